"""New SQLite stores made from a shipped schema instead of their library's own migrations.

Prefect and MLflow create their SQLite database on first use and run every Alembic migration on it:
seconds of a 2-core machine for each new project (Prefect ~9 s, MLflow 1-3 s). For one library version
the result is always the same (tables, indexes, Alembic's version row and whatever rows the migrations
insert), so imgflow ships it as SQL text and creates a new store from it in milliseconds. The library
then finds its schema at the version it expects and migrates nothing; a store of another version is
never made (the files are named by the library version; callers check). Existing files are never touched.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import uuid
from pathlib import Path

VERSION_TABLE = "alembic_version"
"""Where Alembic keeps a database's schema version; a shipped schema must fill it."""


def schema_sql(db: Path, *, header: str) -> str:
    """The SQL text of ``db`` (every table, index and row: run it on a database only migrations
    touched), after ``header`` as ``--`` comment lines."""
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        statements = list(con.iterdump())
    finally:
        con.close()
    comments = [f"-- {line}".rstrip() for line in header.splitlines()]
    return "\n".join([*comments, *statements]) + "\n"


def write_schema(db: Path, path: Path, *, header: str) -> Path:
    """:func:`schema_sql` of ``db`` written to ``path`` (beside it first, then renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(schema_sql(db, header=header))
    os.replace(tmp, path)
    return path


def create_from_schema(sql: str, target: Path) -> bool:
    """Make the SQLite database ``target`` (in an existing folder) from ``sql``, written beside it and
    then linked into place (no reader sees half a file). Returns False, keeping the file, when ``target``
    exists or another process made it meanwhile. Raises sqlite3.Error when ``sql`` fails or leaves no
    schema version row."""
    if target.exists():
        return False
    # SQLite creates the file with the permissions the umask gives (as the library's own would be).
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        con = sqlite3.connect(tmp)
        try:
            con.executescript(sql)
            if not con.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchone():
                raise sqlite3.DatabaseError("the schema has no version row")
        finally:
            con.close()
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()

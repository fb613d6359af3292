"""A new SQLite MLflow store made from MLflow's schema, shipped with imgflow, instead of its migrations.

MLflow creates a SQLite store on first use and runs its ~70 Alembic migrations on it: 1-3 s of a 2-core
machine for each new project's ``.imgflow/mlflow.db`` (and for each test project). For one MLflow version
the result is always the same (tables, indexes, Alembic's version row and the default workspace row the
migrations insert), so ``mlflow-schema-<version>.sql`` beside this module holds it (written by ``python -m
components.registry.store_schema dump`` from MLflow's own table creation and migrations on an empty
database) and :func:`seed_store` makes a new store's file from it (:mod:`components.core.sqlite_schema`).
MLflow then finds its schema current, migrates nothing and creates its ``Default`` experiment as on any
new store. With another MLflow version installed (no file of that name) nothing is written and MLflow
migrates as before; a server URI or an existing file is never touched.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import tempfile
from pathlib import Path

import mlflow

from components.core.sqlite_schema import create_from_schema, write_schema

logger = logging.getLogger(__name__)

SCHEMA_DIR = Path(__file__).resolve().parent


def schema_path(mlflow_version: str | None = None, directory: Path = SCHEMA_DIR) -> Path:
    """The schema file of ``mlflow_version`` (default: the installed MLflow's)."""
    return directory / f"mlflow-schema-{mlflow_version or mlflow.__version__}.sql"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (relative to the working folder, or absolute
    with four slashes); None for any other store, an in-memory database included."""
    if not uri.startswith("sqlite:///"):
        return None
    name = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(name) if name and name != ":memory:" else None


def seed_store(uri: str, *, schema: Path | None = None) -> Path | None:
    """Make the file of a new ``sqlite:///`` store (in an existing folder) from the shipped schema. Returns
    the file written, or None (not a SQLite store, the file or its folder missing, or no usable schema:
    MLflow then handles the URI itself, as without this)."""
    target = sqlite_file(uri)
    source = schema or schema_path()
    if target is None or target.exists() or not target.parent.is_dir() or not source.is_file():
        return None  # (a missing folder stays MLflow's error to report)
    try:
        made = create_from_schema(source.read_text(), target)
    except (OSError, sqlite3.Error, ValueError) as e:  # MLflow creates and migrates the file instead
        logger.debug("MLflow schema %s not used for %s: %s", source, target, e)
        return None
    return target if made else None


def dump_schema(directory: Path = SCHEMA_DIR) -> Path:
    """Write :func:`schema_path` for the installed MLflow into ``directory``: MLflow's own table creation
    and migrations (what its SQLAlchemy store runs on a new database) on an empty temporary file."""
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    with tempfile.TemporaryDirectory(prefix="mlflow-schema-") as tmp:
        db = Path(tmp) / "mlflow.db"
        engine = sqlalchemy.create_engine(f"sqlite:///{db}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        header = (f"The SQLite schema of MLflow {mlflow.__version__} after all its migrations (no data but the "
                  "rows they insert),\nread by components/registry/store_schema.py. Written by `python -m "
                  "components.registry.store_schema dump`: do not edit.")  # fmt: skip
        return write_schema(db, schema_path(directory=directory), header=header)


def main(argv: list[str] | None = None) -> int:
    """``python -m components.registry.store_schema dump [--out DIR]``: write the installed MLflow's
    schema file (after an MLflow upgrade in the lock); ``seed URI``: :func:`seed_store`. Prints the file
    written (nothing when ``seed`` had nothing to do)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m components.registry.store_schema",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("command", choices=["dump", "seed"],
                        help="dump: write the installed MLflow's migrated schema as SQL; seed: make the new "
                             "SQLite store URI names from it")  # fmt: skip
    parser.add_argument("uri", nargs="?", help="seed: the tracking URI (sqlite:///...)")
    parser.add_argument("--out", type=Path, default=SCHEMA_DIR, help="dump: the folder to write into")
    args = parser.parse_args(argv)
    if args.command == "seed" and not args.uri:
        parser.error("seed needs the tracking URI")
    written = dump_schema(args.out) if args.command == "dump" else seed_store(args.uri)
    if written:
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())

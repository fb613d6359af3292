"""New Prefect homes start from a migrated, empty database instead of migrating their own.

Prefect's temporary server creates ``$PREFECT_HOME/prefect.db`` on a home's first run and applies every
schema migration to it: ~8 s of a 2-core machine before the first flow of each new project (a trivial
flow 17-22 s in a fresh home, 10-11 s in the same home again). ``make setup`` builds that database once
per virtual environment (``python -m flows.prefect_home build``: Prefect's own ``prefect server
database upgrade`` on an empty home), and :func:`seed_home` copies it into a home that has no database
yet, so the first run of a project costs what later ones do. The file is named by the installed
Prefect's version: after an upgrade a template of the old schema is never used (Prefect would still
migrate a copied database that is behind, as it migrates the user's own).

Nothing changes where the runs report elsewhere: with ``$PREFECT_API_URL`` set, a database URL in the
environment, or either in the home's ``profiles.toml``, no file is written. A missing or unreadable
template leaves the home as it was, and Prefect creates its database itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path

logger = logging.getLogger(__name__)

DATABASE = "prefect.db"
"""Prefect's default database file under ``$PREFECT_HOME`` (its default connection URL)."""
ELSEWHERE = (
    "PREFECT_API_URL",
    "PREFECT_API_DATABASE_CONNECTION_URL",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",
)
"""Settings under which the runs do not use ``$PREFECT_HOME/prefect.db``."""


def template_path(prefix: str | Path = sys.prefix) -> Path:
    """Where the migrated database of the installed Prefect lives: in the virtual environment, which
    holds that Prefect version and goes away with it."""
    return Path(prefix) / "share" / "imgflow" / f"prefect-{version('prefect')}.db"


def build_template(path: Path | None = None, *, timeout: float = 300) -> Path:
    """Build the template at ``path`` (default :func:`template_path`) with Prefect's own migrations,
    run as ``prefect server database upgrade -y`` on an empty temporary home; written atomically.
    Raises RuntimeError (with Prefect's output) when the migration fails."""
    path = path or template_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ELSEWHERE and k != "PREFECT_PROFILE"}
    with tempfile.TemporaryDirectory(prefix="prefect-home-") as home:
        env["PREFECT_HOME"] = home
        cli = Path(sys.executable).with_name("prefect")
        cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "prefect"]
        done = subprocess.run([*cmd, "server", "database", "upgrade", "-y"], env=env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip
        migrated = Path(home) / DATABASE
        if done.returncode != 0 or not migrated.is_file():
            raise RuntimeError(f"prefect server database upgrade failed ({done.returncode}): "
                               f"{(done.stdout + done.stderr)[-2000:]}")  # fmt: skip
        _copy_database(migrated, path, replace=True)
    path.chmod(0o644)  # readable by whoever uses this environment, as Prefect's own database is
    return path


def seed_home(environ: Mapping[str, str] = os.environ, *, template: Path | None = None) -> Path | None:
    """Copy the template into ``$PREFECT_HOME`` when the runs will use that home's default database
    and it has none yet. Returns the database written, or None (nothing to do, or no usable template:
    Prefect then creates the database itself, as without this)."""
    home = environ.get("PREFECT_HOME")
    if not home or any(environ.get(k) for k in ELSEWHERE):
        return None
    target = Path(home).expanduser() / DATABASE
    if target.exists() or _profile_elsewhere(Path(home).expanduser(), environ.get("PREFECT_PROFILE")):
        return None
    source = template or template_path()
    if not source.is_file():
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_database(source, target)
    except (OSError, sqlite3.Error) as e:  # Prefect migrates a database of its own instead
        logger.debug("Prefect database template %s not used: %s", source, e)
        return None
    return target


def _copy_database(source: Path, target: Path, *, replace: bool = False) -> None:
    """A consistent copy of the SQLite database ``source`` (opened read-only, copied through SQLite's
    backup API) at ``target``, written beside it and then linked into place, so no reader sees half a
    file; an existing ``target`` is kept unless ``replace``. Raises sqlite3.Error when ``source`` is
    not a database with a schema version (Alembic's table, which Prefect keeps)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
        dst = sqlite3.connect(tmp)
        try:
            if not src.execute("SELECT version_num FROM alembic_version").fetchone():
                raise sqlite3.DatabaseError(f"{source} has no schema version")
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        if replace:
            os.replace(tmp, target)
        else:
            with contextlib.suppress(FileExistsError):  # another process seeded it, or Prefect created it
                os.link(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _profile_elsewhere(home: Path, profile: str | None) -> bool:
    """Whether the active profile of ``home/profiles.toml`` names an API or a database URL."""
    try:
        data = tomllib.loads((home / "profiles.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    settings = data.get("profiles", {}).get(profile or data.get("active") or "ephemeral", {})
    return isinstance(settings, dict) and any(settings.get(k) for k in ELSEWHERE)


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.prefect_home build [--force]``: build the template unless it exists (and remove
    templates of other Prefect versions beside it); ``seed``: :func:`seed_home` for ``$PREFECT_HOME``.
    Prints the file (or nothing when ``seed`` had nothing to do)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.prefect_home", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "seed"],
                        help="build: the migrated database of the installed Prefect; seed: copy it into "
                             "$PREFECT_HOME when that home has no database yet")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="build: rebuild it even when it exists")
    args = parser.parse_args(argv)
    if args.command == "seed":
        seeded = seed_home()
        print(seeded or "", end="\n" if seeded else "")
        return 0
    path = template_path()
    if args.force or not path.is_file():
        build_template(path)
    for stale in path.parent.glob("prefect-*.db"):
        if stale != path:
            stale.unlink(missing_ok=True)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

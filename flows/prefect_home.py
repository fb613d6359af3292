"""New Prefect homes start from Prefect's database schema, shipped with imgflow, instead of migrating.

Prefect's temporary server creates ``$PREFECT_HOME/prefect.db`` on a home's first run and applies every
schema migration to it (113 in Prefect 3.8.8): ~8-9 s of a 2-core machine before each new project's
first flow (a trivial flow 17-22 s in a fresh home, 10-12 s in a home whose database exists). The result of those migrations is
the same for every home of one Prefect version (tables, indexes and Alembic's version row; no data), so
imgflow ships it as SQL text (``prefect-schema-<version>.sql`` beside this module, written by ``python -m
flows.prefect_home dump`` from Prefect's own ``prefect server database upgrade`` on an empty home) and
:func:`seed_home` creates a new home's database from it in ~20 ms.

The same module starts that temporary server early (:func:`start_temporary_server`, then
:func:`adopt_temporary_server`): Prefect starts it inside the flow's first API call, after the command
has imported Prefect's server package (~3 s), and then waits ~4 s for it to answer; started as the
command begins, the server boots in its own process while the command imports, and Prefect uses it as
its own.

Only the Prefect version the file is named by uses it: with any other version installed nothing is
written and Prefect migrates as before (``dump`` writes the file for the installed version; a test
checks that the shipped file is what the installed Prefect's migrations produce). Nothing is written
where the runs do not use the home's database either: ``$PREFECT_API_URL`` set, a database URL in the
environment, or either in the active profile of the home's ``profiles.toml``; and a home's existing
database is never touched.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from components.core.sqlite_schema import create_from_schema, write_schema
from flows.environment import prefect_profile

logger = logging.getLogger(__name__)

DATABASE = "prefect.db"
"""Prefect's default database file under ``$PREFECT_HOME`` (its default connection URL)."""
ELSEWHERE = (
    "PREFECT_API_URL",
    "PREFECT_API_DATABASE_CONNECTION_URL",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",
)
"""Settings under which the runs do not use ``$PREFECT_HOME/prefect.db``."""
SCHEMA_DIR = Path(__file__).resolve().parent


def schema_path(prefect_version: str | None = None, directory: Path = SCHEMA_DIR) -> Path:
    """The schema file of ``prefect_version`` (default: the installed Prefect's)."""
    return directory / f"prefect-schema-{prefect_version or version('prefect')}.sql"


def dump_schema(directory: Path = SCHEMA_DIR, *, timeout: float = 300) -> Path:
    """Write :func:`schema_path` for the installed Prefect into ``directory``: Prefect's own migrations
    (``prefect server database upgrade -y``) on an empty temporary home, dumped as SQL. Alembic's table
    rebuilds list a table's constraints in an order that varies from run to run, so a new dump may differ
    from the last in text, not in schema. Raises RuntimeError (with Prefect's output) when the migration
    fails."""
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
        header = (f"The database schema of Prefect {version('prefect')} after all its migrations (no data but "
                  "Alembic's version row),\nread by flows/prefect_home.py. Written by `python -m "
                  "flows.prefect_home dump`: do not edit.")  # fmt: skip
        return write_schema(migrated, schema_path(directory=directory), header=header)


def seed_home(environ: Mapping[str, str] = os.environ, *, schema: Path | None = None) -> Path | None:
    """Create ``$PREFECT_HOME/prefect.db`` from the shipped schema when the runs will use that home's
    default database and it has none yet. Returns the database written, or None (nothing to do, or no
    usable schema: Prefect then creates the database itself, as without this)."""
    home = _local_home(environ)
    target = home / DATABASE if home is not None else None
    if target is None or target.exists():
        return None
    source = schema or schema_path()
    try:
        if not source.is_file():
            return None
        target.parent.mkdir(parents=True, exist_ok=True)  # as Prefect makes its home
        made = create_from_schema(source.read_text(), target)
    except (OSError, sqlite3.Error, ValueError) as e:  # Prefect migrates a database of its own instead
        logger.debug("Prefect schema %s not used: %s", source, e)
        return None
    return target if made else None


PRESTART_PREFECT = "3.8.8"
"""The Prefect version whose temporary server :func:`start_temporary_server` starts as Prefect itself does
(``SubprocessASGIServer._run_uvicorn_command``: the command line and the variables below); with any other
version nothing is started early and Prefect starts its own, as without this."""
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
_NO = ("0", "false", "no", "off")
_EPHEMERAL_SWITCHES = ("PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE")


@dataclass(frozen=True)
class EarlyServer:
    """A temporary Prefect server started before Prefect was imported, not yet handed to Prefect."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"


def start_temporary_server(environ: Mapping[str, str] = os.environ) -> EarlyServer | None:
    """Start the temporary server Prefect would start for a flow run of this process, now: only when the
    run will use one (no ``PREFECT_API_URL`` nor database URL in the environment or the home's active
    profile, ephemeral mode allowed), its home is set (``$PREFECT_HOME``; its database seeded first, see
    :func:`seed_home`: a server started on a home without one migrates it), Prefect is not imported yet
    and is the version :data:`PRESTART_PREFECT` names. The server binds 127.0.0.1 on a free port and is
    stopped when this process exits. None when nothing was started."""
    if (
        "prefect" in sys.modules  # its settings are read: the server it starts is the one it configured
        or _local_home(environ) is None
        or any(environ.get(k, "true").strip().lower() in _NO for k in _EPHEMERAL_SWITCHES)
        or version("prefect") != PRESTART_PREFECT
    ):
        return None
    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a free port (uvicorn exits 3 if taken)
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent),
         "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "error", "--lifespan", "on"],
        env={**environ, **_SERVER_ENV},
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    atexit.register(_stop, process)
    return EarlyServer(process, port)


def adopt_temporary_server(early: EarlyServer | None, *, timeout_s: float | None = None) -> bool:
    """Wait until ``early`` answers ``/api/health``, then make it the temporary server Prefect's clients
    use in this process (Prefect's ``SubprocessASGIServer`` for no fixed port: its ``start`` then returns
    at once, and its ``stop`` runs at exit as for a server Prefect started). True when adopted. Not
    adopted, and stopped, when Prefect's own settings, now read, would not start a temporary server (an
    API URL, ephemeral mode off: Prefect then fails or connects as without this), or the server exited
    (a port taken meanwhile), did not answer within ``timeout_s`` (default: Prefect's own startup
    timeout), or came after Prefect started its own: Prefect then starts or keeps its own."""
    if early is None:
        return False
    import httpx
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        logger.debug("Prefect's settings start no temporary server: the early one is stopped")
        _stop(early.process)
        return False
    server = SubprocessASGIServer()
    deadline = time.monotonic() + (timeout_s or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    with httpx.Client(trust_env=False) as client:  # loopback: never through a proxy
        while not server.running and early.process.poll() is None and time.monotonic() < deadline:
            try:
                if client.get(f"{early.api_url}/health", timeout=2.0).status_code == 200:
                    server.port, server.server_process, server.running = early.port, early.process, True
                    atexit.register(server.stop)
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    logger.debug(
        "the early Prefect server on port %s was not used (exit code %s)", early.port, early.process.poll()
    )
    _stop(early.process)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate ``process`` (this module's server) if it still runs, as Prefect stops its own."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _local_home(environ: Mapping[str, str]) -> Path | None:
    """``$PREFECT_HOME`` when the runs use that home's own database: no API or database URL in the
    environment or in the home's active profile; else None."""
    home = environ.get("PREFECT_HOME")
    if not home or any(environ.get(k) for k in ELSEWHERE):
        return None
    path = Path(home).expanduser()
    return None if _profile_elsewhere(path, environ.get("PREFECT_PROFILE")) else path


def _profile_elsewhere(home: Path, profile: str | None) -> bool:
    """Whether the active profile of ``home/profiles.toml`` names an API or a database URL."""
    settings = prefect_profile(home / "profiles.toml", profile)
    return any(settings.get(k) for k in ELSEWHERE)


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.prefect_home dump [--out DIR]``: write the installed Prefect's schema file (after
    a Prefect upgrade in the lock); ``seed``: :func:`seed_home` for ``$PREFECT_HOME``. Prints the file
    written (nothing when ``seed`` had nothing to do)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.prefect_home", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["dump", "seed"],
                        help="dump: write the installed Prefect's migrated schema as SQL; seed: create "
                             "$PREFECT_HOME/prefect.db from it when that home has no database yet")  # fmt: skip
    parser.add_argument("--out", type=Path, default=SCHEMA_DIR, help="dump: the folder to write into")
    args = parser.parse_args(argv)
    written = dump_schema(args.out) if args.command == "dump" else seed_home()
    if written:
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A new Prefect home starts from the shipped schema, and only where the runs use the home's database."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from flows.prefect_home import DATABASE, dump_schema, schema_path, seed_home
from tests.conftest import sqlite_schema

FLOW = """
from prefect import flow, task

@task
def one():
    return 1

@flow(name="seeded-home")
def seeded():
    return one()

assert seeded() == 1
"""


def _fake_schema(path: Path, version: str = "abc123") -> Path:
    path.write_text(f"CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL);\n"
                    f"INSERT INTO alembic_version VALUES ('{version}');\n")  # fmt: skip
    return path


def _prefect_head() -> list[str]:
    """The newest SQLite migration of the installed Prefect (read from its scripts, nothing migrated)."""
    import importlib.util

    from alembic.script import ScriptDirectory

    spec = importlib.util.find_spec("prefect")
    assert spec is not None and spec.origin is not None
    scripts = Path(spec.origin).parent / "server" / "database" / "_migrations"
    return list(
        ScriptDirectory(str(scripts), version_locations=[str(scripts / "versions" / "sqlite")]).get_heads()
    )


def test_shipped_schema_is_at_the_installed_prefects_newest_migration(tmp_path: Path) -> None:
    shipped = schema_path()
    assert shipped.is_file(), (
        f"no schema for this Prefect: run `python -m flows.prefect_home dump` ({shipped})"
    )
    seeded = seed_home({"PREFECT_HOME": str(tmp_path / "home")})
    assert seeded == tmp_path / "home" / DATABASE
    objects, versions = sqlite_schema(seeded)
    assert [v for (v,) in versions] == _prefect_head()
    tables = {name for kind, name, _, _ in objects if kind == "table"}
    assert {"flow", "flow_run", "task_run", "deployment", "work_pool", "block_document"} <= tables


@pytest.mark.slow
def test_shipped_schema_is_prefects_own_and_a_seeded_home_keeps_its_flow_runs(tmp_path: Path) -> None:
    """What the shipped file builds equals what Prefect's migrations build now (the fast test above
    checks the version only), and Prefect's temporary server runs a flow on it and keeps the run."""
    dumped = dump_schema(tmp_path)  # Prefect's own migrations on an empty home, now
    home = tmp_path / "home"
    seeded = seed_home({"PREFECT_HOME": str(home)})
    assert seeded == home / DATABASE
    migrated = tmp_path / "migrated"
    assert seed_home({"PREFECT_HOME": str(migrated)}, schema=dumped) == migrated / DATABASE
    expected = sqlite_schema(migrated / DATABASE)
    assert sqlite_schema(seeded) == expected  # the shipped file builds what the migrations do
    assert expected[1] and len(expected[0]) > 100

    env = {"PATH": "/usr/bin:/bin", "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    run = subprocess.run([sys.executable, "-c", FLOW], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _flow_runs(seeded) == [("seeded-home", "COMPLETED")]  # the server used the seeded database
    with sqlite3.connect(seeded) as con:
        assert con.execute("SELECT count(*) FROM task_run").fetchone()[0] == 1
    assert sqlite_schema(seeded) == expected  # Prefect found nothing to migrate

    # A home's database is never replaced.
    assert seed_home({"PREFECT_HOME": str(home)}) is None
    with sqlite3.connect(seeded) as con:
        assert con.execute("SELECT count(*) FROM flow_run").fetchone()[0] == 1


@pytest.mark.parametrize(
    "environ",
    [
        {"PREFECT_API_URL": "http://127.0.0.1:4200/api"},
        {"PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://db/prefect"},
        {"PREFECT_SERVER_DATABASE_CONNECTION_URL": "sqlite+aiosqlite:////elsewhere.db"},
    ],
)
def test_no_database_is_written_where_runs_report_elsewhere(tmp_path: Path, environ: dict[str, str]) -> None:
    schema = _fake_schema(tmp_path / "s.sql")
    home = tmp_path / "home"
    assert seed_home({"PREFECT_HOME": str(home), **environ}, schema=schema) is None
    assert not home.exists()


def test_a_profile_naming_a_server_or_database_is_respected(tmp_path: Path) -> None:
    schema, home = _fake_schema(tmp_path / "s.sql"), tmp_path / "home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "remote"\n[profiles.remote]\nPREFECT_API_URL = "http://127.0.0.1:4200/api"\n[profiles.local]\n'
    )
    assert seed_home({"PREFECT_HOME": str(home)}, schema=schema) is None
    local = {"PREFECT_HOME": str(home), "PREFECT_PROFILE": "local"}
    assert seed_home(local, schema=schema) == home / DATABASE
    assert sqlite_schema(home / DATABASE)[1] == [("abc123",)]


def test_missing_or_broken_schema_leaves_the_home_to_prefect(tmp_path: Path) -> None:
    home = tmp_path / "home"
    # No PREFECT_HOME: no home to seed.
    assert seed_home({}, schema=_fake_schema(tmp_path / "s.sql")) is None
    assert seed_home({"PREFECT_HOME": str(home)}, schema=tmp_path / "absent.sql") is None
    assert schema_path("0.0.0-none").name == "prefect-schema-0.0.0-none.sql"  # another Prefect: no file
    assert not schema_path("0.0.0-none").exists()
    broken = tmp_path / "broken.sql"
    broken.write_text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL);\nNOT SQL AT ALL;\n")
    assert seed_home({"PREFECT_HOME": str(home)}, schema=broken) is None
    unversioned = tmp_path / "unversioned.sql"
    unversioned.write_text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL);\n")
    assert seed_home({"PREFECT_HOME": str(home)}, schema=unversioned) is None
    assert list(home.iterdir()) == []  # no half-written database, no temporary left

    existing = home / DATABASE
    existing.write_bytes(b"the user's own")
    assert seed_home({"PREFECT_HOME": str(home)}, schema=_fake_schema(tmp_path / "s2.sql")) is None
    assert existing.read_bytes() == b"the user's own"


# --------------------------------------------------------------------------- the early temporary server

EARLY = """
import json, sys
import psutil
from flows.prefect_home import adopt_temporary_server, seed_home, start_temporary_server

seed_home()
early = start_temporary_server()
assert early is not None
if sys.argv[1] == "gone":  # the early server dies before it is handed over: Prefect starts its own
    early.process.kill()
    early.process.wait()
from prefect import flow, task

adopted = adopt_temporary_server(early)
if sys.argv[1] == "off":  # the home's profile turns ephemeral mode off: nothing adopted, the server stopped
    print(json.dumps({"early": early.process.pid, "adopted": adopted, "exit": early.process.poll()}))
    sys.exit(0)

@task
def one():
    return 1

@flow(name="early-server")
def run():
    return one()

assert run() == 1
servers = [c.pid for c in psutil.Process().children() if "uvicorn" in " ".join(c.cmdline())]
print(json.dumps({"early": early.process.pid, "adopted": adopted, "servers": servers}))
"""


def _early_run(tmp_path: Path, case: str) -> tuple[dict, Path]:
    import json

    home = tmp_path / "home"
    if case == "off":  # an active profile without Prefect's default PREFECT_SERVER_EPHEMERAL_ENABLED
        home.mkdir()
        (home / "profiles.toml").write_text(
            'active = "quiet"\n[profiles.quiet]\nPREFECT_LOGGING_LEVEL = "WARNING"\n'
        )
    env = {"PATH": "/usr/bin:/bin", "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # fmt: skip
    run = subprocess.run([sys.executable, "-c", EARLY, case], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), home / DATABASE


def _flow_runs(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as con:
        return con.execute(
            "SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id"
        ).fetchall()


def test_the_early_server_is_the_one_prefect_uses_and_stops_with_the_process(tmp_path: Path) -> None:
    """`imgflow pipeline` starts Prefect's temporary server before importing Prefect: the flow runs on
    that server (the only one the process started), its run lands in the seeded home, and the server is
    gone when the process exits."""
    import psutil

    seen, db = _early_run(tmp_path, "adopt")
    assert seen["adopted"] is True
    assert seen["servers"] == [seen["early"]]
    assert _flow_runs(db) == [("early-server", "COMPLETED")]
    assert not psutil.pid_exists(seen["early"]) or "uvicorn" not in " ".join(
        psutil.Process(seen["early"]).cmdline()
    )


def test_an_early_server_is_stopped_where_prefects_settings_start_none(tmp_path: Path) -> None:
    """Prefect's own resolved settings decide: a profile that leaves ephemeral mode off gets no server."""
    seen, _db = _early_run(tmp_path, "off")
    assert seen["adopted"] is False
    assert seen["exit"] is not None  # stopped, not left running


@pytest.mark.slow
def test_an_early_server_that_died_is_not_used_and_prefect_starts_its_own(tmp_path: Path) -> None:
    seen, db = _early_run(tmp_path, "gone")
    assert seen["adopted"] is False
    assert len(seen["servers"]) == 1 and seen["servers"] != [seen["early"]]
    assert _flow_runs(db) == [("early-server", "COMPLETED")]


CONDITIONS = """
import json, sys
from flows.prefect_home import start_temporary_server

cases = json.loads(sys.argv[1])
print(json.dumps([start_temporary_server(env) is None for env in cases]))
import prefect  # once Prefect is imported, its own settings decide: nothing is started early
print(json.dumps(start_temporary_server(cases[-1]) is None))
"""


def test_no_early_server_where_runs_report_elsewhere_or_prefect_decides(tmp_path: Path) -> None:
    import json

    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "profiles.toml").write_text(
        'active = "r"\n[profiles.r]\nPREFECT_API_URL = "http://127.0.0.1:4200/api"\n'
    )
    home = str(tmp_path / "home")
    cases = [
        {},  # no home
        {"PREFECT_HOME": home, "PREFECT_API_URL": "http://127.0.0.1:4200/api"},
        {"PREFECT_HOME": home, "PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://db/prefect"},
        {"PREFECT_HOME": home, "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false"},
        {"PREFECT_HOME": home, "PREFECT_SERVER_EPHEMERAL_ENABLED": "0"},
        {"PREFECT_HOME": str(remote)},  # the home's active profile names a server
    ]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, "-c", CONDITIONS, json.dumps([*cases, {"PREFECT_HOME": home}])],
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    before, after = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
    assert before == [True] * len(cases) + [False]  # only the plain local home starts one (stopped at exit)
    assert after is True

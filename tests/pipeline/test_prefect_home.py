"""A new Prefect home starts from the migrated template database, and only where the runs use it."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from flows.prefect_home import DATABASE, build_template, main, seed_home, template_path

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


def _version(db: Path) -> str:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def _fake_template(path: Path, version: str = "abc123") -> Path:
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        con.execute("INSERT INTO alembic_version VALUES (?)", (version,))
    return path


def test_built_template_seeds_a_new_home_whose_flow_runs_are_kept(tmp_path: Path) -> None:
    template = build_template(tmp_path / "share" / "prefect-test.db")  # Prefect's own migrations
    assert _version(template) and not list(template.parent.glob("*.tmp"))
    home = tmp_path / "home"
    seeded = seed_home({"PREFECT_HOME": str(home)}, template=template)
    assert seeded == home / DATABASE and _version(seeded) == _version(template)

    run = subprocess.run([sys.executable, "-c", FLOW], env={"PATH": "/usr/bin:/bin", "PREFECT_HOME": str(home),
                         "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    with sqlite3.connect(seeded) as con:  # the temporary server used the seeded database, and kept the run
        runs = con.execute("SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id")
        assert runs.fetchall() == [("seeded-home", "COMPLETED")]
        assert con.execute("SELECT count(*) FROM task_run").fetchone()[0] == 1
    assert _version(seeded) == _version(template)  # Prefect found nothing to migrate

    # A home's database is never replaced.
    assert seed_home({"PREFECT_HOME": str(home)}, template=template) is None
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
    template = _fake_template(tmp_path / "t.db")
    home = tmp_path / "home"
    assert seed_home({"PREFECT_HOME": str(home), **environ}, template=template) is None
    assert not home.exists()


def test_a_profile_naming_a_server_or_database_is_respected(tmp_path: Path) -> None:
    template, home = _fake_template(tmp_path / "t.db"), tmp_path / "home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "remote"\n[profiles.remote]\nPREFECT_API_URL = "http://127.0.0.1:4200/api"\n[profiles.local]\n'
    )
    assert seed_home({"PREFECT_HOME": str(home)}, template=template) is None
    local = {"PREFECT_HOME": str(home), "PREFECT_PROFILE": "local"}
    assert seed_home(local, template=template) == home / DATABASE


def test_missing_or_broken_template_leaves_the_home_to_prefect(tmp_path: Path) -> None:
    home = tmp_path / "home"
    # No PREFECT_HOME: no home to seed.
    assert seed_home({}, template=_fake_template(tmp_path / "t.db")) is None
    assert seed_home({"PREFECT_HOME": str(home)}, template=tmp_path / "absent.db") is None
    assert not (home / DATABASE).exists()
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"not a database" * 100)
    assert seed_home({"PREFECT_HOME": str(home)}, template=broken) is None
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()  # a database without Prefect's schema version
    assert seed_home({"PREFECT_HOME": str(home)}, template=empty) is None
    assert list(home.iterdir()) == []  # no half-written file, no temporary left

    existing = home / DATABASE
    existing.write_bytes(b"the user's own")
    assert seed_home({"PREFECT_HOME": str(home)}, template=_fake_template(tmp_path / "t2.db")) is None
    assert existing.read_bytes() == b"the user's own"


def test_template_is_named_by_prefect_version_and_setup_built_it(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    path = template_path()
    assert path.name == f"prefect-{version('prefect')}.db"
    assert path.parent == Path(sys.prefix) / "share" / "imgflow"
    assert main(["build"]) == 0  # `make setup` built it: nothing to do but print where it is
    assert capsys.readouterr().out.strip() == str(path) and _version(path)

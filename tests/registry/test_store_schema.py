"""A new SQLite MLflow store is made from the shipped schema: MLflow's own, and MLflow works on it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components.registry import tracking
from components.registry.store_schema import dump_schema, schema_path, seed_store, sqlite_file
from tests.conftest import sqlite_schema


def test_shipped_schema_is_mlflows_own_and_a_seeded_store_works(tmp_path: Path) -> None:
    shipped = schema_path()
    assert shipped.is_file(), "no schema for this MLflow: `python -m components.registry.store_schema dump`"
    dumped = dump_schema(tmp_path)  # MLflow's own table creation and migrations, now
    migrated = tmp_path / "migrated.db"
    assert seed_store(f"sqlite:///{migrated}", schema=dumped) == migrated

    uri = tracking.configure(None, state_dir=tmp_path / "state")  # a new project's store
    store = tmp_path / "state" / "mlflow.db"
    assert uri == f"sqlite:///{store}" and store.is_file()
    assert sqlite_schema(store) == sqlite_schema(migrated)  # the shipped file builds what the migrations do
    from mlflow.store.db.utils import _get_latest_schema_revision

    assert sqlite_schema(store)[1] == [(_get_latest_schema_revision(),)]
    with sqlite3.connect(store) as con:
        assert con.execute("SELECT count(*) FROM experiments").fetchone()[0] == 0  # MLflow makes Default

    client = MlflowClient(uri)  # MLflow's schema check passes, and runs, models and aliases work on it
    assert [e.name for e in client.search_experiments()] == ["Default"]
    exp = client.create_experiment("seeded", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "accuracy", 0.9)
    client.create_registered_model("seeded-model")
    version = client.create_model_version("seeded-model", source=f"runs:/{run.info.run_id}/model")
    client.set_registered_model_alias("seeded-model", "champion", version.version)
    assert client.get_model_version_by_alias("seeded-model", "champion").version == version.version
    assert client.get_run(run.info.run_id).data.metrics == {"accuracy": 0.9}
    assert sqlite_schema(store)[1] == sqlite_schema(migrated)[1]  # nothing was migrated

    before = store.read_bytes()  # configuring again leaves the store alone
    tracking.configure(None, state_dir=tmp_path / "state")
    assert seed_store(uri) is None and store.read_bytes() == before


def test_only_a_new_sqlite_file_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sqlite_file("sqlite:////abs/mlflow.db") == Path("/abs/mlflow.db")
    assert sqlite_file("sqlite:///rel/mlflow.db?timeout=5") == Path("rel/mlflow.db")
    for other in (
        "http://127.0.0.1:5000",
        "postgresql://db/mlflow",
        "file:///tmp/mlruns",
        "sqlite:///:memory:",
    ):
        assert sqlite_file(other) is None and seed_store(other) is None
    monkeypatch.chdir(tmp_path)
    assert seed_store("sqlite:///rel/mlflow.db") is None and not (tmp_path / "rel").exists()  # no folder made
    (tmp_path / "rel").mkdir()
    assert seed_store("sqlite:///rel/mlflow.db") == Path("rel/mlflow.db")  # relative to the working folder
    assert (tmp_path / "rel" / "mlflow.db").is_file()
    # The seeded file's permissions are a new file's (the umask's).
    (tmp_path / "rel" / "plain").write_bytes(b"")
    assert (tmp_path / "rel" / "mlflow.db").stat().st_mode == (tmp_path / "rel" / "plain").stat().st_mode

    existing = tmp_path / "own.db"
    existing.write_bytes(b"the user's own")
    assert seed_store(f"sqlite:///{existing}") is None and existing.read_bytes() == b"the user's own"


def test_missing_or_broken_schema_leaves_the_store_to_mlflow(tmp_path: Path) -> None:
    target = tmp_path / "store" / "mlflow.db"
    target.parent.mkdir()
    uri = f"sqlite:///{target}"
    assert not schema_path("0.0.0-none").exists()  # another MLflow: no file, nothing written
    assert seed_store(uri, schema=schema_path("0.0.0-none")) is None
    broken = tmp_path / "broken.sql"
    broken.write_text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL);\nNOT SQL;\n")
    assert seed_store(uri, schema=broken) is None
    assert not target.exists() and list(target.parent.iterdir()) == []  # no half-written file, no temporary
    assert [e.name for e in MlflowClient(uri).search_experiments()] == ["Default"]  # MLflow makes it itself

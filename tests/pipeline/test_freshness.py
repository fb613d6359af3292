"""Retrain only on change: the training fingerprint, the verdict, and the champion's tags read from a
real (sqlite) MLflow registry."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow
import pytest

from components.core.config import load_params
from components.pipeline.freshness import decide, training_fingerprint
from components.registry import tracking
from tests.conftest import BIN, write_small_params


@pytest.fixture()
def params_file(tmp_path: Path) -> Path:
    return write_small_params(tmp_path)


def test_fingerprint_ignores_names_paths_and_notifications(params_file: Path) -> None:
    base = training_fingerprint(load_params(params_file))
    for same in ("register.model_name=other", "register.tracking_uri=http://x:5000", "project.output_dir=elsewhere",
                 "notify.webhook_url=http://127.0.0.1:1/h", "train.loader_workers=3", "evaluate.batch_size=64"):  # fmt: skip
        assert training_fingerprint(load_params(params_file, [same])) == base, same
    for different in ("train.epochs=9", "project.seed=1", "gates.min_accuracy=0.6", "audit.action=exclude",
                      "split.val_fraction=0.2", "ingest.max_per_class=7"):  # fmt: skip
        assert training_fingerprint(load_params(params_file, [different])) != base, different


def test_decide_covers_every_case() -> None:
    now = {"data_version": "d1", "training_params_hash": "p1"}
    champ = {**now, "version": "4", "run_id": "r4"}
    assert decide(**now, champion=None).reason == "no champion yet"
    up = decide(**now, champion=champ)
    assert not up.retrain and up.status == "up to date" and up.champion_version == "4"
    forced = decide(**now, champion=champ, force=True)
    assert forced.retrain and forced.forced and forced.reason == "forced (--force)"
    data = decide(data_version="d2", training_params_hash="p1", champion=champ)
    assert data.retrain and data.reason == "changed since champion: data version d1 -> d2"
    both = decide(data_version="d2", training_params_hash="p2", champion=champ)
    assert "data version d1 -> d2; training params p1 -> p2" in both.reason
    old = decide(**now, champion={"data_version": "d1", "version": "1"})  # trained before the tag existed
    assert old.retrain and "training params (not recorded) -> p1" in old.reason


def test_alias_provenance_merges_version_and_training_run_tags(tmp_path: Path) -> None:
    uri = tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}", state_dir=tmp_path)
    assert tracking.alias_provenance("m", tracking.CHAMPION) is None  # no model at all
    exp = tracking.ensure_experiment("e", artifact_root=tmp_path / "art")
    run = tracking.start_run(exp, run_name="t", params={}, tags={"data_version": "d1", "training_params_hash": "p1"},
                             tracking_uri=uri)  # fmt: skip
    client = mlflow.MlflowClient()
    client.create_registered_model("m")
    mv = client.create_model_version(
        "m", source=(tmp_path / "art").as_uri(), run_id=run.run_id, tags={"gates_passed": "true"}
    )
    assert tracking.alias_provenance("m", tracking.CHAMPION) is None  # no champion alias yet
    client.set_registered_model_alias("m", tracking.CHAMPION, mv.version)
    got = tracking.alias_provenance("m", tracking.CHAMPION)
    assert got is not None
    assert (
        got["version"],
        got["run_id"],
        got["data_version"],
        got["training_params_hash"],
        got["gates_passed"],
    ) == ("1", run.run_id, "d1", "p1", "true")
    assert not decide(data_version="d1", training_params_hash="p1", champion=got).retrain

    # someone deletes the champion's training run, then garbage-collects it: retrain, never an error
    client.delete_run(run.run_id)
    deleted = tracking.alias_provenance("m", tracking.CHAMPION)
    assert deleted is not None and deleted["training_run_missing"] == "true"
    verdict = decide(data_version="d1", training_params_hash="p1", champion=deleted)
    assert verdict.retrain and f"training run {run.run_id} is gone" in verdict.reason
    gc = subprocess.run([str(BIN / "mlflow"), "gc", "--backend-store-uri", uri, "--run-ids", run.run_id],
                        capture_output=True, text=True, timeout=120)  # fmt: skip
    assert gc.returncode == 0, gc.stderr
    gone = tracking.alias_provenance("m", tracking.CHAMPION)
    assert gone is not None and gone["training_run_missing"] == "true" and gone["gates_passed"] == "true"

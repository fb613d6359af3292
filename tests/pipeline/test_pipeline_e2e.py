"""End to end: `imgflow pipeline` on a small real Fashion-MNIST subset, then the registry.

One pipeline run (session fixture) is shared by these tests; each checks one promise of it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3

import mlflow
import numpy as np
import pandas as pd
import pytest

from components.data.manifest import DataPaths, data_version, read_manifest
from tests.conftest import FMNIST_CLASSES, fmnist_arrays, png_bytes, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def done(pipeline_project: dict) -> dict:
    proc = pipeline_project["proc"]
    assert proc.returncode == 0, (
        f"pipeline failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return pipeline_project


def _models(project) -> list[dict]:
    proc = run_cli("models", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _use_store(project) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{project / '.imgflow' / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{project / '.imgflow' / 'mlflow.db'}")


def test_pipeline_prints_run_version_and_ui(done: dict) -> None:
    out = done["proc"].stdout
    assert "MLflow run" in out and "registered     imgflow-test version 1" in out
    assert "champion" in out and "mlflow ui --backend-store-uri sqlite:///" in out


STAGES = ("ingest", "check", "validate", "audit", "baseline", "train", "evaluate", "register")


def test_console_is_one_line_per_stage_without_library_noise(done: dict) -> None:
    """The default console: a line per stage, progress bars and the summary; no Python warnings
    from libraries (UserWarning, FutureWarning...), no per-rank Ray report lines, no Prefect INFO."""
    proc = done["proc"]
    lines = (proc.stdout + proc.stderr).rstrip("\n").split("\n")  # a bar's redraws (\r) are one line
    assert not [line for line in lines if "Warning" in line]
    assert not [line for line in lines if "Reporting training result" in line]
    assert not [line for line in lines if "Finished in state" in line or "Beginning flow run" in line]
    for stage in STAGES:
        assert len([line for line in lines if line.startswith(f"{stage:<9} ")]) == 1, (stage, lines)
    assert "corruption sweep" in proc.stderr  # the long steps draw a progress bar
    assert len(lines) <= 30, "\n".join(lines)


TASKS = {
    "ingest-images", "check-retrain-needed", "validate-manifest", "audit-labels", "clip-baseline",
    "train-model-on-ray", "evaluate-and-gate", "register-model", "notify-webhook",
}  # fmt: skip


def test_flow_run_history_is_in_the_projects_prefect_home(done: dict) -> None:
    """No server and no Prefect variables (as `make demo` runs): the run and its tasks land in the
    database of ``<state_dir>/prefect``, the home `make ui` serves, not in a temporary one elsewhere."""
    db = done["prefect_home"] / "prefect.db"
    assert db.is_file(), sorted(p.name for p in done["project"].glob(".*"))
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        flows = con.execute(
            "SELECT flow.name, flow_run.state_type FROM flow_run JOIN flow ON flow.id = flow_run.flow_id"
        )
        assert [tuple(r) for r in flows] == [("imgflow-pipeline", "COMPLETED")]
        tasks = con.execute("SELECT name, state_type FROM task_run").fetchall()
    # task run names: "<task> [<what it does>]"
    assert {name.split(" [")[0] for name, _ in tasks} == TASKS
    assert {state for _, state in tasks} == {"COMPLETED"}


def test_audit_and_baseline_run_beside_training(done: dict) -> None:
    """With ``audit.action: report`` and a CPU baseline off Ray, training reads neither: both task runs
    start once validation has passed and before training ends, and evaluate starts after both."""
    db = done["prefect_home"] / "prefect.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        rows = con.execute("SELECT name, start_time, end_time FROM task_run").fetchall()
    runs = {name.split(" [")[0]: (start, end) for name, start, end in rows}  # ISO times: they sort as text
    train_start, train_end = runs["train-model-on-ray"]
    for side in ("audit-labels", "clip-baseline"):
        start, end = runs[side]
        assert runs["validate-manifest"][1] <= start < train_end, (side, runs)
        assert end <= runs["evaluate-and-gate"][0], (side, runs)
    assert train_start < runs["audit-labels"][1], runs  # the audit ran while training did


def test_offline_pipeline_records_the_clip_baseline_as_skipped(done: dict) -> None:
    project = done["project"]  # no CLIP weights ship and HF_HUB_OFFLINE=1: skipped, not failed
    record = json.loads((project / "outputs" / "baseline" / "baseline.json").read_text())
    assert record["status"] == "skipped" and record["reason"].startswith("skipped: weights unavailable")
    assert "CLIP baseline  skipped: weights unavailable" in done["proc"].stdout
    client = mlflow.MlflowClient(f"sqlite:///{project / '.imgflow' / 'mlflow.db'}")
    run = client.get_run(record["mlflow_runs"]["skipped"])
    assert run.data.tags["baseline_status"] == "skipped" and run.info.status == "FINISHED"


def test_registered_version_is_champion_with_provenance(done: dict) -> None:
    project = done["project"]
    (v1,) = _models(project)
    assert v1["aliases"] == ["candidate", "challenger", "champion"]
    assert v1["gates_passed"] is True
    assert v1["metrics"]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert v1["tags"]["data_version"] == data_version(DataPaths(project / "data").manifest)
    assert v1["tags"]["git_commit"]  # 'unknown' outside a checkout, a sha inside one
    run = mlflow.MlflowClient(f"sqlite:///{project / '.imgflow' / 'mlflow.db'}").get_run(v1["run_id"])
    assert run.data.params["train.epochs"] == "8"
    assert "val_accuracy" in run.data.metrics and run.data.tags["data_version"] == v1["tags"]["data_version"]


def test_champion_loads_by_alias_and_predicts_real_images(done: dict) -> None:
    _use_store(done["project"])
    model = mlflow.pyfunc.load_model("models:/imgflow-test@champion")
    x, y = fmnist_arrays("t10k", 64)
    out = model.predict(pd.DataFrame({"image": [png_bytes(a) for a in x]}))
    assert list(out.columns)[:4] == ["labels", "label", "score", "probabilities"] and len(out) == 64
    # The champion ships its OOD detector and conformal sets (fitted by evaluate, copied by register).
    assert set(out.columns[4:]) == {"ood_score", "ood", "prediction_set"}
    assert (
        np.isfinite(out["ood_score"].astype(float)).all()
        and out["ood"].map(lambda v: v in (True, False)).all()
    )
    assert all(set(s) <= set(FMNIST_CLASSES) for s in out["prediction_set"])
    assert (out["labels"].map(list) == out["label"].map(lambda x: [x])).all()  # single-label: the top class
    probs = np.array(out["probabilities"].tolist())
    assert probs.shape == (64, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert set(out["label"]) <= set(FMNIST_CLASSES)
    accuracy = float(np.mean([FMNIST_CLASSES[i] == lab for i, lab in zip(y, out["label"], strict=True)]))
    assert accuracy > 0.3  # 10 classes: chance is 0.1
    # JSON clients send base64 text: same answer.
    b64 = model.predict(pd.DataFrame({"image": [base64.b64encode(png_bytes(x[0])).decode()]}))
    assert b64["label"][0] == out["label"][0]


def test_served_model_reproduces_the_evaluated_accuracy(done: dict) -> None:
    """Raw stored bytes through the registered pyfunc give exactly the evaluate stage's accuracy, with
    the flip TTA the auto recipe gives the small net (evaluate runs a fused copy, serving does not)."""
    project = done["project"]
    assert json.loads((project / "outputs" / "train" / "model" / "model.json").read_text())["tta"] == "hflip"
    _use_store(project)
    model = mlflow.pyfunc.load_model("models:/imgflow-test@champion")
    test = read_manifest(DataPaths(project / "data").manifest).query("split == 'test'")
    images = [(project / "data" / p).read_bytes() for p in test["path"]]
    out = model.predict(pd.DataFrame({"image": images}))
    accuracy = float(np.mean(out["label"].to_numpy() == test["label"].to_numpy()))
    (v1,) = [v for v in _models(project) if v["version"] == "1"]
    assert accuracy == pytest.approx(v1["metrics"]["test_accuracy"], abs=1e-9)


def test_served_model_rejects_non_images(done: dict) -> None:
    _use_store(done["project"])
    model = mlflow.pyfunc.load_model("models:/imgflow-test@champion")
    with pytest.raises(Exception, match="not a decodable image"):
        model.predict(pd.DataFrame({"image": [b"this is not a png"]}))


def test_failed_gates_register_a_candidate_but_keep_champion(done: dict) -> None:
    project = done["project"]
    ev = run_cli("evaluate", "--set", "gates.min_accuracy=0.999", cwd=project)
    assert ev.returncode == 0, ev.stderr
    reg = run_cli("register", cwd=project)
    assert reg.returncode == 3, reg.stderr
    assert "NOT promoted" in reg.stderr and "accuracy" in reg.stderr and "< 0.999" in reg.stderr
    v2, v1 = _models(project)
    assert v2["version"] == "2" and v2["aliases"] == ["candidate"] and v2["gates_passed"] is False
    assert v1["aliases"] == ["challenger", "champion"]

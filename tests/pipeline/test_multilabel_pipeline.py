"""Must-show of the multi-label issue: `imgflow make-composites` then `imgflow pipeline` on the real
multi-label composites (Fashion-MNIST items, two per canvas for most), through the real Prefect
server, local Ray and the sqlite MLflow registry. The registered model returns label sets."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
import yaml

from tests.conftest import run_cli, write_small_params


@pytest.fixture(scope="module")
def composites_run(tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> dict:
    project = tmp_path_factory.mktemp("multilabel")
    write_small_params(project, epochs=20)
    made = run_cli("make-composites", "comp", "--train", "900", "--test", "300", "--json", cwd=project)
    assert made.returncode == 0, made.stderr[-3000:]
    params_file = Path(json.loads(made.stdout)["params"])
    # a small model on 810 canvases: gates sized for it (the report still shows every value)
    params = yaml.safe_load((project / params_file).read_text())
    params["train"].update(batch_size=32, lr=0.003)
    params["gates"].update(min_map=0.5, min_label_ap=0.2, min_slice_accuracy=0.0)
    # The multi-label corruption sweep is checked by tests/evaluate/test_multilabel_eval.py: not again here.
    params["evaluate"]["robustness"]["enabled"] = False
    (project / params_file).write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run_cli("pipeline", "--params", str(params_file), "--json", cwd=project,
                   env={"PREFECT_API_URL": prefect_server})  # fmt: skip
    return {"project": project, "proc": proc, "params": params, "params_file": str(params_file),
            "prefect_api": prefect_server}  # fmt: skip


@pytest.mark.e2e
def test_pipeline_on_composites_registers_a_model_that_predicts_label_sets(composites_run: dict) -> None:
    proc, project = composites_run["proc"], composites_run["project"]
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout)
    assert result["ingest"]["task"] == "multilabel"
    evaluated, registered = result["evaluate"], result["register"]
    assert evaluated["task"] == "multilabel" and evaluated["mAP"] >= 0.5
    assert registered["gates_passed"] and "champion" in registered["aliases"]

    # the gate report shows per-label AP and the thresholds tuned on val
    out = project / "comp" / "outputs" / "evaluate"
    gates = json.loads((out / "gates.json").read_text())
    classes = json.loads((project / "comp" / "data" / "dataset.json").read_text())["classes"]
    assert len(gates["thresholds"]) == len(classes) == 10
    assert all(0.0 < t < 1.0 for t in gates["thresholds"])
    html = (out / "report.html").read_text()
    assert "AP" in html and "threshold" in html.lower()
    for label in ("Ankle boot", "Trouser"):
        assert label in html

    # the registered pyfunc returns label sets (thresholds and temperature travel with it)
    mlflow.set_tracking_uri(f"sqlite:///{project / '.imgflow' / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{project / '.imgflow' / 'mlflow.db'}")
    name = composites_run["params"]["register"]["model_name"]
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    labels = pd.read_csv(project / "comp" / "labels.csv")
    test = labels[labels["split"] == "test"].head(60)
    images = [(project / "comp" / p).read_bytes() for p in test["path"]]
    pred = model.predict(pd.DataFrame({"image": images}))
    truth = [set(s.split("|")) for s in test["labels"]]
    got = [set(s) for s in pred["labels"]]
    assert all(s <= set(classes) for s in got)
    assert any(len(s) == 2 for s in got)  # label sets, not one class per image
    hits = sum(len(g & t) for g, t in zip(got, truth, strict=True))
    precision, recall = hits / max(1, sum(map(len, got))), hits / sum(map(len, truth))
    assert precision > 0.6 and recall > 0.6, (precision, recall)


@pytest.mark.e2e
def test_flow_run_is_recorded_by_the_prefect_server(composites_run: dict) -> None:
    """With $PREFECT_API_URL set, the run and its tasks are the server's (the default, serverless
    run's history: tests/pipeline/test_pipeline_e2e.py)."""
    assert composites_run["proc"].returncode == 0
    api = composites_run["prefect_api"]
    # Runs of deployments (tests/pipeline/test_deploy.py schedules some on the same server) are not this run.
    no_deployment = {"flow_runs": {"deployment_id": {"is_null_": True}}}
    runs = httpx.post(f"{api}/flow_runs/filter", json=no_deployment, timeout=30).json()
    runs = [r for r in runs if r["parameters"].get("params_path") == composites_run["params_file"]]
    assert [r["state_type"] for r in runs] == ["COMPLETED"]
    body = {"flow_runs": {"id": {"any_": [runs[0]["id"]]}}}
    tasks = httpx.post(f"{api}/task_runs/filter", json=body, timeout=30).json()
    names = {t["name"].split(" [")[0] for t in tasks}  # task run names: "<task> [<what it does>]"
    assert {"ingest-images", "validate-manifest", "clip-baseline", "train-model-on-ray", "evaluate-and-gate",
            "register-model"} <= names  # fmt: skip
    assert {t["state_type"] for t in tasks} == {"COMPLETED"}


@pytest.mark.e2e
def test_batch_prediction_writes_label_sets(composites_run: dict) -> None:
    project = composites_run["project"]
    assert composites_run["proc"].returncode == 0
    name = composites_run["params"]["register"]["model_name"]
    proc = run_cli("predict", "comp/images/test", "--params", "comp/params.yaml", "--model", f"models:/{name}@champion",
                   "--out", "preds.parquet", "--json", cwd=project)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = pd.read_parquet(project / "preds.parquet")
    assert len(preds) == 300 and preds["error"].isna().all()
    assert preds["labels"].map(len).between(0, 10).all() and (preds["labels"].map(len) == 2).any()


@pytest.mark.e2e
def test_served_model_answers_with_label_sets(composites_run: dict, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from components.core.config import load_params
    from components.pipeline.models import load_predictor
    from components.serve.serving import create_app

    project = composites_run["project"]
    assert composites_run["proc"].returncode == 0
    # the test runs elsewhere than the project folder: point at the project's registry
    params = load_params(project / "comp" / "params.yaml", [f"project.state_dir={project / '.imgflow'}"])
    predictor, uri = load_predictor(params, None, tmp_path)
    assert predictor.spec.task.name == "multilabel" and predictor.spec.thresholds is not None
    client = TestClient(create_app(predictor, model_uri=uri))
    health = client.get("/health").json()
    assert health["task"] == "multilabel" and len(health["thresholds"]) == 10
    test = pd.read_csv(project / "comp" / "labels.csv").query("split == 'test'").head(8)
    files = [("file", (Path(p).name, (project / "comp" / p).read_bytes(), "image/png")) for p in test["path"]]
    r = client.post("/predict", files=files)
    assert r.status_code == 200, r.text
    rows = r.json()["predictions"]
    assert len(rows) == 8 and all(set(row["labels"]) <= set(health["classes"]) for row in rows)
    assert all(len(row["probabilities"]) == 10 for row in rows)

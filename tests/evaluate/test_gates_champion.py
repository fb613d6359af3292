"""The evaluate -> register contract on a real MLflow registry (sqlite in tmp_path):
a challenger worse than the champion fails its no-regression gates, is registered as
``challenger`` only, and the ``champion`` alias stays where it was. Also: the served model
carries the fitted temperature, and the gate report explains the verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components.core.config import load_params
from components.data.datasets import dataset_for_split
from components.data.manifest import data_version, read_manifest
from components.model.checkpoint import ModelSpec, load_classifier, load_spec, save_classifier
from components.model.models import create_classifier, create_image_transform, resolve_data_config
from components.pipeline.stages import StagePaths, run_evaluate, run_ingest, run_register
from components.registry import tracking
from tests.conftest import write_small_params

TROUSER = 1  # an easy class: the trained model recognises most trousers


def _train_small_model(params, out: Path) -> None:
    """A few quick epochs of imgflow_cnn on the (small) train split; saved as a model dir."""
    torch.manual_seed(0)
    classes = tuple(json.loads((params.project.data_dir / "dataset.json").read_text())["classes"])
    model = create_classifier("imgflow_cnn", len(classes), in_chans=1)
    cfg = resolve_data_config(model)
    ds = dataset_for_split(read_manifest(StagePaths(params).data.manifest), "train", data_dir=params.project.data_dir,
                           classes=classes, transform=create_image_transform(cfg, is_training=False), mode="L")  # fmt: skip
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(8):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    save_classifier(model.state_dict(), ModelSpec("imgflow_cnn", classes, 1, cfg), out)


def _new_training_run(params) -> None:
    """What `imgflow train` leaves for evaluate/register: an MLflow run and outputs/train/run.json."""
    uri = tracking.configure(None, state_dir=params.project.state_dir)
    exp = tracking.ensure_experiment(
        params.register_.experiment, artifact_root=params.project.state_dir / "mlart"
    )
    run = tracking.start_run(exp, run_name="t", params={}, tags={}, tracking_uri=uri)
    paths = StagePaths(params)
    info = {**run.to_dict(), "data_version": data_version(paths.data.manifest), "git_commit": "test",
            "params_hash": params.fingerprint()}  # fmt: skip
    paths.run_file.write_text(json.dumps(info))


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    write_small_params(
        tmp_path,
        max_per_class=20,
        evaluate={"robustness": {"enabled": True, "max_images": 50, "families": ["contrast", "jpeg"]}},
        gates={"min_accuracy": 0.3, "max_ece": 1.0, "min_relative_robustness": 0.0, "min_family_robustness": 0.0,
               "min_slice_accuracy": 0.0, "max_accuracy_drop": 0.02, "max_class_recall_drop": 0.1},
    )  # fmt: skip
    params = load_params(tmp_path / "params.yaml")
    run_ingest(params, progress=False)
    return params


@pytest.mark.slow
def test_worse_challenger_is_not_promoted_and_champion_stays(project) -> None:
    params = project
    model_dir = StagePaths(params).out("train") / "model"
    _train_small_model(params, model_dir)

    # 1. The first model: no champion yet, gates pass, it becomes champion.
    _new_training_run(params)
    first = run_evaluate(params).to_dict()
    assert first["gates_passed"], first["verdict"]
    report = json.loads(Path(first["report_json"]).read_text())
    assert report["champion"]["status"] == "none"
    assert first["temperature"] != 1.0  # fitted on val
    # Where the stage's time went: every part timed, in the JSON and in the report's header.
    parts = {"predict", "metrics", "robustness", "adversarial", "explanations", "ood_conformal", "slices",
             "champion", "ensemble"}  # fmt: skip
    assert set(first["timings"]) == parts and all(v >= 0 for v in first["timings"].values())
    assert first["timings"]["predict"] > 0 and sum(first["timings"].values()) <= first["seconds"]
    assert "seconds by part" in Path(first["report_html"]).read_text()
    reg1 = run_register(params).to_dict()
    assert "champion" in reg1["aliases"]
    # The registered model serves calibrated probabilities: its spec holds the fitted temperature,
    # while the train stage's output (a DVC out) is left untouched.
    served = tracking.download_model_dir(f"models:/{params.register_.model_name}@champion", Path("dl"))
    assert load_spec(served).temperature == pytest.approx(first["temperature"], rel=1e-6)
    assert load_spec(model_dir).temperature == 1.0

    # 2. A challenger that never predicts Trouser: worse on that class (and overall).
    model, spec = load_classifier(model_dir)
    with torch.no_grad():
        model.get_classifier().bias[TROUSER] = -1e4
    save_classifier(model.state_dict(), spec, model_dir)
    _new_training_run(params)
    second = run_evaluate(params).to_dict()
    failed = second["gates"]["failed"]
    assert not second["gates_passed"]
    assert "max_class_recall_drop[Trouser]" in failed
    assert "max_accuracy_drop" in failed
    gate = next(g for g in second["gates"]["gates"] if g["name"] == "max_class_recall_drop[Trouser]")
    assert gate["value"] < -0.5 and gate["bound"] < gate["value"] and "champion" in gate["explanation"]

    reg2 = run_register(params, raise_on_gate_failure=False).to_dict()
    assert reg2["gates_passed"] is False and "champion" not in reg2["aliases"]
    assert (
        tracking.alias_version(params.register_.model_name, "champion") == reg1["version"] != reg2["version"]
    )

    # 3. The report says so, verdict first, and evaluate --model re-evaluates the champion itself.
    html = Path(second["report_html"]).read_text()
    assert html.index("FAILED") < html.index("<h2>Gates</h2>") < html.index("Champion comparison")
    assert "data:image/png;base64," in html  # self-contained: plots inlined
    again = run_evaluate(params, model_uri=f"models:/{params.register_.model_name}@champion").to_dict()
    assert again["accuracy"] == pytest.approx(first["accuracy"])
    assert json.loads(Path(again["report_json"]).read_text())["champion"]["status"] == "skipped"
    # ... into a folder of its own: the pipeline's report is left as it was
    own = StagePaths(params).out("evaluate") / "models" / f"{params.register_.model_name}@champion"
    assert Path(again["report_html"]) == own / "report.html" and (own / "confusion_matrix.png").is_file()
    assert Path(second["report_html"]).read_text() == html

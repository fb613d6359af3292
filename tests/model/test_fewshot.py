"""Few-shot classes: two Fashion-MNIST classes held out of a tiny model's training, added from 10 real
images each without retraining, served by a new registered version while the previous one answers
as before; bad support sets are clear errors that leave the registry unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from components.core.config import load_params
from components.core.errors import DataError
from components.model import fewshot
from components.model.checkpoint import ModelSpec, Predictor, load_classifier, save_classifier
from components.model.features import FEWSHOT_LAYER, extract_features
from tests.conftest import FMNIST_CLASSES, fmnist_arrays, png_bytes
from tests.model.test_embedding_store import write_data_dir

HELD_OUT = (8, 9)  # Bag, Ankle boot: never seen by the base model
BASE = tuple(c for i, c in enumerate(FMNIST_CLASSES) if i not in HELD_OUT)


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny Fashion-MNIST model cut down to 8 classes: the classifier rows of Bag and
    Ankle boot dropped, so the network cannot answer them (its backbone did see them: the held-out
    property of the features is what ``python -m bench labels`` measures; here the mechanics)."""
    from safetensors.torch import load_file

    model, spec = load_classifier(tiny_model_dir)
    keep = [i for i in range(10) if i not in HELD_OUT]
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    for key in ("head.fc.weight", "head.fc.bias"):
        state[key] = state[key][keep]
    spec = ModelSpec(spec.model, BASE, spec.in_chans, spec.data_config, temperature=1.3)
    return save_classifier(state, spec, tmp_path_factory.mktemp("fewshot") / "model")


def _support_folder(root: Path, per_class: int = 10) -> Path:
    """One sub-folder per held-out class with ``per_class`` real training images as PNG files."""
    x, y = fmnist_arrays("train", 600)
    for label in HELD_OUT:
        folder = root / FMNIST_CLASSES[label]
        folder.mkdir(parents=True)
        for i, img in enumerate(x[y == label][:per_class]):
            (folder / f"{i:02d}.png").write_bytes(png_bytes(img))
    return root


def _base_features(base_dir: Path, layer: str = "pooled_last") -> fewshot.BaseFeatures:
    model, spec = load_classifier(base_dir)
    x, y = fmnist_arrays("train", 700)
    keep = ~np.isin(y, HELD_OUT)
    x_keep = Predictor(model, spec).preprocess([png_bytes(a) for a in x[keep]])
    feats = extract_features(model, x_keep, layer=layer)
    labels = np.array([BASE.index(FMNIST_CLASSES[int(t)]) for t in y[keep]])
    return fewshot.BaseFeatures(train=feats[:400], train_labels=labels[:400], heldout=feats[400:],
                                heldout_labels=labels[400:])  # fmt: skip


def _test_images(n: int = 300) -> tuple[list[bytes], np.ndarray]:
    x, y = fmnist_arrays("t10k", n)
    return [png_bytes(a) for a in x], y


def test_added_classes_are_served_and_base_answers_kept(base_dir: Path, tmp_path: Path) -> None:
    images = fewshot.read_support_folder(_support_folder(tmp_path / "support"), k=5)
    model, spec = load_classifier(base_dir)
    # The few-shot default layer: the head reads it through a hook on the CNN's stage before the last.
    support = {n: fewshot.support_features(model, spec, b, layer=FEWSHOT_LAYER) for n, b in images.items()}
    hashes = {n: fewshot.support_hash({n: b}) for n, b in images.items()}
    before = Predictor.from_dir(base_dir)
    test, y = _test_images()
    base_probs = before.predict_proba(test)

    out = tmp_path / "new" / "model"
    bank = fewshot.add_classes(base_dir, out, support, base=_base_features(base_dir, FEWSHOT_LAYER),
                               layer=FEWSHOT_LAYER, hashes=hashes)  # fmt: skip
    # No retraining: the very same weights file, the classes appended, the bank recorded.
    digest = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (base_dir, out)]
    assert digest[0] == digest[1]
    new = Predictor.from_dir(out)
    assert new.spec.classes == (*BASE, "Ankle boot", "Bag") and new.spec.temperature == 1.0
    rec = new.spec.extra["fewshot"]
    assert (
        rec["base_classes"] == 8 and rec["support"]["Bag"]["images"] == 10 and rec["base_temperature"] == 1.3
    )
    assert rec["centre_hash"] == fewshot.vector_hash(bank.centre) and 1.0 <= bank.scale <= 300.0

    probs = new.predict_proba(test)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    labels = np.asarray(new.spec.classes)[probs.argmax(1)]
    truth = np.asarray(FMNIST_CLASSES)[y]
    held = np.isin(y, HELD_OUT)
    assert (labels[held] == truth[held]).mean() >= 0.7  # the new classes are recognised from 10 images
    # Base images keep their base answer; among base classes the ratios are the base model's.
    base_answer = np.asarray(BASE)[base_probs.argmax(1)]
    assert (labels[~held] == base_answer[~held]).mean() >= 0.9
    ratio = probs[:, :8] / base_probs
    np.testing.assert_allclose(ratio, ratio[:, :1].repeat(8, axis=1), rtol=1e-3)
    # The previous version's folder answers exactly as before.
    np.testing.assert_array_equal(Predictor.from_dir(base_dir).predict_proba(test), base_probs)

    again = tmp_path / "removed" / "model"
    assert fewshot.remove_class(out, again, "Bag") is not None
    assert Predictor.from_dir(again).spec.classes == (*BASE, "Ankle boot")
    back = tmp_path / "back" / "model"
    assert fewshot.remove_class(again, back, "Ankle boot") is None
    restored = Predictor.from_dir(back)
    assert restored.spec.classes == BASE and restored.spec.temperature == 1.3
    np.testing.assert_allclose(restored.predict_proba(test), base_probs, atol=1e-6)


def test_bad_support_sets_are_clear_errors(base_dir: Path, tmp_path: Path) -> None:
    support = _support_folder(tmp_path / "support", per_class=3)
    with pytest.raises(DataError, match="'Ankle boot' has 3 support images, fewer than k=5"):
        fewshot.read_support_folder(support, k=5)
    (support / "Bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"support image .*broken\.png cannot be used"):
        fewshot.read_support_folder(support, k=3)
    with pytest.raises(DataError, match="has no sub-folders"):
        fewshot.read_support_folder(support / "Bag", k=1)
    feats = {"Coat": np.zeros((3, 64), np.float32)}
    with pytest.raises(DataError, match="class 'Coat' already exists"):
        fewshot.add_classes(base_dir, tmp_path / "x", feats, base=_base_features(base_dir), layer="pooled_last",
                            hashes={"Coat": "0"})  # fmt: skip
    assert not (tmp_path / "x").exists()
    with pytest.raises(DataError, match="cannot remove 'Coat': it is a trained class"):
        fewshot.remove_class(base_dir, tmp_path / "y", "Coat")


def test_registered_version_serves_new_classes_and_bad_sets_register_nothing(
    base_dir: Path, tmp_path: Path
) -> None:
    """The registry glue end to end on a local sqlite store: base version 1, `classes add` -> version 2
    serving the held-out classes; version 1 answers as before; bad support sets change nothing."""
    from components.pipeline.classes import run_classes_add, run_classes_list, run_classes_remove
    from components.pipeline.context import connect_tracking, experiment_id
    from components.registry import registry, tracking

    x, y = fmnist_arrays("t10k", 120)
    base_rows = ~np.isin(y, HELD_OUT)
    splits = ["train"] * 60 + ["val"] * 30 + ["test"] * 30
    write_data_dir(tmp_path / "data", x[base_rows], y[base_rows], splits[: int(base_rows.sum())])
    (tmp_path / "params.yaml").write_text("{}\n")  # every default, then the test's own places
    params = load_params(tmp_path / "params.yaml", [
        f"project.data_dir={tmp_path / 'data'}", f"project.state_dir={tmp_path / 'state'}",
        f"project.output_dir={tmp_path / 'out'}", f"register.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "register.model_name=fewshot-test", "register.retries=1",
    ])  # fmt: skip
    connect_tracking(params)
    name = "fewshot-test"
    run = tracking.start_run(experiment_id(params), run_name="base", params={}, tags={})
    uri = tracking.log_pyfunc_model(run.run_id, model_dir=base_dir, example_image=png_bytes(x[0]),
                                    pip_requirements=["torch"])  # fmt: skip
    card = registry.ModelCard(task="single-label", classes=BASE, data_version="d", git_commit="g", headline="",
                              gates_passed=True, gate_verdict="passed")  # fmt: skip
    tags = {"gates_passed": "true", "failed_gates": "", "data_version": "d"}
    registry.register_version(uri, name=name, run_id=run.run_id, tags=tags, card=card, auto_promote=True)
    tracking.end_run(run.run_id)
    test, _ = _test_images(200)
    v1 = Predictor.from_dir(tracking.download_model_dir(f"models:/{name}/1", tmp_path / "v1"))
    v1_probs = v1.predict_proba(test)

    short = _support_folder(tmp_path / "short", per_class=3)
    for bad, k in ((short, 5), (tmp_path / "missing", 1)):
        with pytest.raises(DataError):
            run_classes_add(params, bad, k=k)
        assert [v["version"] for v in tracking.list_versions(name)] == ["1"]
    with pytest.raises(DataError, match="already exists"):
        (short / "Ankle boot").rename(short / "Coat")
        run_classes_add(params, short, k=3)
    assert [v["version"] for v in tracking.list_versions(name)] == ["1"]

    change = run_classes_add(params, _support_folder(tmp_path / "support"), k=10)
    assert change.version == "2" and change.base_version == "1" and change.added == ("Ankle boot", "Bag")
    assert change.gates_passed and "champion" in change.aliases and change.base_agreement >= 0.9
    assert change.tags["fewshot_layer"] == FEWSHOT_LAYER and len(change.tags["fewshot_support_hash"]) == 16
    served = Predictor.from_dir(tracking.download_model_dir(f"models:/{name}@champion", tmp_path / "v2"))
    assert served.spec.classes[-2:] == ("Ankle boot", "Bag")
    again = Predictor.from_dir(tracking.download_model_dir(f"models:/{name}/1", tmp_path / "v1b"))
    np.testing.assert_array_equal(again.predict_proba(test), v1_probs)
    listed = run_classes_list(params)
    assert [a["name"] for a in listed["added"]] == ["Ankle boot", "Bag"] and len(listed["trained"]) == 8
    removed = run_classes_remove(params, "Bag")
    assert removed.version == "3" and removed.added == ("Ankle boot",)


def test_cli_bad_support_set_is_exit_code_2(tmp_path: Path) -> None:
    """`imgflow classes add` on a bad support set: one 'imgflow: ...' line, exit code 2 (in-process)."""
    from typer.testing import CliRunner

    from flows.cli import app

    (tmp_path / "params.yaml").write_text("{}\n")
    short = _support_folder(tmp_path / "short", per_class=3)
    where = [f"--params={tmp_path / 'params.yaml'}", f"--set=project.state_dir={tmp_path / 'state'}"]
    result = CliRunner().invoke(app, ["classes", "add", str(short), "--k", "5", *where])
    assert result.exit_code == 2, result.output
    assert "imgflow: class 'Ankle boot' has 3 support images, fewer than k=5" in result.output
    assert "Traceback" not in result.output

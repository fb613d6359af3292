"""Zero-shot scoring: far above chance with the tiny CLIP's learned weights (single-label: softmax
over the classes; multi-label: one centred sigmoid per label, thresholds tuned on held-out
images), the model's logit scale used as the temperature, and the per-label calibration."""

from __future__ import annotations

import numpy as np
import torch

from components.baseline.clip_model import (
    ClipEncoder,
    build_text_classifier,
    create_clip,
    encode_image_batches,
)
from components.baseline.prompts import class_prompts, resolve_templates
from components.baseline.zero_shot import fit_label_calibration, zero_shot_probs
from components.task import MULTILABEL, SINGLELABEL, get_task
from components.task.metrics import compute_metrics
from tests.baseline.tiny_clip import CHANCE, CLASSES, TINY, draw_two

SINGLE, MULTI = get_task(SINGLELABEL), get_task(MULTILABEL)


def _zero_shot_accuracy(encoder: ClipEncoder, held_out: tuple, templates: str = "imagenet80") -> float:
    x, y = held_out
    weights = build_text_classifier(encoder, class_prompts(CLASSES, resolve_templates(templates)))
    probs = zero_shot_probs(SINGLE, encode_image_batches(encoder, x.split(64)), weights, encoder.logit_scale)
    return compute_metrics(y, probs, CLASSES)["accuracy"]


def test_zero_shot_on_held_out_images_is_far_above_chance(tiny_clip: dict, held_out: tuple) -> None:
    encoder = tiny_clip["encoder"]  # loaded back from the checkpoint *file* (baseline.pretrained=path)
    assert encoder.key.startswith(f"{TINY}/sha256:")
    for templates in ("imagenet80", "short"):
        assert _zero_shot_accuracy(encoder, held_out, templates) >= 0.6 > 5 * CHANCE
    untrained = create_clip(TINY, None, random_init=True)
    assert (
        _zero_shot_accuracy(untrained, held_out, "short") < 0.35
    )  # the accuracy comes from the learned weights


def test_zero_shot_probs_use_the_logit_scale() -> None:
    img = np.array([[3.0, 0.0], [0.0, 0.5]])  # unnormalised: only the direction counts
    text = np.array([[1.0, 0.0], [0.0, 1.0]])
    p = zero_shot_probs(SINGLE, img, text, logit_scale=2.0)
    np.testing.assert_allclose(p[0], np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum())
    assert zero_shot_probs(SINGLE, img, text, logit_scale=100.0)[0, 0] > 0.999


def test_multilabel_zero_shot_scores_each_label_with_a_centred_sigmoid() -> None:
    img = np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    text = np.eye(3)
    p = zero_shot_probs(MULTI, img, text, logit_scale=2.0)
    # cos row 0: (1, 0, 0), mean 1/3 -> sigmoid(2 * (cos - 1/3)); rows need not sum to 1
    np.testing.assert_allclose(p[0], 1 / (1 + np.exp(-2 * (np.array([1.0, 0.0, 0.0]) - 1 / 3))))
    assert p[0, 0] > 0.5 > p[0, 1] and not np.isclose(p[0].sum(), 1.0)
    # Platt scaling on val: a shared slope, one intercept per label, probabilities that mean something
    rng = np.random.default_rng(0)
    y = (rng.random((400, 3)) < [0.2, 0.5, 0.05]).astype(np.int8)
    logits = 8.0 * (y - 0.5) + rng.normal(scale=6.0, size=y.shape)  # over-confident raw scores
    cal = fit_label_calibration(logits, y)
    assert cal is not None and 0 < cal.slope < 1  # the raw sigmoid is too sure of itself
    probs = cal(logits)
    assert abs(probs.mean() - y.mean()) < 0.03 and probs[:, 2].mean() < probs[:, 1].mean()
    assert fit_label_calibration(logits[:0], y[:0]) is None


def _pairs(n: int, rng: np.random.Generator) -> list[list[str]]:
    return [[CLASSES[i] for i in rng.choice(len(CLASSES), 2, replace=False)] for _ in range(n)]


def test_multilabel_zero_shot_per_label_ap_is_far_above_prevalence(tiny_clip: dict) -> None:
    """Two shapes per image, the tiny CLIP trained on single shapes: each label is scored on its own,
    thresholds are tuned on half the images, metrics on the other half."""
    from components.task.multilabel import label_matrix, multilabel_metrics, tune_thresholds

    rng = np.random.default_rng(5)
    sets = _pairs(240, rng)
    y = label_matrix(sets, CLASSES)
    prevalence = 2 / len(CLASSES)

    def metrics(encoder: ClipEncoder) -> dict:
        x = torch.stack(
            [encoder.preprocess(draw_two(s, np.random.default_rng(i))) for i, s in enumerate(sets)]
        )
        weights = build_text_classifier(encoder, class_prompts(CLASSES, resolve_templates("imagenet80")))
        probs = zero_shot_probs(
            MULTI, encode_image_batches(encoder, x.split(64)), weights, encoder.logit_scale
        )
        thresholds = [t.threshold for t in tune_thresholds(y[:120], probs[:120], CLASSES)]
        return multilabel_metrics(y[120:], probs[120:], thresholds, CLASSES)

    m = metrics(tiny_clip["encoder"])
    assert m["mAP"] >= 3 * prevalence, m["mAP"]
    assert min(r["ap"] for r in m["per_label"]) > 1.5 * prevalence
    assert m["micro_f1"] > 0.4 and all(0 < r["threshold"] < 1 for r in m["per_label"])
    torch.manual_seed(1)
    untrained = metrics(create_clip(TINY, None, random_init=True))
    assert untrained["mAP"] < m["mAP"] - 0.2  # the scores come from the learned weights

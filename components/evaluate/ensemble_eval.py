"""Does the ensemble beat its members? Each member and the combined model on the same test images.

Every model gets its own temperature fitted on val (members too, so the comparison is calibrated
against calibrated); the ensemble's is fitted on its averaged probabilities, i.e. *after* combining
(:func:`components.evaluate.calibration.fit_temperature`). Reported: test accuracy, NLL and ECE (after
the refit) of each, and the ensemble against its best member (highest test accuracy: the hardest
comparison) with paired-bootstrap bounds: the lower bound of the accuracy gain and the upper bound
of the NLL difference (ensemble minus member; below 0 means the ensemble is better).

Single-label models only (multi-label ensembles are combined and served, not compared here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from components.core.config import Params
from components.core.errors import DataError
from components.evaluate.calibration import expected_calibration_error, fit_temperature
from components.task.comparison import paired_bootstrap

_TINY = 1e-12


def _scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """probs: (N, K) -> softmax(log(probs) / T) (N, K)."""
    z = np.log(np.clip(probs, _TINY, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _row(
    name: str, test: np.ndarray, y_test: np.ndarray, val: np.ndarray, y_val: np.ndarray, bins: int
) -> dict[str, Any]:
    """One model's figures: T fitted on val, then test accuracy, per-image NLL and ECE at that T."""
    t = fit_temperature("singlelabel", np.log(np.clip(val, _TINY, 1.0)), y_val)
    p = _scaled(test, t)
    nll = -np.log(np.clip(p[np.arange(len(y_test)), y_test], _TINY, 1.0))
    return {"name": name, "temperature": t, "accuracy": float((p.argmax(1) == y_test).mean()),
            "nll": float(nll.mean()), "ece": expected_calibration_error(y_test, p, n_bins=bins),
            "_nll": nll, "_correct": p.argmax(1) == y_test}  # fmt: skip


def _nll_upper_bound(
    ens: np.ndarray, member: np.ndarray, *, n_boot: int, confidence: float, seed: int
) -> float:
    """Upper confidence bound of mean(ens - member) per-image NLL, by a paired bootstrap over images."""
    d = np.asarray(ens - member, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(n_boot)])
    return float(np.quantile(means, confidence))


def compare_members(
    member_test: np.ndarray,
    y_test: np.ndarray,
    member_val: np.ndarray,
    y_val: np.ndarray,
    labels: Sequence[str],
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    n_bins: int = 15,
    seed: int = 0,
) -> dict[str, Any]:
    """member_test: (M, N, K) members' probabilities on test, member_val: (M, V, K) on val; y: class indices.

    Returns ``members`` (rows), ``ensemble`` (row), ``best_member`` and ``versus_best``: accuracy and NLL
    differences with their one-sided bootstrap bounds at ``confidence``, and ``beats_best`` (both bounds
    on the right side of 0)."""
    rows = [
        _row(label, member_test[i], y_test, member_val[i], y_val, n_bins) for i, label in enumerate(labels)
    ]
    ens = _row("ensemble", member_test.mean(0), y_test, member_val.mean(0), y_val, n_bins)
    best = max(rows, key=lambda r: (r["accuracy"], -r["nll"]))
    acc = paired_bootstrap(ens["_correct"], best["_correct"], margin=0.0, n_boot=n_boot, confidence=confidence,
                           seed=seed, what="accuracy")  # fmt: skip
    nll_upper = _nll_upper_bound(
        ens["_nll"], best["_nll"], n_boot=n_boot, confidence=confidence, seed=seed + 1
    )
    versus = {
        "member": best["name"], "accuracy_gain": acc.difference, "accuracy_gain_lower": acc.lower,
        "nll_difference": ens["nll"] - best["nll"], "nll_difference_upper": nll_upper,
        "confidence": confidence, "n_boot": n_boot, "images": int(len(y_test)),
    }  # fmt: skip
    versus["beats_best"] = bool(acc.lower > 0 and nll_upper < 0)

    def public(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r.items() if not k.startswith("_")}

    return {"members": [public(r) for r in rows], "ensemble": public(ens), "best_member": best["name"],
            "versus_best": versus}  # fmt: skip


def member_probabilities(params: Params, model_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every member's probabilities (M, N, K) on ``split`` of the data dir and the class indices (N,)."""
    import torch
    from torch.utils.data import DataLoader

    from components.data.datasets import dataset_for_split
    from components.data.manifest import DataPaths, read_manifest
    from components.model.checkpoint import FlipTTA, load_classifier
    from components.model.ensemble import Ensemble
    from components.model.models import create_image_transform, image_mode

    model, spec = load_classifier(model_dir)
    tta = model if isinstance(model, FlipTTA) else None  # the flips apply to every member
    ensemble = tta.model if tta is not None else model
    if not isinstance(ensemble, Ensemble):
        raise DataError(f"{model_dir} is not an ensemble folder")
    ds = dataset_for_split(
        read_manifest(DataPaths(params.project.data_dir).manifest), split, data_dir=params.project.data_dir,
        classes=spec.classes, transform=create_image_transform(spec.data_config, is_training=False),
        mode=image_mode(spec.in_chans), task=spec.task,
    )  # fmt: skip
    probs, targets = [], []
    with torch.inference_mode():
        for x, y in DataLoader(ds, batch_size=params.evaluate.batch_size, shuffle=False):
            if tta is None:
                probs.append(ensemble.member_probabilities(x).numpy())
            else:  # test-time augmentation: each member's logits averaged over the image and its mirror
                flipped = x.index_select(3, tta.reverse)
                logits = [(m(x) + m(flipped)).float() / 2 for m in ensemble.members]
                probs.append(torch.softmax(torch.stack(logits), dim=-1).numpy())
            targets.append(y.numpy())
    return np.concatenate(probs, axis=1), np.concatenate(targets).astype(np.int64)


def ensemble_evidence(params: Params, model_dir: Path) -> dict[str, Any] | None:
    """The gate report's Ensemble section data; None for a single model; a skipped record when the
    comparison does not apply (multi-label, or no val split to fit temperatures on)."""
    from components.evaluate.predictions import has_split
    from components.model.checkpoint import load_spec
    from components.model.ensemble import ensemble_summary

    summary = ensemble_summary(model_dir)
    if summary is None:
        return None
    if load_spec(model_dir).task.fits_decision:
        return {**summary, "status": "skipped", "reason": "multi-label ensembles are not compared per member"}
    if not has_split(params, "val"):
        return {**summary, "status": "skipped", "reason": "no val split to fit the temperatures on"}
    test, y_test = member_probabilities(params, model_dir, "test")
    val, y_val = member_probabilities(params, model_dir, "val")
    labels = [m["label"] for m in summary["members"]]
    compared = compare_members(test, y_test, val, y_val, labels, n_boot=params.evaluate.bootstrap,
                               confidence=params.gates.confidence, n_bins=params.evaluate.calibration_bins,
                               seed=params.project.seed)  # fmt: skip
    return {**summary, "status": "compared", **compared}


def ensemble_scalars(report: Mapping[str, Any] | None) -> dict[str, float]:
    """metrics.json / MLflow scalars of a compared ensemble (empty otherwise)."""
    if not report or report.get("status") != "compared":
        return {}
    versus = report["versus_best"]
    return {
        "ensemble_members": float(len(report["members"])),
        "ensemble_best_member_accuracy": max(m["accuracy"] for m in report["members"]),
        "ensemble_accuracy_gain_lower": versus["accuracy_gain_lower"],
        "ensemble_nll_difference_upper": versus["nll_difference_upper"],
    }


def ensemble_section(report: Mapping[str, Any] | None) -> Any:
    """The gate report's "Ensemble" section: members, their figures, the combined model, the bounds."""
    if not report:
        return None
    from components.core import report as kit

    if report.get("status") != "compared":
        labels = ", ".join(m["label"] for m in report.get("members", []))
        return kit.section(
            "Ensemble", kit.paragraph(f"Members: {labels}."), kit.note(report.get("reason", ""))
        )
    header = ["model", "test accuracy", "NLL", "ECE (after T)", "T (fitted on val)"]
    rows = [[r["name"], kit.num(r["accuracy"]), kit.num(r["nll"]), kit.num(r["ece"]), kit.num(r["temperature"], 3)]
            for r in [*report["members"], report["ensemble"]]]  # fmt: skip
    v = report["versus_best"]
    level = f"{v['confidence']:.0%}"
    text = (
        f"{len(report['members'])} members, probabilities averaged; every temperature fitted on val (the "
        f"ensemble's after combining). Against its best member ({v['member']}) on {v['images']} test images: "
        f"accuracy {v['accuracy_gain']:+.4f} (paired-bootstrap {level} lower bound {v['accuracy_gain_lower']:+.4f}), "
        f"NLL {v['nll_difference']:+.4f} (upper bound {v['nll_difference_upper']:+.4f}): "
        + ("the ensemble is better on both." if v["beats_best"] else "not shown better on both.")
    )
    return kit.section("Ensemble", kit.paragraph(text), kit.table(header, rows))

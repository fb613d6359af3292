"""Evaluation on a label tree: one row per decoding, back-off, and the tree's gates.

Per decoding (``argmax``: the most probable leaf; ``crm``: the leaf of least expected tree distance,
Karthik et al., ICLR 2021) the row holds top-1 accuracy, parent accuracy (the answer's parent is
the true leaf's), average mistake severity (mean tree distance over the mistakes), hierarchical
distance @1 and @k (mean distance of the top-k answers to the truth, over all images) and the ECE
of the answer's probability. Back-off (``serve.backoff``) gets its threshold fitted on the
calibration split for ``serve.backoff_precision`` and is measured on test: precision of the
answers and the share answered.

Gates, only when a tree exists: ``max_crm_hdist_ratio`` (CRM / argmax distance@k <= 1: CRM must not
make worse mistakes than the plain argmax), ``min_backoff_precision`` and ``min_backoff_answered``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from components.evaluate.calibration import _bins_of
from components.evaluate.gates import GateResult, gate_level, make_gate
from components.task.taxonomy import (
    BackoffMode,
    Taxonomy,
    argmax_decode,
    backoff_decode,
    backoff_outcome,
    crm_decode,
    fit_backoff_threshold,
)

DECODINGS: tuple[str, ...] = ("argmax", "crm")
CRM_RATIO_GATE = "max_crm_hdist_ratio"
BACKOFF_PRECISION_GATE = "min_backoff_precision"
BACKOFF_ANSWERED_GATE = "min_backoff_answered"
HIERARCHY_GATES: tuple[str, ...] = (CRM_RATIO_GATE, BACKOFF_PRECISION_GATE, BACKOFF_ANSWERED_GATE)


def ranked(probs: np.ndarray, tree: Taxonomy, decoding: str, *, k: int) -> np.ndarray:
    """(N, k) leaf indices, best first, under ``decoding`` (argmax | crm)."""
    if decoding == "argmax":
        return argmax_decode(probs, k=k)
    if decoding == "crm":
        return crm_decode(probs, tree.distance_matrix(), k=k)
    raise ValueError(f"unknown decoding {decoding!r}: use one of {', '.join(DECODINGS)}")


def decoding_row(
    probs: np.ndarray, labels: np.ndarray, tree: Taxonomy, decoding: str, *, k: int = 5, n_bins: int = 15
) -> dict[str, Any]:
    """One decoding's metrics. probs: (N, K) leaf probabilities (temperature applied); labels: (N,)."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    k = min(k, probs.shape[1])
    top = ranked(probs, tree, decoding, k=k)
    dist = tree.distance_matrix()
    d_top = dist[top, y[:, None]]  # (N, k)
    pred = top[:, 0]
    right = pred == y
    parent = np.array([tree.parent_of(leaf) for leaf in tree.leaves])
    conf = probs[np.arange(len(y)), pred]
    bins = _bins_of(conf, right, n_bins=n_bins, adaptive=False)
    ece = float(sum(b.count * b.gap for b in bins) / max(len(y), 1))
    return {
        "decoding": decoding,
        "top1": float(right.mean()),
        "parent_accuracy": float((parent[pred] == parent[y]).mean()),
        "mistake_severity": float(d_top[~right, 0].mean()) if (~right).any() else 0.0,
        "hdist_1": float(d_top[:, 0].mean()),
        f"hdist_{k}": float(d_top.mean()),
        "ece": ece,
        "mistakes": int((~right).sum()),
        "images": len(y),
    }


def backoff_summary(
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    test_probs: np.ndarray,
    test_labels: np.ndarray,
    tree: Taxonomy,
    *,
    mode: BackoffMode,
    target_precision: float,
    confidence: float | None = 0.95,
) -> dict[str, Any]:
    """Threshold fitted on val for ``target_precision`` (its Wilson lower bound at ``confidence``);
    precision and answered share on test."""
    fit = fit_backoff_threshold(val_probs, val_labels, tree, target_precision=target_precision, mode=mode,
                                confidence=confidence)  # fmt: skip
    answers = backoff_decode(test_probs, tree, threshold=fit.threshold, mode=mode)
    precision, answered, leaf = backoff_outcome(answers, test_labels, tree)
    return {
        "mode": mode,
        "threshold": fit.threshold,
        "target_precision": target_precision,
        "confidence": confidence,
        "reached_on_val": fit.reached,
        "val_precision": fit.precision,
        "val_answered": fit.answered,
        "precision": precision,
        "answered": answered,
        "leaf_answered": leaf,
    }


def hierarchy_report(
    test_probs: np.ndarray,
    test_labels: np.ndarray,
    tree: Taxonomy,
    *,
    val_probs: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    backoff: BackoffMode = "parent",
    backoff_precision: float = 0.975,
    backoff_confidence: float | None = 0.95,
    k: int = 5,
    n_bins: int = 15,
) -> dict[str, Any]:
    """The tree's evidence: ``rows`` (one per decoding), ``crm_hdist_ratio`` (CRM / argmax
    distance@k), ``crm_top1_drop_pt`` (argmax minus CRM top-1, in points) and ``backoff`` (fitted on
    val, measured on test; None without a val split or with ``backoff: off``)."""
    rows = [decoding_row(test_probs, test_labels, tree, d, k=k, n_bins=n_bins) for d in DECODINGS]
    by = {r["decoding"]: r for r in rows}
    kk = min(k, np.asarray(test_probs).shape[1])
    flat = by["argmax"][f"hdist_{kk}"]
    back = None
    if backoff != "off" and val_probs is not None and val_labels is not None:
        back = backoff_summary(val_probs, val_labels, test_probs, test_labels, tree, mode=backoff,
                               target_precision=backoff_precision, confidence=backoff_confidence)  # fmt: skip
    return {
        "tree": tree.to_dict(),
        "height": tree.height(),
        "k": kk,
        "rows": rows,
        "crm_hdist_ratio": by["crm"][f"hdist_{kk}"] / flat if flat > 0 else 1.0,
        "crm_top1_drop_pt": 100.0 * (by["argmax"]["top1"] - by["crm"]["top1"]),
        "backoff": back,
    }


def hierarchy_scalars(report: Mapping[str, Any] | None) -> dict[str, float]:
    """Flat MLflow scalars: ``hier_<decoding>_<metric>`` per row, the CRM ratio, back-off figures."""
    if not report:
        return {}
    out: dict[str, float] = {}
    for row in report["rows"]:
        out |= {f"hier_{row['decoding']}_{k}": float(v) for k, v in row.items() if k != "decoding"}
    out["hier_crm_hdist_ratio"] = float(report["crm_hdist_ratio"])
    out["hier_crm_top1_drop_pt"] = float(report["crm_top1_drop_pt"])
    for key in ("threshold", "precision", "answered", "leaf_answered"):
        if report.get("backoff"):
            out[f"backoff_{key}"] = float(report["backoff"][key])
    return out


def hierarchy_gates(
    report: Mapping[str, Any] | None,
    *,
    max_crm_ratio: float,
    min_precision: float | None,
    min_answered: float | None,
    levels: Mapping[str, str],
) -> list[GateResult]:
    """The tree's gates (none without a tree; back-off gates only when back-off was fitted; a None
    threshold takes the fitted target precision / reports only)."""
    if not report:
        return []
    gates: list[GateResult] = []
    if (level := gate_level(levels, CRM_RATIO_GATE)) is not None:
        what = f"CRM / argmax hierarchical distance@{report['k']}"
        gates.append(make_gate(CRM_RATIO_GATE, what, report["crm_hdist_ratio"], max_crm_ratio, level=level,
                               comparison="<=", explanation="CRM decoding must not make worse mistakes than "
                               "the plain argmax (ratio above 1: its answers sit further from the truth)."))  # fmt: skip
    back = report.get("backoff")
    if not back or report.get("backoff_served") == "off":  # reported, not served: nothing to gate
        return gates
    target = back["target_precision"] if min_precision is None else min_precision
    if (level := gate_level(levels, BACKOFF_PRECISION_GATE)) is not None:
        gates.append(make_gate(BACKOFF_PRECISION_GATE, f"back-off ({back['mode']}) test precision",
                               back["precision"], target, level=level,
                               explanation=f"threshold {back['threshold']:.3f} fitted on val for precision "
                               f"{back['target_precision']:g}; test answers must be as right."))  # fmt: skip
    if min_answered is not None and (level := gate_level(levels, BACKOFF_ANSWERED_GATE)) is not None:
        gates.append(make_gate(BACKOFF_ANSWERED_GATE, "back-off answered share", back["answered"], min_answered,
                               level=level, explanation="share of test images answered (leaf or parent)"))  # fmt: skip
    return gates


def hierarchy_table(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-decoding table for the gate report and the bench."""
    k = report["k"]
    header = ["decoding", "top-1", "parent acc", "mistake severity", "hdist@1", f"hdist@{k}", "ECE"]
    keys = ["top1", "parent_accuracy", "mistake_severity", "hdist_1", f"hdist_{k}", "ece"]
    return header, [[r["decoding"], *(f"{r[key]:.4f}" for key in keys)] for r in report["rows"]]


def leaves_of(labels: Sequence[str], tree: Taxonomy) -> np.ndarray:
    """Class names -> (N,) leaf indices in the tree's (the model's) order."""
    index = {leaf: i for i, leaf in enumerate(tree.leaves)}
    return np.array([index[label] for label in labels], dtype=np.int64)


def hierarchy_section(report: Mapping[str, Any] | None) -> Any:
    """The gate report's "Label tree" section (None without a tree)."""
    if not report:
        return None
    from components.core import report as kit

    header, rows = hierarchy_table(report)
    parts = [
        kit.paragraph(
            f"The classes are the leaves of a label tree of height {report['height']}: a mistake costs the "
            "height of the lowest common ancestor (1 between siblings). CRM answers the leaf of least "
            f"expected distance: hierarchical distance@{report['k']} {report['crm_hdist_ratio']:.3f}x the "
            f"argmax's, top-1 {report['crm_top1_drop_pt']:+.2f} points lower."
        ),
        kit.table(header, rows),
    ]
    back = report.get("backoff")
    if back:
        parts.append(kit.paragraph(
            f"Back-off ({back['mode']}): threshold {back['threshold']:.3f} fitted on val for precision "
            f"{back['target_precision']:g}; on test {back['precision']:.1%} of the answers are right, "
            f"{back['answered']:.1%} of the images are answered ({back['leaf_answered']:.1%} with a leaf)."
        ))  # fmt: skip
    return kit.section("Label tree (hierarchical evaluation)", *parts)


def measure_hierarchy(
    tree: Taxonomy,
    test: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    *,
    backoff: str,
    backoff_precision: float,
    k: int,
    n_bins: int,
    out_dir: Any = None,
    backoff_confidence: float | None = 0.95,
) -> dict[str, Any]:
    """The tree's report from (probs (N, K) with the temperature applied, labels (N,)) of test and
    val; ships the tree and the back-off rule (``hierarchy.json``) to ``out_dir`` when given. With
    ``backoff: off`` the rule is still fitted (``parent``) and reported, and the model ships it off."""
    from components.task.taxonomy import ShippedTree

    fit_mode = backoff if backoff != "off" else "parent"
    report = hierarchy_report(test[0], test[1], tree, val_probs=None if val is None else val[0],
                              val_labels=None if val is None else val[1], backoff=fit_mode,  # type: ignore[arg-type]
                              backoff_precision=backoff_precision, backoff_confidence=backoff_confidence,
                              k=k, n_bins=n_bins)  # fmt: skip
    report["backoff_served"] = backoff
    if out_dir is not None:
        threshold = report["backoff"]["threshold"] if report.get("backoff") else 1.0
        ShippedTree(tree, backoff if report.get("backoff") else "off", threshold).save(out_dir)
    return report

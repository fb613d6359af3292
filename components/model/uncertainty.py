"""What a model ships to say when it does not know: its out-of-distribution (OOD) detector and its
conformal prediction-set rule, saved next to the spec and applied to every prediction.

Both are fitted by the evaluate stage (:mod:`components.evaluate.ood`,
:mod:`components.evaluate.conformal`) and copied into the model folder by register:

- ``ood.json`` + ``ood.safetensors``: which score (``msp``, ``energy``, ``mahalanobis``,
  ``relative_mahalanobis``, ``knn``),
  the feature layer it reads, its statistics (class means and shared precision matrix, or the
  L2-normalised training features of the kNN bank) and the threshold set on val. ``ood_score``: higher
  means less like the training data; ``ood``: the score is above the threshold.
- ``conformal.json``: split-conformal APS/RAPS sets (the calibrated quantile, one per class when
  class-conditional); ``prediction_set``: the classes whose conformity score is within the quantile.

The scores are torch expressions so the same code runs in the Predictor, the registry's pyfunc and
the ONNX graph (:class:`ScoredNet`). A model folder without these files (a model registered before
they existed) loads and predicts as before: :func:`load_ood` / :func:`load_conformal` return None.
No pickle: JSON and safetensors only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from components.core.errors import DataError
from components.core.jsonio import write_json
from components.model.features import Layer, base_model, check_layer

OOD_SPEC, OOD_TENSORS, CONFORMAL_SPEC = "ood.json", "ood.safetensors", "conformal.json"
TRUST_FILES = (OOD_SPEC, OOD_TENSORS, CONFORMAL_SPEC, "hierarchy.json")  # + the label tree (task.taxonomy)
"""The files this module adds to a model folder (each optional)."""

ScoreName = Literal["msp", "energy", "mahalanobis", "relative_mahalanobis", "knn"]
SCORES: tuple[str, ...] = ("msp", "energy", "mahalanobis", "relative_mahalanobis", "knn")
FEATURE_SCORES: tuple[str, ...] = ("mahalanobis", "relative_mahalanobis", "knn")
"""Scores that read the model's features at a layer (the others read only the logits)."""


# --------------------------------------------------------------------------- OOD scores (higher: more OOD)


def msp_score(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """(B, K) logits -> (B,) one minus the maximum softmax probability (Hendrycks & Gimpel 2017)."""
    return 1.0 - torch.softmax(logits.float() / temperature, dim=1).max(dim=1).values


def energy_score(logits: torch.Tensor) -> torch.Tensor:
    """(B, K) logits -> (B,) the free energy ``-logsumexp(logits)`` (Liu et al. 2020): low for inputs
    the classifier puts a lot of logit mass on."""
    return -torch.logsumexp(logits.float(), dim=1)


def mahalanobis_score(feats: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(B, D) features -> (B,) the squared Mahalanobis distance to the nearest class mean under the shared
    covariance (Lee et al. 2018). means: (K, D); precision: (D, D), the inverse shared covariance."""
    f = feats.float()
    fp = f @ precision  # (B, D)
    # (f - mu)^T P (f - mu) = f P f - 2 f P mu + mu P mu, for every class at once: (B, K)
    d = (fp * f).sum(1, keepdim=True) - 2.0 * fp @ means.T + ((means @ precision) * means).sum(1)[None, :]
    return d.min(dim=1).values


def relative_mahalanobis_score(
    feats: torch.Tensor,
    means: torch.Tensor,
    precision: torch.Tensor,
    background_mean: torch.Tensor,
    background_precision: torch.Tensor,
) -> torch.Tensor:
    """(B, D) features -> (B,) the class Mahalanobis score minus the distance under one Gaussian fitted
    to all training features (Ren et al. 2021): the directions every class varies along stop counting,
    which helps near-OOD inputs. background_mean: (1, D); background_precision: (D, D)."""
    return mahalanobis_score(feats, means, precision) - mahalanobis_score(
        feats, background_mean, background_precision
    )


def knn_score(feats: torch.Tensor, bank: torch.Tensor, *, k: int) -> torch.Tensor:
    """(B, D) features -> (B,) the distance to the k-th nearest training feature, both L2-normalised
    (Sun et al. 2022). bank: (N, D), already normalised."""
    f = nn.functional.normalize(feats.float(), dim=1)
    sims = f @ bank.T  # (B, N) cosine similarities
    kth = torch.topk(sims, k, dim=1).values[:, -1]
    return torch.sqrt(torch.clamp(2.0 - 2.0 * kth, min=0.0))


@dataclass(frozen=True)
class OODDetector:
    """One OOD score with its statistics and its threshold, as shipped in a model folder."""

    score: str
    """One of :data:`SCORES`."""
    threshold: float
    """``ood`` when the score is above it; the ``accept_rate`` quantile of the val split's scores."""
    accept_rate: float
    layer: str | None = None
    """The feature layer of a feature score (:mod:`components.model.features`); None for msp/energy."""
    temperature: float = 1.0
    """Softmax temperature of ``msp`` (the one evaluate fitted, so the score matches served probabilities)."""
    k: int = 0
    """Neighbours of ``knn``."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    """``means`` (K, D) and ``precision`` (D, D) for mahalanobis; ``bank`` (N, D) for knn."""
    info: dict[str, Any] = field(default_factory=dict, compare=False)
    """What evaluate measured (held-out AUROC per score, n_fit...): for /health and model cards."""

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise DataError(f"unknown OOD score {self.score!r} in {OOD_SPEC}: one of {', '.join(SCORES)}")
        needed = {"mahalanobis": ("means", "precision"), "knn": ("bank",),
                  "relative_mahalanobis": ("means", "precision", "background_mean", "background_precision")}.get(
            self.score, ()
        )  # fmt: skip
        if missing := [n for n in needed if n not in self.tensors]:
            raise DataError(f"{OOD_TENSORS} lacks {missing} for the {self.score} score: re-run evaluate")
        if self.score in FEATURE_SCORES:
            check_layer(str(self.layer))

    @property
    def needs_features(self) -> bool:
        return self.score in FEATURE_SCORES

    def scores(self, logits: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) logits and, for a feature score, (B, D) features -> (B,) OOD scores."""
        if self.score == "msp":
            return msp_score(logits, temperature=self.temperature)
        if self.score == "energy":
            return energy_score(logits)
        if feats is None:
            raise ValueError(f"the {self.score} score needs the features at {self.layer}")
        return feature_score(self.score, feats, self.tensors, k=self.k)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """(N,) scores -> (N,) bool: out of distribution."""
        return np.asarray(scores) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        """The JSON part (``ood.json``); the tensors go to ``ood.safetensors``."""
        return {"score": self.score, "threshold": self.threshold, "accept_rate": self.accept_rate,
                "layer": self.layer, "temperature": self.temperature, "k": self.k, "info": self.info}  # fmt: skip

    def save(self, out_dir: Path) -> list[Path]:
        """Write ``ood.json`` (and ``ood.safetensors`` when there are statistics) into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [write_json(out_dir / OOD_SPEC, self.to_dict())]
        if self.tensors:
            tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.tensors.items()}
            save_file(tensors, str(out_dir / OOD_TENSORS))
            paths.append(out_dir / OOD_TENSORS)
        return paths


def feature_score(score: str, feats: torch.Tensor, t: dict[str, torch.Tensor], *, k: int) -> torch.Tensor:
    """(B, D) features -> (B,) the feature-space ``score`` with its statistics ``t``."""
    if score == "mahalanobis":
        return mahalanobis_score(feats, t["means"], t["precision"])
    if score == "relative_mahalanobis":
        return relative_mahalanobis_score(
            feats, t["means"], t["precision"], t["background_mean"], t["background_precision"]
        )
    return knn_score(feats, t["bank"], k=k)


def load_ood(model_dir: Path) -> OODDetector | None:
    """The model's OOD detector, or None when its folder has none (fitted before imgflow shipped one)."""
    spec = Path(model_dir) / OOD_SPEC
    if not spec.exists():
        return None
    raw = json.loads(spec.read_text())
    tensors_file = Path(model_dir) / OOD_TENSORS
    tensors = load_file(str(tensors_file)) if tensors_file.exists() else {}
    return OODDetector(score=str(raw["score"]), threshold=float(raw["threshold"]),
                       accept_rate=float(raw["accept_rate"]), layer=raw.get("layer"),
                       temperature=float(raw.get("temperature", 1.0)), k=int(raw.get("k", 0)), tensors=tensors,
                       info=dict(raw.get("info") or {}))  # fmt: skip


class ScoredNet(nn.Module):
    """The model plus its OOD score in one forward pass: x (B, C, H, W) -> (logits (B, K), score (B,)).

    A feature score reads the plain timm model's layer from the same ``forward_features`` pass as the
    logits (:func:`served_logits`); with a test-time-augmentation wrapper the logits are the wrapper's (as
    served) and the features the unflipped image's. Exports to ONNX (the score is a graph output)."""

    def __init__(self, model: nn.Module, detector: OODDetector) -> None:
        super().__init__()
        self.model, self.detector = model, detector
        self.base = base_model(model) if detector.needs_features else None
        for name, t in detector.tensors.items():  # buffers: they follow .to(device) and go into ONNX
            self.register_buffer(f"ood_{name}", t.float(), persistent=False)

    def _detector_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"ood_{name}") for name in self.detector.tensors}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        det = self.detector
        if self.base is None:
            logits = self.model(x)
            return logits, OODDetector.scores(det, logits)
        layer = cast(Layer, det.layer)
        feats = self.base.forward_features(x)  # type: ignore[operator]
        logits = served_logits(self.model, self.base, feats, x)
        return logits, feature_score(
            det.score, pooled_at(self.base, feats, layer), self._detector_tensors(), k=det.k
        )


def served_logits(model: nn.Module, base: nn.Module, feats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, the logits as served, reusing ``feats`` = ``base.forward_features(x)`` where it can:
    ``model`` is the plain timm model ``base``, or a wrapper over it that takes them (``from_features``:
    :class:`~components.model.checkpoint.FlipTTA`, which then runs only the mirror view); any other
    wrapper runs whole."""
    if base is model:
        return base.forward_head(feats)  # type: ignore[operator]
    take = getattr(model, "from_features", None)
    if callable(take) and getattr(model, "model", None) is base:
        return take(feats, x)
    return model(x)


def pooled_at(model: nn.Module, feats: torch.Tensor, layer: Layer) -> torch.Tensor:
    """``forward_features`` output -> (B, D) at ``layer`` (as :func:`components.model.features.layer_features`)."""
    from components.model.features import pool_feature_map

    if layer == "pooled_last":
        return pool_feature_map(model, feats)
    return model.forward_head(feats, pre_logits=True).flatten(1)  # type: ignore[operator]


# --------------------------------------------------------------------------- conformal prediction sets


def image_uniforms(probs: np.ndarray) -> np.ndarray:
    """(N, K) probabilities -> (N,) numbers in [0, 1), one per image, from a hash of its (rounded)
    probabilities: the tie-breaking draw of randomised APS, made a function of the image so that one
    image always gets the same set (a fixed function of x keeps split conformal's guarantee)."""
    rounded = np.round(np.asarray(probs, dtype=np.float64), 4).astype(np.float32)
    out = np.empty(len(rounded))
    for i, row in enumerate(rounded):
        digest = hashlib.blake2b(row.tobytes(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") / 2.0**64
    return out


def aps_scores(probs: np.ndarray, *, lam: float = 0.0, k_reg: int = 0, randomized: bool = True) -> np.ndarray:
    """(N, K) probabilities -> (N, K) the APS conformity score of every class (Romano et al. 2020): the
    probability mass of the classes ranked above it plus u x its own; with ``lam`` > 0 the RAPS
    penalty ``lam * max(0, rank - k_reg)`` (Angelopoulos et al. 2021). Non-randomised: u = 1."""
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=1)
    above = np.cumsum(sorted_p, axis=1) - sorted_p
    u = image_uniforms(probs)[:, None] if randomized else 1.0
    ranks = np.arange(1, probs.shape[1] + 1)[None, :]
    sorted_scores = above + u * sorted_p + lam * np.maximum(0, ranks - k_reg)
    scores = np.empty_like(sorted_scores)
    np.put_along_axis(scores, order, sorted_scores, axis=1)
    return scores


@dataclass(frozen=True)
class ConformalSets:
    """A calibrated split-conformal set rule: class y is in the set of x when its score <= qhat (qhat[y]
    when class-conditional)."""

    method: str
    """``aps`` or ``raps``."""
    coverage: float
    qhat: tuple[float, ...]
    """One quantile (marginal coverage) or one per class in class order (class-conditional)."""
    lam: float = 0.0
    k_reg: int = 0
    randomized: bool = True
    n_calibration: int = 0
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def class_conditional(self) -> bool:
        return len(self.qhat) > 1

    def scores(self, probs: np.ndarray) -> np.ndarray:
        """(N, K) -> (N, K) conformity scores (:func:`aps_scores` with this rule's penalty)."""
        return aps_scores(probs, lam=self.lam, k_reg=self.k_reg, randomized=self.randomized)

    def sets(self, probs: np.ndarray) -> np.ndarray:
        """(N, K) probabilities -> (N, K) bool membership of each class in each image's set."""
        q = np.asarray(self.qhat, dtype=np.float64)[None, :]
        return self.scores(probs) <= q

    def label_sets(self, probs: np.ndarray, classes: Sequence[str]) -> list[list[str]]:
        """The prediction set of every image as class names, most probable first (possibly empty)."""
        member = self.sets(probs)
        order = np.argsort(-np.asarray(probs), axis=1, kind="stable")
        return [
            [classes[j] for j in row_order if row_in[j]]
            for row_order, row_in in zip(order, member, strict=True)
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; an infinite quantile (too few calibration images: every class) is null."""
        raw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        return {**raw, "qhat": [q if np.isfinite(q) else None for q in self.qhat]}

    def save(self, out_dir: Path) -> Path:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return write_json(Path(out_dir) / CONFORMAL_SPEC, self.to_dict())


def load_conformal(model_dir: Path) -> ConformalSets | None:
    """The model's conformal set rule, or None when its folder has none."""
    path = Path(model_dir) / CONFORMAL_SPEC
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return ConformalSets(method=str(raw["method"]), coverage=float(raw["coverage"]),
                         qhat=tuple(np.inf if q is None else float(q) for q in raw["qhat"]), lam=float(raw.get("lam", 0.0)),
                         k_reg=int(raw.get("k_reg", 0)), randomized=bool(raw.get("randomized", True)),
                         n_calibration=int(raw.get("n_calibration", 0)), info=dict(raw.get("info") or {}))  # fmt: skip


def copy_trust_files(src_dir: Path, model_dir: Path) -> list[str]:
    """Copy the OOD and conformal files evaluate wrote in ``src_dir`` into ``model_dir``; returns the
    names copied (none when evaluate fitted none: the model then serves without those fields)."""
    import shutil

    copied = []
    for name in TRUST_FILES:
        if (Path(src_dir) / name).exists():
            shutil.copyfile(Path(src_dir) / name, Path(model_dir) / name)
            copied.append(name)
    return copied


def trust_status(ood: OODDetector | None, conformal: ConformalSets | None) -> dict[str, Any]:
    """What /health says about the model's OOD flag and prediction sets."""
    missing = "not fitted (model registered before imgflow shipped it; re-run evaluate and register)"
    return {
        "ood": ({"score": ood.score, "threshold": ood.threshold, "accept_rate": ood.accept_rate,
                 "layer": ood.layer} if ood else f"ood: {missing}"),
        "conformal": ({"method": conformal.method, "coverage": conformal.coverage,
                       "class_conditional": conformal.class_conditional} if conformal
                      else f"prediction sets: {missing}"),
    }  # fmt: skip

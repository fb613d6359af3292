"""New classes from a few support images, added to a trained model without retraining.

SimpleShot (Wang et al. 2019) on the features of a stored layer (:mod:`components.model.features`,
default ``prev_stage_3x3``: the stage before the last, pooled to 3x3): a feature is centred on the
class-balanced mean of the class means (the base training classes' and the new support sets', fixed at
the first ``classes add``: :func:`balanced_centre`) and L2-normalised; a class's prototype is the normalised mean of its centred, normalised support
features. Measured while planning issue 24 on Fashion-MNIST, the layer matters more than the method
(prototypes, SimpleShot, a logistic probe: < 5 points apart on one layer).

How a model with added classes answers (:class:`PrototypeHead`), for an image with features ``f``:

1. the base model's own calibrated softmax ``p_base`` over its K trained classes, exactly as before;
2. a cosine *router* over every prototype, the K base-class prototypes (class means of the base
   training set) and the M new ones: ``q = softmax(scale * cos(f, prototypes))``;
3. ``q_new = sum of q over the new classes``, the chance that the image is one of the new classes;
   the answer is ``(1 - q_new) * p_base`` for the base classes and ``q_j`` for new class j.

The probabilities sum to one; among the base classes the ranking and the ratios are the base
model's (the factor ``1 - q_new`` is common to all of them), so a base image keeps its base answer
unless the router puts more mass on one new class than remains on the best base class. ``scale``
is fitted by class-balanced log-loss of the router on held-out base images (the val split) and on
the support images (each against prototypes left without it when its class has two or more).

Files in the model folder: ``model.json``'s ``extra["fewshot"]`` (layer, base class count, base
temperature, scale, per-class support hashes, centring-vector hash) and ``fewshot.safetensors``
(centre (D,), prototypes (K+M, D)). The spec's temperature is 1.0 then (the head already applies
the base model's temperature and returns log-probabilities). No MLflow here: the registry glue is
:mod:`components.pipeline.classes`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from components.core.errors import ConfigError, DataError
from components.core.jsonio import write_json
from components.model.features import (
    Layer,
    base_model,
    check_layer,
    extract_features,
    layer_features,
    logits_and_features,
)
from components.task import get_task

FEWSHOT_KEY = "fewshot"
"""The key of the few-shot record in ``model.json``'s ``extra``."""
FEWSHOT_TENSORS = "fewshot.safetensors"
SCALES = np.geomspace(1.0, 300.0, 64)
"""Candidate router scales (cosine similarities are in [-1, 1]: a scale of ~10-100 is typical)."""
SKIPPED_TRUST_FILES = ("ood.json", "ood.safetensors", "conformal.json")
"""Fitted on the base classes only: not carried into a version with new classes (re-run evaluate)."""


# --------------------------------------------------------------------------- SimpleShot maths


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows of x (N, D) scaled to unit length (a zero row stays zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def centre_normalise(feats: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """SimpleShot's CL2N: (N, D) features minus the base mean (D,), L2-normalised."""
    return l2_normalise(np.asarray(feats, dtype=np.float32) - centre[None, :])


def prototype(normalised: np.ndarray) -> np.ndarray:
    """(n, D) centred, normalised features of one class -> its (D,) unit prototype."""
    return l2_normalise(normalised.mean(axis=0, keepdims=True))[0]


def _require_classes(labels: np.ndarray, num_classes: int) -> None:
    missing = [c for c in range(num_classes) if not (labels == c).any()]
    if missing:
        raise DataError(f"no base training features for class index {missing[0]}: cannot build its prototype")


def class_prototypes(normalised: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, D) prototypes of classes 0..C-1 from (N, D) normalised features and (N,) labels; a
    DataError naming a class without features."""
    _require_classes(labels, num_classes)
    return np.stack([prototype(normalised[labels == c]) for c in range(num_classes)])


def balanced_centre(
    base: np.ndarray, labels: np.ndarray, num_classes: int, support: Sequence[np.ndarray]
) -> np.ndarray:
    """The centring vector: the mean of the class means, the ``num_classes`` base classes' (from (N, D)
    ``base`` features and their labels) and each new class's support mean, every class weighing the
    same. The base training mean alone (SimpleShot as published) put new classes far from the base
    ones off-centre together and cost 7-8 points on Fashion-MNIST's held-out classes (docs/few-shot.md)."""
    _require_classes(labels, num_classes)
    means = [
        class_means(base, labels),
        *(np.asarray(f, dtype=np.float32).mean(axis=0, keepdims=True) for f in support),
    ]
    return np.concatenate(means).mean(axis=0).astype(np.float32)


def class_means(feats: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(C, D) the mean feature of each class present in (N,) ``labels``, in sorted label order."""
    x, y = np.asarray(feats, dtype=np.float32), np.asarray(labels)
    return np.stack([x[y == c].mean(axis=0) for c in np.unique(y)])


def vector_hash(v: np.ndarray) -> str:
    """16 hex digits identifying a float32 vector (the centring vector's tag)."""
    return hashlib.sha256(np.ascontiguousarray(v, dtype=np.float32).tobytes()).hexdigest()[:16]


def support_hash(files: Mapping[str, Sequence[bytes]]) -> str:
    """16 hex digits over class names and the sorted content hashes of their images (order-free)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0")
        for digest in sorted(hashlib.sha256(b).hexdigest() for b in files[name]):
            h.update(digest.encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- the head


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return cast(np.ndarray, e / e.sum(axis=1, keepdims=True))


def combine(p_base: torch.Tensor, cos: torch.Tensor, *, scale: float, base_count: int) -> torch.Tensor:
    """The combination rule (module docstring): p_base (B, K) base probabilities, cos (B, K+M) cosine
    similarities to every prototype -> (B, K+M) probabilities."""
    q = torch.softmax(scale * cos, dim=1)
    q_new = q[:, base_count:]
    return torch.cat([(1.0 - q_new.sum(dim=1, keepdim=True)) * p_base, q_new], dim=1)


class PrototypeHead(nn.Module):
    """A trained classifier plus classes added by prototypes: x (B, C, H, W) -> (B, K+M) log-probabilities
    (read as logits at temperature 1, they give back the probabilities of :func:`combine`).

    ``self.model`` is the loaded classifier (possibly a test-time-augmentation wrapper): feature
    consumers (:func:`components.model.features.base_model`) still reach the timm model under it."""

    def __init__(self, model: nn.Module, *, centre: torch.Tensor, prototypes: torch.Tensor, scale: float,
                 base_count: int, base_temperature: float, layer: str) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.base = base_model(model)
        self.layer: Layer = check_layer(layer)
        self.scale, self.base_count, self.base_temperature = (
            float(scale),
            int(base_count),
            float(base_temperature),
        )
        self.centre: torch.Tensor
        self.prototypes: torch.Tensor
        self.register_buffer("centre", centre.float(), persistent=False)
        self.register_buffer("prototypes", prototypes.float(), persistent=False)

    def _logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.base is not self.model:  # a wrapper (flip TTA): its logits, the plain image's features
            return self.model(x), layer_features(self.base, x, layer=self.layer)
        return logits_and_features(self.base, x, layer=self.layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, feats = self._logits_and_features(x)
        p_base = torch.softmax(logits.float() / self.base_temperature, dim=1)
        f = nn.functional.normalize(feats.float() - self.centre, dim=1)
        probs = combine(p_base, f @ self.prototypes.T, scale=self.scale, base_count=self.base_count)
        return torch.log(probs.clamp_min(1e-12))


# --------------------------------------------------------------------------- the bank on disk


@dataclass(frozen=True)
class PrototypeBank:
    """What a model folder holds about its added classes."""

    centre: np.ndarray
    """(D,) mean feature of the base training set at ``layer``."""
    prototypes: np.ndarray
    """(K+M, D) unit prototypes: the K base classes first (class order of the spec), then the new ones."""
    base_count: int
    scale: float
    layer: str
    base_temperature: float
    support: dict[str, dict[str, Any]]
    """Per added class: ``images`` (support count) and ``hash`` (:func:`support_hash` of its images)."""
    base_data_version: str = ""

    @property
    def new_count(self) -> int:
        return len(self.prototypes) - self.base_count

    def record(self) -> dict[str, Any]:
        """The JSON record kept in ``model.json``'s ``extra["fewshot"]``."""
        return {
            "layer": self.layer, "base_classes": self.base_count, "base_temperature": self.base_temperature,
            "scale": self.scale, "support": self.support, "centre_hash": vector_hash(self.centre),
            "base_data_version": self.base_data_version,
        }  # fmt: skip


def base_class_count(spec_extra: Mapping[str, Any], num_classes: int) -> int:
    """How many of a spec's classes the network itself outputs (the rest come from prototypes)."""
    return int(spec_extra.get(FEWSHOT_KEY, {}).get("base_classes", num_classes))


def read_bank(model_dir: Path) -> PrototypeBank | None:
    """The model folder's bank, or None for a model without added classes."""
    spec = json.loads((Path(model_dir) / "model.json").read_text())
    rec = spec.get("extra", {}).get(FEWSHOT_KEY)
    if rec is None:
        return None
    tensors = load_file(str(Path(model_dir) / FEWSHOT_TENSORS))
    return PrototypeBank(
        centre=tensors["centre"].numpy(), prototypes=tensors["prototypes"].numpy(),
        base_count=int(rec["base_classes"]), scale=float(rec["scale"]), layer=str(rec["layer"]),
        base_temperature=float(rec["base_temperature"]), support=dict(rec["support"]),
        base_data_version=str(rec.get("base_data_version", "")),
    )  # fmt: skip


def with_prototype_head(model: nn.Module, model_dir: Path) -> nn.Module:
    """``model`` (the loaded base classifier) under the folder's :class:`PrototypeHead` (unchanged
    when the folder has no added classes). Used by ``checkpoint.load_classifier``."""
    bank = read_bank(model_dir)
    if bank is None:
        return model
    return PrototypeHead(
        model, centre=torch.from_numpy(bank.centre), prototypes=torch.from_numpy(bank.prototypes),
        scale=bank.scale, base_count=bank.base_count, base_temperature=bank.base_temperature, layer=bank.layer,
    ).eval()  # fmt: skip


def write_version(
    src_dir: Path, out_dir: Path, bank: PrototypeBank | None, *, new_classes: Sequence[str]
) -> Path:
    """A new model folder ``out_dir``: ``src_dir``'s weights and spec with ``bank`` (None: no added
    classes left) and ``new_classes`` after the base classes. Trust files fitted on the base classes
    only (OOD detector, conformal sets) are left out."""
    shutil.copytree(src_dir, out_dir, ignore=shutil.ignore_patterns(FEWSHOT_TENSORS, *SKIPPED_TRUST_FILES))
    spec = json.loads((out_dir / "model.json").read_text())
    extra = dict(spec.get("extra") or {})
    base_count = base_class_count(extra, len(spec["classes"]))
    base_classes = list(spec["classes"])[:base_count]
    extra.pop(FEWSHOT_KEY, None)
    if bank is None:
        old = json.loads((src_dir / "model.json").read_text()).get("extra", {}).get(FEWSHOT_KEY)
        spec["temperature"] = float(old["base_temperature"]) if old else spec["temperature"]
    else:
        extra[FEWSHOT_KEY] = bank.record()
        spec["temperature"] = 1.0  # the head applies the base temperature itself
        save_file({"centre": torch.from_numpy(np.ascontiguousarray(bank.centre, dtype=np.float32)),
                   "prototypes": torch.from_numpy(np.ascontiguousarray(bank.prototypes, dtype=np.float32))},
                  str(out_dir / FEWSHOT_TENSORS))  # fmt: skip
    write_json(out_dir / "model.json", {**spec, "classes": [*base_classes, *new_classes], "extra": extra})
    return out_dir


# --------------------------------------------------------------------------- adding and removing classes


@dataclass(frozen=True)
class BaseFeatures:
    """The base model's features the bank is built from (the embedding store's rows)."""

    train: np.ndarray
    """(N, D) training-set features at the layer (centre and base prototypes)."""
    train_labels: np.ndarray
    """(N,) base class index of each training row."""
    heldout: np.ndarray
    """(n, D) held-out (val) features: the router's scale is fitted on them and the support set."""
    heldout_labels: np.ndarray
    data_version: str = ""


def fit_scale(cos: np.ndarray, labels: np.ndarray, *, scales: np.ndarray = SCALES) -> float:
    """The router scale minimising class-balanced log-loss: cos (N, P) similarities, labels (N,) in 0..P-1."""
    classes = np.unique(labels)
    weights = np.zeros(len(labels))
    for c in classes:
        weights[labels == c] = 1.0 / (labels == c).sum() / len(classes)
    losses = [
        -(weights * np.log(_softmax(s * cos)[np.arange(len(labels)), labels] + 1e-12)).sum() for s in scales
    ]
    return float(scales[int(np.argmin(losses))])


def _left_out_cosines(normalised: np.ndarray, protos: np.ndarray, own: int) -> np.ndarray:
    """(n, P) cosines of a new class's n support features, its own prototype (column ``own``) rebuilt
    without the image itself when n >= 2 (so the scale is not fitted on images scoring themselves)."""
    cos = normalised @ protos.T
    n = len(normalised)
    if n >= 2:
        total = normalised.sum(axis=0)
        loo = l2_normalise((total[None, :] - normalised) / (n - 1))
        cos[:, own] = (normalised * loo).sum(axis=1)
    return cos


def _calibrated_scale(protos: np.ndarray, base: BaseFeatures, centre: np.ndarray,
                      support: Sequence[np.ndarray], base_count: int) -> float:  # fmt: skip
    """:func:`fit_scale` on the held-out base rows and every new class's support rows (left out)."""
    cos_parts = [centre_normalise(base.heldout, centre) @ protos.T] if len(base.heldout) else []
    label_parts = [np.asarray(base.heldout_labels, dtype=np.int64)] if len(base.heldout) else []
    first_new = len(protos) - len(support)
    for j, feats in enumerate(support):
        cos_parts.append(_left_out_cosines(centre_normalise(feats, centre), protos, first_new + j))
        label_parts.append(np.full(len(feats), first_new + j, dtype=np.int64))
    return fit_scale(np.concatenate(cos_parts), np.concatenate(label_parts))


def add_classes(
    src_dir: Path,
    out_dir: Path,
    support: Mapping[str, np.ndarray],
    *,
    base: BaseFeatures,
    layer: str,
    hashes: Mapping[str, str],
) -> PrototypeBank:
    """Write ``out_dir``: the model in ``src_dir`` plus one class per ``support`` entry (name -> (k, D)
    support features at ``layer``), prototypes centred on :func:`balanced_centre`. A model that already
    has added classes keeps its centre, base prototypes and classes (their layer must match).
    ``hashes``: each new class's :func:`support_hash`. Returns the bank written."""
    spec = json.loads((Path(src_dir) / "model.json").read_text())
    _check_addable(spec, support, layer)
    old = read_bank(src_dir)
    if old is None:
        base_count = len(spec["classes"])
        labels = np.asarray(base.train_labels)
        centre = balanced_centre(base.train, labels, base_count, list(support.values()))
        protos = class_prototypes(centre_normalise(base.train, centre), labels, base_count)
        old_support: dict[str, dict[str, Any]] = {}
        temperature = float(spec.get("temperature", 1.0))
    else:
        centre, base_count, protos = old.centre, old.base_count, old.prototypes
        old_support, temperature = dict(old.support), old.base_temperature
    new_protos = [prototype(centre_normalise(f, centre)) for f in support.values()]
    all_protos = np.concatenate([protos, np.stack(new_protos)]).astype(np.float32)
    old_new = len(protos) - base_count
    # Support rows of the classes added before are not kept: their prototypes stay, only this call's rows
    # calibrate (with the held-out base rows) the shared scale.
    scale = _calibrated_scale(all_protos, base, centre, list(support.values()), base_count + old_new)
    bank = PrototypeBank(
        centre=centre, prototypes=all_protos, base_count=base_count, scale=scale, layer=layer,
        base_temperature=temperature, base_data_version=base.data_version or (old.base_data_version if old else ""),
        support={**old_support, **{n: {"images": len(f), "hash": hashes[n]} for n, f in support.items()}},
    )  # fmt: skip
    write_version(Path(src_dir), Path(out_dir), bank, new_classes=[*spec["classes"][base_count:], *support])
    return bank


def _check_addable(spec: Mapping[str, Any], support: Mapping[str, np.ndarray], layer: str) -> None:
    if get_task(spec.get("task")).activation != "softmax":
        raise ConfigError("few-shot classes need a single-label model (one softmax over the classes)")
    if not support:
        raise DataError("no classes to add: the folder needs one sub-folder of support images per class")
    taken = set(spec["classes"]) & set(support)
    if taken:
        raise DataError(f"class {sorted(taken)[0]!r} already exists in the model: choose another name "
                        "(or `imgflow classes remove` it first)")  # fmt: skip
    rec = (spec.get("extra") or {}).get(FEWSHOT_KEY)
    if rec is not None and rec["layer"] != check_layer(layer):
        raise ConfigError(
            f"the model's added classes use layer {rec['layer']!r}, not {layer!r}: use the same layer"
        )


def remove_class(src_dir: Path, out_dir: Path, name: str) -> PrototypeBank | None:
    """Write ``out_dir``: the model in ``src_dir`` without added class ``name`` (a DataError when it is
    not one: trained classes cannot be removed without retraining). The scale is kept. Returns the
    bank written (None when no added class is left: the folder is then the base model again)."""
    spec = json.loads((Path(src_dir) / "model.json").read_text())
    bank = read_bank(src_dir)
    added = list(spec["classes"][bank.base_count :]) if bank else []
    if name not in added:
        trained = name in spec["classes"]
        why = "is a trained class (only classes added from support images can be removed)" if trained else (
            f"is not a class of the model (added classes: {', '.join(added) or 'none'})")  # fmt: skip
        raise DataError(f"cannot remove {name!r}: it {why}")
    assert bank is not None
    keep = [n for n in added if n != name]
    if not keep:
        write_version(Path(src_dir), Path(out_dir), None, new_classes=[])
        return None
    rows = [bank.base_count + added.index(n) for n in keep]
    kept = PrototypeBank(
        centre=bank.centre, prototypes=np.concatenate([bank.prototypes[: bank.base_count], bank.prototypes[rows]]),
        base_count=bank.base_count, scale=bank.scale, layer=bank.layer, base_temperature=bank.base_temperature,
        support={n: bank.support[n] for n in keep}, base_data_version=bank.base_data_version,
    )  # fmt: skip
    write_version(Path(src_dir), Path(out_dir), kept, new_classes=keep)
    return kept


# --------------------------------------------------------------------------- support folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def read_support_folder(folder: Path, *, k: int) -> dict[str, list[bytes]]:
    """``folder``'s sub-folders as new classes -> the bytes of their images (sorted by file name).

    Every file in a class folder is a support image (hidden files aside), so a stray file is an error
    rather than a silently smaller support set. A DataError (nothing written yet) for: a missing
    folder, no sub-folders, a class with fewer than ``k`` images, a file that does not decode."""
    from components.model.checkpoint import decode_image

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"support folder {folder} does not exist: give a folder with one sub-folder per new class"
        )
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(
            f"{folder} has no sub-folders: put each new class's images in a folder named after it"
        )
    out: dict[str, list[bytes]] = {}
    for d in classes:
        files = sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith("."))
        if len(files) < k:
            raise DataError(f"class {d.name!r} has {len(files)} support images, fewer than k={k}: add images "
                            "or lower --k")  # fmt: skip
        out[d.name] = [f.read_bytes() for f in files]
        for f, data in zip(files, out[d.name], strict=True):
            try:
                decode_image(data, mode="RGB")
            except DataError as e:
                raise DataError(f"support image {f} cannot be used: {e}") from None
    return out


def support_features(model: nn.Module, spec: Any, images: Sequence[bytes], *, layer: str) -> np.ndarray:
    """(k, D) features at ``layer`` of raw image bytes, preprocessed as the model predicts (``spec``:
    its :class:`~components.model.checkpoint.ModelSpec`)."""
    from components.model.checkpoint import decode_image
    from components.model.models import create_image_transform, image_mode

    transform = create_image_transform(spec.data_config, is_training=False)
    mode = image_mode(spec.in_chans)
    x = torch.stack([transform(decode_image(b, mode=mode)) for b in images])
    return extract_features(model, x, layer=layer)

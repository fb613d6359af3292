"""Trained-model files without pickle: ``model.safetensors`` (weights) + ``model.json`` (spec).

The spec holds everything needed to rebuild the model and predict from raw image bytes: the timm
name, class names, input channels, the resolved preprocessing config and the temperature.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from torch import nn

from components.core.errors import ConfigError, DataError
from components.core.jsonio import write_json
from components.data.image_stats import model_input
from components.model.models import create_classifier, create_image_transform, image_mode
from components.model.uncertainty import ConformalSets, OODDetector, ScoredNet, load_conformal, load_ood
from components.task import Task, get_task
from components.task.taxonomy import ShippedTree, load_hierarchy

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"


@dataclass(frozen=True)
class ModelSpec:
    model: str
    classes: tuple[str, ...]
    in_chans: int
    data_config: dict[str, Any]
    task: Task = field(default_factory=lambda: get_task(None))
    """What the model decides (:class:`components.task.Task`): single-label (softmax over classes) or
    multi-label (a sigmoid per label). A task name is accepted too; model.json stores the name."""
    temperature: float = 1.0
    thresholds: tuple[float, ...] | None = None
    """Multi-label: per-label decision thresholds (tuned on val by evaluate), in class order."""
    tta: str = "none"
    """Test-time augmentation of every prediction: ``none`` or ``hflip`` (average of the logits of
    the image and its mirror image)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", get_task(self.task))  # a name (model.json, callers) -> the Task

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, as model.json stores it (the task by its name)."""
        raw = {f.name: getattr(self, f.name) for f in fields(self)}
        return json.loads(json.dumps({**raw, "task": self.task.name}))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelSpec:
        raw = dict(raw)
        raw["classes"] = tuple(raw["classes"])
        if raw.get("thresholds") is not None:
            raw["thresholds"] = tuple(float(t) for t in raw["thresholds"])
        raw["data_config"] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in raw["data_config"].items()
        }
        return cls(**raw)


def save_classifier(state_dict: dict[str, torch.Tensor], spec: ModelSpec, out_dir: Path) -> Path:
    """Write weights and spec into ``out_dir`` (created); returns ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    write_json(out_dir / SPEC_FILE, spec.to_dict())
    return out_dir


def load_spec(model_dir: Path) -> ModelSpec:
    return ModelSpec.from_dict(json.loads((Path(model_dir) / SPEC_FILE).read_text()))


class FlipTTA(nn.Module):
    """Logits averaged over the image and its horizontal mirror (flipped by a gather, which exports
    to ONNX)."""

    def __init__(self, model: nn.Module, width: int) -> None:
        super().__init__()
        self.model = model
        self.reverse: torch.Tensor
        self.register_buffer("reverse", torch.arange(width - 1, -1, -1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(x.index_select(3, self.reverse))) / 2

    def from_features(self, feats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)`` given the wrapped model's ``forward_features(x)``: the image view's pass is
        shared with whoever read those features; only the mirror view runs again."""
        return (self.model.forward_head(feats) + self.model(x.index_select(3, self.reverse))) / 2  # type: ignore[operator]


def load_classifier(model_dir: Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model from its spec and load the weights (safetensors: no code execution); with
    ``spec.tta == "hflip"`` the model predicts through :class:`FlipTTA`. An ensemble folder
    (:mod:`components.model.ensemble`) loads as one module averaging its members' probabilities."""
    from components.model import ensemble  # imports this module: a lazy import avoids the cycle

    spec = load_spec(model_dir)
    model: nn.Module = (
        ensemble.build_ensemble(model_dir, spec) if ensemble.is_ensemble_dir(model_dir)
        else create_classifier(spec.model, _network_outputs(spec), in_chans=spec.in_chans, pretrained=False)
    )  # fmt: skip
    model.load_state_dict(load_file(str(Path(model_dir) / WEIGHTS_FILE)))
    if spec.tta == "hflip":
        model = FlipTTA(model, int(spec.data_config["input_size"][-1]))
    elif spec.tta != "none":
        raise DataError(f"{model_dir}: unknown test-time augmentation {spec.tta!r} (none | hflip)")
    return _with_added_classes(model, Path(model_dir)).eval(), spec


def _network_outputs(spec: ModelSpec) -> int:
    """The network's own outputs: classes added from support images (:mod:`components.model.fewshot`)
    come from prototypes, not from the classifier's last layer."""
    from components.model.fewshot import base_class_count  # lazy, as the ensemble import above

    return base_class_count(spec.extra, spec.num_classes)


def _with_added_classes(model: nn.Module, model_dir: Path) -> nn.Module:
    """The model under its few-shot prototype head when the folder has added classes, else itself."""
    from components.model.fewshot import with_prototype_head

    return with_prototype_head(model, model_dir)


def with_temperature(
    model_dir: Path, temperature: float, thresholds: Sequence[float] | None = None
) -> ModelSpec:
    """Record a fitted temperature (and, multi-label, the per-label thresholds) in the spec file;
    returns the new spec."""
    spec = load_spec(model_dir)
    if thresholds is not None and len(thresholds) != spec.num_classes:
        raise ValueError(f"{len(thresholds)} thresholds for {spec.num_classes} classes")
    spec = replace(
        spec,
        temperature=float(temperature),
        thresholds=tuple(float(t) for t in thresholds) if thresholds is not None else spec.thresholds,
    )
    write_json(Path(model_dir) / SPEC_FILE, spec.to_dict())
    return spec


def decode_image(data: bytes, *, mode: str) -> Image.Image:
    """Raw file bytes -> PIL image in ``mode``; a clear DataError for anything that is not an image."""
    if not data:
        raise DataError("empty input: expected the bytes of an image file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"input is not a decodable image ({e.__class__.__name__}: {e})") from e
    return model_input(img, mode)


@dataclass(frozen=True)
class Scored:
    """A batch's predictions with what the model ships about trusting them."""

    probs: np.ndarray
    """(N, K) calibrated probabilities."""
    ood_scores: np.ndarray | None = None
    """(N,) OOD scores (higher: less like the training data); None when the model has no detector."""


class Predictor:
    """Batched inference from raw image bytes, with the spec's preprocessing and temperature, and
    (when the model folder has them: :mod:`components.model.uncertainty`) its OOD detector and
    conformal prediction sets."""

    def __init__(
        self,
        model: nn.Module,
        spec: ModelSpec,
        *,
        batch_size: int = 256,
        device: str = "cpu",
        ood: OODDetector | None = None,
        conformal: ConformalSets | None = None,
        hierarchy: ShippedTree | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.spec = spec
        self.batch_size = batch_size
        self.mode = image_mode(spec.in_chans)
        self.transform = create_image_transform(spec.data_config, is_training=False)
        self.ood, self.conformal = ood, conformal
        self.hierarchy = hierarchy  # a label tree: paths, parent probabilities, back-off
        self.scored_net = ScoredNet(self.model, ood).eval().to(self.device) if ood is not None else None

    @classmethod
    def from_dir(cls, model_dir: Path, **kwargs: Any) -> Predictor:
        model, spec = load_classifier(model_dir)
        return cls(model, spec, ood=load_ood(model_dir), conformal=load_conformal(model_dir),
                   hierarchy=load_hierarchy(model_dir), **kwargs)  # fmt: skip

    def preprocess(self, images: list[bytes]) -> torch.Tensor:
        """images: raw file bytes -> (N, C, H, W) float tensor."""
        return torch.stack([self.transform(decode_image(b, mode=self.mode)) for b in images])

    @torch.inference_mode()
    def predict_proba(self, images: list[bytes]) -> np.ndarray:
        """images: raw file bytes -> (N, K) calibrated probabilities: a softmax over the classes, or
        (multi-label) one sigmoid per label."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x = self.preprocess(images[i : i + self.batch_size]).to(self.device, non_blocking=True)
            logits = self.model(x).float()
            out.append(probabilities(logits, self.spec).cpu().numpy())
        k = self.spec.num_classes
        return np.concatenate(out) if out else np.zeros((0, k), dtype=np.float32)

    @torch.inference_mode()
    def score_batch(self, x: torch.Tensor) -> Scored:
        """x: (B, C, H, W) preprocessed -> probabilities and (with a detector) OOD scores, one pass."""
        x = x.to(self.device, non_blocking=True)
        if self.scored_net is None:
            return Scored(probabilities(self.model(x).float(), self.spec).cpu().numpy())
        logits, scores = self.scored_net(x)
        return Scored(probabilities(logits.float(), self.spec).cpu().numpy(), scores.float().cpu().numpy())

    def predict_scored(self, images: list[bytes]) -> Scored:
        """images: raw file bytes -> :class:`Scored` (probabilities, OOD scores when fitted)."""
        parts = [self.score_batch(self.preprocess(images[i : i + self.batch_size]))
                 for i in range(0, len(images), self.batch_size)]  # fmt: skip
        if not parts:
            return Scored(np.zeros((0, self.spec.num_classes), dtype=np.float32))
        scores = None if self.scored_net is None else np.concatenate([p.ood_scores for p in parts])
        return Scored(np.concatenate([p.probs for p in parts]), scores)

    def trust_fields(self, scored: Scored) -> list[dict[str, Any]]:
        """Per image: ``ood_score`` and ``ood`` (with a detector) and ``prediction_set`` (with a conformal
        rule); an empty dict each for a model that ships neither (the fields are absent, not null)."""
        out: list[dict[str, Any]] = [{} for _ in range(len(scored.probs))]
        if self.ood is not None and scored.ood_scores is not None:
            for rec, s, flag in zip(out, scored.ood_scores, self.ood.flags(scored.ood_scores), strict=True):
                rec.update(ood_score=float(s), ood=bool(flag))
        if self.conformal is not None:
            sets = self.conformal.label_sets(scored.probs, self.spec.classes)
            for rec, labels in zip(out, sets, strict=True):
                rec["prediction_set"] = labels
        if self.hierarchy is not None:  # path, parent, parent_probability(ies), answer (back-off)
            for rec, extra in zip(out, self.hierarchy.fields(scored.probs), strict=True):
                rec.update(extra)
        return out

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """The spec's decision on (N, K) probabilities (:meth:`components.task.Task.decide`): (N,) class
        indices, or (N, K) 0/1 with a label predicted when its probability reaches its threshold."""
        return self.spec.task.decide(probs, thresholds=self.spec.thresholds)

    def label_sets(self, probs: np.ndarray) -> list[list[str]]:
        """The predicted labels per image, most probable first: every label at or above its threshold
        (multi-label; possibly none), or the single most probable class."""
        return self.spec.task.label_sets(probs, self.spec.classes, thresholds=self.spec.thresholds)


def resolve_device(device: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (the first GPU when CUDA is available, else the CPU)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: CUDA is not available on this machine")
    return resolved


def probabilities(logits: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Temperature-scaled probabilities of a model's logits: softmax, or a sigmoid per label."""
    return spec.task.torch_probabilities(logits, temperature=spec.temperature)

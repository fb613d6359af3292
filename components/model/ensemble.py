"""Ensembles registered as one model: several trained members whose probabilities are averaged.

An ensemble folder looks like any imgflow model folder, so everything that loads a model through
:func:`components.model.checkpoint.load_classifier` (``Predictor.from_dir``, the MLflow pyfunc,
``serve``, ``predict``, the ONNX export, evaluate) handles it unchanged:

- ``model.safetensors``: every member's weights in one file, keys ``members.<i>.<member key>`` (the
  state dict of :class:`Ensemble`), so the folder's weights hash covers all members;
- ``model.json``: the combined model's spec (classes, preprocessing, the temperature fitted on val
  *after* combining, test-time augmentation);
- ``ensemble.json``: how to rebuild the members (each member's own spec) and what they were (seed,
  model, validation accuracy), plus the combination rule.

The combined model outputs "logits" whose temperature-scaled probabilities are the members' mean
probabilities: ``log(mean_i softmax(z_i))`` for a single-label model (softmax of it is the mean
again), ``logit(mean_i sigmoid(z_i))`` per label for a multi-label one. Temperature scaling, the
ONNX graph (one graph averaging the members' softmax) and every metric then work on the average.

Feature-space consumers (the OOD detector's Mahalanobis/kNN scores, drift embeddings) read the first
member's features: :func:`components.model.features.base_model` follows :attr:`Ensemble.model`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from components.core.errors import DataError
from components.core.jsonio import write_json
from components.model.checkpoint import WEIGHTS_FILE, ModelSpec, load_spec, save_classifier
from components.model.models import create_classifier

ENSEMBLE_FILE = "ensemble.json"
COMBINE_RULE = "mean_probabilities"
_MEMBER_KEYS = ("classes", "in_chans", "data_config")
"""Spec fields every member must share: the ensemble has one class list and one preprocessing."""


@dataclass(frozen=True)
class Member:
    """One trained member: its spec (how to rebuild it) and what it was (for reports)."""

    spec: ModelSpec
    label: str
    """Human name, e.g. ``imgflow_cnn_avgmax seed 1`` or ``snapshot 2/3``."""
    info: dict[str, Any] = field(default_factory=dict)
    """JSON-able facts: ``seed``, ``model``, ``val_accuracy``, ``val_loss``, ``epoch``..."""

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "info": dict(self.info), "spec": self.spec.to_dict()}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Member:
        return cls(ModelSpec.from_dict(raw["spec"]), str(raw["label"]), dict(raw.get("info", {})))


def combined_logits(probs: torch.Tensor, activation: str) -> torch.Tensor:
    """probs: (N, K) averaged probabilities -> (N, K) "logits" whose activation gives them back:
    ``log p`` under a softmax (the rows sum to 1), ``log p - log(1 - p)`` under a sigmoid. Clamped
    away from 0 and 1 so no logit is infinite (an infinite one would make temperature fitting NaN)."""
    tiny = torch.finfo(probs.dtype).tiny
    if activation == "softmax":
        return torch.log(probs.clamp_min(tiny))
    p = probs.clamp(1e-7, 1 - 1e-7)
    return torch.log(p) - torch.log1p(-p)


class Ensemble(nn.Module):
    """x (B, C, H, W) -> (B, K) combined logits: the members' probabilities averaged (see the module
    docstring). ``activation``: the task's (``softmax`` | ``sigmoid``)."""

    def __init__(self, members: Sequence[nn.Module], *, activation: str) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.activation = activation

    @property
    def model(self) -> nn.Module:
        """The first member: where feature readers (``base_model``) find named layers."""
        return self.members[0]

    def member_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """x -> (M, B, K) each member's probabilities (temperature 1)."""
        logits = torch.stack([m(x).float() for m in self.members])
        return torch.softmax(logits, dim=-1) if self.activation == "softmax" else torch.sigmoid(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combined_logits(self.member_probabilities(x).mean(dim=0), self.activation)


def is_ensemble_dir(model_dir: Path) -> bool:
    """True for a folder written by :func:`save_ensemble`."""
    return (Path(model_dir) / ENSEMBLE_FILE).is_file()


def read_members(model_dir: Path) -> list[Member]:
    """The members recorded in an ensemble folder, in weight order."""
    raw = json.loads((Path(model_dir) / ENSEMBLE_FILE).read_text())
    if raw.get("combine") != COMBINE_RULE:
        raise DataError(f"{model_dir}: unknown ensemble combination {raw.get('combine')!r} ({COMBINE_RULE})")
    return [Member.from_dict(m) for m in raw["members"]]


def build_ensemble(model_dir: Path, spec: ModelSpec) -> Ensemble:
    """The (untrained) :class:`Ensemble` of an ensemble folder; the caller loads ``model.safetensors``."""
    members = [
        create_classifier(m.spec.model, m.spec.num_classes, in_chans=m.spec.in_chans, pretrained=False)
        for m in read_members(model_dir)
    ]
    return Ensemble(members, activation=spec.task.activation)


def _check_compatible(specs: Sequence[ModelSpec], labels: Sequence[str]) -> None:
    """A DataError naming the first member whose classes, channels, preprocessing or task differ."""
    first = specs[0]
    for spec, label in zip(specs[1:], labels[1:], strict=True):
        for key in _MEMBER_KEYS:
            if getattr(spec, key) != getattr(first, key):
                raise DataError(
                    f"ensemble member {label!r} has other {key} than {labels[0]!r}: members must share "
                    f"classes, input channels and preprocessing (set train.input_size to one value)"
                )
        if spec.task.name != first.task.name or spec.tta != first.tta:
            raise DataError(f"ensemble member {label!r} has another task or test-time augmentation")


def save_ensemble(
    member_dirs: Sequence[Path],
    out_dir: Path,
    *,
    labels: Sequence[str] | None = None,
    infos: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Combine trained model folders into one ensemble folder ``out_dir`` (replaced); returns it.

    The combined spec starts at temperature 1 (evaluate refits it on val, after combining); member
    temperatures and thresholds are dropped (the members' raw probabilities are averaged)."""
    if len(member_dirs) < 2:
        raise DataError(f"an ensemble needs at least 2 members, got {len(member_dirs)}")
    labels = list(labels) if labels is not None else [Path(d).name for d in member_dirs]
    infos = list(infos) if infos is not None else [{} for _ in member_dirs]
    specs = [load_spec(d) for d in member_dirs]
    _check_compatible(specs, labels)
    state: dict[str, torch.Tensor] = {}
    for i, d in enumerate(member_dirs):
        state.update({f"members.{i}.{k}": v for k, v in load_file(str(Path(d) / WEIGHTS_FILE)).items()})
    members = [
        Member(replace(s, temperature=1.0, thresholds=None, tta="none"), label, dict(info))
        for s, label, info in zip(specs, labels, infos, strict=True)
    ]
    combined = replace(
        specs[0], model=ensemble_name(specs), temperature=1.0, thresholds=None,
        extra={"ensemble": {"members": len(members), "combine": COMBINE_RULE}},
    )  # fmt: skip
    out_dir = Path(out_dir)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    save_classifier(state, combined, out_dir)
    write_json(out_dir / ENSEMBLE_FILE, {"combine": COMBINE_RULE, "members": [m.to_dict() for m in members]})
    return out_dir


def ensemble_name(specs: Sequence[ModelSpec]) -> str:
    """The combined spec's ``model`` label, e.g. ``ensemble[3x imgflow_cnn_avgmax]`` (not a timm name:
    :func:`build_ensemble` rebuilds the members from ``ensemble.json``)."""
    names: dict[str, int] = {}
    for s in specs:
        names[s.model] = names.get(s.model, 0) + 1
    return "ensemble[" + ", ".join(f"{n}x {m}" for m, n in names.items()) + "]"


def ensemble_summary(model_dir: Path) -> dict[str, Any] | None:
    """``{"members": [{label, info...}], "combine": ...}`` of an ensemble folder (reports, cards);
    None for a single model."""
    if not is_ensemble_dir(model_dir):
        return None
    return {
        "combine": COMBINE_RULE,
        "members": [{"label": m.label, "model": m.spec.model, **m.info} for m in read_members(model_dir)],
    }

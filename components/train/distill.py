"""Knowledge distillation (Hinton, Vinyals and Dean, 2015): a student learns from a teacher's softened
class probabilities as well as from the hard labels.

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * hard(z_s, y)

``z_t`` are the teacher's logits on the *same augmented batch* the student sees. The teacher runs in
every Ray Train worker (eval mode, no gradients) rather than from logits precomputed once per image:
random crops, flips, erasing and mixup change each batch's inputs, and logits of the clean image would
be targets for an image the student never saw. Its cost is one extra forward pass of the teacher per
step. The T^2 factor keeps the soft term's gradients at the scale of the hard term's when T changes.

The teacher is an imgflow model folder (safetensors + spec) on storage the workers read; the driver
resolves it from the registry (:mod:`components.pipeline.distillation`) and checks it with
:func:`check_teacher` before Ray starts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from components.core.errors import ConfigError
from components.model.checkpoint import ModelSpec, load_classifier, load_spec
from components.task import get_task
from components.train.recipe import TrainRecipe

logger = logging.getLogger(__name__)


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """T^2 * KL(p_t || p_s) of the temperature-softened distributions, averaged over the batch.

    student_logits, teacher_logits: (N, K). The teacher's side carries no gradient."""
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    hard_loss: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """``alpha`` * the soft-target loss + (1 - ``alpha``) * ``hard_loss`` (the recipe's own training
    loss on the labels, already computed). alpha=0 is plain training; alpha=1 ignores the labels."""
    if alpha == 0.0:
        return hard_loss
    soft = soft_target_loss(student_logits, teacher_logits, temperature=temperature)
    return alpha * soft + (1.0 - alpha) * hard_loss


class TeacherInput(nn.Module):
    """Turns a batch prepared for the student into the teacher's input: the student's normalisation
    undone and the teacher's applied, then resized when the two models read different sizes."""

    def __init__(self, student_config: dict[str, Any], teacher_config: dict[str, Any]) -> None:
        super().__init__()
        s_mean, s_std = _stats(student_config, "mean"), _stats(student_config, "std")
        t_mean, t_std = _stats(teacher_config, "mean"), _stats(teacher_config, "std")
        # x_t = (x_s * s_std + s_mean - t_mean) / t_std, folded into one scale and shift per channel
        self.scale: torch.Tensor
        self.shift: torch.Tensor
        self.register_buffer("scale", s_std / t_std, persistent=False)
        self.register_buffer("shift", (s_mean - t_mean) / t_std, persistent=False)
        self.same_stats = bool(torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std))
        self.size = tuple(int(v) for v in teacher_config["input_size"][-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.same_stats:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return x


def _stats(config: dict[str, Any], key: str) -> torch.Tensor:
    return torch.tensor([float(v) for v in config[key]], dtype=torch.float32).view(1, -1, 1, 1)


def check_teacher(teacher_dir: Path, *, classes: Sequence[str], in_chans: int, task: str) -> ModelSpec:
    """The teacher's spec, or a ConfigError saying why this teacher cannot teach on this data: another
    class set (or order: logits are matched by position), other input channels, or a task whose outputs
    are not one softmax over the classes."""
    if not (Path(teacher_dir) / "model.json").is_file():
        raise ConfigError(f"teacher {teacher_dir} is not an imgflow model folder (no model.json)")
    spec = load_spec(teacher_dir)
    if get_task(task).activation != "softmax" or spec.task.activation != "softmax":
        raise ConfigError("distillation needs a single-label task (one softmax over the classes)")
    if tuple(spec.classes) != tuple(classes):
        missing, extra = sorted(set(classes) - set(spec.classes)), sorted(set(spec.classes) - set(classes))
        detail = f"missing {missing}, extra {extra}" if missing or extra else "same names in another order"
        raise ConfigError(
            f"the teacher's classes do not match the data's ({detail}): the teacher must be trained on "
            f"this dataset's class set, in the same order ({len(classes)} classes)"
        )
    if spec.in_chans != in_chans:
        raise ConfigError(
            f"the teacher reads {spec.in_chans}-channel images, the student {in_chans}: set train.in_chans="
            f"{spec.in_chans} or pick a teacher trained on the same kind of image"
        )
    return spec


class Distiller:
    """The KD training loss of one worker: ``distiller(x, student_logits, y)`` runs the frozen teacher on
    ``x`` (the same augmented batch) and combines its soft targets with ``hard_loss(student_logits, y)``."""

    def __init__(
        self,
        teacher: nn.Module,
        hard_loss: nn.Module,
        *,
        temperature: float,
        alpha: float,
        adapt: nn.Module | None = None,
    ) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.hard_loss = hard_loss
        self.temperature = temperature
        self.alpha = alpha
        self.adapt = adapt or nn.Identity()

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(self.adapt(x))

    def __call__(self, x: torch.Tensor, student_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hard = self.hard_loss(student_logits, y)
        if self.alpha == 0.0:
            return hard  # plain training: the teacher's pass would be wasted
        return distillation_loss(
            student_logits, self.teacher_logits(x), hard, temperature=self.temperature, alpha=self.alpha
        )


def build_distiller(
    recipe: TrainRecipe, hard_loss: nn.Module, student_config: dict[str, Any], device: torch.device
) -> Distiller:
    """The recipe's teacher (``recipe.teacher_dir``) loaded on ``device`` as a :class:`Distiller`;
    ``student_config``: the student's resolved data config (what its batches are prepared with)."""
    if recipe.teacher_dir is None or recipe.distill_temperature is None or recipe.distill_alpha is None:
        raise ValueError("the recipe names no teacher: build_distiller is for distillation recipes")
    check_teacher(recipe.teacher_dir, classes=recipe.classes, in_chans=recipe.in_chans, task=recipe.task)
    teacher, spec = load_classifier(recipe.teacher_dir)
    adapt = TeacherInput(student_config, spec.data_config)
    return Distiller(
        teacher.to(device), hard_loss, temperature=recipe.distill_temperature, alpha=recipe.distill_alpha,
        adapt=adapt.to(device),
    )  # fmt: skip

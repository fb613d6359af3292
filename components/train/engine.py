"""Plain PyTorch steps, shared by the Ray workers and by single-process runs (benchmarks, tests).

Kept free of Ray so the per-worker loop stays thin (Made-With-ML's train_step/eval_step split).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; each data-parallel rank gets its own stream.

    ``PYTHONHASHSEED`` is left alone: it only reaches processes started after it is set, and a
    component does not change its process's environment."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker seeding derived from torch's per-worker seed."""
    s = torch.initial_seed() % (2**32)
    np.random.seed(s)
    random.seed(s)


def set_deterministic(enabled: bool) -> None:
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.benchmark = not enabled


def _batches(
    loader: Iterable[Any], device: torch.device, *, channels_last: bool = False
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for x, y in loader:
        yield x.to(device, non_blocking=True, memory_format=fmt), y.to(device, non_blocking=True)


def count_correct(logits: torch.Tensor, y: torch.Tensor) -> int:
    """Correct predictions in a batch: argmax == class index, or, for multi-hot targets (N, K), the
    whole label set right at probability 0.5 (subset accuracy, as scikit-learn's accuracy_score)."""
    if y.ndim == 2:
        return int(((logits > 0) == (y > 0.5)).all(dim=1).sum())
    return int((logits.argmax(1) == y).sum())


def allreduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum scalar counters over all data-parallel workers (no-op without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def _freeze_frozen_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers whose parameters are frozen (linear probe) keep their running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in m.parameters()
        ):
            m.eval()


@dataclass
class StepOptions:
    """How a training step runs; the defaults are plain fp32 SGD-style steps."""

    amp_dtype: torch.dtype | None = None
    """Autocast dtype (bf16/fp16) on GPU; None: full precision."""
    scaler: Any = None
    """``torch.amp.GradScaler`` for fp16."""
    mixup: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    """timm ``Mixup``: returns mixed inputs and soft targets (N, K)."""
    ema: Any = None
    """timm ``ModelEmaV3`` updated after each optimiser step."""
    channels_last: bool = False
    distill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """Knowledge distillation (``components.train.distill.Distiller``): the step's loss is
    ``distill(x, logits, y)`` (the teacher sees the same augmented batch) instead of ``loss_fn(logits, y)``."""


def _backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, opts: StepOptions) -> None:
    optimizer.zero_grad(set_to_none=True)
    if opts.scaler is not None:
        opts.scaler.scale(loss).backward()
        opts.scaler.step(optimizer)
        opts.scaler.update()
    else:
        loss.backward()
        optimizer.step()


MIN_PROGRESSIVE_SIDE = 8
"""Progressive resizing never trains below this side (an imgflow small net's three 2x2 pools need it)."""


def progressive_scale(epoch: int, epochs: int, *, start: float, until: float) -> float:
    """Progressive resizing: the side of epoch ``epoch``'s training batches as a fraction of the input
    side. ``start`` at the first epoch, growing linearly to full size over the first ``until`` of the
    ``epochs``; 1.0 from then on (at least for the last epoch, and always when ``start`` is 1)."""
    ramp = min(int(round(until * epochs)), epochs - 1)
    if start >= 1.0 or epoch >= ramp:
        return 1.0
    return start + (1.0 - start) * epoch / ramp


def resize_batch(x: torch.Tensor, scale: float) -> torch.Tensor:
    """A batch (N, C, H, W) at ``scale`` of its side (bilinear with antialiasing, at least
    ``MIN_PROGRESSIVE_SIDE`` px, in its memory format); the batch itself when ``scale`` keeps its size."""
    h, w = x.shape[-2:]
    size = (max(MIN_PROGRESSIVE_SIDE, round(h * scale)), max(MIN_PROGRESSIVE_SIDE, round(w * scale)))
    if size[0] >= h and size[1] >= w:
        return x
    fmt = (
        torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    )
    out = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.contiguous(memory_format=fmt)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    device: torch.device,
    scheduler: Any = None,
    start_step: int = 0,
    on_batch: Callable[[int, float], None] | None = None,
    opts: StepOptions | None = None,
    input_scale: float = 1.0,
) -> dict[str, float]:
    """One pass over ``loader``; returns sums (loss_sum, correct, count) to reduce across workers.
    ``input_scale`` < 1: the model trains on the batches resized to that share of their side
    (progressive resizing, :func:`progressive_scale`); a distillation teacher still sees them whole."""
    opts = opts or StepOptions()
    model.train()
    _freeze_frozen_batchnorm(model)
    loss_sum, correct, count, step = 0.0, 0, 0, start_step
    for i, (x, y) in enumerate(_batches(loader, device, channels_last=opts.channels_last)):
        hard = y
        if opts.mixup is not None:
            x, y = opts.mixup(x, y)
            hard = y.argmax(1)
        with torch.autocast(device.type, dtype=opts.amp_dtype, enabled=opts.amp_dtype is not None):
            logits = model(resize_batch(x, input_scale))
            loss = loss_fn(logits, y) if opts.distill is None else opts.distill(x, logits, y)
        _backward_step(loss, optimizer, opts)
        step += 1
        if opts.ema is not None:
            opts.ema.update(model, step=step)
        if scheduler is not None:
            scheduler.step_update(step)
        n = hard.shape[0]
        loss_sum += float(loss.detach()) * n
        correct += count_correct(logits, hard)
        count += n
        if on_batch is not None:
            on_batch(i, float(loss.detach()))
    return {"loss_sum": loss_sum, "correct": float(correct), "count": float(count), "step": float(step)}


@torch.inference_mode()
def eval_sums(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: nn.Module,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Loss/accuracy sums over ``loader`` (reduced across workers by the caller). ``amp_dtype``: the
    forward under the training's autocast (bf16 on a CPU with native bf16: ~40% less time per
    validation pass); the loss is computed in fp32 from the logits either way."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in _batches(loader, device, channels_last=channels_last):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        loss_sum += float(loss_fn(logits, y)) * y.shape[0]
        correct += count_correct(logits, y)
        count += y.shape[0]
    return {"loss_sum": loss_sum, "correct": float(correct), "count": float(count)}


@torch.inference_mode()
def predict_logits(
    model: nn.Module, loader: Iterable[Any], *, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Returns logits (N, K) float32 and targets ((N,) int64, or (N, K) multi-hot), in loader order."""
    model.eval()
    logits, targets = [], []
    for x, y in _batches(loader, device):
        logits.append(model(x).float().cpu().numpy())
        targets.append(y.cpu().numpy())
    return np.concatenate(logits), np.concatenate(targets)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """logits: (N, K) -> probabilities (N, K)."""
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)

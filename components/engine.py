"""Plain PyTorch steps, shared by the Ray workers and by single-process runs (benchmarks, tests).

Kept free of Ray so the per-worker loop stays thin (Made-With-ML's train_step/eval_step split).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; each data-parallel rank gets its own stream."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    os.environ["PYTHONHASHSEED"] = str(s)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker seeding derived from torch's per-worker seed."""
    s = torch.initial_seed() % (2**32)
    np.random.seed(s)
    random.seed(s)


def set_deterministic(enabled: bool) -> None:
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.benchmark = not enabled


def _batches(loader: Iterable[Any], device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


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
) -> dict[str, float]:
    """One pass over ``loader``; returns sums (loss_sum, correct, count) to reduce across workers."""
    model.train()
    loss_sum, correct, count, step = 0.0, 0, 0, start_step
    for i, (x, y) in enumerate(_batches(loader, device)):
        logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if scheduler is not None:
            scheduler.step_update(step)
        n = y.shape[0]
        loss_sum += float(loss.detach()) * n
        correct += int((logits.argmax(1) == y).sum())
        count += n
        if on_batch is not None:
            on_batch(i, float(loss.detach()))
    return {"loss_sum": loss_sum, "correct": float(correct), "count": float(count), "step": float(step)}


@torch.inference_mode()
def eval_sums(
    model: nn.Module, loader: Iterable[Any], loss_fn: nn.Module, *, device: torch.device
) -> dict[str, float]:
    """Loss/accuracy sums over ``loader`` (reduced across workers by the caller)."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in _batches(loader, device):
        logits = model(x)
        loss_sum += float(loss_fn(logits, y)) * y.shape[0]
        correct += int((logits.argmax(1) == y).sum())
        count += y.shape[0]
    return {"loss_sum": loss_sum, "correct": float(correct), "count": float(count)}


@torch.inference_mode()
def predict_logits(
    model: nn.Module, loader: Iterable[Any], *, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Returns logits (N, K) float32 and targets (N,) int64, in loader order."""
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

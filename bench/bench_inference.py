"""Batch inference outside training: evaluate's predictions and the embedding store's features.

The default model (``imgflow_resnet_avgmax`` with flip TTA, as ``train.recipe: auto`` builds it for
Fashion-MNIST; weights as initialised, batch-norm statistics spread as after training: speed does not
depend on the values) over real Fashion-MNIST test images, decoded once. Contenders, each over every
image, interleaved round by round (the minimum of the rounds is kept: this machine is shared):

- predictions: the plain model one batch after another with torch's threads (the reference); the
  batch-norm-folded channels-last copy (:func:`components.model.inference.prepare_for_inference`)
  the same way, batches of 512 (``evaluate.batch_size``: what evaluate ran before); the copy side by
  side, one intra-op thread each, in units of ``unit_size`` (128 images at 28 px) (what ``predict_split`` runs now);
- features (``pre_logits`` + ``pooled_last``, one pass): the plain model in channels-last memory one
  batch after another (``extract_layers`` before); ``extract_layers`` now (folded copy, side by side).

Figures are ratios against the reference measured in the same run, so a noisy box shifts both.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.data.sources import fashion_mnist_paths, load_fashion_mnist
from components.model.checkpoint import FlipTTA
from components.model.features import Layer, base_model, extract_layers, features_at
from components.model.inference import prepare_for_inference, side_by_side_iter, unit_size
from components.model.models import create_classifier

LAYERS: tuple[Layer, ...] = ("pre_logits", "pooled_last")


def _images(n: int) -> torch.Tensor:
    arrays = load_fashion_mnist(
        fashion_mnist_paths(Path("/usr/share/datasets/fashion-mnist"), download=False)
    )
    x = torch.from_numpy(np.ascontiguousarray(arrays["test"][0][:n])).float().div_(255).unsqueeze(1)
    return (x - 0.2860) / 0.3530


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = create_classifier("imgflow_resnet_avgmax", 10, in_chans=1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.2, 3)
    return FlipTTA(net, 28).eval()


def _one_by_one(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, batch: int) -> None:
    with torch.inference_mode():
        for b in x.split(batch):
            fn(b)


def _units(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, batch: int) -> None:
    def unit(b: torch.Tensor) -> Any:
        with torch.inference_mode():
            return fn(b)

    for _ in side_by_side_iter(unit, x.split(batch)):
        pass


def run(*, quick: bool = False) -> dict[str, Any]:
    n, rounds = (2000, 2) if quick else (10000, 5)
    x = _images(n)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    model = _model()
    fast = prepare_for_inference(model)
    plain_cl = copy.deepcopy(base_model(model)).to(memory_format=torch.channels_last)
    contenders: dict[str, Callable[[], Any]] = {
        "predict: plain model, one batch at a time": lambda: _one_by_one(model, x, 512),
        "predict: folded copy, one batch at a time": lambda: _one_by_one(fast, x_cl, 512),
        "predict: folded copy, side by side": lambda: _units(fast, x_cl, unit_size(x.shape[1:])),
        "features: plain channels-last, one batch at a time": lambda: _one_by_one(
            lambda b: features_at(plain_cl, b, LAYERS), x_cl, 512
        ),
        "features: extract_layers (folded copy, side by side)": lambda: extract_layers(
            model, x, layers=LAYERS, batch_size=512
        ),
    }
    seconds: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(rounds):
        order = list(contenders)[r % len(contenders) :] + list(contenders)[: r % len(contenders)]
        for name in order:
            t0 = time.perf_counter()
            contenders[name]()
            seconds[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in seconds.items()}
    ref_p, ref_f = (
        best["predict: plain model, one batch at a time"],
        best["features: plain channels-last, one batch at a time"],
    )
    figures = [{"name": f"{k} (s)", "value": v, "unit": "s"} for k, v in best.items()]
    figures += [
        {"name": "predict speed-up, side by side vs plain", "value": ref_p / best["predict: folded copy, side by side"],
         "unit": "x", "target": "> 1", "passed": ref_p / best["predict: folded copy, side by side"] > 1},
        {"name": "predict speed-up, side by side vs one by one (both folded)",
         "value": best["predict: folded copy, one batch at a time"] / best["predict: folded copy, side by side"],
         "unit": "x"},
        {"name": "features speed-up, extract_layers vs before", "value": ref_f / best[
            "features: extract_layers (folded copy, side by side)"], "unit": "x", "target": "> 1",
         "passed": ref_f / best["features: extract_layers (folded copy, side by side)"] > 1},
    ]  # fmt: skip
    return {
        "images": n,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "figures": figures,
    }

"""Fast batch inference on the CPU: a batch-norm-folded channels-last copy of the model, and whole batches
run side by side, one intra-op thread each.

Every pass over a split that imgflow makes outside training goes through here: evaluate's predictions,
the corruption sweep and the attacks (:mod:`components.evaluate.robustness`,
:mod:`components.evaluate.adversarial`) and the embedding store's features
(:func:`components.model.features.extract_layers`). Measured by ``python -m bench inference`` (the
default residual net with flip TTA, 10,000 Fashion-MNIST test images, 2 cores, fp32, best of 5
interleaved rounds, 2026-12-06): the classifier 12.8 s as it is, 6.5 s folded in channels-last memory one
batch of 512 after another (evaluate before), 4.9 s folded side by side in units of 128 (now, :func:`unit_size`); its two
feature layers 3.35 s through the plain channels-last network (``extract_layers`` before), 2.33 s now.
In ``imgflow evaluate`` on the full dataset (two alternating pairs): the test and val predictions
19.8-21.6 s -> 10.2-11.6 s, and the embedding store's pass over all 70,000 images 35.0-38.4 s -> 20.7-23.0 s.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar, cast

import torch
from torch import nn

from components.core.progress import progress_bar

logger = logging.getLogger(__name__)

J = TypeVar("J")
R = TypeVar("R")

UNIT_VALUES = 128 * 28 * 28
"""Input values per side-by-side unit on the CPU (:func:`unit_size`): a unit's activations then stay in
the caches. Measured at 28 px grey (the default residual net, 10,000 images, 2 cores): features in 2.94 s
with units of 512 images, 2.54 s of 256, 2.42 s of 128, 2.45 s of 64; the flip-TTA classifier 6.1 s at
512, 5.2 s at 128. Larger images get fewer per unit (224 px RGB: the floor of 8)."""


def unit_size(image_shape: Sequence[int]) -> int:
    """Images per unit for images of ``image_shape`` (C, H, W): :data:`UNIT_VALUES` of input, 8 to 128
    images (smaller units than 64 were no faster at 28 px)."""
    return min(128, max(8, UNIT_VALUES // max(1, math.prod(image_shape))))


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """A faster eval-only copy: conv+batch-norm folded (:func:`fold_batch_norm`), channels-last memory.
    The copy keeps the model's class and methods (``forward_features``, ``forward_head``...); its outputs
    equal the model's to float rounding. ``model`` itself is left as it was (its mode included)."""
    was_training = model.training
    fast = copy.deepcopy(model).eval()
    model.train(was_training)
    return fold_batch_norm(fast).to(memory_format=torch.channels_last)


def fold_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` (in eval mode; changed in place) with each ``BatchNorm2d`` that only ever reads the
    output of one ``Conv2d`` — a conv whose output nothing else reads — folded into that conv's weights
    and replaced by ``Identity``. Submodules keep their names, so every method of the model still works.

    Safe where one submodule is called several times (flip TTA runs its network on the image and on its
    mirror: each pair is folded once, however often it is called — folding per call, as torch.fx's
    ``fuse`` does, applied the batch norm twice: logits off by 4.7, test accuracy 10%). A module torch.fx
    cannot trace is searched child by child; what cannot be traced at all is left as it is."""
    from torch import fx

    try:
        graph = fx.symbolic_trace(module).graph
    except Exception as e:  # tracing is best effort: a part that cannot be traced just is not folded
        logger.debug(
            "batch-norm folding: tracing %s failed (%s); trying its children", type(module).__name__, e
        )
        for name, child in module.named_children():
            if next(child.children(), None) is not None:
                setattr(module, name, fold_batch_norm(child))
        return module
    for conv_name, bn_name in _conv_bn_pairs(module, graph):
        _fold_pair(module, conv_name, bn_name)
    return module


def _conv_bn_pairs(module: nn.Module, graph: Any) -> list[tuple[str, str]]:
    """(conv, batch norm) submodule names where, over every call in ``graph``, the batch norm's input
    is that conv's output and that conv's output goes to that batch norm only."""
    from torch import fx

    readers: dict[str, set[str]] = {}  # conv -> what reads its output, over all its calls
    sources: dict[str, set[str]] = {}  # batch norm -> what produced its input, over all its calls
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        sub = module.get_submodule(node.target)
        if type(sub) is nn.Conv2d:  # exact types: subclasses may do more (timm's BatchNormAct2d)
            readers.setdefault(node.target, set()).update(
                user.target if user.op == "call_module" else f"<{user.name}>" for user in node.users
            )
        elif type(sub) is nn.BatchNorm2d:
            arg = node.args[0] if node.args else None
            source = arg.target if isinstance(arg, fx.Node) and arg.op == "call_module" else f"<{node.name}>"
            sources.setdefault(node.target, set()).add(str(source))
    return [
        (next(iter(src)), bn)
        for bn, src in sources.items()
        if len(src) == 1 and readers.get(next(iter(src))) == {bn}
    ]


def _fold_pair(module: nn.Module, conv_name: str, bn_name: str) -> None:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    conv = cast(nn.Conv2d, module.get_submodule(conv_name))
    bn = cast(nn.BatchNorm2d, module.get_submodule(bn_name))
    if bn.training or not bn.track_running_stats or bn.running_mean is None:
        return  # batch statistics, not running ones: nothing fixed to fold
    _replace(module, conv_name, fuse_conv_bn_eval(conv, bn))
    _replace(module, bn_name, nn.Identity())


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, new)


def unit_batches(batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``batches`` cut into consecutive pieces of :func:`unit_size` images (views, no copies), in order."""
    for batch in batches:
        yield from batch.split(unit_size(batch.shape[1:]))


def side_by_side_iter(fn: Callable[[J], R], jobs: Iterable[J], *, workers: int | None = None) -> Iterator[R]:
    """fn(job) for each job, in order, run by ``workers`` threads (default: torch's thread count) with
    one intra-op thread each: a small network's convolutions scale poorly across threads inside one op,
    so whole batches side by side keep the cores busier. ``jobs`` is read lazily, at most two jobs per
    thread ahead of the results taken (a split streamed in batches is never all in memory). ``fn`` must
    not depend on the order the jobs run in."""
    n_workers = max(1, workers or torch.get_num_threads())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(n_workers, thread_name_prefix="imgflow-units") as pool:
            pending: deque[Future[R]] = deque()
            for job in jobs:
                pending.append(pool.submit(fn, job))
                if len(pending) >= 2 * n_workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        torch.set_num_threads(threads)


def side_by_side(
    fn: Callable[[J], R], jobs: Sequence[J], *, workers: int | None = None, description: str
) -> list[R]:
    """[fn(job) for job in jobs] by :func:`side_by_side_iter`, with a progress bar over the jobs."""
    results: list[R] = []
    with progress_bar(len(jobs), description=description) as advance:  # when a person watches
        for result in side_by_side_iter(fn, jobs, workers=workers):
            results.append(result)
            advance(1)
    return results

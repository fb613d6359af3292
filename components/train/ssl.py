"""Self-supervised pretraining (SimCLR or BYOL) of a timm backbone on unlabelled images, through Ray Train.

``imgflow pretrain --method simclr|byol`` lands here: the driver (:func:`pretrain`) decodes the images once
into a memory-mapped uint8 array, hashes it (the *data hash*), and runs :func:`ssl_loop_per_worker` on
the same Ray Train trainer supervised training uses (:func:`components.train.ray_adapter.run_trainer`:
one checkpoint per epoch, ``train.max_failures`` restarts from the last one). Each worker takes two
augmented views of its share of every batch (:mod:`components.train.ssl_augment`), projects the
backbone's pooled features through a small MLP and minimises NT-Xent (Chen et al., 2020) — or, for
``byol`` (Grill et al., 2020), predicts an EMA target network's projection of the other view
(:class:`BYOLNetwork`; the target is a submodule, so checkpoints carry it).

Deterministic by construction: the epoch's order and every augmentation draw come from generators
seeded by (seed, data hash, epoch, rank, step), and the learning rate is a function of the step, so a
run resumed from epoch k's checkpoint continues the very curve an uninterrupted run draws (on the
same device and thread count). What comes out is the backbone alone (``backbone/``: safetensors + a
JSON spec with the model name, channels, image side and data hash); ``train.init: ssl:<run id>``
starts supervised training from it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from components.core.errors import ConfigError
from components.model.features import layer_features
from components.model.models import create_classifier
from components.train import ray_adapter
from components.train.engine import allreduce_sums, seed_everything, set_deterministic
from components.train.progress import ProgressSender, progress_display
from components.train.ray_adapter import RayOptions
from components.train.ssl_augment import ViewAugment, augment_view

BACKBONE_SUBDIR = "backbone"
BACKBONE_WEIGHTS = "backbone.safetensors"
BACKBONE_SPEC = "backbone.json"
STATE_FILE = "ssl_state.pt"
HISTORY_FILE = "history.json"
METHODS = ("simclr", "byol")
BYOL_BRANCHES = ("online", "target")


# --------------------------------------------------------------------------- the loss and the network


def nt_xent_loss(
    z1: torch.Tensor, z2: torch.Tensor, *, temperature: float, decoupled: bool = False
) -> torch.Tensor:
    """SimCLR's NT-Xent: z1, z2 (B, D) projections of two views of the same B images.

    Every one of the 2B embeddings is classified, by cosine similarity / ``temperature``, against the
    other 2B - 1: its positive is the other view of its image, the remaining 2B - 2 are negatives.
    Returns the mean cross-entropy over the 2B rows.
    """
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))  # an embedding is not its own candidate
    positives = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    if not decoupled:
        return F.cross_entropy(sim, positives)
    is_positive = F.one_hot(positives, 2 * b).bool()  # on sim's device: no host tensor in the mask
    pos = sim[is_positive]  # row order: one positive per row
    return (torch.logsumexp(sim.masked_fill(is_positive, float("-inf")), dim=1) - pos).mean()


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss, 2 - 2 cos(p, z), averaged over the rows: p the online network's
    predictions, z the target's projections of another view (no gradient flows into z)."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()


def _mlp(width: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)
    )


class SimCLRNetwork(nn.Module):
    """A timm backbone (no classifier) and SimCLR's projection MLP on its pooled last-stage features."""

    def __init__(self, backbone: nn.Module, *, hidden: int, out: int) -> None:
        super().__init__()
        self.backbone = backbone
        width = int(getattr(backbone, "num_features", 0))
        if width <= 0:
            raise ConfigError(
                f"{type(backbone).__name__} reports no num_features: cannot attach a projection"
            )
        self.projection = _mlp(width, hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(layer_features(self.backbone, x, layer="pooled_last"))


class BYOLNetwork(SimCLRNetwork):
    """BYOL's online network: SimCLR's backbone and projection, then a predictor MLP (the projection's
    hidden size); ``target``, a copy of the backbone and projection outside autograd, follows it by EMA
    (:func:`update_target`). The forward is the online prediction; the target is called on its own."""

    def __init__(self, backbone: nn.Module, *, hidden: int, out: int) -> None:
        super().__init__(backbone, hidden=hidden, out=out)
        self.predictor = _mlp(out, hidden, out)
        self.target = SimCLRNetwork(copy.deepcopy(backbone), hidden=hidden, out=out)
        self.target.projection = copy.deepcopy(self.projection)
        self.target.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(super().forward(x))


BYOL_MOMENTUM_MEASURED = (0.98, 630)
"""The best base momentum measured and the run's steps (6 epochs of Fashion-MNIST's 54k images, batch
256 on 2 workers): ``auto`` keeps the target's lag the same share of any run."""
BYOL_MOMENTUM_RANGE = (0.9, 0.996)


def byol_auto_momentum(total_steps: int) -> float:
    """``ssl.byol_momentum: auto``: 1 - m scaled by the run's length from the measured best (0.98 at 630
    steps), within ``BYOL_MOMENTUM_RANGE`` (0.996: the paper's, for ~100k steps)."""
    base, steps = BYOL_MOMENTUM_MEASURED
    low, high = BYOL_MOMENTUM_RANGE
    return min(high, max(low, 1 - (1 - base) * steps / max(1, total_steps)))


def resolve_byol_momentum(setting: float | str, total_steps: int) -> float:
    """``ssl.byol_momentum`` as a number: ``auto`` from the run's ``total_steps``, a number as it is."""
    return byol_auto_momentum(total_steps) if setting == "auto" else float(setting)


def byol_momentum_at(base: float, step: int, total: int) -> float:
    """The target's EMA momentum, raised from ``base`` to 1 along a cosine over the run (Grill et al.,
    eq. in §3.2): a function of the global step, so a resumed run continues it."""
    return 1 - (1 - base) * (math.cos(math.pi * min(step / max(1, total), 1.0)) + 1) / 2


@torch.no_grad()
def update_target(network: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter (BatchNorm's running
    statistics are the target's own: it runs in train mode on the full views)."""
    inner = ray_adapter_unwrap(network)
    if not isinstance(inner, BYOLNetwork):
        return
    online = dict(inner.named_parameters())
    for name, t in inner.target.named_parameters():
        t.lerp_(online[name], 1 - momentum)


# --------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class SSLRecipe:
    """Everything a pretraining run decides, resolved on the driver and pickled to every worker."""

    method: str
    model: str
    in_chans: int
    images_file: Path
    """(N, C, side, side) uint8 ``.npy``, memory-mapped by every worker."""
    data_hash: str
    """sha256 of the decoded images (first 16 hex digits): with ``seed`` it fixes the loss curve."""
    epochs: int
    batch_size: int
    """Images per step per worker (each gives two views)."""
    lr: float
    weight_decay: float
    warmup_epochs: int
    temperature: float
    proj_hidden: int
    proj_dim: int
    augment: ViewAugment
    deterministic: bool
    seed: int
    loss: str = "ntxent"
    """``ntxent`` or ``dcl`` (:func:`nt_xent_loss` with ``decoupled``)."""
    local_crops: int = 0
    """Multi-crop (Caron et al., 2020): this many extra small views per image, each a positive of both
    full views (0: SimCLR's two views alone)."""
    local_scale: tuple[float, float] = (0.1, 0.35)
    local_side: int = 0
    """The local views' side in pixels (0: 4/7 of the images' side, 16 for 28)."""
    byol_momentum: float = 0.98
    """``byol``: the target's EMA momentum at step 0 (cosine-raised to 1 by the last step)."""
    byol_backbone: str = "online"
    """``byol``: which backbone ``backbone/`` holds, ``online`` or ``target`` (EMA); the other goes to
    ``backbone/<other>/`` (a backbone folder of its own)."""
    channels_last: bool = False
    """NHWC weights and views (``train.channels_last``): ~1.4x the views per second on CPU (oneDNN)."""
    amp: str = "off"
    """``train.amp``: the network's forward (and so its backward) under autocast — bf16 on a CPU with
    native bf16 for ``auto`` (:func:`components.train.torch_recipe.amp_dtype`); the loss stays fp32."""

    @property
    def image_side(self) -> int:
        return int(np.load(self.images_file, mmap_mode="r").shape[-1])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (MLflow params, the backbone's spec)."""
        out = asdict(self)
        out["images_file"] = str(self.images_file)
        out["augment"] = {k: list(v) if isinstance(v, tuple) else v for k, v in out["augment"].items()}
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SSLRecipe:
        """The inverse of :meth:`to_dict` (a backbone spec's ``recipe``)."""
        raw = dict(values)
        aug: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in raw.pop("augment").items()
        }
        if "local_scale" in raw:
            raw["local_scale"] = tuple(raw["local_scale"])
        return cls(**{**raw, "images_file": Path(raw["images_file"]), "augment": ViewAugment(**aug)})


def hash_images(images: np.ndarray) -> str:
    """sha256 of a decoded image array, shape included: the data hash of a pretraining run."""
    h = hashlib.sha256(repr(tuple(images.shape)).encode())
    for i in range(0, len(images), 4096):  # chunks: a memory-mapped array is read once, not copied
        h.update(np.ascontiguousarray(images[i : i + 4096]).tobytes())
    return h.hexdigest()[:16]


def _generator(*parts: Any) -> torch.Generator:
    """A torch generator seeded from ``parts`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def build_network(recipe: SSLRecipe) -> SimCLRNetwork:
    """The backbone (``num_classes=0``: no classifier) and projection (BYOL: and predictor and target),
    seeded identically on every rank; channels-last when the recipe says so."""
    seed_everything(recipe.seed)
    backbone = create_classifier(recipe.model, 0, in_chans=recipe.in_chans)
    kind = BYOLNetwork if recipe.method == "byol" else SimCLRNetwork
    network = kind(backbone, hidden=recipe.proj_hidden, out=recipe.proj_dim)
    return network.to(memory_format=torch.channels_last) if recipe.channels_last else network


def lr_at(recipe: SSLRecipe, step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine to lr/100: a function of the step, so a resumed run continues it."""
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return recipe.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# --------------------------------------------------------------------------- checkpoints


def backbone_state(network: nn.Module, branch: str = "online") -> dict[str, torch.Tensor]:
    """The backbone's weights (no projection), contiguous CPU tensors for safetensors; ``branch="target"``:
    BYOL's EMA target backbone."""
    inner = ray_adapter_unwrap(network)
    owner = inner.target if branch == "target" and isinstance(inner, BYOLNetwork) else inner
    return {k: v.detach().cpu().contiguous() for k, v in owner.backbone.state_dict().items()}


def ray_adapter_unwrap(network: nn.Module) -> SimCLRNetwork:
    """The network inside DistributedDataParallel (or itself)."""
    inner = getattr(network, "module", network)
    if not isinstance(inner, SimCLRNetwork):
        raise TypeError(f"expected a SimCLRNetwork, got {type(inner).__name__}")
    return inner


def save_backbone(network: nn.Module, recipe: SSLRecipe, out_dir: Path, *, history: Sequence[dict],
                  branch: str | None = None) -> Path:  # fmt: skip
    """``out_dir/backbone.safetensors`` + ``backbone.json`` (model, channels, side, data hash, recipe).
    BYOL: ``recipe.byol_backbone``'s branch there, the other in ``out_dir/<other>/`` (``branch`` in the spec)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if branch is None and recipe.method == "byol":
        branch = recipe.byol_backbone
        other = next(b for b in BYOL_BRANCHES if b != branch)
        save_backbone(network, recipe, out_dir / other, history=history, branch=other)
    save_file(backbone_state(network, branch or "online"), str(out_dir / BACKBONE_WEIGHTS))
    spec = {
        "kind": "imgflow-ssl-backbone",
        "method": recipe.method,
        "model": recipe.model,
        "in_chans": recipe.in_chans,
        "image_side": recipe.image_side,
        "data_hash": recipe.data_hash,
        "epochs_done": len(history),
        "recipe": recipe.to_dict(),
        **({"branch": branch} if branch else {}),
    }
    (out_dir / BACKBONE_SPEC).write_text(json.dumps(spec, indent=2))
    return out_dir


def read_backbone_spec(folder: Path) -> dict[str, Any]:
    """The spec of a backbone folder written by :func:`save_backbone` (a ConfigError when it is not one)."""
    path = folder / BACKBONE_SPEC
    if not path.is_file() or not (folder / BACKBONE_WEIGHTS).is_file():
        raise ConfigError(
            f"{folder} holds no self-supervised backbone ({BACKBONE_SPEC} + {BACKBONE_WEIGHTS})"
        )
    return dict(json.loads(path.read_text()))


def load_backbone_into(model: nn.Module, folder: Path) -> None:
    """Load a pretrained backbone into a timm classifier of the same architecture; only the classifier
    head stays as initialised. Anything else that does not fit is a ConfigError (architecture mismatch)."""
    state = load_file(str(folder / BACKBONE_WEIGHTS))
    own = model.state_dict()
    clf = _classifier(model)
    head = {
        f"{name}.{k}"
        for name, m in model.named_modules()
        if clf is not None and m is clf
        for k in m.state_dict()
    }
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    missing = sorted(k for k in own if k not in state and k not in head)
    if unexpected or wrong or missing:
        listed = ", ".join((unexpected + wrong + missing)[:4])
        raise ConfigError(
            f"the self-supervised backbone in {folder} does not fit this model (architecture mismatch: {listed}): "
            "pretrain with the same train.model and channels, or drop train.init"
        )
    model.load_state_dict(state, strict=False)


def _classifier(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_classifier", None)
    found = get() if callable(get) else None
    return found if isinstance(found, nn.Module) else None


def _save_state(out: Path, network: nn.Module, optimizer: Any, epoch: int, history: list[dict],
                recipe: SSLRecipe) -> None:  # fmt: skip
    torch.save(
        {
            "network": ray_adapter_unwrap(network).state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
        },
        out / STATE_FILE,
    )
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    save_backbone(network, recipe, out / BACKBONE_SUBDIR, history=history)


def _restore_state(checkpoint: Path, network: nn.Module, optimizer: Any) -> tuple[int, list[dict]]:
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    ray_adapter_unwrap(network).load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]) + 1, list(json.loads((checkpoint / HISTORY_FILE).read_text()))


# --------------------------------------------------------------------------- the per-worker loop

LOOP_CONFIG_KEY = "ssl"


@dataclass(frozen=True)
class SSLWorkerRun:
    recipe: SSLRecipe
    threads: int
    progress: Any
    worker_events: Path | None
    verbose: bool


def steps_per_epoch(n: int, batch: int, world: int) -> int:
    """Full global batches only (NT-Xent's negatives are the batch); at least one."""
    return max(1, n // (batch * world))


def _epoch(network: nn.Module, optimizer: Any, images: np.ndarray, recipe: SSLRecipe, *, epoch: int,
           rank: int, world: int, device: torch.device, on_batch: Any) -> dict[str, float]:  # fmt: skip
    """One epoch on this rank's share of every global batch; loss sums (to reduce over ranks)."""
    n = len(images)
    steps = steps_per_epoch(n, recipe.batch_size, world)
    order = torch.randperm(n, generator=_generator(recipe.seed, recipe.data_hash, "order", epoch)).numpy()
    warmup = recipe.warmup_epochs * steps
    network.train()
    loss_sum, count = 0.0, 0
    for step in range(steps):
        start = (step * world + rank) * recipe.batch_size
        idx = np.sort(order[start : start + recipe.batch_size] if start < n else order[: recipe.batch_size])
        x = torch.from_numpy(np.asarray(images[idx], dtype=np.float32) / 255.0)
        g = _generator(recipe.seed, recipe.data_hash, "views", epoch, rank, step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(recipe, epoch * steps + step, recipe.epochs * steps, warmup)
        loss = _views_loss(network, x, recipe, g, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if recipe.method == "byol":
            update_target(
                network, byol_momentum_at(recipe.byol_momentum, epoch * steps + step, recipe.epochs * steps)
            )
        loss_sum += float(loss.detach()) * len(idx)
        count += len(idx)
        on_batch(step, steps, float(loss.detach()))
    return {"loss_sum": loss_sum, "count": float(count)}


def _views_loss(network: nn.Module, x: torch.Tensor, recipe: SSLRecipe, g: torch.Generator,
                device: torch.device) -> torch.Tensor:  # fmt: skip
    """The loss of one batch: two full views, plus ``local_crops`` small ones (each paired with both full
    views; the loss is the mean over pairs). Local views leave BatchNorm's running statistics alone: those
    describe full-size images, which is what a probe or a classifier sees. SimCLR: NT-Xent on the
    projections. BYOL: each full view's prediction regresses the target's projection of the other
    (symmetrised), each local view's both full views' (multi-crop; local views skip the target)."""
    from components.train.torch_recipe import amp_dtype

    fmt = torch.channels_last if recipe.channels_last else torch.contiguous_format
    dtype = amp_dtype(recipe.amp, device)
    # The views are drawn in fp32 (the generator's draws do not depend on amp); only the network runs
    # under autocast, and the loss below (cosine similarities, log-softmax) is computed in fp32.
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        views = [augment_view(x, recipe.augment, g).to(device, memory_format=fmt) for _ in range(2)]
        full = [network(v) for v in views]
        local = []
        if recipe.local_crops:
            side = recipe.local_side or max(8, round(x.shape[-1] * 4 / 7))
            with _frozen_bn_statistics(network):
                local = [
                    network(augment_view(x, recipe.augment, g, scale=recipe.local_scale, side=side).to(
                        device, memory_format=fmt))
                    for _ in range(recipe.local_crops)
                ]  # fmt: skip
        targets = _target_projections(network, views) if recipe.method == "byol" else []
    if targets:
        byol_pairs = [(full[0], targets[1]), (full[1], targets[0]), *((v, t) for v in local for t in targets)]
        return torch.stack([byol_loss(p, z) for p, z in byol_pairs]).mean()
    pairs = [(full[0], full[1]), *((f, v) for f in full for v in local)]
    losses = [
        nt_xent_loss(a, b, temperature=recipe.temperature, decoupled=recipe.loss == "dcl") for a, b in pairs
    ]
    return torch.stack(losses).mean()


@torch.no_grad()
def _target_projections(network: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """BYOL's target network on the full views (train mode: batch statistics, as the online network)."""
    inner = ray_adapter_unwrap(network)
    if not isinstance(inner, BYOLNetwork):
        raise ConfigError(f"byol needs a BYOLNetwork, got {type(inner).__name__}")
    return [inner.target(v) for v in views]


@contextlib.contextmanager
def _frozen_bn_statistics(network: nn.Module) -> Any:
    """BatchNorm layers normalise by their batch but do not update their running statistics."""
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum


def ssl_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: SimCLR or BYOL epochs, a checkpoint and a report after each."""
    from components.train.worker import note_worker_event

    run: SSLWorkerRun = config[LOOP_CONFIG_KEY]
    recipe = run.recipe
    ray_adapter.configure_worker_logging(verbose=run.verbose)
    rank, world = ray_adapter.worker_rank_and_world()
    torch.set_num_threads(run.threads)
    set_deterministic(recipe.deterministic)
    network = ray_adapter.prepare_model(build_network(recipe))
    trained = [p for p in network.parameters() if p.requires_grad]  # BYOL's target follows by EMA
    optimizer = torch.optim.AdamW(trained, lr=recipe.lr, weight_decay=recipe.weight_decay)
    images = np.load(recipe.images_file, mmap_mode="r")
    start_epoch, history = 0, list[dict[str, Any]]()
    with ray_adapter.latest_checkpoint() as checkpoint:
        if checkpoint is not None:
            start_epoch, history = _restore_state(checkpoint, network, optimizer)
    note_worker_event(run.worker_events, rank, phase="start", start_epoch=start_epoch)
    progress = ProgressSender(run.progress if rank == 0 else None)
    progress.send({"type": "start", "start_epoch": start_epoch})
    device = ray_adapter.worker_device()
    for epoch in range(start_epoch, recipe.epochs):

        def on_batch(i: int, total: int, loss: float, _epoch: int = epoch) -> None:
            if i == 1:
                note_worker_event(run.worker_events, rank, phase="mid_epoch", epoch=_epoch)
            progress.batch(_epoch, i, total, loss)

        t0 = time.perf_counter()
        sums = allreduce_sums(
            _epoch(
                network,
                optimizer,
                images,
                recipe,
                epoch=epoch,
                rank=rank,
                world=world,
                device=device,
                on_batch=on_batch,
            ),  # fmt: skip
            device,
        )
        seconds = time.perf_counter() - t0
        metrics = {
            "epoch": epoch,
            "ssl_loss": sums["loss_sum"] / max(sums["count"], 1.0),
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": seconds,
            "images_per_s": sums["count"] / max(seconds, 1e-9),
        }
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                _save_state(Path(tmp), network, optimizer, epoch, history, recipe)
            ray_adapter.report(metrics, checkpoint_dir=Path(tmp) if rank == 0 else None)


# --------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class PretrainResult:
    """A finished pretraining: the backbone folder, every epoch's record, wall time, the Ray run."""

    backbone_dir: Path
    history: list[dict[str, Any]]
    seconds: float
    ray_run: str
    recipe: SSLRecipe

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone_dir": str(self.backbone_dir),
            "history": self.history,
            "seconds": self.seconds,
            "ray_run": self.ray_run,
            "recipe": self.recipe.to_dict(),
        }


def pretrain(
    recipe: SSLRecipe,
    *,
    out_dir: Path,
    workers: int,
    cpus_per_worker: int,
    use_gpu: bool | None,
    storage_path: Path | str,
    run_name: str,
    max_failures: int = 0,
    show_progress: bool = True,
    ray_options: RayOptions | None = None,
) -> PretrainResult:
    """Pretrain on Ray Train (a local runtime unless ``ray_options`` names a cluster, or one is up;
    ``use_gpu=None``: GPUs when the cluster has them);
    copies the final backbone to ``out_dir/backbone`` and its loss curve to ``out_dir/history.json``.
    Re-running with the same ``run_name`` and ``storage_path`` resumes from the last epoch's checkpoint."""
    if recipe.method not in METHODS:
        raise ConfigError(f"unknown pretraining method {recipe.method!r}: use one of {', '.join(METHODS)}")
    options = ray_options or RayOptions()
    started = ray_adapter.init_ray(
        address=options.address, dashboard=options.dashboard, verbose=options.verbose
    )
    try:
        gpu = ray_adapter.cluster_has_gpus() if use_gpu is None else use_gpu
        ray_adapter.check_resources(workers, cpus_per_worker, gpu)

        def copy_out(checkpoint: Path) -> list[dict[str, Any]]:
            if (out_dir / BACKBONE_SUBDIR).exists():
                shutil.rmtree(out_dir / BACKBONE_SUBDIR)
            shutil.copytree(checkpoint / BACKBONE_SUBDIR, out_dir / BACKBONE_SUBDIR)
            return list(json.loads((checkpoint / HISTORY_FILE).read_text()))

        with contextlib.ExitStack() as stack:
            events = ray_adapter.progress_channel(stack)
            run = SSLWorkerRun(recipe, cpus_per_worker, events, options.worker_events, options.verbose)
            t0 = time.perf_counter()
            with progress_display(events, epochs=recipe.epochs, show=show_progress, verbose=False):
                done = ray_adapter.run_trainer(
                    ssl_loop_per_worker, {LOOP_CONFIG_KEY: run}, workers=workers, cpus_per_worker=cpus_per_worker,
                    use_gpu=gpu, storage_path=storage_path, run_name=run_name, read_checkpoint=copy_out,
                    max_failures=max_failures, verbose=options.verbose,
                )  # fmt: skip
            seconds = time.perf_counter() - t0
    finally:
        if started:
            ray_adapter.shutdown_ray()
    (out_dir / HISTORY_FILE).write_text(json.dumps(done.checkpoint, indent=2))
    return PretrainResult(out_dir / BACKBONE_SUBDIR, done.checkpoint, seconds, done.path, recipe)

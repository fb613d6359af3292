"""SimCLR and BYOL pieces without Ray: the losses on hand-checkable cases, the views, BYOL's target and its
checkpoint, LP-FT, backbone loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from components.core.errors import ConfigError
from components.model.models import create_classifier
from components.train.ssl import (
    BYOLNetwork,
    SimCLRNetwork,
    SSLRecipe,
    _epoch,
    _restore_state,
    _save_state,
    _views_loss,
    build_network,
    byol_loss,
    byol_momentum_at,
    lr_at,
    nt_xent_loss,
    read_backbone_spec,
    save_backbone,
)
from components.train.ssl_augment import ViewAugment, augment_view
from components.train.ssl_init import BACKBONE_GROUP_KEY, LpFtSchedule, lpft_param_groups
from tests.conftest import fmnist_arrays


def test_nt_xent_on_a_hand_checked_case() -> None:
    # Two images, both views identical unit vectors e1 and e2, temperature 1: every row has its
    # positive at similarity 1 and two negatives at 0 -> loss = -log(e / (e + 2)).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert nt_xent_loss(z, z.clone(), temperature=1.0).item() == pytest.approx(
        -math.log(math.e / (math.e + 2))
    )
    # Scale does not matter (cosine similarity); a lower temperature sharpens a correct match.
    assert nt_xent_loss(3 * z, z, temperature=1.0).item() == pytest.approx(-math.log(math.e / (math.e + 2)))
    assert nt_xent_loss(z, z, temperature=0.1).item() < 1e-3
    # Swapped positives (each view matches the other image) is the worst case.
    assert nt_xent_loss(z, z.flip(0), temperature=1.0).item() > 1.5


def test_decoupled_loss_leaves_the_positive_out_of_the_denominator() -> None:
    # The same case as above: the denominator keeps the two negatives alone -> log(2) - 1.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert nt_xent_loss(z, z.clone(), temperature=1.0, decoupled=True).item() == pytest.approx(
        math.log(2) - 1
    )
    # Against a row-by-row reference on random projections.
    z1, z2 = torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), torch.randn(5, 8)
    u = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    sim = u @ u.T / 0.2
    ref = [torch.logsumexp(sim[i, [k for k in range(10) if k not in (i, (i + 5) % 10)]], 0) - sim[i, (i + 5) % 10]
           for i in range(10)]  # fmt: skip
    got = nt_xent_loss(z1, z2, temperature=0.2, decoupled=True).item()
    assert got == pytest.approx(torch.stack(ref).mean().item(), rel=1e-5)
    assert got < nt_xent_loss(z1, z2, temperature=0.2).item()  # the positive no longer counts against itself


def _aug(channels: int) -> ViewAugment:
    return ViewAugment((0.35, 1.0), 0.5, 0.4, 0.4, 0.05, 0.2 if channels == 3 else 0.0, (0.5,) * channels,
                       (0.5,) * channels)  # fmt: skip


def test_views_are_seeded_and_keep_the_data_geometry() -> None:
    x = torch.from_numpy(fmnist_arrays("t10k", 16)[0]).float().div(255).unsqueeze(1)
    a = augment_view(x, _aug(1), torch.Generator().manual_seed(3))
    b = augment_view(x, _aug(1), torch.Generator().manual_seed(3))
    c = augment_view(x, _aug(1), torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    rgb = augment_view(x.expand(-1, 3, -1, -1).contiguous(), _aug(3), torch.Generator().manual_seed(0))
    assert rgb.shape == (16, 3, 28, 28)


def test_local_views_are_small_and_leave_the_norm_statistics_alone(tmp_path: Path) -> None:
    """Multi-crop: local views come out at ``local_side`` (4/7 of the side by default), the loss pairs them
    with both full views, and only the full views move BatchNorm's running statistics."""
    x = torch.from_numpy(fmnist_arrays("t10k", 16)[0]).float().div(255).unsqueeze(1)
    view = augment_view(x, _aug(1), torch.Generator().manual_seed(0), scale=(0.1, 0.35), side=16)
    assert view.shape == (16, 1, 16, 16)

    def recipe(local_crops: int) -> SSLRecipe:
        return SSLRecipe("simclr", "imgflow_cnn", 1, tmp_path / "x.npy", "0" * 16, 1, 16, 1e-3, 0.0, 0, 0.2, 8, 4,
                         _aug(1), False, 0, local_crops=local_crops)  # fmt: skip

    def running_means(net: nn.Module) -> list[torch.Tensor]:
        return [m.running_mean.clone() for m in net.modules() if isinstance(m, nn.BatchNorm2d)]

    seen: list[tuple[int, ...]] = []
    for local_crops in (0, 3):
        net = build_network(recipe(local_crops))
        hook = net.backbone.stem.register_forward_pre_hook(
            lambda _m, args: seen.append(tuple(args[0].shape[-2:]))
        )
        before = running_means(net)
        # the same generator state: the full views are drawn first, so they are the same in both runs
        loss = _views_loss(net, x, recipe(local_crops), torch.Generator().manual_seed(1), torch.device("cpu"))
        hook.remove()
        assert torch.isfinite(loss)
        after = running_means(net)
        if local_crops == 0:
            plain_after = after
        else:  # local views normalised by their own batch but not counted in the running statistics
            assert all(torch.equal(a, b) for a, b in zip(after, plain_after, strict=True))
        assert not all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert seen == [(28, 28)] * 2 + [(28, 28)] * 2 + [(16, 16)] * 3


def test_amp_runs_the_network_in_bf16_and_the_loss_in_fp32(tmp_path: Path) -> None:
    """``amp`` (``train.amp``): the views are the same draws, the network's projections come out in the
    autocast dtype where the CPU has native bf16, the loss is fp32 and close to the fp32 run's."""
    from components.train.torch_recipe import cpu_has_native_bf16

    x = torch.from_numpy(fmnist_arrays("t10k", 32)[0]).float().div(255).unsqueeze(1)
    dtypes: list[torch.dtype] = []
    losses = {}
    for amp in ("off", "auto"):
        recipe = SSLRecipe("simclr", "imgflow_cnn", 1, tmp_path / "x.npy", "0" * 16, 1, 32, 1e-3, 0.0, 0, 0.2, 8, 4,
                           _aug(1), False, 0, local_crops=2, amp=amp)  # fmt: skip
        torch.manual_seed(0)
        net = build_network(recipe)
        hook = net.register_forward_hook(lambda _m, _a, out: dtypes.append(out.dtype))
        losses[amp] = _views_loss(net, x, recipe, torch.Generator().manual_seed(1), torch.device("cpu"))
        hook.remove()
        assert losses[amp].dtype == torch.float32
    native = cpu_has_native_bf16()
    assert dtypes == [torch.float32] * 4 + [torch.bfloat16 if native else torch.float32] * 4
    assert float(losses["auto"]) == pytest.approx(float(losses["off"]), rel=0.02)


def test_lr_schedule_is_a_function_of_the_step() -> None:
    from dataclasses import dataclass

    @dataclass
    class R:
        lr: float = 1.0

    values = [lr_at(R(), s, 100, 10) for s in range(100)]  # type: ignore[arg-type]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[-1] < 0.05 and all(a >= b for a, b in zip(values[10:], values[11:], strict=False))


def test_lpft_probe_then_gentle_fine_tune() -> None:
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    model = create_classifier("imgflow_cnn", 10, in_chans=1)
    groups = lpft_param_groups(model, weight_decay=0.05)
    head = {id(p) for p in model.get_classifier().parameters()}
    for g in groups:
        assert all((id(p) not in head) == g[BACKBONE_GROUP_KEY] for p in g["params"])
    opt = create_optimizer_v2(groups, opt="adamw", lr=0.01, weight_decay=0.05)
    inner = CosineLRScheduler(opt, t_initial=100, lr_min=1e-4, t_in_epochs=False)
    sched = LpFtSchedule(inner, opt, probe_steps=10, backbone_scale=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items() if "head" not in k}
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for step in range(1, 4):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step_update(step)
    after = model.state_dict()
    assert all(
        torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k
    )
    sched.step_update(10)
    lrs = {g[BACKBONE_GROUP_KEY]: g["lr"] for g in opt.param_groups}
    assert lrs[True] == pytest.approx(0.1 * lrs[False])


def test_backbone_loads_into_the_same_architecture_only(tmp_path: Path) -> None:
    from components.train.ssl import load_backbone_into

    net = SimCLRNetwork(create_classifier("imgflow_cnn", 0, in_chans=1), hidden=8, out=4)

    class _Recipe:
        method, model, in_chans, data_hash, image_side = "simclr", "imgflow_cnn", 1, "abc", 28

        def to_dict(self) -> dict:
            return {}

    folder = save_backbone(net, _Recipe(), tmp_path / "backbone", history=[])  # type: ignore[arg-type]
    clf = create_classifier("imgflow_cnn", 10, in_chans=1)
    load_backbone_into(clf, folder)
    assert torch.equal(clf.state_dict()["stem.0.weight"], net.backbone.state_dict()["stem.0.weight"])
    with pytest.raises(ConfigError, match="architecture mismatch"):
        load_backbone_into(create_classifier("imgflow_cnn_wide", 10, in_chans=1), folder)
    with pytest.raises(ConfigError, match="architecture mismatch"):
        load_backbone_into(create_classifier("imgflow_cnn", 10, in_chans=3), folder)


# --------------------------------------------------------------------------- BYOL


def test_byol_loss_on_hand_checked_cases() -> None:
    # 2 - 2 cos: 0 for the same direction (any scale), 2 orthogonal, 4 opposite; no gradient into the target.
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    assert byol_loss(p, torch.tensor([[3.0, 0.0], [0.0, 1.0]])).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p, torch.tensor([[0.0, 1.0], [1.0, 0.0]])).item() == pytest.approx(2.0)
    assert byol_loss(p, -p.detach()).item() == pytest.approx(4.0)
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0]], requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


def test_byol_auto_momentum_keeps_the_measured_lag_relative_to_the_run() -> None:
    """0.98 at the measured 630 steps; a run 5x longer lags 5x less (0.996, the paper's cap); a run of a
    few dozen steps (a few thousand images) gets the floor rather than a target that barely moves."""
    from components.train.ssl import byol_auto_momentum

    assert byol_auto_momentum(630) == pytest.approx(0.98)
    assert byol_auto_momentum(1260) == pytest.approx(0.99)
    assert byol_auto_momentum(3150) == pytest.approx(0.996) and byol_auto_momentum(10**6) == 0.996
    assert byol_auto_momentum(36) == 0.9


def test_byol_momentum_rises_from_the_base_to_one() -> None:
    values = [byol_momentum_at(0.99, s, 100) for s in range(101)]
    assert values[0] == pytest.approx(0.99) and values[50] == pytest.approx(0.995) and values[-1] == 1.0
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))


def _byol_recipe(tmp_path: Path, *, local_crops: int) -> SSLRecipe:
    import numpy as np

    images = tmp_path / "x.npy"
    if not images.exists():
        np.save(images, fmnist_arrays("t10k", 96)[0][:, None])
    return SSLRecipe("byol", "imgflow_cnn", 1, images, "0" * 16, 2, 32, 1e-3, 0.0, 0, 0.2, 8, 4, _aug(1), False, 0,
                     local_crops=local_crops)  # fmt: skip


def _run_epoch(net: nn.Module, opt: torch.optim.Optimizer, recipe: SSLRecipe, epoch: int) -> float:
    import numpy as np

    sums = _epoch(net, opt, np.load(recipe.images_file, mmap_mode="r"), recipe, epoch=epoch, rank=0, world=1,
                  device=torch.device("cpu"), on_batch=lambda *_: None)  # fmt: skip
    return sums["loss_sum"] / sums["count"]


def test_byol_target_starts_as_the_online_copy_and_follows_by_ema(tmp_path: Path) -> None:
    """The target is the online backbone + projection (no predictor) outside autograd, sees only the full
    views, and after a step is exactly momentum * target + (1 - momentum) * online."""
    from components.train.ssl import update_target

    recipe = _byol_recipe(tmp_path, local_crops=2)
    net = build_network(recipe)
    assert isinstance(net, BYOLNetwork) and not any(p.requires_grad for p in net.target.parameters())
    online = net.state_dict()
    assert all(torch.equal(v, online[k]) for k, v in net.target.state_dict().items())
    assert not any(k.startswith("predictor") for k in net.target.state_dict())
    seen: list[tuple[int, ...]] = []
    hook = net.target.backbone.stem.register_forward_pre_hook(
        lambda _m, a: seen.append(tuple(a[0].shape[-2:]))
    )
    x = torch.from_numpy(fmnist_arrays("t10k", 16)[0]).float().div(255).unsqueeze(1)
    loss = _views_loss(net, x, recipe, torch.Generator().manual_seed(1), torch.device("cpu"))
    hook.remove()
    assert seen == [(28, 28)] * 2 and 0.0 <= loss.item() <= 4.0
    loss.backward()
    assert all(p.grad is None for p in net.target.parameters())
    assert net.predictor[0].weight.grad is not None
    before = {k: v.clone() for k, v in net.target.named_parameters()}
    with torch.no_grad():
        net.backbone.stem[0].weight.add_(1.0)
    update_target(net, 0.9)
    expected = 0.9 * before["backbone.stem.0.weight"] + 0.1 * net.backbone.stem[0].weight
    assert torch.allclose(net.target.backbone.stem[0].weight, expected)


def test_byol_checkpoint_carries_the_target_and_resumes_the_curve(tmp_path: Path) -> None:
    """Two epochs in one go, or one epoch, a checkpoint, a fresh network restored from it and the second
    epoch: the same losses (the target's EMA state is in the checkpoint, its momentum a function of the
    step). Both backbones are saved, ``byol_backbone``'s in ``backbone/``, the other beside it."""
    from components.train.ssl import load_backbone_into

    recipe = _byol_recipe(tmp_path, local_crops=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:

        def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
            net = build_network(recipe)
            return net, torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=recipe.lr)

        net, opt = fresh()
        straight = [_run_epoch(net, opt, recipe, e) for e in range(2)]
        net, opt = fresh()
        first = _run_epoch(net, opt, recipe, 0)
        (tmp_path / "ckpt").mkdir()
        _save_state(tmp_path / "ckpt", net, opt, 0, [{"ssl_loss": first}], recipe)
        net, opt = fresh()
        start, history = _restore_state(tmp_path / "ckpt", net, opt)
        assert start == 1 and len(history) == 1
        assert [first, _run_epoch(net, opt, recipe, 1)] == straight
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "end").mkdir()
    _save_state(tmp_path / "end", net, opt, 1, history, recipe)
    folder = tmp_path / "end" / "backbone"
    assert read_backbone_spec(folder)["branch"] == "online"
    assert read_backbone_spec(folder / "target")["branch"] == "target"
    assert isinstance(net, BYOLNetwork)
    for branch, owner in ((folder, net), (folder / "target", net.target)):
        clf = create_classifier("imgflow_cnn", 10, in_chans=1)
        load_backbone_into(clf, branch)
        assert torch.equal(clf.state_dict()["stem.0.weight"], owner.backbone.state_dict()["stem.0.weight"])

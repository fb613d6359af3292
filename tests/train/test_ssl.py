"""SimCLR pieces without Ray: the loss on a hand-checkable case, the views, LP-FT, backbone loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from components.core.errors import ConfigError
from components.model.models import create_classifier
from components.train.ssl import SimCLRNetwork, lr_at, nt_xent_loss, save_backbone
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

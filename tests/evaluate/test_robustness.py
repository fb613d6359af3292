"""Corruption sweep: every family is deterministic, in range and hurts more with severity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from components.core.errors import ConfigError
from components.evaluate.plots import plot_robustness_heatmap
from components.evaluate.robustness import (
    FAMILIES,
    SEVERITIES,
    corrupt,
    corruption_sweep,
    resolve_families,
    summarise,
    sweep_dtype,
)
from tests.conftest import fmnist_arrays


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    x, _ = fmnist_arrays("t10k", n=64)
    return torch.from_numpy(x).float().unsqueeze(1) / 255


def test_at_least_nine_families_of_the_issue() -> None:
    assert len(FAMILIES) >= 9
    for needed in ("gaussian_noise", "shot_noise", "gaussian_blur", "motion_blur", "zoom_blur", "brightness",
                   "contrast", "jpeg", "pixelate", "elastic"):  # fmt: skip
        assert needed in FAMILIES
    assert resolve_families(["all"]) == FAMILIES
    with pytest.raises(ConfigError, match="fog"):
        resolve_families(["fog"])


@pytest.mark.parametrize("family", FAMILIES)
def test_corruption_is_seeded_in_range_and_grows_with_severity(family: str, images: torch.Tensor) -> None:
    distances = []
    for s in SEVERITIES:
        a = corrupt(images, family, s, seed=7, batch=3)
        b = corrupt(images, family, s, seed=7, batch=3)
        assert a.shape == images.shape and a.dtype == torch.float32
        assert torch.equal(a, b)  # same seed, same batch: identical
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
        distances.append(float((a - images).abs().mean()))
    assert distances[0] > 0  # it changes the images
    assert distances[-1] > distances[0]  # severity 5 is harsher than 1


def test_random_families_differ_between_seeds(images: torch.Tensor) -> None:
    for fam in ("gaussian_noise", "shot_noise", "impulse_noise", "elastic", "motion_blur"):
        assert not torch.equal(corrupt(images, fam, 3, seed=1), corrupt(images, fam, 3, seed=2))


class _ConstantModel(nn.Module):
    """Predicts class 0 whatever the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 3)
        out[:, 0] = 1.0
        return out


class _BrightnessModel(nn.Module):
    """Class 1 when the mean normalised intensity is above 0, else 0: sensitive to brightness."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-m, m], dim=1)


def test_sweep_counts_a_constant_model_exactly(images: torch.Tensor) -> None:
    y = torch.tensor([0] * 16 + [1] * 48)
    r = corruption_sweep(_ConstantModel(), [(images[:32], y[:32]), (images[32:], y[32:])], mean=(0.5,), std=(0.5,),
                         families=("gaussian_noise", "contrast"), seed=0)  # fmt: skip
    assert r.n == 64 and r.clean_accuracy == 0.25
    assert r.accuracy == {"gaussian_noise": [0.25] * 5, "contrast": [0.25] * 5}
    assert r.relative_robustness == pytest.approx(1.0)


def test_sweep_sees_a_brightness_sensitive_model_fail(images: torch.Tensor) -> None:
    # Labels = the model's clean predictions, so clean accuracy is 1 and every drop is the corruption's.
    model = _BrightnessModel()
    with torch.no_grad():
        y = model((images - 0.5) / 0.5).argmax(1)
    r = corruption_sweep(model, [(images, y)], mean=(0.5,), std=(0.5,), families=("brightness", "jpeg"))
    assert r.clean_accuracy == 1.0
    assert r.worst_family == "brightness"
    assert r.accuracy["brightness"][-1] < r.accuracy["brightness"][0] <= 1.0


def test_motion_blur_smears_a_point_into_a_one_sided_streak() -> None:
    # One bright pixel in the middle: the blurred image keeps its total (a normalised kernel, no
    # border effects), spreads it over several pixels, and the streak starts at the point and runs
    # one way only (ImageNet-C's motion blur is one-sided), at most 45 degrees off the horizontal.
    x = torch.zeros(8, 1, 29, 29)
    x[:, :, 14, 14] = 1.0
    out = corrupt(x, "motion_blur", 5, seed=3)
    assert out.sum(dim=(1, 2, 3)) == pytest.approx(torch.ones(8), abs=1e-4)
    for img in out[:, 0]:
        lit = torch.nonzero(img > 1e-3).float() - 14.0  # (row, col) offsets from the point
        assert len(lit) >= 5 and float(img[14, 14]) == float(img.max())
        cols, rows = lit[:, 1], lit[:, 0]
        assert bool((cols <= 1).all()) or bool((cols >= -1).all())  # one side of the point only
        assert float(rows.abs().max()) <= float(cols.abs().max()) + 1  # within +-45 degrees
    assert (
        len({tuple(torch.nonzero(img > 1e-3).flatten().tolist()) for img in out[:, 0]}) > 1
    )  # angles differ


def test_sweep_takes_uint8_and_does_not_depend_on_workers_or_batching(images: torch.Tensor) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    torch.manual_seed(0)
    model(images[:2])
    model.eval()
    with torch.no_grad():
        y = model((images - 0.5) / 0.5).argmax(1)
    as_uint8 = (images * 255).round().to(torch.uint8)
    fams = ("gaussian_noise", "motion_blur", "elastic", "jpeg")
    one = corruption_sweep(model, [(as_uint8, y)], mean=(0.5,), std=(0.5,), families=fams, seed=5, workers=1)
    two = corruption_sweep(model, [(images, y)], mean=(0.5,), std=(0.5,), families=fams, seed=5, workers=2)
    assert one.clean_accuracy == two.clean_accuracy == 1.0
    assert one.accuracy == two.accuracy  # same images (8-bit exact), same seeds, any thread layout
    threads = torch.get_num_threads()
    corruption_sweep(model, [(as_uint8[:8], y[:8])], mean=(0.5,), std=(0.5,), families=("contrast",))
    assert torch.get_num_threads() == threads


def test_summarise_by_hand() -> None:
    r = summarise({"a": [0.8, 0.6, 0.4, 0.2, 0.0], "b": [0.8] * 5}, clean_accuracy=0.8, n=10)
    # family means 0.4 and 0.8 -> mean corruption accuracy 0.6, relative 0.75; worst a (0.5)
    assert r.mean_corruption_accuracy == pytest.approx(0.6)
    assert r.relative_robustness == pytest.approx(0.75)
    assert r.worst_family == "a" and r.family_relative["a"] == pytest.approx(0.5)
    assert len(r.rows()) == 10
    assert r.rows()[1] == {"family": "a", "severity": 2, "accuracy": 0.6, "relative": pytest.approx(0.75)}


def test_heatmap_png(tmp_path: Path) -> None:
    from PIL import Image

    path = plot_robustness_heatmap({"a": [0.9, 0.7, 0.5, 0.3, 0.1], "b": [0.9] * 5}, tmp_path / "h.png",
                                   clean_accuracy=0.92)  # fmt: skip
    with Image.open(path) as im:
        assert im.format == "PNG" and len(np.unique(np.asarray(im.convert("L")))) > 20


def _reference_sweep(
    model: nn.Module, x01: torch.Tensor, y: torch.Tensor, *, seed: int, batch: int
) -> tuple[float, dict[str, list[float]]]:
    """The sweep written the plain way: one batch, family and severity at a time, through the model as
    loaded (no conv-BN folding, no channels-last, one thread, fp32)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 intra-op threads on a busy 2-core box spin: 7x the CPU, measured
    try:
        return _reference_counts(model, x01, y, seed=seed, batch=batch)
    finally:
        torch.set_num_threads(threads)


def _reference_counts(
    model: nn.Module, x01: torch.Tensor, y: torch.Tensor, *, seed: int, batch: int
) -> tuple[float, dict[str, list[float]]]:
    clean, correct = 0, {f: [0] * len(SEVERITIES) for f in FAMILIES}
    with torch.no_grad():
        for b, (xb, yb) in enumerate(zip(x01.split(batch), y.split(batch), strict=True)):
            clean += int((model((xb - 0.5) / 0.5).argmax(1) == yb).sum())
            for fam in FAMILIES:
                for i, sev in enumerate(SEVERITIES):
                    xc = corrupt(xb, fam, sev, seed=seed, batch=b)
                    correct[fam][i] += int((model((xc - 0.5) / 0.5).argmax(1) == yb).sum())
    n = len(y)
    return clean / n, {f: [c / n for c in counts] for f, counts in correct.items()}


def test_fast_sweep_gives_the_reference_accuracies(tiny_model_dir: Path) -> None:
    # A real trained model on real test images: the fast engine (folded conv-BN, channels-last, units on
    # two threads) must count exactly what the plain loop counts; bf16 autocast (amp=auto, where the CPU
    # has it natively) may move a condition's accuracy only by the few near-tie predictions.
    from components.model.checkpoint import load_classifier

    model = load_classifier(tiny_model_dir)[0].eval()
    x, labels = fmnist_arrays("t10k", n=64)
    x_u8, y = torch.from_numpy(x).unsqueeze(1), torch.as_tensor(labels, dtype=torch.long)
    clean, reference = _reference_sweep(model, x_u8.float() / 255, y, seed=3, batch=32)

    def sweep(amp: str) -> Any:
        batches = zip(x_u8.split(32), y.split(32), strict=True)
        return corruption_sweep(model, batches, mean=(0.5,), std=(0.5,), seed=3, workers=2, amp=amp)

    fast = sweep("off")
    assert fast.clean_accuracy == clean and fast.accuracy == reference
    assert 0.5 < clean < 1.0 and len({a for accs in reference.values() for a in accs}) > 10  # not degenerate
    auto = sweep("auto")
    if sweep_dtype("auto") is None:  # no native bf16 here: auto is fp32
        assert auto.accuracy == reference
    for fam in FAMILIES:
        assert np.abs(np.subtract(auto.accuracy[fam], reference[fam])).max() <= 2 / 64, fam  # <= 2 images
    assert auto.relative_robustness == pytest.approx(fast.relative_robustness, abs=0.01)


def test_sweep_dtype_is_bf16_only_where_native() -> None:
    from components.train.torch_recipe import cpu_has_native_bf16

    assert sweep_dtype("off") is None
    assert sweep_dtype("auto") == (torch.bfloat16 if cpu_has_native_bf16() else None)
    with pytest.raises(ConfigError, match="amp"):
        sweep_dtype("fp8")


@pytest.mark.parametrize("name", ["imgflow_resnet_avgmax", "imgflow_cnn_avgmax"])
def test_inference_copy_of_a_flip_tta_model_predicts_what_the_model_does(name: str) -> None:
    """Flip TTA runs one network twice: folding batch norm into its convs once per call applied it twice
    (the pipeline's test accuracy fell to 10%). The inner network is folded once, predictions kept."""
    from components.model.checkpoint import FlipTTA
    from components.model.inference import prepare_for_inference
    from components.model.models import create_classifier

    torch.manual_seed(0)
    net = create_classifier(name, 10, in_chans=1)
    for m in net.modules():  # batch-norm statistics far from the identity, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.2, 3)
    x, _ = fmnist_arrays("t10k", n=16)
    x = (torch.from_numpy(x).float().unsqueeze(1) / 255 - 0.5) / 0.5
    for model in (FlipTTA(net, 28), net):
        fast = prepare_for_inference(model)
        with torch.inference_mode():
            want = model.eval()(x)
            assert torch.allclose(fast(x.contiguous(memory_format=torch.channels_last)), want, atol=1e-4)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # folded, not skipped

"""Corruption robustness: a fixed-seed sweep of corruption families x severities over the test set.

The corruptions are torchvision ``transforms.v2`` ops applied to whole batches of model-sized
images in [0, 1] (``imagecorruptions`` 1.1.2, the ImageNet-C reference code, is unmaintained since 2020 and
does not run on the pinned stack: it calls ``skimage.filters.gaussian(multichannel=True)``, removed
in scikit-image 0.19, and numpy 2 needs scikit-image >= 0.24; it would also add OpenCV and works one
numpy image at a time — far too slow for 55 x 10k images). Severity tables follow CIFAR-10-C
(Hendrycks & Dietterich 2019), the version of the benchmark made for 32-px images, so they suit
28-px Fashion-MNIST; ops torchvision lacks (shot and impulse noise, additive brightness, the
zoom-blur average, motion blur's one-sided streak) are short tensor expressions over the batch.

Every (family, severity, batch) draws its randomness from its own seeded generator, so a sweep is
reproducible and independent of batch order, of which families are selected and of how many
threads run it. :func:`corruption_sweep` runs (batch, family) units side by side, one intra-op
thread each, on the conv-BN-fused channels-last model, in bf16 autocast where the CPU runs bf16
natively (``amp="auto"``).

Where the time goes (10k Fashion-MNIST test images x 11 families x 5 severities, one thread, CPU
microseconds per image, AVX512-BF16 EPYC): the corruptions ~0.8 ms in all, the model's 56 passes
~9.5 ms (73k-parameter CNN, fp32 169 us per pass) — inference is ~95% of the sweep, so the engine
is what pays: bf16 autocast 101 us per pass (1.7x; the 18M-MAC residual net 365 -> 210 us), while
torch.compile (35 s to compile, ~10% faster) and a frozen TorchScript trace (~3%) do not pay for
themselves and larger batches (1024) are slower than 256.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from torch import nn

from components.core.errors import ConfigError
from components.model.inference import prepare_for_inference, side_by_side

logger = logging.getLogger(__name__)

SEVERITIES = (1, 2, 3, 4, 5)
# Elastic displacement fields are drawn per chunk of this many images (one field per call).
_ELASTIC_CHUNK = 32
_ELASTIC_SIGMA = 4.0
# Zoom levels averaged by zoom blur (see _zoom_blur).
_ZOOM_STEPS = 6

# CIFAR-10-C parameters per severity 1..5 (elastic: torchvision's alpha, sigma fixed at 4 px).
_PARAMS: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of additive noise
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity (Poisson)
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of salt-and-pepper pixels
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in pixels
    "motion_blur": (1.0, 1.5, 2.0, 2.5, 3.0),  # sigma in pixels of the one-sided streak
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),  # largest zoom averaged
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to intensity
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # down-sampling factor
    "elastic": (10.0, 20.0, 30.0, 40.0, 50.0),  # displacement magnitude alpha
}
FAMILIES: tuple[str, ...] = tuple(_PARAMS)


def _gaussian_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    return x + c * torch.randn(x.shape, generator=g)


def _shot_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    return torch.poisson(x * c, generator=g) / c


def _impulse_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(x.shape, generator=g)
    out = x.clone()
    out[u < c / 2] = 0.0
    out[u > 1 - c / 2] = 1.0
    return out


def _gaussian_blur(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    k = 2 * math.ceil(3 * c) + 1
    return F.gaussian_blur(x, kernel_size=[k, k], sigma=[c, c])


def _motion_blur(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    # ImageNet-C's motion blur (ImageMagick's): a one-sided streak of Gaussian weights (sigma c,
    # taps out to 3 sigma) along a random direction in [-45, 45] degrees drawn per image. Each tap
    # is one bilinear shift of the whole batch (grid_sample with per-image offsets), so the cost
    # does not depend on the kernel's size and nothing loops over images.
    b, _, h, w = x.shape
    angle = torch.deg2rad(torch.rand(b, generator=g) * 90.0 - 45.0)
    direction = torch.stack([torch.cos(angle) * 2.0 / w, torch.sin(angle) * 2.0 / h], dim=1)  # (B, 2)
    taps = torch.arange(0, math.ceil(3 * c) + 1, dtype=torch.float32)
    weights = torch.exp(-(taps**2) / (2 * c * c))
    weights /= weights.sum()
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    base = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    out = x * weights[0]
    for d, wt in zip(taps[1:], weights[1:], strict=True):
        grid = base + (d * direction).view(b, 1, 1, 2)
        out += wt * torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                                    align_corners=False)  # fmt: skip
    return out


def _zoom_blur(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    # CIFAR-10-C averages zooms 1.00, 1.01, ..., c; _ZOOM_STEPS evenly spaced zooms give the same
    # blur at a quarter of the cost (the sweep's most expensive family otherwise).
    zooms = np.linspace(1.0, c, _ZOOM_STEPS)
    out = x.clone()
    for z in zooms[1:]:
        out += F.affine(x, angle=0.0, translate=[0, 0], scale=float(z), shear=[0.0, 0.0])
    return out / len(zooms)


def _brightness(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    return x + c  # ImageNet-C adds to the HSV value channel; for grey images that is intensity


def _contrast(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    return F.adjust_contrast(x, c)


def _jpeg(x: torch.Tensor, c: int, g: torch.Generator) -> torch.Tensor:
    as_uint8 = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return F.jpeg(as_uint8, quality=int(c)).float() / 255


def _pixelate(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = F.resize(x, [max(1, int(h * c)), max(1, int(w * c))], antialias=True)
    return F.resize(small, [h, w], interpolation=T.InterpolationMode.NEAREST)


def _elastic(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    # torchvision's ElasticTransform field (uniform noise, Gaussian-smoothed with sigma 4 px, scaled
    # by alpha / size) drawn from ``g`` instead of the global RNG (the sweep runs in threads), one
    # field per chunk of _ELASTIC_CHUNK images, all fields smoothed in one call.
    h, w = x.shape[-2:]
    chunks = x.split(_ELASTIC_CHUNK)
    sigma = _ELASTIC_SIGMA
    k = min(int(8 * sigma + 1) | 1, 2 * min(h, w) - 1)  # reflect padding needs pad < side (8 px images)
    noise = torch.rand(len(chunks) * 2, 1, h, w, generator=g) * 2 - 1
    field = F.gaussian_blur(noise, kernel_size=[k, k], sigma=[sigma, sigma]).view(len(chunks), 2, h, w)
    field = field * torch.tensor([c / h, c / w]).view(1, 2, 1, 1)
    displacement = field.permute(0, 2, 3, 1)  # (n, H, W, 2): (dx, dy) per pixel
    return torch.cat([F.elastic(chunk, displacement[i : i + 1]) for i, chunk in enumerate(chunks)])


_OPS: dict[str, Callable[[torch.Tensor, Any, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "brightness": _brightness,
    "contrast": _contrast,
    "jpeg": _jpeg,
    "pixelate": _pixelate,
    "elastic": _elastic,
}


def list_corruptions() -> list[str]:
    """The corruption family names :func:`corrupt` accepts."""
    return list(FAMILIES)


def resolve_families(names: Sequence[str]) -> tuple[str, ...]:
    """Validate family names from params; ``all`` expands to every family."""
    if list(names) == ["all"]:
        return FAMILIES
    unknown = [n for n in names if n not in _OPS]
    if unknown:
        raise ConfigError(
            f"unknown corruption families {unknown} (evaluate.robustness.families); known: {', '.join(FAMILIES)}"
        )
    return tuple(names)


def _generator(seed: int, family: str, severity: int, batch: int) -> torch.Generator:
    key = f"{seed}:{family}:{severity}:{batch}".encode()
    return torch.Generator().manual_seed(zlib.crc32(key))


def corrupt(x: torch.Tensor, family: str, severity: int, *, seed: int = 0, batch: int = 0) -> torch.Tensor:
    """x: (B, C, H, W) float in [0, 1] -> the corrupted batch, same shape, clipped to [0, 1]."""
    if family not in _OPS:
        raise ConfigError(f"unknown corruption {family!r}; known: {', '.join(FAMILIES)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    c = _PARAMS[family][severity - 1]
    return _OPS[family](x, c, _generator(seed, family, severity, batch)).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------- the sweep


def sweep_dtype(amp: str) -> torch.dtype | None:
    """The sweep's autocast dtype: bf16 when ``amp`` is ``auto`` and this CPU runs bf16 natively
    (AVX512-BF16 or AMX: ~1.7x faster passes); None (fp32) with ``off`` or without native bf16, where
    emulated bf16 would be slower than fp32."""
    # Imported here: torch_recipe pulls in timm and the data stack (seconds), which the modules that
    # only need this module's report types (gate_report) should not pay for.
    from components.train.torch_recipe import cpu_has_native_bf16

    if amp not in ("auto", "off"):
        raise ConfigError(f"evaluate.robustness.amp must be auto or off, got {amp!r}")
    return torch.bfloat16 if amp == "auto" and cpu_has_native_bf16() else None


@dataclass(frozen=True)
class RobustnessReport:
    """Accuracy under each corruption family x severity, and summaries.

    ``relative_robustness`` = mean corruption accuracy / clean accuracy (1.0: no loss);
    ``family_relative[f]`` = the family's mean accuracy over severities / clean accuracy.
    With ``metric`` other than ``accuracy`` (multi-label: ``mAP``) every "accuracy" field holds
    that metric instead.
    """

    n: int
    clean_accuracy: float
    accuracy: dict[str, list[float]]
    """family -> accuracy at severities 1..5."""
    mean_corruption_accuracy: float
    relative_robustness: float
    family_relative: dict[str, float]
    worst_family: str
    seed: int
    seconds: float
    metric: str = "accuracy"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[dict[str, Any]]:
        """Long format for CSV / ``dvc plots``: family, severity, the metric (column ``accuracy`` or
        ``mAP``), relative."""
        return [
            {
                "family": fam,
                "severity": s,
                self.metric: acc,
                "relative": acc / self.clean_accuracy if self.clean_accuracy else 0.0,
            }
            for fam, accs in self.accuracy.items()
            for s, acc in zip(SEVERITIES, accs, strict=True)
        ]


def corruption_sweep(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    families: Sequence[str] = FAMILIES,
    seed: int = 0,
    workers: int | None = None,
    score: Callable[[np.ndarray, np.ndarray], float] | None = None,
    metric: str = "accuracy",
    amp: str = "off",
) -> RobustnessReport:
    """Run every family x severity over ``batches`` and count correct top-1 predictions.

    batches: (x, y) with x (B, C, H, W) at the model's input size, un-normalised, uint8 or float
    in [0, 1], and y (B,) class indices; mean/std: the model's normalisation (``data_config``),
    applied after corrupting, exactly as the eval transform does.

    score: instead of top-1 accuracy, ``score(logits (N, K), targets (N, ...))`` over all images of
    each (family, severity) — e.g. mAP for a multi-label model, whose y are (B, C) indicator rows —
    reported under the name ``metric``.

    Work is split into (batch, family) units run by ``workers`` threads (default: torch's thread
    count), each with one intra-op thread: a small CNN's convolutions scale poorly across threads
    inside one op, so whole batches side by side keep the cores busier (about 1.3x on 2 cores).
    Every unit draws from its own seeded generator, so the result does not depend on scheduling.

    amp: ``auto``: the model runs under bf16 autocast where the CPU has native bf16 (:func:`sweep_dtype`;
    the corruptions stay fp32) — accuracies then differ from fp32's by the few predictions whose top
    two logits lie within bf16 rounding; ``off`` (the default here; the evaluate stage passes
    ``evaluate.robustness.amp``): fp32 throughout.
    """
    import time

    t0 = time.perf_counter()
    fast = prepare_for_inference(model)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    dtype = sweep_dtype(amp)
    data = list(batches)  # kept as given (uint8: 4x smaller); each unit converts its own batch
    if not data or sum(int(y.shape[0]) for _, y in data) == 0:
        raise ValueError("no images to run the corruption sweep on")

    def n_correct(x: torch.Tensor, y: torch.Tensor) -> Any:
        x = ((x - m) / s).contiguous(memory_format=torch.channels_last)
        # autocast is thread-local: entered here, in the worker thread that runs the model
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = fast(x).float()
        if score is not None:  # keep the logits: the metric is computed over all batches at once
            return logits.numpy()
        return int((logits.argmax(1) == y).sum())

    def unit(b: int, fam: str | None) -> tuple[str | None, list[Any]]:
        x, y = _as_float(data[b][0]), data[b][1]
        with torch.inference_mode():
            if fam is None:
                return None, [n_correct(x, y)]
            return fam, [n_correct(corrupt(x, fam, sev, seed=seed, batch=b), y) for sev in SEVERITIES]

    jobs = [(b, fam) for b in range(len(data)) for fam in (None, *families)]
    results = side_by_side(lambda job: unit(*job), jobs, workers=workers, description="corruption sweep")
    if score is not None:
        return _scored(results, data, families, score=score, metric=metric, seed=seed, t0=t0)
    clean = sum(counts[0] for fam, counts in results if fam is None)
    correct = {f: [0] * len(SEVERITIES) for f in families}
    for fam, counts in results:
        if fam is not None:
            correct[fam] = [a + c for a, c in zip(correct[fam], counts, strict=True)]
    total = sum(int(y.shape[0]) for _, y in data)
    return summarise(
        {f: [c / total for c in counts] for f, counts in correct.items()},
        clean_accuracy=clean / total,
        n=total,
        seed=seed,
        seconds=time.perf_counter() - t0,
    )


def _scored(
    results: list[tuple[str | None, list[Any]]],
    data: list[tuple[torch.Tensor, torch.Tensor]],
    families: Sequence[str],
    *,
    score: Callable[[np.ndarray, np.ndarray], float],
    metric: str,
    seed: int,
    t0: float,
) -> RobustnessReport:
    """Summaries of a scored sweep: results hold each (batch, family) unit's logits, in job order
    (batch-major), so concatenating a family's entries keeps the batches' order."""
    import time

    targets = torch.cat([y for _, y in data]).numpy()
    clean = np.concatenate([out[0] for fam, out in results if fam is None])
    table = {
        f: [float(score(np.concatenate([out[k] for fam, out in results if fam == f]), targets))
            for k in range(len(SEVERITIES))]
        for f in families
    }  # fmt: skip
    return summarise(table, clean_accuracy=float(score(clean, targets)), n=len(targets), seed=seed,
                     seconds=time.perf_counter() - t0, metric=metric)  # fmt: skip


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float images are taken as already in [0, 1]."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def summarise(
    accuracy: dict[str, list[float]],
    *,
    clean_accuracy: float,
    n: int,
    seed: int = 0,
    seconds: float = 0.0,
    metric: str = "accuracy",
) -> RobustnessReport:
    """Summaries of a family -> per-severity accuracy table (see :class:`RobustnessReport`)."""
    if not accuracy:
        raise ValueError("no corruption families to summarise")
    family_mean = {f: float(np.mean(a)) for f, a in accuracy.items()}
    mca = float(np.mean(list(family_mean.values())))
    rel = {f: (v / clean_accuracy if clean_accuracy else 0.0) for f, v in family_mean.items()}
    worst = min(rel, key=lambda f: rel[f])
    report = RobustnessReport(
        n=n,
        clean_accuracy=float(clean_accuracy),
        accuracy={f: [float(v) for v in a] for f, a in accuracy.items()},
        mean_corruption_accuracy=mca,
        relative_robustness=mca / clean_accuracy if clean_accuracy else 0.0,
        family_relative=rel,
        worst_family=worst,
        seed=seed,
        seconds=float(seconds),
        metric=metric,
    )
    logger.info(
        "corruption sweep on %d images: clean %s %.4f, mean corrupted %.4f (relative %.3f), worst %s %.3f",
        n, metric, clean_accuracy, mca, report.relative_robustness, worst, rel[worst],
    )  # fmt: skip
    return report

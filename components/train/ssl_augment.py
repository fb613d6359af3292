"""SimCLR's augmentations, derived from the data rather than ImageNet defaults.

A view of a batch: random resized crop at the data's own side (timm's geometry, batched:
:func:`components.data.datasets.random_resized_crop_flip`), horizontal flip, multiplicative brightness,
contrast around each image's mean, Gaussian noise; colour images only also turn grey at random (a
grey image has no colour to jitter). Pixels are worked on in [0, 1] and normalised last as the model's
data config says (the preprocessing supervised training and serving use). Every draw comes from the caller's ``torch.Generator``: the same seed
gives the same views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from components.data.datasets import random_resized_crop_flip


@dataclass(frozen=True)
class ViewAugment:
    """One SimCLR view's augmentation strengths; ``mean``/``std``: per channel, in [0, 1] units."""

    crop_scale: tuple[float, float]
    hflip: float
    brightness: float
    """Each image's pixels times a factor drawn from [1 - brightness, 1 + brightness]."""
    contrast: float
    """Each image's deviation from its mean times a factor drawn from [1 - contrast, 1 + contrast]."""
    noise: float
    """Gaussian noise with a standard deviation drawn from [0, noise] per image."""
    grey_p: float
    """Colour images: probability of turning a view grey (0 for grey data)."""
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=g) * (hi - lo) + lo).view(n, 1, 1, 1)


def augment_view(
    x: torch.Tensor,
    aug: ViewAugment,
    g: torch.Generator,
    *,
    scale: tuple[float, float] | None = None,
    side: int | None = None,
) -> torch.Tensor:
    """x: (B, C, H, W) pixels in [0, 1] -> one normalised augmented view (B, C, H, W); ``scale`` and
    ``side`` (a multi-crop local view: a smaller crop at a smaller side) override the crop's area range
    and output side."""
    n, c = x.shape[0], x.shape[1]
    x = random_resized_crop_flip(x, scale=scale or aug.crop_scale, ratio=(3 / 4, 4 / 3), hflip=aug.hflip,
                                 generator=g, side=side)  # fmt: skip
    x = x * _uniform(n, 1 - aug.brightness, 1 + aug.brightness, g)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - m) * _uniform(n, 1 - aug.contrast, 1 + aug.contrast, g) + m
    if c == 3 and aug.grey_p > 0:
        grey = x.mean(dim=1, keepdim=True).expand_as(x)
        x = torch.where((torch.rand(n, generator=g) < aug.grey_p).view(n, 1, 1, 1), grey, x)
    x = x + torch.randn(x.shape, generator=g) * _uniform(n, 0.0, aug.noise, g)
    x = x.clamp(0.0, 1.0)
    mean = torch.tensor(aug.mean, dtype=x.dtype).view(1, c, 1, 1)
    std = torch.tensor(aug.std, dtype=x.dtype).view(1, c, 1, 1)
    return (x - mean) / std

"""Adversarial robustness: accuracy under FGSM and PGD at small L-infinity budgets (accuracy vs eps).

Attacks work in pixel space (images in [0, 1], what a file can hold), so eps means the same for
every model whatever its normalisation: eps = 1/255 changes each pixel by at most one grey level.
FGSM (Goodfellow et al. 2015) takes one step of size eps along the sign of the loss gradient; PGD
(Madry et al. 2018) takes ``steps`` steps of 2.5 eps / steps from a seeded random start, projected
back onto the eps-ball and [0, 1] after each. Both maximise the cross-entropy of the true class,
untargeted. PGD accuracy is the one to read (FGSM is its one-step, weaker relative); a model whose
accuracy falls to zero at eps = 1/255 has learnt features a grey level can flip.

Single-label models only: a multi-label model has no one true class to push away from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.core import report as kit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdversarialReport:
    """Accuracy of one model on one image sample under each attack at each budget."""

    epsilons: tuple[float, ...]
    fgsm: tuple[float, ...]
    pgd: tuple[float, ...]
    """Accuracy at each eps (same order as ``epsilons``)."""
    n: int
    pgd_steps: int
    seed: int

    @property
    def clean_accuracy(self) -> float:
        """Accuracy at eps = 0 (the smallest budget when 0 was not asked for)."""
        return self.pgd[0]

    @property
    def strongest(self) -> tuple[float, float]:
        """(largest eps, PGD accuracy there): what ``gates.min_adversarial_accuracy`` is checked on."""
        return self.epsilons[-1], self.pgd[-1]

    def to_dict(self) -> dict[str, Any]:
        raw = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {**raw, "clean_accuracy": self.clean_accuracy}

    def rows(self) -> list[dict[str, Any]]:
        return [{"epsilon": e, "fgsm_accuracy": f, "pgd_accuracy": p}
                for e, f, p in zip(self.epsilons, self.fgsm, self.pgd, strict=True)]  # fmt: skip


class _Normalised(nn.Module):
    """The model with its input normalisation in front: it takes images in [0, 1]."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.model((x01 - self.mean) / self.std)


def _grad_sign(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad.sign()


def fgsm(model: nn.Module, x01: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of size eps; x01: (B, C, H, W) in [0, 1], y: (B,) class indices."""
    if eps == 0:
        return x01
    return (x01 + eps * _grad_sign(model, x01, y)).clamp(0, 1).detach()


def pgd(
    model: nn.Module,
    x01: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """L-inf PGD with a random start: ``steps`` steps of 2.5 eps / steps, projected after each."""
    if eps == 0:
        return x01
    step = 2.5 * eps / steps
    start = torch.empty(x01.shape).uniform_(-eps, eps, generator=generator).to(x01.device)
    adv = (x01 + start).clamp(0, 1)
    for _ in range(steps):
        adv = adv + step * _grad_sign(model, adv, y)
        adv = torch.min(torch.max(adv, x01 - eps), x01 + eps).clamp(0, 1).detach()
    return adv


def adversarial_curve(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    epsilons: Sequence[float],
    pgd_steps: int = 10,
    seed: int = 0,
    batch_size: int = 128,
    amp: str = "off",
    workers: int | None = None,
) -> AdversarialReport:
    """Accuracy under FGSM and PGD at each eps. images: (N, C, H, W) uint8 (or float in [0, 1]) at the
    model's input size; targets: (N,) class indices. The model's train/eval mode is restored after.

    Each (eps, batch) is one unit with its own seeded PGD start, run side by side on the conv-BN-fused
    channels-last copy the corruption sweep uses (:func:`~components.model.inference.side_by_side`),
    so the result does not depend on scheduling. amp: ``auto``: forward and backward in bf16 autocast
    where the CPU runs bf16 natively (the attack steps on the sign of the gradient; the images stay fp32)."""
    from components.evaluate.robustness import sweep_dtype
    from components.model.inference import prepare_for_inference, side_by_side

    was_training = model.training
    net = _Normalised(prepare_for_inference(model), mean, std)
    dtype = sweep_dtype(amp)
    x_all = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    x_all = x_all.contiguous(memory_format=torch.channels_last)
    batches = list(zip(x_all.split(batch_size), targets.long().split(batch_size), strict=True))

    def unit(job: tuple[int, int]) -> tuple[int, int, int]:
        j, b = job
        x, y = batches[b]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + j * 10_007 + b)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            fg = _n_correct(net, fgsm(net, x, y, epsilons[j]), y)
            pg = _n_correct(net, pgd(net, x, y, epsilons[j], steps=pgd_steps, generator=generator), y)
        return j, fg, pg

    jobs = [(j, b) for j in range(len(epsilons)) for b in range(len(batches))]
    correct = {kind: np.zeros(len(epsilons)) for kind in ("fgsm", "pgd")}
    try:
        for j, fg, pg in side_by_side(unit, jobs, workers=workers, description="adversarial (FGSM, PGD)"):
            correct["fgsm"][j] += fg
            correct["pgd"][j] += pg
    finally:
        model.train(was_training)
    n = len(x_all)
    return AdversarialReport(
        epsilons=tuple(float(e) for e in epsilons),
        fgsm=tuple(float(c / n) for c in correct["fgsm"]),
        pgd=tuple(float(c / n) for c in correct["pgd"]),
        n=n,
        pgd_steps=pgd_steps,
        seed=seed,
    )


@torch.no_grad()
def _n_correct(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return int((net(x).float().argmax(1) == y).sum())


# --------------------------------------------------------------------------- report


def plot_curve(report: Mapping[str, Any], path: Path) -> Path:
    """Accuracy vs eps (FGSM and PGD) as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    eps = [e * 255 for e in report["epsilons"]]
    ax.plot(eps, report["fgsm"], "o-", label="FGSM")
    ax.plot(eps, report["pgd"], "s-", label=f"PGD ({report['pgd_steps']} steps)")
    ax.set(xlabel="eps (grey levels of 255)", ylabel="accuracy", ylim=(0, 1.02),
           title=f"Adversarial accuracy ({report['n']} test images)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def adversarial_section(data: Mapping[str, Any] | None, images: Mapping[str, Path]) -> kit.Section | None:
    """The gate report's "Adversarial robustness" section from :meth:`AdversarialReport.to_dict`
    (or ``{"status": "skipped", "reason"}``)."""
    if not data:
        return None
    title = "Adversarial robustness"
    if "epsilons" not in data:
        return kit.section(title, kit.note(data.get("reason", "not measured")))
    rows = [[f"{e:g} ({e * 255:.2g}/255)", kit.num(f, 3), kit.num(p, 3)]
            for e, f, p in zip(data["epsilons"], data["fgsm"], data["pgd"], strict=True)]  # fmt: skip
    text = (
        f"{data['n']} class-stratified test images (seed {data['seed']}), untargeted L-inf attacks on the pixels "
        f"in [0, 1]: FGSM (one step) and PGD ({data['pgd_steps']} steps, random start). Clean accuracy "
        f"{data['clean_accuracy']:.3f}; PGD at eps {data['epsilons'][-1]:g}: {data['pgd'][-1]:.3f}."
    )
    return kit.section(
        title,
        kit.paragraph(text),
        kit.table(["eps", "FGSM accuracy", "PGD accuracy"], rows),
        kit.figure(
            images.get("adversarial"), alt="accuracy vs eps", caption="Accuracy vs perturbation budget."
        ),
    )

"""Fine-tuning for ``train.init: ssl:<run>``, with LP-FT as an option: probe first, then fine-tune
(Kumar et al., ICLR 2022).

The issue's planning measured that fully fine-tuning a SimCLR backbone at lr 1e-3 from the start
lost the whole gain of pretraining (76.7% vs the probe's 80.5% at 1% of the labels, a recipe without
augmentation): a fresh head's large early gradients can wreck the features before the head is any
good. So the optimiser keeps the backbone's parameters in their own groups, and :class:`LpFtSchedule`
scales those groups' learning rate by 0 for the first ``probe_steps`` (a linear probe: only the head
moves) and by ``backbone_scale`` afterwards, on top of the recipe's cosine schedule. With imgflow's own
recipe neither helped (``python -m bench ssl_finetune``), so the defaults are no probe steps and a scale
of 1.0 (``train.init_probe_epochs``, ``train.init_backbone_lr_scale``). It works
through DistributedDataParallel unchanged (every parameter keeps ``requires_grad``), and a resumed
run lands in the right phase because the schedule is a function of the step.
"""

from __future__ import annotations

from typing import Any

from torch import nn

BACKBONE_GROUP_KEY = "imgflow_backbone"


def _classifier_ids(model: nn.Module) -> set[int]:
    inner = getattr(model, "module", model)
    get = getattr(inner, "get_classifier", None)
    head = get() if callable(get) else None
    return {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()


def lpft_param_groups(model: nn.Module, *, weight_decay: float) -> list[dict[str, Any]]:
    """The model's trainable parameters in four groups: backbone / head x decayed / not (biases and
    norm weights: 1-d tensors, as timm leaves them undecayed); backbone groups carry ``BACKBONE_GROUP_KEY``."""
    head = _classifier_ids(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) not in head, p.ndim > 1), []).append(p)
    return [
        {"params": ps, "weight_decay": weight_decay if decayed else 0.0, BACKBONE_GROUP_KEY: backbone}
        for (backbone, decayed), ps in sorted(groups.items())
    ]


class LpFtSchedule:
    """A timm per-step scheduler whose backbone groups get ``x0`` during the probe, then ``x backbone_scale``."""

    def __init__(self, inner: Any, optimizer: Any, *, probe_steps: int, backbone_scale: float) -> None:
        self.inner, self.optimizer = inner, optimizer
        self.probe_steps, self.backbone_scale = probe_steps, backbone_scale
        self._scale_backbone(0)  # the first step runs before any step_update

    def _scale_backbone(self, step: int) -> None:
        factor = 0.0 if step < self.probe_steps else self.backbone_scale
        for group in self.optimizer.param_groups:
            if group.get(BACKBONE_GROUP_KEY):
                group["lr"] = float(group["lr"]) * factor  # the inner schedule just set it afresh

    def step_update(self, num_updates: int, metric: float | None = None) -> None:
        self.inner.step_update(num_updates, metric)
        self._scale_backbone(num_updates)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.inner.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

"""Any timm model at any input size (issue 17, item 3): one model per family, grey or RGB, at a small
non-native size, a forward and one optimizer step each; a transformer built for 32 px saves and
loads again through imgflow's checkpoint files without being told its size.

Tiny configurations (fewer blocks, narrower) keep each family's own code path while costing well
under a second on CPU; pretrained=False throughout (no network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from components.model.checkpoint import ModelSpec, load_classifier, save_classifier
from components.model.models import create_classifier, resolve_data_config

# family -> (timm name, tiny overrides, (input channels, side)); every override is a constructor
# argument of that family. Grey at 32 px and RGB at 48 px alternate over the families: one optimizer
# step of a CNN costs 1-4 CPU-s here (first-call kernel setup), both sizes for every family ~25 s.
FAMILIES: dict[str, tuple[str, dict[str, Any], tuple[int, int]]] = {
    "vit": ("vit_tiny_patch16_224", {"depth": 2}, (1, 32)),
    "deit": ("deit_tiny_patch16_224", {"depth": 2}, (3, 48)),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"depths": (1, 1), "num_heads": (1, 2), "embed_dim": 24},
        (1, 32),
    ),
    "convnext": ("convnext_atto", {"depths": (1, 1, 1, 1)}, (3, 48)),
    "mobilenet": ("mobilenetv3_small_050", {}, (1, 32)),
    "resnet": ("resnet10t", {}, (3, 48)),
    "efficientnet": ("tf_efficientnet_lite0", {}, (1, 32)),
}


def _train_step(model: torch.nn.Module, x: torch.Tensor, classes: int) -> float:
    """One AdamW step on random labels; returns the loss (finite when forward and backward worked)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model(x), torch.arange(len(x)) % classes)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_trains_at_a_small_non_native_size(family: str) -> None:
    name, tiny, (in_chans, side) = FAMILIES[family]
    torch.manual_seed(0)
    model = create_classifier(name, 3, in_chans=in_chans, **tiny)
    x = torch.randn(4, in_chans, side, side)
    assert model(x).shape == (4, 3), (family, in_chans, side)
    before = [p.detach().clone() for p in model.parameters()]
    assert torch.isfinite(torch.tensor(_train_step(model, x, 3)))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    cfg = resolve_data_config(model, input_size=side)
    assert cfg["input_size"] == (in_chans, side, side) and len(cfg["mean"]) == in_chans


def test_a_transformer_at_32px_loads_again_from_its_checkpoint(tmp_path: Path) -> None:
    """The weights of a ViT run at 32 px (4 tokens) keep the native shapes, so the loader, which
    builds the model from its name alone, restores the same function at that size."""
    name = "vit_tiny_patch16_224"  # full depth here: the loader builds the registered architecture
    model = create_classifier(name, 3, in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    save_classifier(model.state_dict(), ModelSpec(name, ("a", "b", "c"), 1, resolve_data_config(model, input_size=32)),
                    tmp_path)  # fmt: skip
    loaded, spec = load_classifier(tmp_path)
    assert spec.data_config["input_size"] == (1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)

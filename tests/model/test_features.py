"""Features at named layers for the timm families the trainer supports (CNN, ViT with prefix tokens,
NHWC Swin), batched, in eval mode, as numpy."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from components.core.errors import ConfigError
from components.model.checkpoint import load_classifier
from components.model.features import LAYERS, extract_features, layer_features, pool_feature_map


def _vit(**kwargs: object) -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32, patch_size=8, **kwargs
    )


def test_small_cnn_layers_match_its_own_forward(tiny_model_dir) -> None:
    model, _ = load_classifier(tiny_model_dir)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        fmap = model.forward_features(x)
        logits = model(x)
    pooled = extract_features(model, x, layer="pooled_last", batch_size=2)
    pre = extract_features(model, x, layer="pre_logits", batch_size=2)
    assert pooled.dtype == np.float32 and pooled.shape == (5, fmap.shape[1])
    np.testing.assert_allclose(pooled, fmap.mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    # pre_logits is exactly what the last linear layer maps to the logits.
    fc = model.get_classifier()
    np.testing.assert_allclose(
        fc(torch.from_numpy(pre)).detach().numpy(), logits.numpy(), rtol=1e-4, atol=1e-5
    )


def test_vit_pooled_last_skips_prefix_tokens() -> None:
    model = _vit(reg_tokens=2).eval()  # class token + 2 registers: 3 prefix tokens
    assert model.num_prefix_tokens == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
    assert tokens.shape[1] == 3 + 16  # 4x4 patch grid at 32 px / 8
    pooled = extract_features(model, x, layer="pooled_last")
    np.testing.assert_allclose(pooled, tokens[:, 3:].mean(1).numpy(), rtol=1e-5, atol=1e-6)
    pre = extract_features(model, x, layer="pre_logits")
    np.testing.assert_allclose(pre, tokens[:, 0].numpy(), rtol=1e-5, atol=1e-6)  # the class token


def test_nhwc_maps_pool_over_their_spatial_axes() -> None:
    class Nhwc(torch.nn.Module):
        output_fmt = "NHWC"

    feats = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    assert pool_feature_map(Nhwc(), feats).shape == (2, 5)
    assert pool_feature_map(torch.nn.Identity(), feats).shape == (2, 3)  # NCHW: C = 3


def test_batches_eval_mode_and_empty_input() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=3, in_chans=1)
    model.train()
    x = torch.randn(5, 1, 32, 32)
    one_go = extract_features(model, x, layer="pooled_last", batch_size=8)
    # A DataLoader-like iterable of (x, y) pairs gives the same rows: batch norm ran in eval mode.
    pairs = [(x[:3], torch.zeros(3)), (x[3:], torch.zeros(2))]
    np.testing.assert_allclose(extract_features(model, pairs, total=5), one_go, rtol=1e-5, atol=1e-5)
    assert model.training  # restored
    assert extract_features(model, x[:0], layer="pre_logits").shape == (0, 512)
    with pytest.raises(ConfigError, match="unknown feature layer"):
        extract_features(model, x, layer="penultimate")
    assert set(LAYERS) == {"pre_logits", "pooled_last"}


def test_layer_features_keep_gradients_for_callers_that_want_them() -> None:
    model = _vit().eval()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    layer_features(model, x, layer="pooled_last").sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0

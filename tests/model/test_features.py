"""Features at named layers for the timm families the trainer supports (CNN, ViT with prefix tokens,
NHWC Swin), batched, in eval mode, as numpy."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from components.core.errors import ConfigError
from components.model.checkpoint import load_classifier
from components.model.features import (
    FEWSHOT_LAYER,
    LAYERS,
    extract_features,
    layer_features,
    logits_and_features,
    pool_feature_map,
)


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
    # atol 1e-5: the two paths sum the tokens in other orders (2e-6 apart on an AVX2 CPU)
    np.testing.assert_allclose(pooled, tokens[:, 3:].mean(1).numpy(), rtol=1e-5, atol=1e-5)
    pre = extract_features(model, x, layer="pre_logits")
    np.testing.assert_allclose(pre, tokens[:, 0].numpy(), rtol=1e-5, atol=1e-5)  # the class token


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
    assert set(LAYERS) == {"pre_logits", "pooled_last", "prev_stage_3x3"}


def test_extraction_leaves_the_model_trainable_and_as_it_was() -> None:
    """The pass runs in channels-last memory and inference mode; the caller's model comes back in its own
    layout with ordinary weights that a training step can use (and the same features either way)."""
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=1)
    x = torch.randn(4, 1, 32, 32)
    first = extract_features(model, x, layer="pre_logits")
    assert all(p.is_contiguous() and not p.is_inference() for p in model.parameters())
    with torch.inference_mode():  # inside a caller's inference mode: no layout change at all
        again = extract_features(model, x, layer="pre_logits")
    np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-5)
    assert all(not p.is_inference() for p in model.parameters())
    model(x).sum().backward()  # a training step after extraction
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_layer_features_keep_gradients_for_callers_that_want_them() -> None:
    model = _vit().eval()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    layer_features(model, x, layer="pooled_last").sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_prev_stage_3x3_on_imgflow_cnn_is_the_stage_before_the_last(tiny_model_dir) -> None:
    """imgflow's CNN has no forward_intermediates: its stages[-2] is read by a hook, in the same pass
    that gives the logits (the few-shot head's path)."""
    model, _ = load_classifier(tiny_model_dir)
    assert FEWSHOT_LAYER == "prev_stage_3x3"
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        fmap = model.stages[:-1](model.stem(x))  # (3, 32, 7, 7) at 28 px
        expected = torch.nn.functional.adaptive_avg_pool2d(fmap, 3).flatten(1)
        logits, feats = logits_and_features(model, x, layer="prev_stage_3x3")
        np.testing.assert_allclose(logits.numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
    got = extract_features(model, x, layer="prev_stage_3x3", batch_size=2)
    assert got.shape == (3, fmap.shape[1] * 9)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_prev_stage_3x3_on_a_vit_is_its_token_grid_before_the_last_block() -> None:
    model = _vit(depth=2, reg_tokens=1).eval()  # class token + 1 register; a 4x4 patch grid at 32 px
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.blocks[0](model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x)))))
        grid = tokens[:, model.num_prefix_tokens :].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
        expected = torch.nn.functional.adaptive_avg_pool2d(grid, 3).flatten(1)
        logits, feats = logits_and_features(model, x, layer="prev_stage_3x3")
        np.testing.assert_allclose(logits.numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
    got = extract_features(model, x, layer="prev_stage_3x3")
    assert got.shape == (2, model.embed_dim * 9)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(feats.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_prev_stage_3x3_on_a_timm_cnn_and_a_model_without_stages() -> None:
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=1)
    got = extract_features(model, torch.randn(2, 1, 32, 32), layer="prev_stage_3x3")
    assert got.shape == (2, model.layer3[-1].conv2.out_channels * 9) and np.isfinite(got).all()

    class Flat(torch.nn.Module):
        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(ConfigError, match="no forward_intermediates and no stages"):
        extract_features(Flat(), torch.randn(1, 1, 8, 8), layer="prev_stage_3x3")

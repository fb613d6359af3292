"""Grad-CAM for the small CNN (a real trained model) and for a ViT at 32x32 on its own patch grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from components.evaluate.explain import (
    build_gallery,
    cam_layer,
    gallery_section,
    grad_cam,
    overlay,
    pick_examples,
    to_display,
)
from components.model.checkpoint import Predictor
from tests.conftest import FMNIST_CLASSES, fmnist_arrays, png_bytes


@pytest.fixture(scope="module")
def cnn(tiny_model_dir: Path) -> Predictor:
    return Predictor.from_dir(tiny_model_dir)


def test_small_cnn_heat_maps_sit_on_the_garment(cnn: Predictor, tmp_path: Path) -> None:
    x, _ = fmnist_arrays("t10k", 32)
    batch = cnn.preprocess([png_bytes(a) for a in x])
    cams, classes, probs = grad_cam(cnn.model, batch)
    assert cam_layer(cnn.model).name == "stages.2.1.0"  # the last conv of imgflow_cnn
    assert cams.shape == (32, 28, 28) and cams.min() >= 0 and np.allclose(cams.max(axis=(1, 2)), 1.0)
    with torch.no_grad():
        assert (classes == cnn.model(batch).argmax(1).numpy()).all()
    assert ((probs > 0) & (probs <= 1)).all()
    # Fashion-MNIST garments on a black ground: the evidence lies on the garment, not the background.
    garment = x > 20
    on_garment = [cams[i][garment[i]].mean() > cams[i][~garment[i]].mean() for i in range(32)]
    assert np.mean(on_garment) >= 0.75
    img = overlay(to_display(batch[:1], (0.5,), (0.5,))[0], cams[0])
    img.save(tmp_path / "o.png")
    assert Image.open(tmp_path / "o.png").size == (2 * 112 + 4, 112)


@pytest.mark.parametrize(("patch", "grid"), [(8, 4), (4, 8)])
def test_vit_maps_follow_the_patch_grid_and_skip_prefix_tokens(patch: int, grid: int) -> None:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=patch, reg_tokens=2
    )
    assert tuple(vit.patch_embed.grid_size) == (grid, grid) and vit.num_prefix_tokens == 3
    x = torch.randn(2, 3, 32, 32)
    raw, _, _ = grad_cam(vit, x, upsample=False)
    assert raw.shape == (2, grid, grid)  # the model's own grid, not a fixed 14x14
    assert raw.std() > 0  # patches differ
    cams, _, _ = grad_cam(vit, x, target=[1, 2])
    assert cams.shape == (2, 32, 32)
    assert cam_layer(vit).name == "blocks.11.norm1"


def test_gallery_of_confident_errors_and_confused_pairs(cnn: Predictor, tmp_path: Path) -> None:
    x, y = fmnist_arrays("t10k", 64)
    batch = cnn.preprocess([png_bytes(a) for a in x])
    with torch.no_grad():
        probs = cnn.model(batch).softmax(1).numpy()
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)
    assert len(wrong) > 2  # the tiny model makes mistakes to show
    pair = {"true": FMNIST_CLASSES[y[wrong[0]]], "predicted": FMNIST_CLASSES[pred[wrong[0]]]}
    picks = pick_examples(probs, y, [pair], FMNIST_CLASSES, errors=3, per_pair=2)
    errors = [i for g, i in picks if g == "confident error"]
    assert len(errors) == 3 and all(pred[i] != y[i] for i in errors)
    assert probs[errors].max(1).tolist() == sorted(probs[wrong].max(1), reverse=True)[:3]
    assert any("->" in g for g, _ in picks)
    gallery = build_gallery(cnn.model, lambda rows: batch[list(rows)], picks, probs=probs, targets=y,
                            classes=FMNIST_CLASSES, mean=(0.5,), std=(0.5,))  # fmt: skip
    assert len({i for _, i in picks}) == len(picks)  # an image is shown once
    files = gallery.write(tmp_path)
    assert len(files) == 2 * len(picks) and all(Image.open(p).format == "PNG" for p in files.values())
    html = gallery_section(gallery.to_dict(), files)
    assert (
        html is not None
        and html.body.count("<img") == 2 * len(picks)
        and "data:image/png;base64" in html.body
    )

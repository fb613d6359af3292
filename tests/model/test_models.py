"""Model factory, preprocessing resolved from the model, and pickle-free model files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.core.errors import ConfigError, DataError
from components.model.checkpoint import ModelSpec, Predictor, decode_image, load_classifier, save_classifier
from components.model.models import create_classifier, create_image_transform, resolve_data_config
from tests.conftest import fmnist_arrays, png_bytes


def test_imgflow_cnn_is_a_timm_model_with_its_own_preprocessing() -> None:
    model = create_classifier("imgflow_cnn", 7, in_chans=1)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 7)
    cfg = resolve_data_config(model)
    assert cfg["input_size"] == (1, 28, 28) and cfg["mean"] == (0.5,)
    assert resolve_data_config(model, input_size=32)["input_size"] == (1, 32, 32)


def test_any_timm_model_by_name_and_grey_stats_adapted() -> None:
    model = create_classifier("resnet10t", 4, in_chans=1)
    cfg = resolve_data_config(model, input_size=32)
    assert len(cfg["mean"]) == 1 and cfg["input_size"] == (1, 32, 32)
    x = create_image_transform(cfg, is_training=False)(
        decode_image(png_bytes(fmnist_arrays(n=1)[0][0]), mode="L")
    )
    assert x.shape == (1, 32, 32)
    assert model.eval()(x[None]).shape == (1, 4)


def test_unknown_model_and_unavailable_weights_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown model 'resnet_nope'"):
        create_classifier("resnet_nope", 3)
    with pytest.raises(ConfigError, match="no pretrained weights"):
        create_classifier("imgflow_cnn", 3, pretrained=True)


def test_saved_model_round_trips_without_pickle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_classifier("imgflow_cnn", 10, in_chans=1).eval()
    spec = ModelSpec(
        model="imgflow_cnn", classes=tuple("abcdefghij"), in_chans=1, data_config=resolve_data_config(model)
    )
    save_classifier(model.state_dict(), spec, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    loaded, spec2 = load_classifier(tmp_path)
    assert spec2 == spec
    x, _ = fmnist_arrays(n=8)
    images = [png_bytes(a) for a in x]
    probs = Predictor(loaded, spec2).predict_proba(images)
    assert probs.shape == (8, 10)
    with torch.inference_mode():
        ref = torch.softmax(model(Predictor(model, spec).preprocess(images)), 1).numpy()
    np.testing.assert_allclose(probs, ref, atol=1e-6)


def test_spec_holds_a_task_and_model_json_its_name(tmp_path: Path) -> None:
    import json

    from components.task import get_task

    model = create_classifier("imgflow_cnn", 3, in_chans=1).eval()
    spec = ModelSpec("imgflow_cnn", ("a", "b", "c"), 1, resolve_data_config(model), task="multilabel",
                     thresholds=(0.5, 0.2, 0.9))  # fmt: skip
    assert spec.task is get_task("multilabel") and ModelSpec("m", ("a",), 1, {}).task is get_task(
        "singlelabel"
    )
    save_classifier(model.state_dict(), spec, tmp_path)
    assert json.loads((tmp_path / "model.json").read_text())["task"] == "multilabel"
    _, loaded = load_classifier(tmp_path)
    assert loaded == spec and loaded.task is get_task("multilabel")
    predictor = Predictor(model, loaded)
    probs = np.array([[0.6, 0.3, 0.95], [0.1, 0.1, 0.1]])
    assert predictor.decide(probs).tolist() == [[1, 1, 1], [0, 0, 0]]
    assert predictor.label_sets(probs) == [["c", "a", "b"], []]


def test_decode_image_rejects_non_images() -> None:
    with pytest.raises(DataError, match="empty input"):
        decode_image(b"", mode="L")
    with pytest.raises(DataError, match="not a decodable image"):
        decode_image(b"GIF89a-but-not-really", mode="L")
    truncated = png_bytes(fmnist_arrays(n=1)[0][0])[:60]
    with pytest.raises(DataError, match="not a decodable image"):
        decode_image(truncated, mode="L")


@pytest.mark.parametrize(
    ("name", "in_chans", "side"),
    [
        ("imgflow_resnet_avgmax", 1, 28),
        ("imgflow_resnet_avgmax", 3, 64),
        ("imgflow_resnet_small_avgmax", 1, 28),
    ],
)
def test_small_resnets_build_and_train_a_step(name: str, in_chans: int, side: int) -> None:
    """The residual candidates of the default recipe: any small size, grey or RGB, one optimiser step
    lowers the loss on a fixed batch; no pretrained weights exist for them."""
    torch.manual_seed(0)
    model = create_classifier(name, 5, in_chans=in_chans)
    assert resolve_data_config(model, input_size=side)["input_size"] == (in_chans, side, side)
    x, y = torch.randn(8, in_chans, side, side), torch.arange(8) % 5
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[1] < losses[0]
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (8, 2 * model.num_features)
    with pytest.raises(ConfigError, match="no pretrained weights"):
        create_classifier(name, 3, pretrained=True)

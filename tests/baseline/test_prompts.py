"""Prompts: template sets and files, the prompt ensemble's text embedding, per-class overrides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.baseline.clip_model import ClipEncoder, build_text_classifier
from components.baseline.prompts import class_prompts, resolve_templates
from components.core.errors import ConfigError
from tests.baseline.tiny_clip import CLASSES, TINY_CFG


def _text(encoder: ClipEncoder, prompt: str) -> np.ndarray:
    with torch.inference_mode():
        e = encoder.model.encode_text(encoder.tokenizer([prompt]), normalize=True)[0]
    return e.numpy()


def test_prompt_ensemble_is_the_renormalised_mean_of_normalised_prompt_embeddings(tiny_clip: dict) -> None:
    encoder = tiny_clip["encoder"]
    templates = resolve_templates("short")
    weights = build_text_classifier(encoder, class_prompts(CLASSES, templates))
    assert weights.shape == (len(CLASSES), TINY_CFG["embed_dim"])
    for k in (0, 7):
        mean = np.mean([_text(encoder, t.replace("{}", CLASSES[k])) for t in templates], axis=0)
        np.testing.assert_allclose(weights[k], mean / np.linalg.norm(mean), atol=1e-5)
    single = build_text_classifier(encoder, class_prompts(CLASSES, ["a photo of a {}."]))
    np.testing.assert_allclose(single[3], _text(encoder, f"a photo of a {CLASSES[3]}."), atol=1e-5)
    assert not np.allclose(single, weights, atol=1e-3)  # the ensemble really changes the embedding


def test_per_class_overrides_change_only_their_class(tiny_clip: dict) -> None:
    encoder, templates = tiny_clip["encoder"], ["a photo of a {}."]
    base = build_text_classifier(encoder, class_prompts(CLASSES, templates))
    prompts = class_prompts(
        CLASSES,
        templates,
        names={"green square": "emerald square"},
        overrides={"red circle": ["a photo of a blue square."]},
    )
    assert prompts[CLASSES.index("green square")] == ["a photo of a emerald square."]
    weights = build_text_classifier(encoder, prompts)
    red, blue = CLASSES.index("red circle"), CLASSES.index("blue square")
    np.testing.assert_allclose(weights[red], base[blue], atol=1e-5)  # red circle now reads "blue square"
    untouched = [k for k in range(len(CLASSES)) if CLASSES[k] not in ("red circle", "green square")]
    np.testing.assert_allclose(weights[untouched], base[untouched], atol=1e-6)
    with pytest.raises(ConfigError, match="purple hexagon"):
        class_prompts(CLASSES, templates, overrides={"purple hexagon": ["x"]})


def test_template_sets_and_template_files(tmp_path: Path) -> None:
    assert len(resolve_templates("imagenet80")) == 80 and len(resolve_templates("short")) == 7
    assert all("{}" in t for t in resolve_templates("imagenet80"))
    f = tmp_path / "prompts.txt"
    f.write_text("# my prompts\na photo of a {}.\n\nan icon of a {}\n")
    assert resolve_templates(str(f)) == ("a photo of a {}.", "an icon of a {}")
    f.write_text("a photo of a {}.\na photo without a slot\n")
    with pytest.raises(ConfigError, match="without a slot"):
        resolve_templates(str(f))
    with pytest.raises(ConfigError, match="imagenet80"):
        resolve_templates(str(tmp_path / "missing.txt"))

"""The tiny CLIP, trained once per test session and shared by the baseline test modules."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from components.baseline.clip_model import create_clip
from tests.baseline.tiny_clip import CLASSES, TINY, TINY_CFG, draw, train_contrastively


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny CLIP config registered with open_clip, trained once; its checkpoint as a file and as
    an open_clip ``local-dir:`` folder."""
    import open_clip

    root = tmp_path_factory.mktemp("tiny-clip")
    (root / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(root / f"{TINY}.json")
    torch.manual_seed(0)
    encoder = create_clip(TINY, None, random_init=True)
    train_contrastively(encoder)
    checkpoint = root / "tiny_clip.pt"
    torch.save(encoder.model.state_dict(), checkpoint)
    local = root / "local"
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    shutil.copy2(checkpoint, local / "open_clip_pytorch_model.bin")
    return {"checkpoint": checkpoint, "local_dir": local, "encoder": create_clip(TINY, str(checkpoint))}


@pytest.fixture(scope="session")
def held_out(tiny_clip: dict) -> tuple[torch.Tensor, np.ndarray]:
    """15 new images per class, preprocessed: (180, 3, 32, 32) and their class indices (180,)."""
    rng = np.random.default_rng(123)  # never the training seed: new positions, sizes, backgrounds
    preprocess = tiny_clip["encoder"].preprocess
    x = torch.stack([preprocess(draw(c, rng)) for c in CLASSES for _ in range(15)])
    return x, np.repeat(np.arange(len(CLASSES)), 15)

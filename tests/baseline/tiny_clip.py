"""A tiny open_clip model and the synthetic images it learns, for the baseline tests.

No registry ships CLIP weights, so the mechanics are proven on a tiny CLIP (conv image tower,
one-layer text tower) trained contrastively for 300 steps on synthetic captioned images
("a photo of a red circle"). The fixtures that train it live in ``conftest.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from components.baseline.clip_model import ClipEncoder
from components.baseline.prompts import resolve_templates

TINY = "imgflow-test-tiny-clip"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},  # a ModifiedResNet
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
CHANCE = 1 / len(CLASSES)


def draw(cls: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A coloured shape of class ``"<colour> <shape>"`` at a random place, size and grey background."""
    colour, shape = cls.split()
    grey = int(rng.integers(0, 256))
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    r = int(rng.integers(9, 15))
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    fill = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLOURS[colour])
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def draw_two(labels: list[str], rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Two coloured shapes (classes ``labels``), one in each half of the image, in random order."""
    grey = int(rng.integers(0, 256))
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    d = ImageDraw.Draw(img)
    halves = [(0, size // 2), (size // 2, size)]
    for cls, (lo, hi) in zip(labels, [halves[i] for i in rng.permutation(2)], strict=True):
        colour, shape = cls.split()
        r = int(rng.integers(6, 8))
        cx, cy = int(rng.integers(lo + r, hi - r + 1)), int(rng.integers(r, size - r))
        fill = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLOURS[colour])
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def train_contrastively(encoder: ClipEncoder, *, steps: int = 300, seed: int = 0) -> None:
    """Symmetric InfoNCE (CLIP's loss) on (image, caption) pairs; captions from the 80 templates."""
    model, rng = encoder.model, np.random.default_rng(seed)
    pool = torch.stack([torch.stack([encoder.preprocess(draw(c, rng)) for _ in range(50)]) for c in CLASSES])
    templates = resolve_templates("imagenet80")
    tokens = encoder.tokenizer([t.format(c) for t in templates for c in CLASSES]).view(
        len(templates), len(CLASSES), -1
    )
    cls = torch.arange(len(CLASSES)).repeat(2)  # every class twice per batch
    model.token_embedding.weight.requires_grad_(False)  # 49408 x 32 random codes are input enough
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps, pct_start=0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster than two fighting on a shared box
    torch.manual_seed(seed)
    model.train()
    try:
        for _ in range(steps):
            img_i = torch.from_numpy(rng.integers(0, pool.shape[1], size=len(cls)))
            tpl_i = torch.from_numpy(rng.integers(0, len(templates), size=len(cls)))
            img, txt, scale = model(pool[cls, img_i], tokens[tpl_i, cls])
            logits = scale * img @ txt.T
            target = torch.arange(len(cls))
            loss = (
                torch.nn.functional.cross_entropy(logits, target)
                + torch.nn.functional.cross_entropy(logits.T, target)
            ) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()

"""Few-shot classes on Fashion-MNIST (issue 24): do a trained backbone's stored-layer features beat raw
pixels at recognising classes it never saw?

The five last Fashion-MNIST classes (Sandal, Shirt, Sneaker, Bag, Ankle boot) are held out: an
``imgflow_cnn`` is trained on the first five only, with the project's training step
(:func:`components.train.engine.train_one_epoch`). Then 5-way episodes over the held-out classes'
test images, all representations on the SAME seeded episodes (:mod:`components.evaluate.fewshot`):

- ``backbone``: the trained model's ``prev_stage_3x3`` layer (the stage before the last, pooled to 3x3:
  the layer ``imgflow classes add`` and ``imgflow evaluate --few-shot`` use by default);
- ``backbone_pooled_last``: the store's audit/OOD default layer (the last stage's global mean) and
  ``backbone_last_2x2`` (the last stage pooled 2x2, the issue's planning layer), for comparison;
- ``random_init``: the same architecture with random weights, at ``prev_stage_3x3`` (the architecture's prior);
- ``pixels``: the preprocessed image itself (784 values).

ProtoNet, SimpleShot (centred on the balanced mean of the base classes' means and the episode's
support-class means, as ``imgflow classes add`` centres) and L2-only at k = 1, 5, 10. Figures:
``fewshot_5shot_gain_pt``, SimpleShot 5-shot accuracy of the backbone minus the best pixel rule, in points (target
>= 1.0); ``fewshot_episodes_s``, the 300 episodes of every method and k on the backbone's cached
features (target < 30 s); the same gain for ProtoNet, for random init and for the other layers, for
reference.

Run it as part of ``python -m bench labels`` (bench/bench_labels.py merges :func:`run_fewshot`), or
alone: ``python -m bench.fewshot [--quick]`` prints the JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.evaluate.fewshot import METHODS, FewShotRow, evaluate_episodes, table_text
from components.model.features import DEFAULT_LAYER, FEWSHOT_LAYER, extract_features
from components.model.fewshot import class_means
from components.model.models import create_classifier
from components.train.engine import seed_everything, train_one_epoch

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
BASE_CLASSES, NOVEL_CLASSES = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
GAIN_TARGET_PT, EPISODES_TARGET_S = 1.0, 30.0
N_WAY, KS, N_QUERY, EPISODES, SEED = 5, (1, 5, 10), 15, 300, 0


def _fmnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) labels of the official ``train`` or ``t10k`` files."""
    with gzip.open(FMNIST_DIR / f"{split}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FMNIST_DIR / f"{split}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return x, y.astype(np.int64)


def _tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> (N, 1, 28, 28) as imgflow_cnn's transform makes them (mean 0.5, std 0.5 at
    its native 28 px: the same numbers as ToTensor + Normalize, without a PIL round trip)."""
    return (torch.from_numpy(x).float().div(255.0).sub(0.5).div(0.5)).unsqueeze(1)


def train_backbone(x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int = SEED) -> torch.nn.Module:
    """An imgflow_cnn trained on the base classes (labels 0..4) with the project's epoch loop."""
    seed_everything(seed)
    model = create_classifier("imgflow_cnn", len(BASE_CLASSES), in_chans=1)
    inputs, targets = _tensor(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=0.005)
    loss = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        batches = [(inputs[i], targets[i]) for i in torch.randperm(len(x)).split(128)]
        train_one_epoch(model, batches, opt, loss, device=torch.device("cpu"))
    return model.eval()


def _representations(
    backbone: torch.nn.Module, novel: np.ndarray, base: np.ndarray, base_labels: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Features of the novel test images per representation, and each one's base class means (C, D):
    SimpleShot centres on their balanced mean with the episode's support means, as the product does."""
    seed_everything(SEED)
    random_init = create_classifier("imgflow_cnn", len(BASE_CLASSES), in_chans=1).eval()
    feats, centres = {}, {}
    for name, model, layer in (("backbone", backbone, FEWSHOT_LAYER), ("random_init", random_init, FEWSHOT_LAYER),
                               ("backbone_pooled_last", backbone, DEFAULT_LAYER)):  # fmt: skip
        feats[name] = extract_features(model, _tensor(novel), layer=layer)
        centres[name] = class_means(extract_features(model, _tensor(base), layer=layer), base_labels)
    # The planning measurement read the last conv map pooled to 2x2 (256 values): measured side by
    # side on the same episodes.
    feats["backbone_last_2x2"] = _pooled_2x2(backbone, _tensor(novel))
    centres["backbone_last_2x2"] = class_means(_pooled_2x2(backbone, _tensor(base)), base_labels)
    feats["pixels"] = _tensor(novel).flatten(1).numpy()
    centres["pixels"] = class_means(_tensor(base).flatten(1).numpy(), base_labels)
    return feats, centres


@torch.no_grad()
def _pooled_2x2(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """(N, C*4) the last conv stage's map average-pooled to 2x2 (a finer layer than pooled_last)."""
    out = [
        torch.nn.functional.adaptive_avg_pool2d(model.forward_features(b), 2).flatten(1) for b in x.split(512)
    ]
    return torch.cat(out).numpy()


def _accuracy(rows: list[FewShotRow], features: str, method: str, k: int) -> float:
    return next(r.accuracy for r in rows if (r.features, r.method, r.k) == (features, method, k))


def run_fewshot(*, quick: bool) -> dict[str, Any]:
    """The figures and tables above; ``quick``: a smaller, shorter-trained backbone (smoke run)."""
    t0 = time.perf_counter()
    x, y = _fmnist("train")
    base_rows = np.flatnonzero(np.isin(y, BASE_CLASSES))
    per_run = 6000 if quick else 15000
    train_rows = np.random.default_rng(SEED).permutation(base_rows)[:per_run]
    epochs = 1 if quick else 3  # the planning measurement: 3 epochs
    backbone = train_backbone(x[train_rows], y[train_rows], epochs=epochs)
    train_s = time.perf_counter() - t0
    xt, yt = _fmnist("t10k")
    novel = np.flatnonzero(np.isin(yt, NOVEL_CLASSES))
    feats, centres = _representations(backbone, xt[novel], x[train_rows[:5000]], y[train_rows[:5000]])
    t1 = time.perf_counter()
    rows = evaluate_episodes({"backbone": feats["backbone"]}, yt[novel], n_way=N_WAY, ks=KS, n_query=N_QUERY,
                             episodes=EPISODES, seed=SEED, centres=centres, methods=METHODS)  # fmt: skip
    episodes_s = time.perf_counter() - t1
    rows += evaluate_episodes({k: v for k, v in feats.items() if k != "backbone"}, yt[novel], n_way=N_WAY, ks=KS,
                              n_query=N_QUERY, episodes=EPISODES, seed=SEED, centres=centres,
                              methods=METHODS)  # fmt: skip
    # Against the best of the pixel rules (each on the same episodes).
    pixels = max(_accuracy(rows, "pixels", m, 5) for m in METHODS)
    gain = 100 * (_accuracy(rows, "backbone", "simpleshot", 5) - pixels)
    gain_protonet = 100 * (_accuracy(rows, "backbone", "protonet", 5) - pixels)
    gain_pooled_last = 100 * (_accuracy(rows, "backbone_pooled_last", "simpleshot", 5) - pixels)
    gain_2x2 = 100 * (_accuracy(rows, "backbone_last_2x2", "simpleshot", 5) - pixels)
    random_gain = 100 * (_accuracy(rows, "random_init", "simpleshot", 5) - pixels)
    figures = [
        {"name": "fewshot_5shot_gain_pt", "value": gain, "unit": "pt", "target": f">= {GAIN_TARGET_PT}",
         "passed": gain >= GAIN_TARGET_PT},
        {"name": "fewshot_episodes_s", "value": episodes_s, "unit": "s", "target": f"< {EPISODES_TARGET_S}",
         "passed": episodes_s < EPISODES_TARGET_S},
        {"name": "fewshot_protonet_5shot_gain_pt", "value": gain_protonet, "unit": "pt"},
        {"name": "fewshot_random_init_5shot_gain_pt", "value": random_gain, "unit": "pt"},
        {"name": "fewshot_pooled_last_5shot_gain_pt", "value": gain_pooled_last, "unit": "pt"},
        {"name": "fewshot_2x2_5shot_gain_pt", "value": gain_2x2, "unit": "pt"},
    ]  # fmt: skip
    return {
        "figures": figures,
        "tables": {"fewshot": [r.to_dict() for r in rows]},
        "setup": {
            "base_classes": list(BASE_CLASSES),
            "novel_classes": list(NOVEL_CLASSES),
            "train_images": per_run,
            "epochs": epochs,
            "n_way": N_WAY,
            "n_query": N_QUERY,
            "episodes": EPISODES,
            "seed": SEED,
            "layer": FEWSHOT_LAYER,
            "novel_test_images": int(len(novel)),
            "train_s": train_s,
        },  # fmt: skip
        "text": table_text(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small backbone training (smoke run)")
    result = run_fewshot(quick=parser.parse_args().quick)
    print(result["text"])
    print(json.dumps({k: v for k, v in result.items() if k != "text"}, indent=2))


if __name__ == "__main__":
    main()

"""Evaluation time on the 10k Fashion-MNIST test set (issue target: <= 180 s on 2 cores).

Times the evaluate stage's computations on arrays decoded straight from the idx files: test and
val inference, temperature fit, metrics, the 10-family x 5-severity corruption sweep and the
gate report. Two sweep sizes: the default sample (``evaluate.robustness.max_images``) and, unless
``--quick``, every test image. Uses ``outputs/train/model`` when present (a trained model, real
accuracies), else a freshly initialised imgflow_cnn (same compute, meaningless accuracies).
Baseline in the same run: one plain clean inference pass over the test set.
"""

from __future__ import annotations

import gzip
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.calibration import calibrate, softmax_t
from components.checkpoint import load_classifier
from components.config import Params
from components.evaluation import compute_metrics
from components.gate_report import Evidence, build_gates, write_report
from components.models import create_classifier
from components.robustness import corruption_sweep, prepare_for_inference

FM = Path("/usr/share/datasets/fashion-mnist")
TARGET_S = 180.0


def _arrays(split: str) -> tuple[torch.Tensor, np.ndarray]:
    with gzip.open(FM / f"{split}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(FM / f"{split}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return torch.from_numpy(x.copy()).float() / 255, y


def _logits(model: torch.nn.Module, x01: torch.Tensor) -> np.ndarray:
    fast = prepare_for_inference(model)
    with torch.inference_mode():
        return np.concatenate([fast(((b - 0.5) / 0.5).contiguous(memory_format=torch.channels_last)).numpy()
                               for b in x01.split(512)])  # fmt: skip


def _sweep(model: torch.nn.Module, x: torch.Tensor, y: np.ndarray, n: int) -> tuple[Any, float]:
    idx = np.random.default_rng(0).permutation(len(y))[:n]
    t0 = time.perf_counter()
    r = corruption_sweep(model, zip(x[idx].split(512), torch.from_numpy(y[idx]).split(512), strict=True),
                         mean=(0.5,), std=(0.5,), seed=42)  # fmt: skip
    return r, time.perf_counter() - t0


def run(*, quick: bool = False) -> dict[str, Any]:
    trained = Path("outputs/train/model")
    model = (
        load_classifier(trained)[0]
        if (trained / "model.json").exists()
        else create_classifier("imgflow_cnn", 10, in_chans=1)
    )
    classes = [str(i) for i in range(10)]
    test_x, test_y = _arrays("t10k")
    val_x, val_y = _arrays("train")
    val_x, val_y = val_x[:6000], val_y[:6000]
    params = Params()
    t0 = time.perf_counter()
    test_logits = _logits(model, test_x)
    baseline_s = time.perf_counter() - t0
    val_logits = _logits(model, val_x)
    cal = calibrate(val_logits, val_y, test_logits, test_y)
    metrics = compute_metrics(test_y, softmax_t(test_logits, cal.temperature), classes)
    sample = 500 if quick else (params.evaluate.robustness.max_images or 10000)
    rob, sweep_s = _sweep(model, test_x, test_y, sample)
    ev = Evidence(metrics=metrics, calibration=cal, robustness=rob, slices=[], champion=None)
    with tempfile.TemporaryDirectory() as tmp:
        write_report(ev, build_gates(params.gates, ev), Path(tmp), context={})
    total_s = time.perf_counter() - t0
    figures = [
        {"name": "clean_inference_10k_seconds", "value": baseline_s, "unit": "s"},
        {"name": f"sweep_{sample}_images_seconds", "value": sweep_s, "unit": "s"},
        {
            "name": "evaluation_seconds",
            "value": total_s,
            "unit": "s",
            "target": f"<= {TARGET_S:.0f}",
            "passed": total_s <= TARGET_S if not quick else None,
        },  # fmt: skip
        {"name": "images_per_s_in_sweep", "value": sample * 51 / sweep_s, "unit": "img/s"},
        {"name": "test_accuracy", "value": metrics["accuracy"]},
        {"name": "relative_robustness", "value": rob.relative_robustness},
        {"name": "ece_after_scaling", "value": cal.after["ece"]},
    ]
    if not quick:
        full, full_s = _sweep(model, test_x, test_y, len(test_y))
        full_total = total_s - sweep_s + full_s
        figures += [
            {"name": "sweep_all_10k_seconds", "value": full_s, "unit": "s"},
            {
                "name": "evaluation_seconds_full_sweep",
                "value": full_total,
                "unit": "s",
                "target": f"<= {TARGET_S:.0f}",
                "passed": full_total <= TARGET_S,
            },  # fmt: skip
            {"name": "relative_robustness_full", "value": full.relative_robustness},
        ]
    return {
        "figures": figures,
        "threads": torch.get_num_threads(),
        "baseline": "one clean inference pass over the 10k test images",
        "model": str(trained) if (trained / "model.json").exists() else "imgflow_cnn (random init)",
    }

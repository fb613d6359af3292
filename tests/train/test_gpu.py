"""The GPU path, run by ``make test-gpu`` on a machine with CUDA (skipped elsewhere): a Ray Train run on a
GPU worker end to end, and GPU inference that agrees with the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import FMNIST_DIR, fmnist_arrays, png_bytes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_ray_train_run_on_a_gpu_worker(tmp_path: Path) -> None:
    """``fit`` with ``use_gpu`` auto on a runtime that has a GPU: the worker trains on ``cuda`` under
    bf16/fp16 autocast, the run finishes with finite losses, and the saved fp32 model predicts the same
    on the GPU as on the CPU."""
    from components.core.config import TrainConfig
    from components.data.ingest import ingest
    from components.data.manifest import DataPaths
    from components.model.checkpoint import Predictor
    from components.train import ray_adapter
    from components.train.recipe import build_recipe
    from components.train.training import fit

    ingest("fashion-mnist", data_dir=tmp_path / "data", max_per_class=40, fashion_mnist_dir=FMNIST_DIR,
           progress=False)  # fmt: skip
    recipe = build_recipe(TrainConfig(epochs=2, workers=1, cpus_per_worker=2), DataPaths(tmp_path / "data"),
                          seed=0, weights_dir=tmp_path / "weights")  # fmt: skip
    events = tmp_path / "events.jsonl"
    started = ray_adapter.init_ray(num_cpus=2)
    try:
        assert ray_adapter.cluster_has_gpus()
        result = fit(recipe, workers=1, cpus_per_worker=2, use_gpu=None, storage_path=tmp_path / "ray",
                     run_name="gpu", out_dir=tmp_path / "model", show_progress=False, worker_events=events)  # fmt: skip
    finally:
        if started:
            ray_adapter.shutdown_ray()
    start = [e for e in map(json.loads, events.read_text().splitlines()) if e["phase"] == "start"]
    assert start and start[0]["device"].startswith("cuda")
    assert start[0]["amp"] in {"torch.bfloat16", "torch.float16"}
    assert len(result.history) == 2 and all(np.isfinite(h["train_loss"]) for h in result.history)
    images = [png_bytes(a) for a in fmnist_arrays("t10k", 64)[0]]
    on_gpu = Predictor.from_dir(result.model_dir, device="cuda").predict_proba(images)
    on_cpu = Predictor.from_dir(result.model_dir, device="cpu").predict_proba(images)
    np.testing.assert_allclose(on_gpu, on_cpu, atol=2e-3)


def test_predictor_on_cuda_matches_cpu(tiny_model_dir: Path) -> None:
    """Serving and batch prediction on the GPU: same probabilities as the CPU, in fp32 numpy."""
    from components.model.checkpoint import Predictor

    images = [png_bytes(a) for a in fmnist_arrays("t10k", 300)[0]]
    gpu = Predictor.from_dir(tiny_model_dir, device="auto", batch_size=128)
    assert gpu.device.type == "cuda"
    probs = gpu.predict_proba(images)
    assert probs.dtype == np.float32 and probs.shape == (300, 10)
    np.testing.assert_allclose(probs, Predictor.from_dir(tiny_model_dir).predict_proba(images), atol=2e-3)

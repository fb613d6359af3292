"""HTTP serving: `imgflow serve` as its own process on loopback, a small asyncio client here.

Latency: single-image requests one at a time (p50/p95). Throughput: the same requests with at
most ``concurrency`` in flight (bounded by a semaphore). Both through POST /invocations with a
base64 PNG of a real Fashion-MNIST image (MLflow's scoring JSON).
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from components.data.sources import encode_png, fashion_mnist_paths, load_fashion_mnist
from components.model.checkpoint import ModelSpec, save_classifier
from components.model.models import create_classifier, resolve_data_config


def _payloads(n: int) -> list[dict[str, Any]]:
    arrays = load_fashion_mnist(
        fashion_mnist_paths(Path("/usr/share/datasets/fashion-mnist"), download=False)
    )
    return [{"inputs": [base64.b64encode(encode_png(a)).decode()]} for a in arrays["test"][0][:n]]


def _start(model_dir: Path, port: int, cwd: Path) -> subprocess.Popen:
    cmd = [
        str(Path(sys.executable).parent / "imgflow"),
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=dict(os.environ))  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("imgflow serve did not become healthy")


async def _load(url: str, payloads: list[dict[str, Any]], concurrency: int) -> tuple[list[float], float]:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(p: dict[str, Any]) -> None:
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(url, json=p)
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(p) for p in payloads))
        return latencies, time.perf_counter() - t0


def run(*, quick: bool = False) -> dict[str, Any]:
    import socket

    n, concurrency = (100, 8) if quick else (500, 8)
    payloads = _payloads(n)
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        model = create_classifier("imgflow_cnn", 10, in_chans=1)
        spec = ModelSpec("imgflow_cnn", tuple(f"c{i}" for i in range(10)), 1, resolve_data_config(model))
        model_dir = save_classifier(model.state_dict(), spec, Path(tmp) / "model")
        proc = _start(model_dir, port, Path(tmp))
        try:
            url = f"http://127.0.0.1:{port}/invocations"
            asyncio.run(_load(url, payloads[:10], 1))  # warm-up
            single, _ = asyncio.run(_load(url, payloads, 1))
            _, wall = asyncio.run(_load(url, payloads, concurrency))
        finally:
            os.killpg(proc.pid, 2)
            proc.wait(timeout=30)
    ms = np.array(single) * 1000
    return {
        "figures": [
            {"name": "requests", "value": n},
            {"name": "p50_latency_single", "value": float(np.percentile(ms, 50)), "unit": "ms"},
            {"name": "p95_latency_single", "value": float(np.percentile(ms, 95)), "unit": "ms"},
            {"name": f"throughput_concurrency_{concurrency}", "value": n / wall, "unit": "req/s"},
        ],
        "baseline": "none: absolute figures (one image per request, loopback, 2 shared cores)",
    }

"""Ray Serve vs ``imgflow serve`` (uvicorn) under the same bounded load, in the same run.

Both servers are the real commands in their own processes on 127.0.0.1, serving the same model
folder: ``imgflow serve`` (one uvicorn process) and ``imgflow serve --ray --replicas R`` (Ray
Serve: an HTTP proxy actor and R replicas, 1 CPU each, requests batched per replica). The load is
``clients`` concurrent clients, each sending ``requests`` POST /invocations one after the other,
every request one real Fashion-MNIST PNG (MLflow's scoring JSON, base64); after a warm-up.
Figures per server: p50/p95 latency, requests/s, failed requests; and Ray Serve's ratios to uvicorn.

``run(quick)`` is called by ``bench/bench_scale.py`` (``python -m bench scale``); alone: ``python -m bench.scale_serve [--quick]``
prints the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from components.data.sources import encode_png, fashion_mnist_paths, load_fashion_mnist
from components.model.checkpoint import ModelSpec, save_classifier
from components.model.models import create_classifier, resolve_data_config

FMNIST = Path("/usr/share/datasets/fashion-mnist")
IMGFLOW = Path(sys.executable).parent / "imgflow"


@dataclass(frozen=True)
class Load:
    clients: int
    requests: int
    warmup: int = 20


def _payload() -> dict[str, Any]:
    """One real test image (the first of Fashion-MNIST's test split) as MLflow scoring JSON."""
    arrays = load_fashion_mnist(fashion_mnist_paths(FMNIST, download=False))
    return {"inputs": [base64.b64encode(encode_png(arrays["test"][0][0])).decode()]}


def _demo_model(out: Path) -> Path:
    """The pipeline's default CNN (imgflow_cnn, 10 classes, 28 px grey); weights do not change speed."""
    model = create_classifier("imgflow_cnn", 10, in_chans=1)
    spec = ModelSpec("imgflow_cnn", tuple(f"c{i}" for i in range(10)), 1, resolve_data_config(model))
    return save_classifier(model.state_dict(), spec, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], model_dir: Path, port: int, cwd: Path) -> tuple[subprocess.Popen, float]:
    """``imgflow serve <args>`` on ``port``, healthy; and the seconds it took to answer /health."""
    log = open(cwd / f"serve-{port}.log", "w")  # noqa: SIM115 - the child writes to it
    cmd = [str(IMGFLOW), "serve", "--model", str(model_dir), "--port", str(port), *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    while time.monotonic() - t0 < 600:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(f"{' '.join(cmd)} did not answer /health within 600 s")


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to the command (it shuts its own Ray runtime down), then its whole group if it lingers."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


async def _drive(url: str, payload: dict[str, Any], load: Load) -> tuple[list[float], int, float]:
    """``load.clients`` clients x ``load.requests`` sequential requests: latencies (s) of the
    answered ones, failures, wall seconds."""
    latencies: list[float] = []
    failures = 0
    limits = httpx.Limits(max_connections=load.clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def one_client() -> None:
            nonlocal failures
            for _ in range(load.requests):
                t0 = time.perf_counter()
                r = await client.post(url, json=payload)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    failures += 1

        for _ in range(load.warmup):
            (await client.post(url, json=payload)).raise_for_status()
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(load.clients)))
        return latencies, failures, time.perf_counter() - t0


def _measure(
    name: str, args: list[str], model_dir: Path, payload: dict[str, Any], load: Load, cwd: Path
) -> dict:
    port = _free_port()
    proc, ready_s = _start(args, model_dir, port, cwd)
    try:
        latencies, failures, wall = asyncio.run(_drive(f"http://127.0.0.1:{port}/invocations", payload, load))
    finally:
        _stop(proc)
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "server": name,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "requests_per_s": len(latencies) / wall,
        "failed": failures,
        "ready_s": ready_s,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Same model, same load, same run: uvicorn, then Ray Serve with 1 replica (and, not quick, as
    many replicas as this machine has CPUs, at most 2)."""
    load = Load(clients=4, requests=25) if quick else Load(clients=8, requests=100)
    replica_counts = [1] if quick else sorted({1, min(2, os.cpu_count() or 1)})
    payload = _payload()
    with tempfile.TemporaryDirectory(prefix="bench-scale-serve-") as tmp:
        model_dir = _demo_model(Path(tmp) / "model")
        servers = [_measure("uvicorn", [], model_dir, payload, load, Path(tmp))]
        for n in replica_counts:
            args = ["--ray", "--replicas", str(n)]
            servers.append(_measure(f"ray_serve_{n}", args, model_dir, payload, load, Path(tmp)))
    base = servers[0]
    figures: list[dict[str, Any]] = []
    for s in servers:
        figures += [
            {"name": f"{s['server']}_p50_latency", "value": s["p50_ms"], "unit": "ms"},
            {"name": f"{s['server']}_p95_latency", "value": s["p95_ms"], "unit": "ms"},
            {"name": f"{s['server']}_throughput", "value": s["requests_per_s"], "unit": "req/s"},
            {"name": f"{s['server']}_failed_requests", "value": s["failed"], "target": "0",
             "passed": s["failed"] == 0},
        ]  # fmt: skip
        if s is not base:
            ratio = s["requests_per_s"] / base["requests_per_s"]
            figures.append({"name": f"{s['server']}_throughput_vs_uvicorn", "value": ratio, "unit": "x"})
            figures.append({"name": f"{s['server']}_p50_vs_uvicorn", "value": s["p50_ms"] / base["p50_ms"],
                            "unit": "x"})  # fmt: skip
    return {
        "figures": figures,
        "servers": servers,
        "load": {
            "clients": load.clients,
            "requests_per_client": load.requests,
            "images_per_request": 1,
            "warmup_requests": load.warmup,
        },  # fmt: skip
        "baseline": "imgflow serve (one uvicorn process, torch's default threads) in the same run; Ray "
        "Serve replicas reserve 1 CPU each (one torch thread), behind Serve's HTTP proxy",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 clients x 25 requests, 1 replica")
    print(json.dumps(run(quick=parser.parse_args().quick), indent=2))


if __name__ == "__main__":
    main()

"""`imgflow serve --ray`: the tiny real model as a Ray Serve deployment on 127.0.0.1 answers exactly
like the FastAPI app `imgflow serve` runs under uvicorn — same predictions for real Fashion-MNIST
images, same status codes and messages for the same malformed requests, same token rule — with
concurrent requests batched into one model pass. A replica killed mid-request costs its in-flight
requests a quick 500, never a hang, and Serve's new replica answers the next ones.

One Serve application for the module (in this process, on a free port; Serve and the Ray runtime
are shut down after). The reference is ``serving.create_app`` over the same model folder and limits,
in-process: the very app uvicorn serves (``tests/serve/test_serving.py`` runs it as a process).
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import ray
from fastapi.testclient import TestClient

from components.core.config import load_params
from components.core.errors import ConfigError, DataError
from components.model.checkpoint import Predictor
from components.pipeline.models import run_serve_ray
from components.serve import ray_serve
from components.serve.serving import ServeLimits, create_app, predictions
from tests.conftest import (
    BIN,
    FMNIST_CLASSES,
    REPO,
    fmnist_arrays,
    free_port,
    png_bytes,
    run_cli,
    stop_process_group,
    wait_http,
)

TOKEN = "ray-serve-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
LIMITS = ServeLimits(max_image_bytes=20000, max_batch=8)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    x, _ = fmnist_arrays("t10k", 12)
    return [png_bytes(a) for a in x]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Iterator[TestClient]:
    """The app `imgflow serve` runs, over the same model and limits."""
    app = create_app(Predictor.from_dir(tiny_model_dir), model_uri="tiny", limits=LIMITS, token=TOKEN)
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def ray_url(tiny_model_dir: Path) -> Iterator[str]:
    settings = ray_serve.ServeSettings(port=free_port(), limits=LIMITS, token=TOKEN)
    running = ray_serve.start(tiny_model_dir, model_uri="tiny", settings=settings)
    try:
        yield running.url
    finally:
        ray_serve.stop(running)
    assert not ray.is_initialized() or not running.owns_ray


def _b64(image: bytes) -> str:
    return base64.b64encode(image).decode()


def _error(r: Any) -> dict[str, Any]:
    """An error body without the memory addresses PIL's messages carry ("<BytesIO at 0x7f...>")."""
    body = r.json()
    return {**body, "message": re.sub(r" at 0x[0-9a-f]+", "", body["message"])}


def test_health_is_the_same(ray_url: str, reference: TestClient) -> None:
    for path in ("/health", "/ping"):
        r = httpx.get(ray_url + path, timeout=30)  # open without the token, as with uvicorn
        assert r.status_code == 200
        assert r.json() == reference.get(path).json()
        assert r.json()["classes"] == list(FMNIST_CLASSES)


def test_predictions_equal_the_uvicorn_apps(ray_url: str, reference: TestClient, images: list[bytes]) -> None:
    payload = {"inputs": [_b64(b) for b in images[:8]]}
    got = httpx.post(f"{ray_url}/invocations", json=payload, headers=AUTH, timeout=60)
    want = reference.post("/invocations", json=payload, headers=AUTH)
    assert got.status_code == want.status_code == 200, got.text
    for g, w in zip(got.json()["predictions"], want.json()["predictions"], strict=True):
        assert (g["label"], g["labels"], [t["label"] for t in g["top_k"]]) == (
            w["label"], w["labels"], [t["label"] for t in w["top_k"]]
        )  # fmt: skip
        np.testing.assert_allclose(g["probabilities"], w["probabilities"], atol=1e-6)
    files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(images[8:10])]
    got = httpx.post(f"{ray_url}/predict", files=files, headers=AUTH, timeout=60)
    want = reference.post("/predict", files=files, headers=AUTH)
    assert got.status_code == 200, got.text
    assert [p["label"] for p in got.json()["predictions"]] == [p["label"] for p in want.json()["predictions"]]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(
    ray_url: str, reference: TestClient, images: list[bytes]
) -> None:
    """Eight requests at once (one with an undecodable image): the good ones get exactly their
    own predictions, the bad one its 400, whatever batch they shared."""
    bodies = [{"inputs": [_b64(images[i]), _b64(images[(i + 1) % 12])]} for i in range(7)]
    bodies.insert(3, {"inputs": [_b64(images[0]), "bm90IGFuIGltYWdl"]})
    results: list[httpx.Response | None] = [None] * len(bodies)

    def send(i: int) -> None:
        results[i] = httpx.post(f"{ray_url}/invocations", json=bodies[i], headers=AUTH, timeout=60)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for body, r in zip(bodies, results, strict=True):
        assert r is not None
        want = reference.post("/invocations", json=body, headers=AUTH)
        assert r.status_code == want.status_code, r.text
        if r.status_code == 200:
            got_p = [p["probabilities"] for p in r.json()["predictions"]]
            np.testing.assert_allclose(
                got_p, [p["probabilities"] for p in want.json()["predictions"]], atol=1e-6
            )
        else:
            assert r.status_code == 400 and _error(r) == _error(want)


BAD_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    # The shapes of tests/serve/test_serving.py::test_bad_input_is_a_clear_4xx, and the token rule.
    ("/predict", {"files": {"file": ("notes.txt", b"this is not an image", "text/plain")}}),
    ("/invocations", {"json": {"inputs": ["bm90IGFuIGltYWdl"]}}),
    ("/invocations", {"json": {"inputs": ["%%% not base64"]}}),
    ("/invocations", {"json": {"pictures": ["x"]}}),
    ("/invocations", {"json": {"dataframe_split": {"columns": ["img"], "data": [["x"]]}}}),
    ("/invocations", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
    ("/invocations", {"content": b"hello", "headers": {"content-type": "text/plain"}}),
    ("/predict", {"files": {"file": ("big.png", b"\x89PNG" + b"0" * 30000, "image/png")}}),
    ("/invocations", {"json": {"inputs": []}}),
    ("/invocations", {"json": {"inputs": ["aGk="] * 9}}),
    ("/predict", {"content": b"x", "headers": {"content-type": "application/json"}}),
    ("/invocations", {"json": {"inputs": ["aGk="]}, "headers": {"authorization": "Bearer wrong"}}),
]


@pytest.mark.parametrize(("path", "kwargs"), BAD_REQUESTS)
def test_malformed_requests_get_the_same_4xx(
    ray_url: str, reference: TestClient, path: str, kwargs: dict[str, Any]
) -> None:
    kwargs = {**kwargs, "headers": {**AUTH, **kwargs.get("headers", {})}}
    got = httpx.post(ray_url + path, timeout=60, **kwargs)
    want = reference.post(path, **kwargs)
    assert 400 <= want.status_code < 500
    assert got.status_code == want.status_code, got.text
    assert _error(got) == _error(want)


def test_score_requests_isolates_a_bad_image(tiny_model_dir: Path, images: list[bytes]) -> None:
    """The batch function itself: one pass for good requests, a bad image fails only its request."""
    predictor = Predictor.from_dir(tiny_model_dir)
    good = [images[:3], images[3:4], images[4:6]]
    out = ray_serve.score_requests(predictor, good, top_k=3)
    assert [len(o) for o in out if isinstance(o, list)] == [3, 1, 2]
    assert out[0] == predictions(predictor, images[:3], top_k=3)
    mixed = ray_serve.score_requests(predictor, [images[:2], [b"not an image"], images[2:3]], top_k=3)
    assert isinstance(mixed[1], DataError) and "not a decodable image" in str(mixed[1])
    assert mixed[0] == predictions(predictor, images[:2], top_k=3)
    assert mixed[2] == predictions(predictor, images[2:3], top_k=3)


def test_scaling_options_are_checked() -> None:
    assert ray_serve.parse_autoscale("1, 4") == (1, 4)
    for bad in ("4", "a,b", "3,1", "0,0", "1,2,3"):
        with pytest.raises(ConfigError, match="--autoscale"):
            ray_serve.parse_autoscale(bad)
    options = ray_serve.Scaling(autoscale=(1, 3), max_ongoing=8).deployment_options()
    assert options["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in options
    assert ray_serve.Scaling(replicas=2, max_ongoing=8).deployment_options()["num_replicas"] == 2


def test_bad_scaling_options_are_usage_errors(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Exit 2 with a message, before any Ray starts."""
    params = load_params(REPO / "params.yaml")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"replicas": 2, "autoscale": "1,2"}, "exclude each other"),
        ({"autoscale": "3,1"}, "MIN <= MAX"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_serve_ray(params, model=str(tiny_model_dir), **kwargs)
    proc = run_cli("serve", "--model", str(tiny_model_dir), "--replicas", "2", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "need --ray" in proc.stderr, proc.stderr


def _replica_names() -> list[str]:
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{ray_serve.APP_NAME}#")
    )


def test_a_replica_killed_mid_request_gives_a_quick_error_then_serve_recovers(
    ray_url: str, images: list[bytes]
) -> None:
    """Four clients keep requests in flight; the only replica is killed (ray.kill: the actor's
    process ends at once). Requests it held get a 500 within seconds, no request hangs, and once
    Serve has started a new replica the requests succeed again. One race ends later: a request the
    dead replica had taken the body of, which Serve then hands to the new replica without it, waits
    there for its body until the app's own ``request_timeout_s`` answers 504 (seen once in CI: sent
    0.05 s before the kill, 504 after 39 s = ~9 s to a new replica + the 30 s limit)."""
    (victim,) = _replica_names()
    body = {"inputs": [_b64(b) for b in images[:8]]}
    log: list[tuple[float, float, int]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            r = httpx.post(f"{ray_url}/invocations", json=body, headers=AUTH, timeout=90)
            log.append((t0, time.monotonic(), r.status_code))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace="serve"))
        deadline = killed_at + 90
        while not any(s > killed_at and code == 200 for s, _, code in log) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    recovered = [end - killed_at for s, end, code in log if s > killed_at and code == 200]
    assert recovered, f"no request succeeded within 90 s of the kill: {log}"
    failed = [(s - killed_at, end - killed_at, code) for s, end, code in log if code != 200]
    assert all(code in (500, 503, 504) for _, _, code in failed), failed
    # A failure is the kill's own: its request was in flight at the kill. It ended right after, or
    # (504, the race above) within the app's request limit of reaching the new replica.
    quick = [(s, end) for s, end, code in failed if code != 504]
    resent = [(s, end) for s, end, code in failed if code == 504]
    assert all(s <= 1.0 and end < 10.0 for s, end in quick), failed
    assert all(s <= 1.0 and end < 30.0 + LIMITS.request_timeout_s for s, end in resent), failed
    assert max(end - s for s, end, _ in log) < 90
    assert _replica_names() and _replica_names() != [victim]


@pytest.mark.slow
def test_imgflow_serve_ray_command_serves_two_replicas_and_stops_on_ctrl_c(
    tmp_path: Path, tiny_model_dir: Path, images: list[bytes]
) -> None:
    """The real command: two replicas answer, Ctrl-C stops it with exit 0 and every process it
    started (the Ray runtime, Serve's controller, proxy and replicas) is gone."""
    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - the child writes to it
    proc = subprocess.Popen(
        [str(BIN / "imgflow"), "serve", "--ray", "--replicas", "2", "--model", str(tiny_model_dir),
         "--port", str(port), "--set", "serve.max_batch=8"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=300, proc=proc)
        started = psutil.Process(proc.pid).children(recursive=True)
        replicas = [p for p in started if "ServeReplica" in " ".join(p.cmdline())]
        assert len(replicas) == 2, [p.cmdline() for p in started]
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": [_b64(images[0])]}, timeout=60)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] in FMNIST_CLASSES
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": ["aGk="] * 9}, timeout=60)
        assert r.status_code == 413
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        stop_process_group(proc)

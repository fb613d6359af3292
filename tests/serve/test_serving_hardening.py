"""The scoring server against hostile and careless clients (issue 22, item 1).

In-process (httpx over ASGI, fast): every malformed JSON shape and wrong type is a 400; a body
above the limit is refused from its Content-Length without a byte read, and while streaming after
at most one chunk past the limit; saturation answers 503 + Retry-After; a slow request 504 while its
slot stays held until its scoring ends; the bearer token. Then one real ``imgflow serve`` process
(module-scoped) on a tiny real model, fuzzed over real sockets: huge bodies (chunked, honest and
lying Content-Length; generated lazily), deep nesting, truncated multipart, 64 concurrent good
requests — no 5xx, the server's RSS growth bounded (measured), a good image still answered.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from components.core.config import ServeConfig
from components.model.checkpoint import Predictor
from components.serve.serving import (
    ServeLimits,
    create_app,
    open_access_warning,
    predictions,
)
from flows.environment import SERVE_TOKEN_ENV, serve_token
from tests.conftest import (
    BIN,
    FMNIST_CLASSES,
    fmnist_arrays,
    free_port,
    png_bytes,
    stop_process_group,
    wait_http,
)

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def predictor(tiny_model_dir: Path) -> Predictor:
    return Predictor.from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def image() -> bytes:
    x, _ = fmnist_arrays("t10k", 1)
    return png_bytes(x[0])


def _b64(image: bytes) -> str:
    return base64.b64encode(image).decode()


async def _post(app: Any, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.post(path, **kwargs)


def _call(app: Any, path: str, **kwargs: Any) -> httpx.Response:
    return asyncio.run(_post(app, path, **kwargs))


# --------------------------------------------------------------------------- malformed JSON: 400


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


WRONG_SHAPES: list[bytes] = [
    b'{"inputs": ["iVBOR',  # truncated
    b"",
    b"\xff\xfe\xfa\x00not utf-8 \x80\x81",
    b'{"inputs": ["\xc3\x28"]}',  # invalid UTF-8 inside a string
    _nested(100_000),
    b'{"inputs": ' * 50_000,
    b"1" * 5000,  # an int too long to convert
    *(
        json.dumps(v).encode()
        for v in (
            [],
            "inputs",
            5,
            None,
            {"inputs": 5},
            {"inputs": None},
            {"inputs": [5]},
            {"inputs": [[1, 2]]},
            {"inputs": {"image": 5}},
            {"inputs": {"pictures": ["x"]}},
            {"inputs": [{"image": []}]},
            {"instances": {"image": [None]}},
            {"dataframe_split": []},
            {"dataframe_split": {"columns": 5, "data": [["x"]]}},
            {"dataframe_split": {"columns": "image", "data": [["x"]]}},
            {"dataframe_split": {"columns": ["image"], "data": "x"}},
            {"dataframe_split": {"columns": ["image"], "data": [5]}},
            {"dataframe_split": {"columns": ["image"], "data": [["x", "y"]]}},
            {"dataframe_split": {"columns": [["image"]], "data": [["x"]]}},
            {"dataframe_records": {"image": "x"}},
            {"dataframe_records": [5]},
            {"dataframe_records": [{"image": {"b64": "x"}}]},
        )
    ),
]


def test_every_malformed_json_shape_is_a_400(predictor: Predictor) -> None:
    app = create_app(predictor, model_uri="tiny")
    for body in WRONG_SHAPES:
        r = _call(app, "/invocations", content=body, headers=JSON)
        assert r.status_code == 400, (body[:60], r.text)
        assert r.json()["error_code"] == "BAD_REQUEST" and r.json()["message"]
    deep = _call(app, "/invocations", content=_nested(100_000), headers=JSON)
    assert "nested too deeply" in deep.json()["message"]


# --------------------------------------------------------------------------- body limits: 413 without holding it


class Lazy:
    """A body generated chunk by chunk (never allocated whole), counting what the server pulled."""

    def __init__(self, prefix: bytes, total: int, chunk: int = 64 * 1024) -> None:
        self.prefix, self.total, self.chunk, self.pulled = prefix, total, chunk, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        block = b"A" * self.chunk
        first = self.prefix + block[len(self.prefix) :]
        while self.pulled < self.total:
            part = first if self.pulled == 0 else block
            self.pulled += len(part)
            yield part


MULTIPART = "multipart/form-data; boundary=xyz"
MULTIPART_HEAD = b'--xyz\r\nContent-Disposition: form-data; name="f"; filename="big.png"\r\n\r\n'


@pytest.mark.parametrize(
    ("path", "ctype", "prefix"),
    [("/invocations", "application/json", b'{"inputs": ["'), ("/predict", MULTIPART, MULTIPART_HEAD)],
)
def test_huge_body_is_refused_without_reading_it(
    predictor: Predictor, path: str, ctype: str, prefix: bytes
) -> None:
    limit = 1_000_000
    app = create_app(predictor, model_uri="tiny", limits=ServeLimits(max_body_bytes=limit))
    declared = Lazy(prefix, 200_000_000)
    r = _call(
        app, path, content=declared, headers={"content-type": ctype, "content-length": str(declared.total)}
    )
    assert r.status_code == 413 and "at most 1000000 bytes" in r.json()["message"]
    assert declared.pulled == 0, "a body declared too large must be refused before it is read"

    streamed = Lazy(prefix, 200_000_000)  # no Content-Length: chunked
    r = _call(app, path, content=streamed, headers={"content-type": ctype})
    assert r.status_code == 413, r.text
    assert limit < streamed.pulled <= limit + streamed.chunk, "read past the limit before refusing"


def test_body_limit_follows_batch_and_image_limits() -> None:
    assert ServeLimits().body_limit == 100_000_000
    small = ServeLimits(max_image_bytes=20_000, max_batch=8)
    assert small.body_limit == 8 * (20_000 * 4 // 3 + 1024) + 64 * 1024
    cfg = ServeConfig(max_body_bytes=5000, request_timeout_s=2, max_concurrency=3, queue_timeout_s=0.1)
    limits = ServeLimits.from_config(cfg)
    assert (limits.body_limit, limits.request_timeout_s, limits.max_concurrency, limits.queue_timeout_s) == (
        5000,
        2,
        3,
        0.1,
    )


def test_truncated_multipart_is_a_4xx(predictor: Predictor, image: bytes) -> None:
    app = create_app(predictor, model_uri="tiny")
    whole = MULTIPART_HEAD + image + b"\r\n--xyz--\r\n"
    for cut in (10, len(MULTIPART_HEAD) - 5, len(MULTIPART_HEAD) + len(image) // 2, len(whole) - 3):
        r = _call(app, "/predict", content=whole[:cut], headers={"content-type": MULTIPART})
        assert 400 <= r.status_code < 500, (cut, r.text)
    r = _call(app, "/predict", content=whole, headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and "boundary" in r.json()["message"]
    r = _call(app, "/predict", content=whole, headers={"content-type": MULTIPART})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] in FMNIST_CLASSES


# --------------------------------------------------------------------------- concurrency and timeouts


class Gate:
    """A scorer (the ``score=`` seam) that holds every request until released."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor, self.entered, self.open = predictor, 0, asyncio.Event()

    async def __call__(self, images: list[bytes]) -> list[dict[str, Any]]:
        self.entered += 1
        await self.open.wait()
        return predictions(self.predictor, images, top_k=3)


def test_saturated_server_answers_503_with_retry_after(predictor: Predictor, image: bytes) -> None:
    async def scenario() -> None:
        gate = Gate(predictor)
        limits = ServeLimits(max_concurrency=2, queue_timeout_s=0.1)
        app = create_app(predictor, model_uri="tiny", limits=limits, score=gate)
        body = {"inputs": [_b64(image)]}
        held = [asyncio.create_task(_post(app, "/invocations", json=body)) for _ in range(2)]
        while gate.entered < 2:
            await asyncio.sleep(0.01)
        busy = await _post(app, "/invocations", json=body)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert (
            busy.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
            and "max_concurrency" in busy.json()["message"]
        )
        gate.open.set()
        assert [(await t).status_code for t in held] == [200, 200]
        assert (await _post(app, "/invocations", json=body)).status_code == 200

    asyncio.run(scenario())


def test_slow_request_is_504_and_keeps_its_slot_until_scoring_ends(
    predictor: Predictor, image: bytes
) -> None:
    async def scenario() -> None:
        gate = Gate(predictor)
        limits = ServeLimits(max_concurrency=1, queue_timeout_s=0.05, request_timeout_s=0.3)
        app = create_app(predictor, model_uri="tiny", limits=limits, score=gate)
        body = {"inputs": [_b64(image)]}
        t0 = time.monotonic()
        slow = await _post(app, "/invocations", json=body)
        assert slow.status_code == 504 and "serve.request_timeout_s" in slow.json()["message"]
        assert time.monotonic() - t0 < 5
        # The timed-out scoring is cancelled; a slot is free again once it has really stopped.
        await asyncio.sleep(0.05)
        gate.open.set()
        assert (await _post(app, "/invocations", json=body)).status_code == 200

    asyncio.run(scenario())


def test_timed_out_thread_scoring_holds_the_slot(
    predictor: Predictor, image: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default scorer runs in a thread, which cannot be interrupted: a request that timed out
    keeps its slot (the next one gets 503) until its thread ends, then the slot is free again."""
    release = threading.Event()
    body = {"inputs": [_b64(image)]}

    def stuck(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        release.wait(30)
        return predictions(*args, **kwargs)

    async def scenario() -> None:
        limits = ServeLimits(max_concurrency=1, queue_timeout_s=0.05, request_timeout_s=0.2)
        app = create_app(predictor, model_uri="tiny", limits=limits)
        first = await _post(app, "/invocations", json=body)
        assert first.status_code == 504, first.text
        assert (await _post(app, "/invocations", json=body)).status_code == 503
        release.set()
        for _ in range(100):
            reply = await _post(app, "/invocations", json=body)
            if reply.status_code != 503:
                break
            await asyncio.sleep(0.05)
        assert reply.status_code == 200, reply.text

    monkeypatch.setattr("components.serve.serving.predictions", stuck)  # the thread-pool path, made slow
    try:
        asyncio.run(scenario())
    finally:
        release.set()


# --------------------------------------------------------------------------- token


def test_token_guards_scoring_but_not_health(predictor: Predictor, image: bytes) -> None:
    app = create_app(predictor, model_uri="tiny", token="s3cret-token")
    body = {"inputs": [_b64(image)]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                    {"Authorization": "Bearer s3cret-token "}, {"Authorization": "Basic czNjcmV0LXRva2Vu"}):  # fmt: skip
        r = _call(app, "/invocations", json=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
        assert r.json()["error_code"] == "UNAUTHENTICATED"
    assert _call(app, "/predict", files={"f": ("a.png", image)}).status_code == 401
    ok = _call(app, "/invocations", json=body, headers={"Authorization": "Bearer s3cret-token"})
    assert ok.status_code == 200 and ok.json()["predictions"][0]["label"] in FMNIST_CLASSES

    async def health() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return [(await c.get(p)).status_code for p in ("/health", "/ping")]

    assert asyncio.run(health()) == [200, 200]


def test_token_comes_from_params_else_the_environment() -> None:
    from components.core.config import Params

    params = Params()
    assert serve_token(params, {}) is None
    assert serve_token(params, {SERVE_TOKEN_ENV: "from-env"}) == "from-env"
    with_token = params.model_copy(update={"serve": params.serve.model_copy(update={"token": "from-params"})})
    assert serve_token(with_token, {SERVE_TOKEN_ENV: "from-env"}) == "from-params"


def test_open_bind_without_token_warns() -> None:
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        warning = open_access_warning(host, requires_token=False)
        assert warning and host in warning and "IMGFLOW_SERVE_TOKEN" in warning
        assert open_access_warning(host, requires_token=True) is None
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert open_access_warning(host, requires_token=False) is None


# --------------------------------------------------------------------------- a real server, fuzzed

TOKEN = "fuzz-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 2_000_000
HUGE = 200_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[dict[str, Any]]:
    """``imgflow serve`` on the tiny model folder, its limits set by the CLI options, its token by
    the environment (``$IMGFLOW_SERVE_TOKEN``)."""
    root = tmp_path_factory.mktemp("serve-fuzz")
    port = free_port()
    env = dict(os.environ, **{SERVE_TOKEN_ENV: TOKEN})
    log = open(root / "serve.log", "w")  # noqa: SIM115 - the child writes to it
    proc = subprocess.Popen(
        [str(BIN / "imgflow"), "serve", "--model", str(tiny_model_dir), "--port", str(port),
         "--max-body-bytes", str(LIMIT), "--max-concurrency", "4", "--request-timeout", "60",
         "--set", "serve.queue_timeout_s=60"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=180, proc=proc)
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "pid": proc.pid, "log": root / "serve.log"}
    finally:
        stop_process_group(proc)


def _raw(port: int, head: str, body: Iterator[bytes]) -> tuple[int | None, int]:
    """Send ``head`` then ``body`` chunk by chunk over a raw socket (so the declared length may lie),
    stopping once the server answers or closes; (the answer's status or None, body bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head.encode())
        answered = False
        for chunk in body:
            view = memoryview(chunk)
            while view and not answered:
                readable, writable, _ = select.select([sock], [sock], [], 30)
                answered = bool(readable)
                if writable and not answered:
                    try:
                        n = sock.send(view)
                    except (BrokenPipeError, ConnectionResetError):
                        answered = True
                        break
                    view, sent = view[n:], sent + n
            if answered:
                break
        try:
            reply = sock.recv(65536)
        except ConnectionResetError:
            return None, sent
    return (int(reply.split(b" ", 2)[1]) if reply else None), sent


def _lazy(prefix: bytes, total: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """``total`` bytes starting with ``prefix``, one ``chunk`` at a time (never allocated whole)."""
    block = b"A" * chunk
    yield prefix
    for _ in range((total - len(prefix)) // chunk):
        yield block


def _head(path: str, ctype: str, length: int | None) -> str:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {ctype}\r\n{framing}\r\n\r\n")  # fmt: skip


def _chunked(parts: Iterator[bytes]) -> Iterator[bytes]:
    for p in parts:
        yield b"%x\r\n" % len(p) + p + b"\r\n"
    yield b"0\r\n\r\n"


class RssPeak:
    """The server's peak RSS, sampled every 20 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()

    def __enter__(self) -> RssPeak:
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _good(url: str, image: bytes) -> httpx.Response:
    return httpx.post(f"{url}/invocations", json={"inputs": [_b64(image)]}, headers=AUTH, timeout=60)


def test_real_server_token(server: dict[str, Any], image: bytes) -> None:
    url = server["url"]
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    r = httpx.post(f"{url}/invocations", json={"inputs": [_b64(image)]}, timeout=60)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(f"{url}/invocations", json={"inputs": [_b64(image)]}, headers={"Authorization": "Bearer x"},
                   timeout=60)  # fmt: skip
    assert r.status_code == 401
    assert _good(url, image).status_code == 200


def test_fuzzed_server_never_5xx_holds_no_huge_body_and_still_answers(
    server: dict[str, Any], image: bytes
) -> None:
    url, port = server["url"], server["port"]
    expected = _good(url, image).json()["predictions"][0]  # warm: the first request allocates buffers
    statuses: list[tuple[str, int | None]] = []
    sent_mb: dict[str, float] = {}
    with RssPeak(server["pid"]) as rss:
        base = rss.peak
        with httpx.Client(timeout=60, headers=AUTH) as client:
            for body in WRONG_SHAPES:
                statuses.append(
                    ("json", client.post(f"{url}/invocations", content=body, headers=JSON).status_code)
                )
        json_prefix, multi_prefix = b'{"inputs": ["', MULTIPART_HEAD
        for path, ctype, prefix in (("/invocations", "application/json", json_prefix),
                                    ("/predict", MULTIPART, multi_prefix)):  # fmt: skip
            # Honest but huge Content-Length: refused before reading.
            status, sent = _raw(port, _head(path, ctype, HUGE), _lazy(prefix, HUGE))
            sent_mb[f"{path} declared"] = sent / 1e6
            assert status == 413 and sent < 64 << 20, (path, status, sent)
            # Chunked: refused once past the limit, long before 200 MB went.
            status, sent = _raw(port, _head(path, ctype, None), _chunked(_lazy(prefix, HUGE)))
            sent_mb[f"{path} chunked"] = sent / 1e6
            assert status == 413 and sent < 64 << 20, (path, status, sent)
            # A lying Content-Length (1 MB declared, 200 MB sent): only the declared bytes are read.
            status, sent = _raw(port, _head(path, ctype, 1_000_000), _lazy(prefix, HUGE))
            statuses.append(("lying", status))
            assert status is not None and 400 <= status < 500, (path, status)
            # Truncated: the declared length never arrives, the client hangs up.
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(_head(path, ctype, 50_000).encode() + prefix + b"A" * 1000)
        assert _good(url, image).status_code == 200

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(timeout=120, headers=AUTH, limits=limits) as client:
                body = {"inputs": [_b64(image)]}
                return await asyncio.gather(
                    *(client.post(f"{url}/invocations", json=body) for _ in range(64))
                )

        replies = asyncio.run(burst())
    growth_mb = (rss.peak - base) / 1e6
    assert [s for s in statuses if s[1] is None or s[1] >= 500] == []
    assert all(s[1] == 400 for s in statuses if s[0] == "json"), statuses
    assert [r.status_code for r in replies] == [200] * 64
    assert all(r.json()["predictions"][0]["label"] == expected["label"] for r in replies)
    print(f"server RSS: {base / 1e6:.0f} MB before, peak {rss.peak / 1e6:.0f} MB (+{growth_mb:.0f} MB); "
          f"MB sent of 200 MB bodies before the 413: {sent_mb}")  # fmt: skip
    assert growth_mb < 150, f"the server's RSS grew by {growth_mb:.0f} MB"
    after = _good(url, image)
    assert after.status_code == 200 and after.json()["predictions"][0]["label"] == expected["label"]
    assert "Traceback" not in server["log"].read_text()

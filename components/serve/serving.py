"""HTTP scoring server for a registered imgflow model (FastAPI).

Speaks MLflow's scoring protocol, so clients of ``mlflow models serve`` work unchanged:

- ``POST /invocations`` — JSON ``{"dataframe_split": {"columns": ["image"], "data": [[b64], ...]}}``,
  ``{"dataframe_records": [{"image": b64}, ...]}``, ``{"inputs": [b64, ...]}`` (or
  ``{"inputs": {"image": [...]}}``) or ``{"instances": ...}``; answers ``{"predictions": [...]}``.
- ``POST /predict`` — multipart upload of one or more image files (any field name).
- ``GET /health`` and ``GET /ping`` — liveness, with the model URI and its classes.

Each prediction: ``label``, ``score`` and ``top_k`` (labels with calibrated probabilities: the
temperature fitted by evaluate is in the model's spec). Input a client got wrong (not an image,
too large, wrong field, bad JSON) is a 4xx with a message saying what to send, never a 500.

What a hostile or careless client cannot do (:class:`ServeLimits`):

- make the server hold a large body: a body above :attr:`ServeLimits.body_limit` is refused from its
  ``Content-Length`` before a byte is read, and while streaming (chunked, or a lying length) as soon
  as one byte more arrived; multipart bodies go through the same capped stream;
- crash the parser: any JSON that does not parse (too deeply nested, not UTF-8, truncated) is a 400;
- pile up work: at most ``max_concurrency`` requests are read and scored at once; one more waits
  ``queue_timeout_s`` for a slot, then gets 503 with ``Retry-After``; a request that takes longer than
  ``request_timeout_s`` gets 504 (its slot is freed when its scoring really ends, so the bound holds);
- use the model without the token, when the server has one (401; /health and /ping stay open).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from components.core.config import ServeConfig
from components.core.errors import DataError
from components.model.checkpoint import Predictor
from components.model.uncertainty import trust_status

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"


class RequestError(DataError):
    """A request the server does not answer: ``status`` is the HTTP code to answer with,
    ``headers`` extra response headers (``Retry-After`` on 503)."""

    def __init__(self, message: str, status: int = 400, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


ERROR_CODES = {401: "UNAUTHENTICATED", 503: "TEMPORARILY_UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
"""MLflow's error codes for the answers that are not the client's input at fault (else BAD_REQUEST)."""


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of the server (the ``serve.*`` params of the same names)."""

    top_k: int = 3
    max_image_bytes: int = 10_000_000
    max_batch: int = 256
    max_body_bytes: int = 100_000_000
    request_timeout_s: float = 30.0
    max_concurrency: int = 8
    queue_timeout_s: float = 1.0

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> ServeLimits:
        """The limits the ``serve`` params section sets."""
        return cls(top_k=cfg.top_k, max_image_bytes=cfg.max_image_bytes, max_batch=cfg.max_batch,
                   max_body_bytes=cfg.max_body_bytes, request_timeout_s=cfg.request_timeout_s,
                   max_concurrency=cfg.max_concurrency, queue_timeout_s=cfg.queue_timeout_s)  # fmt: skip

    @property
    def body_limit(self) -> int:
        """Bytes a request body may have: ``max_body_bytes``, or less when ``max_batch`` images of
        ``max_image_bytes`` (base64 in JSON, plus 1 KiB framing each) need less."""
        needed = self.max_batch * (self.max_image_bytes * 4 // 3 + 1024) + 64 * 1024
        return min(self.max_body_bytes, needed)


def _b64(value: Any, index: int) -> bytes:
    if not isinstance(value, str):
        raise RequestError(f"image {index}: expected base64 text, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"image {index}: not valid base64 ({e})") from e


def _column(columns: list[Any], rows: list[Any]) -> list[Any]:
    if IMAGE_COLUMN not in columns:
        raise RequestError(f"dataframe_split needs an {IMAGE_COLUMN!r} column, got columns {columns}")
    i = columns.index(IMAGE_COLUMN)
    if not all(isinstance(r, list) and len(r) == len(columns) for r in rows):
        raise RequestError("dataframe_split.data must be a list of rows, one value per column")
    return [r[i] for r in rows]


def images_from_json(payload: Any) -> list[bytes]:
    """MLflow's scoring-server JSON formats -> raw image bytes (base64-decoded)."""
    if not isinstance(payload, dict):
        raise RequestError('the body must be a JSON object such as {"inputs": ["<base64 image>"]}')
    if "dataframe_split" in payload:
        split = payload["dataframe_split"]
        if not isinstance(split, dict) or not isinstance(split.get("data"), list):
            raise RequestError('dataframe_split must be {"columns": ["image"], "data": [[...], ...]}')
        columns = split.get("columns") or [IMAGE_COLUMN]
        if not isinstance(columns, list):
            raise RequestError(f"dataframe_split.columns must be a list of names such as [{IMAGE_COLUMN!r}]")
        cells = _column(columns, split["data"])
    elif "dataframe_records" in payload:
        records = payload["dataframe_records"]
        if not isinstance(records, list) or not all(
            isinstance(r, dict) and IMAGE_COLUMN in r for r in records
        ):
            raise RequestError(f"dataframe_records must be a list of objects with an {IMAGE_COLUMN!r} field")
        cells = [r[IMAGE_COLUMN] for r in records]
    elif "inputs" in payload or "instances" in payload:
        data = payload.get("inputs", payload.get("instances"))
        if isinstance(data, dict):
            data = data.get(IMAGE_COLUMN)
        if isinstance(data, str):
            data = [data]
        if not isinstance(data, list):
            raise RequestError(f"inputs must be a list of base64 images or {{{IMAGE_COLUMN!r}: [...]}}")
        cells = [c[IMAGE_COLUMN] if isinstance(c, dict) and IMAGE_COLUMN in c else c for c in data]
    else:
        keys = ", ".join(map(str, payload)) or "none"
        raise RequestError(
            f"unknown input format (keys: {keys}); send dataframe_split, dataframe_records, inputs or "
            f"instances with base64 images in an {IMAGE_COLUMN!r} column"
        )
    return [_b64(c, i) for i, c in enumerate(cells)]


def check_limits(images: list[bytes], limits: ServeLimits) -> None:
    if not images:
        raise RequestError("no images in the request")
    if len(images) > limits.max_batch:
        raise RequestError(f"{len(images)} images in one request; at most {limits.max_batch}", status=413)
    for i, b in enumerate(images):
        if len(b) > limits.max_image_bytes:
            raise RequestError(
                f"image {i} is {len(b)} bytes; at most {limits.max_image_bytes} (serve.max_image_bytes)",
                status=413,
            )


def predictions(predictor: Predictor, images: list[bytes], *, top_k: int) -> list[dict[str, Any]]:
    """Images -> one record each: labels (the predicted label set: every label at or above its
    threshold for a multi-label model, else the top class), label, score (the most probable class),
    top_k [{label, probability}], probabilities; and when the model ships them, ood_score, ood (its OOD
    flag), prediction_set (its conformal set) and, with a label tree, path, parent, parent_probability,
    parent_probabilities and (serve.backoff on) answer: a leaf, an ancestor or null."""
    scored = predictor.predict_scored(images)
    probs = scored.probs
    classes = predictor.spec.classes
    k = min(top_k, len(classes))
    out = []
    trusts = predictor.trust_fields(scored)
    for row, labels, trust in zip(probs, predictor.label_sets(probs), trusts, strict=True):
        order = np.argsort(-row)[:k]
        out.append(
            {
                "labels": labels,
                "label": classes[int(order[0])],
                "score": float(row[order[0]]),
                "top_k": [{"label": classes[int(j)], "probability": float(row[j])} for j in order],
                "probabilities": [float(p) for p in row],
                **trust,
            }
        )
    return out


ScoreFn = Callable[[list[bytes]], Awaitable[list[dict[str, Any]]]]
"""Scores a checked batch of images: one prediction record each (see :func:`predictions`)."""

OPEN_PATHS = frozenset({"/health", "/ping"})
"""Liveness answers without a token (load balancers and orchestrators probe them)."""


def create_app(
    predictor: Predictor,
    *,
    model_uri: str,
    limits: ServeLimits = ServeLimits(),
    score: ScoreFn | None = None,
    token: str | None = None,
) -> FastAPI:
    """The FastAPI application serving ``predictor``.

    ``score``: used instead of running :func:`predictions` in the thread pool (a Ray Serve
    deployment routes it through its ``@serve.batch`` method). ``token``: when set, every path but
    /health and /ping needs ``Authorization: Bearer <token>`` (401 otherwise)."""
    app = FastAPI(title="imgflow model server", version="1")
    if token:
        app.add_middleware(BearerToken, token=token)
    admission = Admission(limits)
    spec = predictor.spec
    info = {"status": "ok", "model": model_uri, "task": spec.task.name, "classes": list(spec.classes),
            "thresholds": list(spec.thresholds) if spec.thresholds else None,
            **trust_status(predictor.ood, predictor.conformal)}  # fmt: skip

    @app.exception_handler(RequestError)
    async def _bad_request(_: Request, exc: RequestError) -> JSONResponse:
        code = ERROR_CODES.get(exc.status, "BAD_REQUEST")
        return JSONResponse(
            {"error_code": code, "message": str(exc)}, status_code=exc.status, headers=exc.headers
        )

    @app.exception_handler(DataError)
    async def _bad_image(_: Request, exc: DataError) -> JSONResponse:
        return JSONResponse({"error_code": "BAD_REQUEST", "message": str(exc)}, status_code=400)

    async def _score_in_threadpool(images: list[bytes]) -> list[dict[str, Any]]:
        scoring = asyncio.ensure_future(run_in_threadpool(predictions, predictor, images, top_k=limits.top_k))
        try:
            return await asyncio.shield(scoring)
        except asyncio.CancelledError:
            # Timed out: a thread cannot be stopped, so the request holds its slot until it ends.
            await asyncio.wait({scoring})
            raise

    scorer = score or _score_in_threadpool

    async def _answer(read: Callable[[], Awaitable[list[bytes]]]) -> dict[str, Any]:
        """Read and score the request's images holding one of the server's slots."""

        async def work() -> dict[str, Any]:
            images = await read()
            check_limits(images, limits)
            return {"predictions": await scorer(images)}

        return await admission.run(work())

    @app.get("/health")
    @app.get("/ping")
    async def health() -> dict[str, Any]:
        return info

    @app.post("/invocations")
    async def invocations(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            check_declared_length(request, limits.body_limit)
            return await _answer(lambda: _uploaded(request, limits))
        if not ctype.startswith("application/json"):
            raise RequestError(
                f"content type {ctype or 'none'!r} is not supported: send application/json "
                "(MLflow scoring format) or multipart/form-data (image files)",
                status=415,
            )
        check_declared_length(request, limits.body_limit)
        return await _answer(lambda: _json_images(request, limits))

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise RequestError("POST /predict takes multipart/form-data image files", status=415)
        check_declared_length(request, limits.body_limit)
        return await _answer(lambda: _uploaded(request, limits))

    return app


class BearerToken:
    """ASGI middleware: every HTTP path but :data:`OPEN_PATHS` answers 401 unless the request
    carries ``Authorization: Bearer <token>`` (compared in constant time). Pure ASGI, so the body
    streams through untouched (the body limits still apply)."""

    def __init__(self, app: ASGIApp, *, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        message = "this server needs a token: send 'Authorization: Bearer <token>' (serve.token)"
        response = JSONResponse({"error_code": ERROR_CODES[401], "message": message}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return hmac.compare_digest(given, self._expected)


class Admission:
    """At most ``limits.max_concurrency`` requests are read and scored at once.

    One more waits ``queue_timeout_s`` for a slot, then is refused with 503 + ``Retry-After``
    rather than queueing without end. A request past ``request_timeout_s`` is answered 504 at once,
    but keeps its slot until its work really stops: scoring in a thread cannot be interrupted, and
    freeing the slot early would let timed-out work pile up beyond the bound."""

    def __init__(self, limits: ServeLimits) -> None:
        self._limits = limits
        self._slots = asyncio.Semaphore(limits.max_concurrency)

    async def run(self, work: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
        """``work``'s result, or RequestError 503 (no slot) / 504 (too slow)."""
        lim = self._limits
        try:
            async with asyncio.timeout(lim.queue_timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            work.close()
            raise RequestError(
                f"the server is busy ({lim.max_concurrency} requests in progress, serve.max_concurrency); "
                "retry shortly",
                status=503,
                headers={"Retry-After": "1"},
            ) from None
        task = asyncio.ensure_future(work)
        task.add_done_callback(self._release)
        done, _ = await asyncio.wait({task}, timeout=lim.request_timeout_s)
        if not done:
            task.cancel()
            raise RequestError(
                f"the request took longer than {lim.request_timeout_s:g} s (serve.request_timeout_s); "
                "send fewer or smaller images, or retry later",
                status=504,
            )
        return task.result()

    def _release(self, task: asyncio.Future[Any]) -> None:
        self._slots.release()
        if not task.cancelled():
            task.exception()  # retrieved here: a timed-out request's late error is not logged as lost


def check_declared_length(request: Request, limit: int) -> None:
    """413 before reading a byte when the body's declared ``Content-Length`` is above ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise RequestError(_too_large(limit), status=413)


def _too_large(limit: int) -> str:
    return f"request body too large: at most {limit} bytes (serve.max_body_bytes, serve.max_batch)"


async def capped_stream(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The body's chunks as they arrive; 413 as soon as more than ``limit`` bytes came (whatever
    ``Content-Length`` said, or with none: chunked), so no more than ``limit`` is ever held."""
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise RequestError(_too_large(limit), status=413)
            yield chunk
    except ClientDisconnect:
        raise RequestError("the client went away before the body was complete") from None


def parse_json(body: bytes | bytearray) -> Any:
    """``body`` as JSON; every way it can fail to parse (syntax, encoding, nesting) is a 400."""
    try:
        return json.loads(body)
    except RecursionError:
        raise RequestError("the body is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int too long to convert
        raise RequestError(f"the body is not valid JSON ({e})") from e


async def _json_images(request: Request, limits: ServeLimits) -> list[bytes]:
    body = bytearray()
    async for chunk in capped_stream(request, limits.body_limit):
        body += chunk
    # Parsing and base64-decoding up to max_body_bytes would stall the event loop (and /health).
    return await run_in_threadpool(lambda: images_from_json(parse_json(body)))


async def _uploaded(request: Request, limits: ServeLimits) -> list[bytes]:
    """The files of a multipart form, read through the capped stream (starlette spools each file,
    in memory up to 1 MB, then on disk), each up to the size limit (one byte more means too large)."""
    parser = MultiPartParser(request.headers, capped_stream(request, limits.body_limit),
                             max_files=limits.max_batch + 1, max_fields=limits.max_batch + 1)  # fmt: skip
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise RequestError(f"the multipart body is not valid ({e.message})") from e
    try:
        return await _files(form, limits)
    finally:
        await form.close()


async def _files(form: FormData, limits: ServeLimits) -> list[bytes]:
    images = []
    for _, value in form.multi_items():
        if isinstance(value, str):
            raise RequestError("multipart fields must be image files, not text fields")
        data = await value.read(limits.max_image_bytes + 1)
        if len(data) > limits.max_image_bytes:
            raise RequestError(f"{value.filename} is larger than {limits.max_image_bytes} bytes", status=413)
        images.append(data)
    return images


def open_access_warning(host: str, *, requires_token: bool) -> str | None:
    """A warning when ``host`` is reachable from other machines and no token guards the model."""
    if requires_token:
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (
        f"serving on {host} without a token: anyone who can reach this address can use the model. "
        "Set serve.token (or $IMGFLOW_SERVE_TOKEN; clients send 'Authorization: Bearer <token>') "
        "or bind 127.0.0.1."
    )


def serve(app: Any, *, host: str, port: int, requires_token: bool = False) -> None:
    """Run ``app`` with uvicorn until interrupted; warns when it is open to the network without a token."""
    import uvicorn

    warning = open_access_warning(host, requires_token=requires_token)
    if warning:
        logger.warning(warning)
    logger.info("serving on http://%s:%d (POST /invocations, POST /predict, GET /health)", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")

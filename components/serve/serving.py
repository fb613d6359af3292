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
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from components.core.errors import DataError
from components.model.checkpoint import Predictor

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"


class RequestError(DataError):
    """A bad request: ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServeLimits:
    top_k: int = 3
    max_image_bytes: int = 10_000_000
    max_batch: int = 256


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
        cells = _column(list(split.get("columns") or [IMAGE_COLUMN]), split["data"])
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
    top_k [{label, probability}], probabilities."""
    probs = predictor.predict_proba(images)
    classes = predictor.spec.classes
    k = min(top_k, len(classes))
    out = []
    for row, labels in zip(probs, predictor.label_sets(probs), strict=True):
        order = np.argsort(-row)[:k]
        out.append(
            {
                "labels": labels,
                "label": classes[int(order[0])],
                "score": float(row[order[0]]),
                "top_k": [{"label": classes[int(j)], "probability": float(row[j])} for j in order],
                "probabilities": [float(p) for p in row],
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
        _require_token(app, token)
    spec = predictor.spec
    info = {"status": "ok", "model": model_uri, "task": spec.task.name, "classes": list(spec.classes),
            "thresholds": list(spec.thresholds) if spec.thresholds else None}  # fmt: skip

    @app.exception_handler(RequestError)
    async def _bad_request(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error_code": "BAD_REQUEST", "message": str(exc)}, status_code=exc.status)

    @app.exception_handler(DataError)
    async def _bad_image(_: Request, exc: DataError) -> JSONResponse:
        return JSONResponse({"error_code": "BAD_REQUEST", "message": str(exc)}, status_code=400)

    async def _score_in_threadpool(images: list[bytes]) -> list[dict[str, Any]]:
        return await run_in_threadpool(predictions, predictor, images, top_k=limits.top_k)

    scorer = score or _score_in_threadpool

    async def _answer(images: list[bytes]) -> dict[str, Any]:
        check_limits(images, limits)
        return {"predictions": await scorer(images)}

    @app.get("/health")
    @app.get("/ping")
    async def health() -> dict[str, Any]:
        return info

    @app.post("/invocations")
    async def invocations(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            return await _answer(await _uploaded(request, limits))
        if not ctype.startswith("application/json"):
            raise RequestError(
                f"content type {ctype or 'none'!r} is not supported: send application/json "
                "(MLflow scoring format) or multipart/form-data (image files)",
                status=415,
            )
        return await _answer(images_from_json(await _json(request, limits)))

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise RequestError("POST /predict takes multipart/form-data image files", status=415)
        return await _answer(await _uploaded(request, limits))

    return app


def _require_token(app: FastAPI, token: str) -> None:
    """Every path but :data:`OPEN_PATHS` answers 401 unless the request carries ``token`` (constant-time compare)."""
    expected = f"Bearer {token}".encode()

    @app.middleware("http")
    async def _check_token(request: Request, call_next: Any) -> Any:
        if request.url.path in OPEN_PATHS:
            return await call_next(request)
        given = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            return JSONResponse(
                {
                    "error_code": "UNAUTHENTICATED",
                    "message": "send the server's token as 'Authorization: Bearer <token>'",
                },
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await call_next(request)


async def _json(request: Request, limits: ServeLimits) -> Any:
    body = await request.body()
    if len(body) > limits.max_batch * limits.max_image_bytes * 4 // 3 + 1024:
        raise RequestError("request body too large", status=413)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not valid JSON ({e})") from e


async def _uploaded(request: Request, limits: ServeLimits) -> list[bytes]:
    """The files of a multipart form, each read up to the size limit (one byte more means too large)."""
    form = await request.form(max_files=limits.max_batch + 1)
    images = []
    for _, value in form.multi_items():
        if isinstance(value, str):
            raise RequestError("multipart fields must be image files, not text fields")
        data = await value.read(limits.max_image_bytes + 1)
        if len(data) > limits.max_image_bytes:
            raise RequestError(f"{value.filename} is larger than {limits.max_image_bytes} bytes", status=413)
        images.append(data)
    return images


def serve(app: Any, *, host: str, port: int) -> None:
    """Run ``app`` with uvicorn until interrupted."""
    import uvicorn

    logger.info("serving on http://%s:%d (POST /invocations, POST /predict, GET /health)", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")

"""``imgflow serve --ray``: the model as a Ray Serve deployment behind the same HTTP protocol.

Every replica runs the FastAPI app of :mod:`components.serve.serving` (the same routes, JSON formats,
limits, token and 4xx answers as ``imgflow serve``); only the scoring differs: a replica gathers the
images of the requests that arrive together (``@serve.batch``, up to ``max_batch_images`` images or
``batch_wait_s``) and scores them in one model pass, off its event loop. Replicas are Ray actors: a
fixed number (``--replicas N``) or as many as the load needs between two bounds (``--autoscale
min,max``), on the local runtime or on every node of the cluster ``RAY_ADDRESS`` names.

The model's files travel inside the deployment (read once by the driver), so a replica on another
node needs no shared storage. A replica that dies mid-request: its in-flight requests get a 5xx at
once (Serve's proxy does not resend a request that may have run), every later request waits for or
goes to a live replica, and Serve starts a new one; ``request_timeout_s`` bounds every request, so
nothing hangs (a request Serve hands to the new replica after the dead one took its body waits for
that body until then: a 504).

This module is the only one importing ``ray.serve``; Ray itself starts through
:mod:`components.train.ray_adapter` (127.0.0.1, dashboard off).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve

from components.core.errors import ConfigError, DataError
from components.model.checkpoint import Predictor
from components.serve import serving
from components.train import ray_adapter

logger = logging.getLogger(__name__)

APP_NAME = "imgflow"
"""The Serve application's name (``serve status`` lists it)."""
DEPLOYMENT_NAME = "ImgflowModel"


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Scaling:
    """How many replicas serve, and what each reserves.

    ``replicas``: a fixed count; ``autoscale``: ``(min, max)`` replicas, Serve adding one when the
    requests in flight per replica pass ``target_ongoing`` (then ``replicas`` is ignored).
    ``max_ongoing``: requests a replica holds at once (None: ``serve.max_concurrency``, so the app's
    own admission never refuses what Serve sent it); ``@serve.batch`` scores all it holds in one
    model pass, waiting at most ``batch_wait_s`` after the first for others to join. More requests
    wait in the proxy, up to ``max_queued`` (then 503)."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_ongoing: int | None = None
    target_ongoing: float = 2.0
    batch_wait_s: float = 0.005
    max_queued: int = 64

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {self.replicas}")
        if self.autoscale is not None:
            low, high = self.autoscale
            if low < 0 or high < 1 or low > high:
                raise ConfigError(f"--autoscale MIN,MAX needs 0 <= MIN <= MAX and MAX >= 1, got {low},{high}")

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``serve.deployment`` for this scaling (``max_ongoing`` resolved)."""
        if self.max_ongoing is None:
            raise ValueError("Scaling.max_ongoing unresolved: build_application sets it from the limits")
        options: dict[str, Any] = {
            "ray_actor_options": {
                "num_cpus": self.cpus_per_replica,
                "num_gpus": self.gpus_per_replica,
                # The replica's code never blocks its event loop (the model runs in a thread), so it
                # can run on Serve's own loop: one thread hop less per request, as Ray's
                # RAY_SERVE_THROUGHPUT_OPTIMIZED mode does (set for this deployment only).
                "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}},
            },
            "max_ongoing_requests": self.max_ongoing,
            "max_queued_requests": self.max_queued,
            # A replica that stops answering is replaced within seconds, not Serve's default 40 s.
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 10.0,
            # A model that cannot load fails the deployment after a few tries instead of twenty.
            "max_constructor_retry_count": 3,
        }
        if self.autoscale is None:
            options["num_replicas"] = self.replicas
        else:
            low, high = self.autoscale
            options["autoscaling_config"] = {
                "min_replicas": low,
                "initial_replicas": max(low, 1),
                "max_replicas": high,
                "target_ongoing_requests": self.target_ongoing,
            }
        return options

    @property
    def most_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"1,4"`` -> ``(1, 4)``; a ConfigError naming the expected form otherwise."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"--autoscale takes MIN,MAX replicas such as 1,4; got {text!r}")
    low, high = int(parts[0]), int(parts[1])
    Scaling(autoscale=(low, high))  # checks the bounds
    return low, high


@dataclass(frozen=True)
class ServeSettings:
    """Where the HTTP proxy listens and what the app enforces (the ``serve`` params, as for uvicorn)."""

    host: str = "127.0.0.1"
    port: int = 8000
    limits: serving.ServeLimits = field(default_factory=serving.ServeLimits)
    token: str | None = None

    @property
    def proxy_timeout_s(self) -> float:
        """Serve's end-to-end bound on a request (408 after it): the app's own time limits plus a
        margin, so the app's clearer 503/504 comes first and only time queued in the proxy counts."""
        return self.limits.queue_timeout_s + self.limits.request_timeout_s + 30.0


@dataclass(frozen=True)
class ModelFiles:
    """The files of an imgflow model folder (model.safetensors + model.json), as bytes."""

    files: dict[str, bytes]
    """Path relative to the folder (POSIX) -> content."""

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelFiles:
        root = Path(model_dir)
        return cls(
            {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        )

    def write(self, out_dir: Path) -> Path:
        for name, data in self.files.items():
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / name).write_bytes(data)
        return out_dir


# --------------------------------------------------------------------------- scoring


Outcome = list[dict[str, Any]] | DataError
"""What one request's images come to: a prediction each, or the error of an image that is not one."""


def score_requests(predictor: Predictor, requests: Sequence[list[bytes]], *, top_k: int) -> list[Outcome]:
    """The images of several requests scored in one model pass, split back per request.

    A request holding an undecodable image gets its DataError; the others still get predictions
    (scored one request at a time then, as the shared pass cannot say whose image failed)."""
    flat = [image for request in requests for image in request]
    try:
        preds = serving.predictions(predictor, flat, top_k=top_k)
    except DataError as e:
        if len(requests) == 1:
            return [e]
        return [score_requests(predictor, [request], top_k=top_k)[0] for request in requests]
    out: list[Outcome] = []
    start = 0
    for request in requests:
        out.append(preds[start : start + len(request)])
        start += len(request)
    return out


class ModelReplica:
    """One Serve replica: loads the model, then serves :func:`serving.create_app` with batched scoring."""

    def __init__(
        self, model: ModelFiles, *, model_uri: str, settings: ServeSettings, scaling: Scaling, device: str
    ) -> None:
        with tempfile.TemporaryDirectory(prefix="imgflow-replica-") as tmp:
            self.predictor = Predictor.from_dir(model.write(Path(tmp) / "model"), device=device)
        self.model_uri = model_uri
        self.settings = settings
        # A batch is requests (each at most limits.max_batch images; the predictor splits a large
        # pass into its own batches): as many as the replica holds at once.
        # The batch handler's documented setters; Ray's stubs type it as a plain callable.
        self._score_batch.set_max_batch_size(scaling.max_ongoing or settings.limits.max_concurrency)  # type: ignore[attr-defined]
        self._score_batch.set_batch_wait_timeout_s(scaling.batch_wait_s)  # type: ignore[attr-defined]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _score_batch(self, requests: list[list[bytes]]) -> list[Outcome]:
        # The model runs in a thread: the replica's event loop keeps taking requests (they form the
        # next batch) and answering /health meanwhile.
        top_k = self.settings.limits.top_k
        return await asyncio.to_thread(score_requests, self.predictor, requests, top_k=top_k)

    async def score(self, images: list[bytes]) -> list[dict[str, Any]]:
        """``serving.ScoreFn``: this request's predictions, computed in a batch with its neighbours."""
        outcome = await self._score_batch(images)
        if isinstance(outcome, DataError):
            raise outcome
        return outcome

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve after ``__init__``: the app this replica serves (``serve.ingress()``)."""
        return serving.create_app(
            self.predictor, model_uri=self.model_uri, limits=self.settings.limits,
            score=self.score, token=self.settings.token,
        )  # fmt: skip


# --------------------------------------------------------------------------- running


def build_application(model: ModelFiles, *, model_uri: str, settings: ServeSettings, scaling: Scaling) -> Any:
    """The Serve application (``serve.Application``): the model's replicas behind one ingress."""
    if scaling.max_ongoing is None:
        scaling = replace(scaling, max_ongoing=settings.limits.max_concurrency)
    device = "cuda" if scaling.gpus_per_replica > 0 else "cpu"
    # serve.ingress() without an app: Serve calls ModelReplica.__serve_build_asgi_app__ after __init__.
    deployment = serve.deployment(name=DEPLOYMENT_NAME, **scaling.deployment_options())(
        serve.ingress()(ModelReplica)
    )
    return deployment.bind(model, model_uri=model_uri, settings=settings, scaling=scaling, device=device)


@dataclass(frozen=True)
class RunningServe:
    """A deployed application: its URL, and whether this process started the Ray runtime (and so
    owns its shutdown) or joined a cluster (where only the application is deleted)."""

    url: str
    owns_ray: bool


def gpus_per_replica(scaling: Scaling) -> float:
    """A GPU share per replica when the cluster has GPUs (all replicas fit at the most replicas)."""
    gpus = ray_adapter.cluster_resources().get("GPU", 0.0)
    return min(1.0, gpus / scaling.most_replicas) if gpus else 0.0


def start(
    model_dir: Path,
    *,
    model_uri: str,
    settings: ServeSettings,
    scaling: Scaling = Scaling(),
    ray_address: str | None = None,
    verbose: bool = False,
    interruptible: bool = False,
) -> RunningServe:
    """Start (or join) Ray, deploy the model in ``model_dir`` and return once its replicas answer.

    The caller stops it with :func:`stop`. GPU replicas when the cluster has GPUs (unless
    ``scaling`` sets a share). A ConfigError when the cluster cannot hold the replicas.
    ``interruptible``: from the moment Ray is up, SIGTERM interrupts like Ctrl-C (a command's
    process; see :func:`serve_until_interrupted`)."""
    warning = serving.open_access_warning(settings.host, requires_token=bool(settings.token))
    if warning:
        logger.warning(warning)
    owns_ray = ray_adapter.init_ray(address=ray_address, verbose=verbose)
    if interruptible:
        # Ray's core handles SIGTERM as a crash (a stack dump, then abort: exit 134) after
        # ray.init; a stop request while the replicas start or serve must stop them cleanly.
        signal.signal(signal.SIGTERM, _interrupt)
    # Not verbose: the driver's Serve lines ("Started Serve", "Application ... is ready") stay off.
    logging.getLogger("ray.serve").setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        if scaling.gpus_per_replica == 0 and ray_adapter.cluster_has_gpus():
            scaling = replace(scaling, gpus_per_replica=gpus_per_replica(scaling))
        _check_fits(scaling)
        # Not verbose: Serve's controller, proxy and replicas log warnings only (no access log).
        logging_config = {"log_level": "INFO" if verbose else "WARNING", "enable_access_log": verbose}
        serve.start(
            http_options={"host": settings.host, "port": settings.port,
                          "request_timeout_s": settings.proxy_timeout_s},
            logging_config=logging_config,
        )  # fmt: skip
        app = build_application(
            ModelFiles.from_dir(model_dir), model_uri=model_uri, settings=settings,
            scaling=scaling,
        )  # fmt: skip
        t0 = time.perf_counter()
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config=logging_config)
        logger.info("Ray Serve: %s ready in %.1f s", DEPLOYMENT_NAME, time.perf_counter() - t0)
    except BaseException:
        stop(RunningServe(url="", owns_ray=owns_ray))
        raise
    return RunningServe(url=f"http://{settings.host}:{settings.port}", owns_ray=owns_ray)


def _check_fits(scaling: Scaling) -> None:
    """A ConfigError, not a deployment waiting forever, when the replicas cannot all be placed."""
    have = ray_adapter.cluster_resources().get("CPU", 0.0)
    need = scaling.most_replicas * scaling.cpus_per_replica
    if need > have:
        raise ConfigError(
            f"{scaling.most_replicas} replicas x {scaling.cpus_per_replica:g} CPU need {need:g} CPUs, but the "
            f"Ray cluster has {have:g}: serve fewer replicas or add nodes"
        )


def stop(running: RunningServe) -> None:
    """Remove the application; shut Serve and Ray down when this process started the runtime."""
    import ray

    if not ray.is_initialized():
        return
    if running.owns_ray:
        serve.shutdown()
        ray_adapter.shutdown_ray()
    else:
        serve.delete(APP_NAME)


def serve_until_interrupted(running: RunningServe) -> None:
    """Block until Ctrl-C (or SIGTERM, when started ``interruptible``), then :func:`stop`."""
    logger.info("Ray Serve on %s (POST /invocations, POST /predict, GET /health); Ctrl-C stops", running.url)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        logger.info("stopping Ray Serve")
    finally:
        stop(running)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")

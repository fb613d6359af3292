"""Shared fixtures. Tests talk only to 127.0.0.1 and never need the network."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from flows.cli import ENV_DEFAULTS

# Entry-point environment (set before anything imports ray/prefect/mlflow), as the CLI sets it.
for _k, _v in {**ENV_DEFAULTS, "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("RAY_ADDRESS", None)

REPO = Path(__file__).resolve().parents[1]
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
BIN = Path(sys.executable).parent


def fmnist_arrays(split: str = "t10k", n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` real Fashion-MNIST images (n, 28, 28) uint8 and labels (n,) of a split."""
    if not (FMNIST_DIR / f"{split}-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST is not installed: run `make data` (apt-get install dataset-fashion-mnist)")
    with gzip.open(FMNIST_DIR / f"{split}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(FMNIST_DIR / f"{split}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    return x.copy(), y.copy()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def run_cli(
    *args: str, cwd: Path, timeout: int = 900, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``imgflow`` console script as a user would (own PREFECT_HOME in ``cwd``).
    ``env``: variables to set, or to remove where the value is None."""
    full_env = dict(os.environ, PREFECT_HOME=str(cwd / ".prefect"))
    # In-process tests point MLflow elsewhere (mlflow.set_tracking_uri also sets this variable):
    # a CLI run uses its project's own store unless the caller says otherwise.
    full_env.pop("MLFLOW_TRACKING_URI", None)
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    return subprocess.run(
        [str(BIN / "imgflow"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def write_small_params(project: Path, *, max_per_class: int = 30, epochs: int = 8, **sections: dict) -> Path:
    """A params.yaml for a small real Fashion-MNIST run inside ``project``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["max_per_class"] = max_per_class
    params["train"].update(epochs=epochs, batch_size=32, lr=0.005)
    params["gates"].update(min_accuracy=0.5, min_class_recall=0.0)
    # A few-image model is neither calibrated, robust nor better than the last one: only the
    # tests about those gates turn them on.
    params["gates"].update(
        max_ece=1.0, min_relative_robustness=0.0, min_family_robustness=0.0, min_slice_accuracy=0.0,
        max_accuracy_drop=1.0, max_class_recall_drop=1.0,
    )  # fmt: skip
    params["evaluate"]["robustness"]["max_images"] = 200
    params["evaluate"]["adversarial"].update(max_images=100, pgd_steps=5)
    params["register"]["model_name"] = "imgflow-test"
    for name, values in sections.items():
        params[name].update(values)
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def sqlite_schema(db: Path) -> tuple[list[tuple], list[tuple]]:
    """(every table, index and trigger of a SQLite file with the lines of its SQL as a set, sorted; the
    Alembic version rows). A set: Alembic's table rebuilds list constraints in an order that varies by run."""
    import sqlite3

    def lines(sql: str | None) -> tuple[str, ...]:
        return tuple(sorted({line.strip().rstrip(",").strip() for line in (sql or "").splitlines()}))

    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")
        objects = sorted((kind, name, table, lines(sql)) for kind, name, table, sql in rows)
        return objects, con.execute("SELECT version_num FROM alembic_version").fetchall()
    finally:
        con.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, *, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop the process we started and its children (its own session), by PID — never by name."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """A real Prefect server on 127.0.0.1 and a free port, with its own PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home))
    env.pop("PREFECT_API_URL", None)
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        api = f"http://127.0.0.1:{port}/api"
        try:
            wait_http(f"{api}/health", timeout=120, proc=proc)
            yield api
        finally:
            stop_process_group(proc)


# What `make demo` runs with: no Prefect server, no Prefect variables, no user profile (HOME is the
# project), so the CLI gives the run the project's own Prefect home, ``<state_dir>/prefect``.
AS_MAKE_DEMO = ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILE")


@pytest.fixture(scope="session")
def pipeline_project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real `imgflow pipeline` run on 300+300 real images as `make demo` runs it: Prefect without a
    server (its history in the project's Prefect home), local Ray, sqlite MLflow. The same flow
    against a running Prefect server: tests/pipeline/test_multilabel_pipeline.py."""
    project = tmp_path_factory.mktemp("project")
    write_small_params(project)
    env: dict[str, str | None] = dict.fromkeys(AS_MAKE_DEMO)
    proc = run_cli("pipeline", cwd=project, env={**env, "HOME": str(project)})
    return {"project": project, "proc": proc, "prefect_home": project / ".imgflow" / "prefect"}


@pytest.fixture()
def copy_repo_files(tmp_path: Path):
    def _copy(*names: str) -> Path:
        for name in names:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, tmp_path / name)
        return tmp_path

    return _copy


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """``mlflow.set_tracking_uri`` also sets $MLFLOW_TRACKING_URI: each test starts without it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def start_mlflow_server(store: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:port over ``store`` (sqlite + artifact folder), healthy.

    Restarting it on the same ``store`` keeps every run, version, tag and alias.
    """
    store.mkdir(parents=True, exist_ok=True)
    log = open(store / "server.log", "a")  # noqa: SIM115 - the child writes to it until stopped
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
    except BaseException:
        stop_process_group(proc)
        raise
    return proc


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow tracking/registry server on 127.0.0.1 and a free port (stopped by PID)."""
    store, port = tmp_path_factory.mktemp("mlflow-server"), free_port()
    proc = start_mlflow_server(store, port)
    try:
        yield {"uri": f"http://127.0.0.1:{port}", "store": store, "port": port, "proc": proc}
    finally:
        stop_process_group(proc)


def train_tiny_model(out_dir: Path, *, n: int = 2000, epochs: int = 2, seed: int = 0) -> Path:
    """A real imgflow_cnn trained for seconds on ``n`` Fashion-MNIST images, saved as an imgflow
    model folder (``model.safetensors`` + ``model.json``) through the product's own preprocessing."""
    import torch

    from components.model.checkpoint import ModelSpec, Predictor, save_classifier
    from components.model.models import create_classifier, resolve_data_config

    torch.manual_seed(seed)
    model = create_classifier("imgflow_cnn", len(FMNIST_CLASSES), in_chans=1)
    spec = ModelSpec("imgflow_cnn", FMNIST_CLASSES, 1, resolve_data_config(model))
    x, y = fmnist_arrays("train", n)
    inputs = Predictor(model, spec).preprocess([png_bytes(a) for a in x])
    targets = torch.as_tensor(y, dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=0.005)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(n).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs[idx]), targets[idx]).backward()
            opt.step()
    return save_classifier(model.eval().state_dict(), spec, out_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@contextmanager
def fast_ray_runtime(num_cpus: int = 2) -> Iterator[None]:
    """One local Ray runtime for a test module (train() then neither starts nor stops one), stopped
    after only if started here. Its Train controller polls workers every 0.5 s, as in every local runtime
    ``init_ray`` starts, so reports and checkpoints of sub-second epochs are registered before the next
    epoch is over."""
    from components.train import ray_adapter

    started = ray_adapter.init_ray(num_cpus=num_cpus)
    try:
        yield
    finally:
        if started:
            ray_adapter.shutdown_ray()

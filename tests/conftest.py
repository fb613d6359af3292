"""Shared fixtures. Tests talk only to 127.0.0.1 and never need the network."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

# Entry-point environment (set before anything imports ray/prefect/mlflow).
for _k, _v in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}.items():
    os.environ.setdefault(_k, _v)
os.environ.pop("MLFLOW_TRACKING_URI", None)
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


def run_cli(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """Run the installed ``imgflow`` console script as a user would."""
    return subprocess.run(
        [str(BIN / "imgflow"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


def write_small_params(project: Path, *, max_per_class: int = 30, epochs: int = 4, **sections: dict) -> Path:
    """A params.yaml for a small real Fashion-MNIST run inside ``project``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["max_per_class"] = max_per_class
    params["train"].update(epochs=epochs, batch_size=32, lr=0.005)
    params["gates"].update(min_accuracy=0.5, min_class_recall=0.0)
    params["register"]["model_name"] = "imgflow-test"
    for name, values in sections.items():
        params[name].update(values)
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def pipeline_project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real `imgflow pipeline` run (ephemeral Prefect, local Ray, sqlite MLflow) on 300+300 images."""
    project = tmp_path_factory.mktemp("project")
    write_small_params(project)
    env_home = project / ".prefect"
    os.environ["PREFECT_HOME"] = str(env_home)
    proc = run_cli("pipeline", cwd=project)
    return {"project": project, "proc": proc}


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

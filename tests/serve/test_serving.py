"""`imgflow serve` as a real process on 127.0.0.1: a registered model answers real Fashion-MNIST
images over real HTTP (MLflow scoring JSON and multipart uploads) exactly like the in-process
pyfunc; bad input gets a 4xx with a message."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest

from components.pipeline.stages import serving_pip_requirements
from components.registry import tracking
from tests.conftest import (
    BIN,
    FMNIST_CLASSES,
    fmnist_arrays,
    free_port,
    png_bytes,
    stop_process_group,
    wait_http,
)

NAME = "serve-test"


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    """The tiny real model registered as champion in a sqlite store; an image it gets right."""
    root = tmp_path_factory.mktemp("serve")
    uri = tracking.configure(f"sqlite:///{root / 'mlflow.db'}", state_dir=root)
    exp = tracking.ensure_experiment("serve", artifact_root=root / "artifacts")
    run = tracking.start_run(exp, run_name="tiny", params={}, tags={}, tracking_uri=uri)
    x, y = fmnist_arrays("t10k", 40)
    images = [png_bytes(a) for a in x]
    model_uri = tracking.log_pyfunc_model(
        run.run_id,
        model_dir=tiny_model_dir,
        example_image=images[0],
        pip_requirements=serving_pip_requirements(),
    )
    tracking.register(
        model_uri, name=NAME, run_id=run.run_id, tags={"gates_passed": "true"}, aliases=["champion"]
    )
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = pyfunc.predict(pd.DataFrame({"image": images}))
    right = [i for i, lab in enumerate(out["label"]) if lab == FMNIST_CLASSES[y[i]]]
    assert right, "the tiny model gets none of 40 test images right"
    i = right[0]
    return {"root": root, "uri": uri, "image": images[i], "expected": out.iloc[i], "images": images}


@pytest.fixture(scope="module")
def server(registered: dict):
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=registered["uri"])
    log = open(registered["root"] / "serve.log", "w")  # noqa: SIM115 - the child writes to it
    proc = subprocess.Popen(
        [str(BIN / "imgflow"), "serve", "--model", f"models:/{NAME}@champion", "--port", str(port),
         "--set", "serve.max_image_bytes=20000", "--set", "serve.max_batch=8"],
        cwd=registered["root"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=180, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)


def _check(pred: dict, expected: pd.Series) -> None:
    assert pred["label"] == expected["label"]
    np.testing.assert_allclose(pred["probabilities"], expected["probabilities"], atol=1e-6)
    assert pred["top_k"][0] == {"label": expected["label"], "probability": pytest.approx(expected["score"])}
    assert len(pred["top_k"]) == 3 and pred["top_k"][0]["probability"] >= pred["top_k"][1]["probability"]


def test_health_names_the_model(server: str) -> None:
    for path in ("/health", "/ping"):
        body = httpx.get(server + path, timeout=30).json()
        assert body["status"] == "ok" and body["model"] == f"models:/{NAME}@champion"
        assert body["classes"] == list(FMNIST_CLASSES)


def test_mlflow_scoring_json_formats_answer_the_right_class(server: str, registered: dict) -> None:
    b64 = base64.b64encode(registered["image"]).decode()
    for payload in (
        {"dataframe_split": {"columns": ["image"], "data": [[b64]]}},
        {"dataframe_records": [{"image": b64}]},
        {"inputs": [b64]},
        {"instances": {"image": [b64]}},
    ):
        r = httpx.post(f"{server}/invocations", json=payload, timeout=60)
        assert r.status_code == 200, r.text
        (pred,) = r.json()["predictions"]
        _check(pred, registered["expected"])


def test_multipart_upload_answers_the_right_class(server: str, registered: dict) -> None:
    files = [("files", ("shoe.png", registered["image"], "image/png")),
             ("files", ("other.png", registered["images"][1], "image/png"))]  # fmt: skip
    r = httpx.post(f"{server}/predict", files=files, timeout=60)
    assert r.status_code == 200, r.text
    first, second = r.json()["predictions"]
    _check(first, registered["expected"])
    assert second["label"] in FMNIST_CLASSES


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        (
            {"files": {"file": ("notes.txt", b"this is not an image", "text/plain")}},
            400,
            "not a decodable image",
        ),
        ({"json": {"inputs": ["bm90IGFuIGltYWdl"]}}, 400, "not a decodable image"),
        ({"json": {"inputs": ["%%% not base64"]}}, 400, "not valid base64"),
        ({"json": {"pictures": ["x"]}}, 400, "unknown input format"),
        (
            {"json": {"dataframe_split": {"columns": ["img"], "data": [["x"]]}}},
            400,
            "needs an 'image' column",
        ),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "not supported"),
        ({"files": {"file": ("big.png", b"\x89PNG" + b"0" * 30000, "image/png")}}, 413, "larger than 20000"),
        ({"json": {"inputs": []}}, 400, "no images"),
    ],
)
def test_bad_input_is_a_clear_4xx(server: str, kwargs: dict, status: int, message: str) -> None:
    path = "/predict" if "files" in kwargs else "/invocations"
    r = httpx.post(server + path, timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["message"]


def test_too_many_images_is_413(server: str, registered: dict) -> None:
    b64 = base64.b64encode(registered["image"]).decode()
    r = httpx.post(f"{server}/invocations", json={"inputs": [b64] * 9}, timeout=60)
    assert r.status_code == 413 and "at most 8" in r.json()["message"]


@pytest.mark.slow
def test_mlflow_models_serve_answers_the_same_requests(registered: dict) -> None:
    """`mlflow models serve --env-manager local` on the registered pyfunc takes imgflow's JSON."""
    port = free_port()
    # mlflow execs `uvicorn` by name: the venv's bin must be on PATH (as after `source .venv/bin/activate`).
    env = dict(
        os.environ, MLFLOW_TRACKING_URI=registered["uri"], PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}"
    )
    log = open(registered["root"] / "mlflow-serve.log", "w")  # noqa: SIM115 - the child writes to it
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=registered["root"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=300, proc=proc)
        b64 = base64.b64encode(registered["image"]).decode()
        payload = {"dataframe_split": {"columns": ["image"], "data": [[b64]]}}
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=120)
        assert r.status_code == 200, r.text
        (pred,) = r.json()["predictions"]
        assert pred["label"] == registered["expected"]["label"]
        np.testing.assert_allclose(pred["probabilities"], registered["expected"]["probabilities"], atol=1e-6)
    finally:
        stop_process_group(proc)

"""Object storage: ingest from an ``s3://`` image folder and DVC data versions on an S3 remote.

One real S3-protocol server per module: moto's standalone server on 127.0.0.1 and a free port,
started and stopped by PID. It enforces IAM: after the setup below, every request must be signed by
a user whose policy allows it. ``reader`` may do anything in S3 except read the objects named
``denied-*``, so an object that is listed but cannot be read is a real ``AccessDenied``, not a mock.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pandas as pd
import pytest
import yaml

from components.core.errors import DataError
from components.data import ingest as ingest_module
from components.data.ingest import ingest
from components.data.sources import list_source
from tests.conftest import (
    BIN,
    REPO,
    fmnist_arrays,
    free_port,
    png_bytes,
    run_cli,
    stop_process_group,
    wait_http,
    write_small_params,
)

BUCKET = "images"
PREFIX = "fmnist"
CLASSES = ("Bag", "Sneaker", "Trouser")  # Fashion-MNIST labels 8, 7, 1
PER_CLASS = 6
DENIED_KEY = f"{PREFIX}/Bag/denied-0.png"
CORRUPT_KEY = f"{PREFIX}/Sneaker/broken.png"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    admin: dict[str, str]
    """Credentials of a user allowed everything (test setup)."""
    reader: dict[str, str]
    """Credentials imgflow runs with: every S3 action except reading ``denied-*`` objects."""
    images: dict[str, bytes]
    """Key -> bytes of every readable, decodable image under ``s3://images/fmnist``."""

    def env(self, who: str = "reader") -> dict[str, str]:
        """The standard AWS variables botocore (under s3fs and dvc-s3) reads."""
        keys = self.reader if who == "reader" else self.admin
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": keys["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": keys["SecretAccessKey"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self, service: str = "s3", who: str = "admin") -> Any:
        env = self.env(who)
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=env["AWS_DEFAULT_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )


def _real_images() -> dict[str, bytes]:
    """PER_CLASS real Fashion-MNIST test images of each class in CLASSES, keyed by object key."""
    x, y = fmnist_arrays("t10k", 400)
    wanted = {8: "Bag", 7: "Sneaker", 1: "Trouser"}
    out: dict[str, bytes] = {}
    for label, name in wanted.items():
        for i, idx in enumerate([j for j in range(len(y)) if y[j] == label][:PER_CLASS]):
            out[f"{PREFIX}/{name}/{i:03d}.png"] = png_bytes(x[idx])
    return out


def _user(iam: Any, name: str, statements: list[dict[str, Any]]) -> dict[str, str]:
    iam.create_user(UserName=name)
    policy = {"Version": "2012-10-17", "Statement": statements}
    iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AccessKeyId": key["AccessKeyId"], "SecretAccessKey": key["SecretAccessKey"]}


def _setup(endpoint: str) -> S3Server:
    """Users, the bucket and its objects, while the server still takes unsigned requests; then IAM on."""
    setup = S3Server(endpoint, {"AccessKeyId": "setup", "SecretAccessKey": "setup"}, {}, {})
    iam = setup.client("iam")
    admin = _user(iam, "admin", [{"Effect": "Allow", "Action": "*", "Resource": "*"}])
    reader = _user(
        iam,
        "reader",
        [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/*/denied-*"},
        ],
    )
    s3 = setup.client()
    s3.create_bucket(Bucket=BUCKET)
    images = _real_images()
    x, _ = fmnist_arrays("t10k", 500)
    unreadable = {
        DENIED_KEY: png_bytes(x[450]),  # a good image nobody may read
        CORRUPT_KEY: png_bytes(x[451])[:60],  # a PNG cut short
        f"{PREFIX}/.hidden/skip.png": png_bytes(x[452]),
    }
    for key, body in {**images, **unreadable}.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    # moto's switch for IAM enforcement: after 0 more unsigned actions, every request is checked.
    httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"0", headers={"Content-Type": "text/plain"})
    return S3Server(endpoint, admin, reader, images)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    log_dir = tmp_path_factory.mktemp("moto")
    port = free_port()
    with open(log_dir / "moto.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        endpoint = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{endpoint}/moto-api/data.json", timeout=60, proc=proc)
            yield _setup(endpoint)
        finally:
            stop_process_group(proc)


@pytest.fixture()
def as_reader(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """This process talks to the server as ``reader`` (botocore reads the AWS variables)."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reasons(quarantine: Path) -> dict[str, str]:
    rows = pd.read_csv(quarantine, keep_default_na=False)
    return dict(zip(rows["source_path"], rows["reason"], strict=True))


# --------------------------------------------------------------------------------------------
# Listing and bad objects (in process)


def test_s3_prefix_lists_one_class_per_sub_folder(as_reader: S3Server) -> None:
    listing = list_source(f"s3://{BUCKET}/{PREFIX}/")
    assert listing.kind == "imagefolder" and listing.classes == CLASSES
    paths = [item.source_path for item in listing.items]
    assert paths == sorted(paths) and not [p for p in paths if ".hidden" in p]
    assert len(paths) == len(as_reader.images) + 2  # the denied and the corrupt object are listed
    first = next(i for i in listing.items if i.source_path == "Bag/000.png")
    assert first.label == "Bag" and first.read() == as_reader.images[f"{PREFIX}/Bag/000.png"]
    assert list_source(f"imagefolder:s3://{BUCKET}/{PREFIX}").classes == CLASSES  # the long form


def test_object_deleted_after_listing_is_quarantined_and_the_rest_ingested(
    as_reader: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer deletes an object between ingest's listing and its read: one ``not_found``
    record, and the denied and corrupt objects are quarantined with their reasons; never a crash."""
    gone = f"{PREFIX}/Trouser/005.png"
    s3 = as_reader.client()
    real_list_source = ingest_module.list_source

    def list_then_delete(*args: Any, **kwargs: Any) -> Any:
        listing = real_list_source(*args, **kwargs)
        s3.delete_object(Bucket=BUCKET, Key=gone)
        return listing

    monkeypatch.setattr(ingest_module, "list_source", list_then_delete)
    try:
        summary = ingest(f"s3://{BUCKET}/{PREFIX}", data_dir=tmp_path / "data", seed=0)
    finally:
        s3.put_object(Bucket=BUCKET, Key=gone, Body=as_reader.images[gone])
    assert summary.reasons == {"not_found": 1, "truncated": 1, "unreadable": 1}, summary.reasons
    assert summary.ingested == len(as_reader.images) - 1
    reasons = _reasons(tmp_path / "data" / "quarantine.csv")
    assert reasons["Trouser/005.png"] == "file not found"
    assert "Access Denied" in reasons["Bag/denied-0.png"]
    assert "truncated" in reasons["Sneaker/broken.png"]


@pytest.mark.parametrize(
    ("what", "env", "expected"),
    [
        ("no such bucket", {}, "does not exist"),
        ("unknown access key", {"AWS_ACCESS_KEY_ID": "AKIANOBODY"}, "access denied listing .*Access Key Id"),
        ("nothing listening", {"AWS_ENDPOINT_URL": "closed"}, "cannot list"),
    ],
)
def test_unlistable_source_is_a_clear_error_not_a_hang(
    as_reader: S3Server, monkeypatch: pytest.MonkeyPatch, what: str, env: dict[str, str], expected: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}" if value == "closed" else value)
    uri = f"s3://no-such-bucket/{PREFIX}" if what == "no such bucket" else f"s3://{BUCKET}/{PREFIX}"
    t0 = time.monotonic()
    with pytest.raises(DataError, match=expected) as err:
        list_source(uri)
    assert time.monotonic() - t0 < 60, what  # bounded retries and timeouts, not botocore's minutes
    assert uri in str(err.value) and "AWS_ENDPOINT_URL" in str(err.value)


# --------------------------------------------------------------------------------------------
# `imgflow ingest` from s3:// under `dvc repro`, then the data version through an S3 DVC remote


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", PREFECT_HOME=str(cwd / ".prefect"),
                DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
                GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid", **env)  # fmt: skip
    full.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=full)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def _project(root: Path, *, source: str) -> Path:
    """A DVC project with the repo's dvc.yaml and code, ingesting ``source``."""
    root.mkdir()
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "components", root / "components", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"].update(source=source, max_per_class=None)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text(".prefect/\n.imgflow/\n")
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_ingest_from_s3_and_dvc_push_pull_through_an_s3_remote(s3_server: S3Server, tmp_path: Path) -> None:
    env = s3_server.env()
    project = _project(tmp_path / "project", source=f"s3://{BUCKET}/{PREFIX}")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        _run(cmd, project, env)
    s3_server.client().create_bucket(Bucket="dvc-store")
    _run(["dvc", "remote", "add", "-d", "store", "s3://dvc-store/imgflow"], project, env)
    _run(["dvc", "remote", "modify", "store", "endpointurl", s3_server.endpoint], project, env)

    repro = _run(["dvc", "repro", "ingest"], project, env)  # runs `imgflow ingest` (dvc.yaml)
    assert "Running stage 'ingest'" in repro.stdout
    manifest = pd.read_parquet(project / "data" / "manifest.parquet")
    assert set(manifest["image_id"]) == {_sha(b) for b in s3_server.images.values()}
    assert sorted(set(manifest["label"])) == list(CLASSES)
    reasons = _reasons(project / "data" / "quarantine.csv")
    assert set(reasons) == {"Bag/denied-0.png", "Sneaker/broken.png"}, reasons
    _run(["git", "add", "-A"], project, env)
    _run(["git", "commit", "-q", "-m", "data version from s3"], project, env)

    _run(["dvc", "push"], project, env)
    pushed = s3_server.client().list_objects_v2(Bucket="dvc-store").get("KeyCount", 0)
    assert pushed >= len(s3_server.images) + 2  # every stored image, the manifest, dataset.json

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(project), str(clone)], tmp_path, env)
    assert not (clone / "data" / "manifest.parquet").exists()
    _run(["dvc", "pull", "ingest"], clone, env)  # the data version (later stages never ran here)
    for name in ("manifest.parquet", "dataset.json"):
        assert (clone / "data" / name).read_bytes() == (project / "data" / name).read_bytes()
    assert _files(clone / "data" / "store") == _files(project / "data" / "store")
    status = _run(["dvc", "status", "ingest"], clone, env)
    assert "up to date" in status.stdout, status.stdout


# --------------------------------------------------------------------------------------------
# Ray Train checkpoints on the S3 server (train.storage_path)


@pytest.mark.slow
def test_training_keeps_its_checkpoints_in_the_bucket(s3_server: S3Server, tmp_path: Path) -> None:
    """``train.storage_path=s3://...``: Ray Train writes the run's checkpoints through pyarrow's S3
    filesystem (endpoint and credentials from the same AWS variables), and imgflow copies the model
    out of the last one."""
    s3_server.client().create_bucket(Bucket="ray-runs")
    write_small_params(tmp_path, max_per_class=None, epochs=2,
                       train={"workers": 1, "storage_path": "s3://ray-runs/imgflow"},
                       ingest={"source": f"s3://{BUCKET}/{PREFIX}"})  # fmt: skip
    env = s3_server.env()
    assert run_cli("ingest", "--json", cwd=tmp_path, env=env).returncode == 0
    done = run_cli("train", "--json", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="ray-runs").get("Contents", [])]
    # <prefix>/<run name>/checkpoint_<n>/<files>
    checkpoints = {
        parts[2]
        for parts in (k.split("/") for k in keys)
        if len(parts) > 3 and parts[2].startswith("checkpoint_")  # not checkpoint_manager_snapshot.json
    }
    assert len(checkpoints) == 2, keys  # one per epoch, both kept (CheckpointConfig num_to_keep=2)
    assert (tmp_path / "outputs" / "train" / "model").is_dir()
    assert not (tmp_path / ".imgflow" / "ray_results").exists()


# --------------------------------------------------------------------------------------------
# Ray Data batch prediction straight from the bucket (components/serve/ray_batch.py)


@pytest.mark.slow
def test_ray_data_predicts_from_the_s3_prefix_with_error_rows_for_bad_objects(
    as_reader: S3Server, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Every listed object gets a row; the denied and the corrupt one carry their error, the rest a label."""
    ray_batch = pytest.importorskip("components.serve.ray_batch")
    source = ray_batch.list_images(f"s3://{BUCKET}/{PREFIX}")
    with ray_batch.ray_runtime(num_cpus=2):  # its processes inherit the reader's AWS variables
        result = ray_batch.predict_with_ray(tiny_model_dir, source, tmp_path / "pred.parquet", batch_size=8)
    rows = pd.read_parquet(tmp_path / "pred.parquet").set_index("path")
    assert result.images == len(source) == len(rows)
    errors = rows["error"].fillna("")
    assert errors[f"s3://{BUCKET}/{DENIED_KEY}"]  # an error row, not a failed job
    assert errors[f"s3://{BUCKET}/{CORRUPT_KEY}"]
    good = rows.loc[[f"s3://{BUCKET}/{key}" for key in as_reader.images]]
    assert (errors[good.index] == "").all()
    truth = [key.split("/")[1] for key in as_reader.images]
    assert (good["label"].to_numpy() == truth).mean() > 0.5  # a real (tiny) model: chance is 0.1

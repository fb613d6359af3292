"""Fault injection through the stack: the MLflow tracking server killed and restarted mid-run, the
Prefect server gone during a flow run, the disk full while writing the store. Each ends in a retry
that finishes or a clear error (naming the server or the full folder, never a traceback), and
nothing already written locally is lost: a re-run resumes, re-registers or re-ingests.

Default suite (one cheap test per kind): an MLflow server SIGKILLed and restarted between two
batches of a run's logging (the client's retries carry the run over; then, gone for good, a
TrackingError naming the URI); ``imgflow pipeline`` against a Prefect API that does not answer;
``imgflow ingest`` into a full tmpfs (exit 7, the previous data version intact, a re-run after
freeing space succeeds). ``slow``: the real CLI with the servers killed mid-stage (train, register,
pipeline) and evaluate into a full ``outputs/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from components.core.errors import TrackingError
from components.data.manifest import data_version, read_manifest
from components.registry import tracking
from tests.conftest import (
    BIN,
    free_port,
    run_cli,
    start_mlflow_server,
    stop_process_group,
    wait_http,
    write_small_params,
)

DISK_FULL_EXIT = 7


# --------------------------------------------------------------------------- helpers


@dataclass
class _Background:
    """A CLI command running in the background; its output goes to files, not to pipes nobody reads
    while it runs (a long run could stall on a full pipe)."""

    proc: subprocess.Popen[str]
    out: Path
    err: Path

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float = 900) -> tuple[int, str, str]:
        """Wait for it: exit code, stdout, stderr."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process_group(self.proc)
            raise
        return self.proc.returncode, self.out.read_text(), self.err.read_text()


def _start(project: Path, *args: str, env: dict[str, str] | None = None) -> _Background:
    """The installed CLI in the background, in its own session (stopped by PID if a test fails)."""
    full_env = dict(os.environ, PREFECT_HOME=str(project / ".prefect"))
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.update(env or {})
    out, err = project / "cli.out", project / "cli.err"
    with open(out, "w") as out_f, open(err, "w") as err_f:
        proc = subprocess.Popen(
            [str(BIN / "imgflow"), *args], cwd=project, env=full_env, stdout=out_f, stderr=err_f, text=True,
            start_new_session=True,
        )  # fmt: skip
    return _Background(proc, out, err)


def _wait_for(condition: Callable[[], bool], cli: _Background, *, timeout: float, what: str) -> None:
    """Until ``condition()`` holds; fails when the command ended first (the fault would come too late)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if not cli.running():
            rc, _, err = cli.finish()
            pytest.fail(f"the command ended (rc {rc}) before {what}: {err[-3000:]}")
        if time.monotonic() > deadline:
            stop_process_group(cli.proc)
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.05)


def _crash(proc: subprocess.Popen) -> None:
    """SIGKILL the server's whole process group: a crash, not a clean shutdown."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _clear_error(stderr: str, text: str) -> bool:
    """The command printed its one-line ``imgflow: ...`` message holding ``text``, and no traceback of
    its own. (Libraries may log around it: Ray's workers their tracebacks with a ``(pid=...)`` prefix,
    Prefect its failed task run and, at exit, the log lines it could not send to a server that is gone.)"""
    said = any(line.startswith("imgflow: ") and text in line for line in stderr.splitlines())
    return said and not re.search(r"^Traceback", stderr, re.MULTILINE)


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".commit.json"))]


def _digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> its sha256 (what a failed run must leave untouched)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- 1. MLflow server restarted


def test_mlflow_server_restarted_mid_run_keeps_every_metric_then_gone_names_the_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Backoff factor 1 (default 2): retries 0, 2, 4, 8 ... s apart, so the call notices the restarted
    # server sooner; the same 7 retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    store, port = tmp_path / "mlflow", free_port()
    uri = f"http://127.0.0.1:{port}"
    servers = [start_mlflow_server(store, port)]
    try:
        tracking.configure(uri, state_dir=tmp_path / ".imgflow")
        experiment = tracking.ensure_experiment("fault-injection")
        run = tracking.start_run(experiment, run_name="restarted", params={"train": {"epochs": 4}},
                                 tags={"data_version": "v1"}, tracking_uri=uri)  # fmt: skip
        tracking.log_history(run.run_id, [{"epoch": e, "val_accuracy": 0.5 + e / 10} for e in (0, 1)])
        _crash(servers[0])
        # The same port and backend store, back after a start-up of several seconds; meanwhile the
        # next calls wait in the MLflow client's retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, backoff).
        restart = threading.Thread(target=lambda: servers.append(start_mlflow_server(store, port)))
        restart.start()
        started = time.monotonic()
        tracking.log_history(run.run_id, [{"epoch": e, "val_accuracy": 0.5 + e / 10} for e in (2, 3)])
        waited = time.monotonic() - started
        checkpoint = tmp_path / "checkpoint"
        checkpoint.mkdir()
        (checkpoint / "model.json").write_text('{"arch": "imgflow_cnn"}')
        tracking.log_artifacts(run.run_id, [checkpoint], artifact_path="checkpoint")
        tracking.end_run(run.run_id)
        restart.join(timeout=180)
        assert len(servers) == 2 and waited > 1.0  # the call really waited for the restarted server

        client = MlflowClient(uri)
        history = client.get_metric_history(run.run_id, "val_accuracy")
        assert sorted((m.step, round(m.value, 3)) for m in history) == [
            (0, 0.5),
            (1, 0.6),
            (2, 0.7),
            (3, 0.8),
        ]
        done = client.get_run(run.run_id)
        assert done.info.status == "FINISHED" and done.data.params["train.epochs"] == "4"
        assert [a.path for a in client.list_artifacts(run.run_id, "checkpoint")] == ["checkpoint/model.json"]

        # Gone for good (no client retries, to keep the test short): a clear error naming the server.
        _crash(servers[1])
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        pattern = rf"MLflow call failed \(log metrics\) at {re.escape(uri)}: .*tracking server at {re.escape(uri)} up"
        with pytest.raises(TrackingError, match=pattern):
            tracking.log_metrics(run.run_id, {"late": 1.0})
    finally:
        for proc in servers:
            stop_process_group(proc)


def test_tracking_uri_in_messages_hides_the_password() -> None:
    assert tracking.shown_uri("http://ci:s3cret@mlflow:5000/x") == "http://ci:***@mlflow:5000/x"
    assert tracking.shown_uri("sqlite:///tmp/mlflow.db") == "sqlite:///tmp/mlflow.db"


def _train_project(project: Path, uri: str) -> dict[str, str]:
    write_small_params(
        project, max_per_class=10, epochs=3, audit={"enabled": False},
        register={"tracking_uri": uri, "model_name": "fault-test", "retries": 2, "retry_backoff_s": 0.5},
        evaluate={"robustness": {"max_images": 30, "families": ["contrast"]}, "adversarial": {"enabled": False}},
    )  # fmt: skip
    env = {"MLFLOW_TRACKING_URI": uri}
    ingest = run_cli("ingest", cwd=project, env=env, timeout=300)
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    return env


def _restart(server: subprocess.Popen, store: Path, port: int) -> subprocess.Popen:
    _crash(server)
    time.sleep(1.0)  # a moment with nothing listening: connections are refused
    return start_mlflow_server(store, port)


@pytest.mark.slow
def test_mlflow_server_restarted_during_train_and_register(tmp_path: Path) -> None:
    store, port = tmp_path / "mlflow", free_port()
    uri = f"http://127.0.0.1:{port}"
    project = tmp_path / "project"
    project.mkdir()
    server = start_mlflow_server(store, port)
    try:
        env = _train_project(project, uri)
        # Training: the server dies once the MLflow run exists (run.json) and comes back while Ray trains;
        # the per-epoch metrics and the checkpoint are logged at the end, through the client's retries.
        train = _start(project, "train", "--json", env=env)
        _wait_for(
            lambda: (project / "outputs/train/run.json").exists(), train, timeout=300, what="MLflow run"
        )
        server = _restart(server, store, port)
        rc, out, err = train.finish()
        assert rc == 0, err[-3000:]
        run_id = json.loads(out)["run_id"]
        client = MlflowClient(uri)
        assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [0, 1, 2]
        assert client.list_artifacts(run_id, "checkpoint")
        evaluate = run_cli("evaluate", cwd=project, env=env, timeout=600)
        assert evaluate.returncode == 0, evaluate.stderr[-3000:]
        evaluated = _digests(project / "outputs" / "evaluate")

        # Register: the server dies once the model is logged (its MLmodel is written: the experiment keeps
        # its artifacts in the project's .imgflow/mlartifacts), while the version and aliases are made.
        register = _start(project, "register", "--json", env=env)
        _wait_for(
            lambda: any(project.glob(".imgflow/mlartifacts/**/MLmodel")),
            register,
            timeout=300,
            what="logged model",
        )
        server = _restart(server, store, port)
        rc, out, err = register.finish()
        assert rc in (0, 3), err[-3000:]  # 3: registered, but this small model failed a gate
        first = json.loads(out) if rc == 0 else None
        versions = client.search_model_versions("name='fault-test'")
        assert versions and client.get_model_version_by_alias("fault-test", "candidate").run_id == run_id

        # Gone for good: a clear error naming the URI, the evaluation untouched; back: a re-run re-registers.
        _crash(server)
        fast = {**env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        down = run_cli("register", cwd=project, env=fast, timeout=300)
        assert down.returncode == 2 and _clear_error(down.stderr, f"at {uri}"), down.stderr[-3000:]
        assert _digests(project / "outputs" / "evaluate") == evaluated
        server = start_mlflow_server(store, port)
        again = run_cli("register", "--json", cwd=project, env=env, timeout=600)
        assert again.returncode == rc, again.stderr[-3000:]
        latest = client.get_model_version_by_alias("fault-test", "candidate")
        assert int(latest.version) > max(int(v.version) for v in versions)
        if first is not None:
            assert json.loads(again.stdout)["version"] == latest.version
    finally:
        stop_process_group(server)


@pytest.mark.slow
def test_mlflow_server_gone_while_training_then_train_resume_logs_the_same_run(tmp_path: Path) -> None:
    """The training is not lost: after the clear error, ``--resume`` restores the last Ray checkpoint
    (no epoch trained again) and logs into the same MLflow run."""
    store, port = tmp_path / "mlflow", free_port()
    uri = f"http://127.0.0.1:{port}"
    project = tmp_path / "project"
    project.mkdir()
    server = start_mlflow_server(store, port)
    try:
        env = _train_project(project, uri)
        train = _start(project, "train", env={**env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
        _wait_for(
            lambda: (project / "outputs/train/run.json").exists(), train, timeout=300, what="MLflow run"
        )
        _crash(server)  # and it stays down until training has ended
        rc, _, err = train.finish()
        assert rc == 2 and _clear_error(err, f"at {uri}"), err[-3000:]
        run_before = json.loads((project / "outputs/train/run.json").read_text())
        history = json.loads((project / "outputs/train/history.json").read_text())
        assert [h["epoch"] for h in history] == [0, 1, 2]  # the training itself finished

        server = start_mlflow_server(store, port)
        resumed = run_cli("train", "--resume", "--json", cwd=project, env=env, timeout=900)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert json.loads(resumed.stdout)["run_id"] == run_before["run_id"]
        assert (
            json.loads((project / "outputs/train/history.json").read_text()) == history
        )  # nothing retrained
        client = MlflowClient(uri)
        assert [m.step for m in client.get_metric_history(run_before["run_id"], "val_accuracy")] == [0, 1, 2]
        assert client.list_artifacts(run_before["run_id"], "checkpoint")
        evaluate = run_cli("evaluate", cwd=project, env=env, timeout=600)
        assert evaluate.returncode == 0, evaluate.stderr[-3000:]  # the resumed training is complete
    finally:
        stop_process_group(server)


# --------------------------------------------------------------------------- 2. Prefect server gone


def test_pipeline_against_a_prefect_api_that_does_not_answer_says_so(tmp_path: Path) -> None:
    write_small_params(tmp_path, max_per_class=3)
    api = f"http://127.0.0.1:{free_port()}/api"
    proc = run_cli("pipeline", cwd=tmp_path, env={"PREFECT_API_URL": api}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _clear_error(proc.stderr, f"the Prefect API at {api} is not answering"), proc.stderr[-3000:]
    assert "run `imgflow pipeline` again" in proc.stderr


def _start_prefect(home: Path, port: int) -> subprocess.Popen:
    """``prefect server start`` on 127.0.0.1:port with its database in ``home`` (kept across restarts)."""
    env = dict(os.environ, PREFECT_HOME=str(home))
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "a")  # noqa: SIM115 - the child writes to it until stopped
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", timeout=180, proc=proc)
    except BaseException:
        stop_process_group(proc)
        raise
    return proc


def _flow_runs(api: str) -> list[dict]:
    import httpx

    return httpx.post(f"{api}/flow_runs/filter", json={}, timeout=30).json()


@pytest.mark.slow
def test_prefect_server_gone_mid_flow_fails_clearly_and_the_next_run_works(tmp_path: Path) -> None:
    home, port = tmp_path / "prefect", free_port()
    home.mkdir()
    api = f"http://127.0.0.1:{port}/api"
    project = tmp_path / "project"
    project.mkdir()
    write_small_params(project, max_per_class=10, epochs=2, audit={"enabled": False})
    server = _start_prefect(home, port)
    try:
        # Few client retries, so the run gives up in seconds once the server is gone.
        env = {"PREFECT_API_URL": api, "PREFECT_CLIENT_MAX_RETRIES": "1"}
        run = _start(project, "pipeline", env=env)
        _wait_for(lambda: (project / "outputs/train/run.json").exists(), run, timeout=600, what="training")
        stop_process_group(server)  # gone while the train task runs
        rc, _, err = run.finish()
        assert rc == 2 and _clear_error(err, f"the Prefect API at {api} stopped answering"), err[-4000:]
        version = data_version(project / "data" / "manifest.parquet")  # what ingest wrote is kept

        # Back on the same port and database: the next run works (the project lock was released).
        server = _start_prefect(home, port)
        again = run_cli("pipeline", "--json", cwd=project, env=env, timeout=900)
        assert again.returncode in (0, 3), again.stderr[-4000:]
        out = json.loads(again.stdout)
        assert out["ingest"]["data_version"] == version and out["register"]["version"]
        states = {r["state_type"] for r in _flow_runs(api)}
        assert "COMPLETED" in states or again.returncode == 3
    finally:
        stop_process_group(server)


@pytest.mark.slow
def test_prefect_server_restarted_mid_flow_the_run_finishes(tmp_path: Path) -> None:
    """Back within the client's retries (PREFECT_CLIENT_MAX_RETRIES, default 5: 2+4+8+16+32 s)."""
    home, port = tmp_path / "prefect", free_port()
    home.mkdir()
    api = f"http://127.0.0.1:{port}/api"
    project = tmp_path / "project"
    project.mkdir()
    write_small_params(project, max_per_class=10, epochs=2, audit={"enabled": False})
    server = _start_prefect(home, port)
    try:
        run = _start(project, "pipeline", "--json", env={"PREFECT_API_URL": api})
        _wait_for(lambda: (project / "data/manifest.parquet").exists(), run, timeout=600, what="ingest")
        _crash(server)
        server = _start_prefect(home, port)
        rc, out, err = run.finish()
        assert rc in (0, 3), err[-4000:]
        assert json.loads(out)["register"]["version"]
    finally:
        stop_process_group(server)


# --------------------------------------------------------------------------- 3. disk full


@contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A ``size`` tmpfs mounted on ``path`` for the block; unmounted in any case."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the fault-injection disk-full tests run as root)")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"mount is not permitted here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)  # busy: detach it now


def _fill(folder: Path, *, leave: int) -> Path:
    """A file that takes all free space of ``folder``'s file system but ``leave`` bytes."""
    filler = folder / "filler.bin"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(folder).free - leave)
    return filler


def _check_data(data: Path, seen: int) -> None:
    """The ingest files are whole and from one run; every stored image is what its row says."""
    manifest = read_manifest(data / "manifest.parquet")
    quarantine = pd.read_csv(data / "quarantine.csv", dtype=str, keep_default_na=False)
    assert len(manifest) + len(quarantine) == seen
    for rel, image_id in zip(manifest["path"], manifest["image_id"], strict=True):
        assert hashlib.sha256((data / rel).read_bytes()).hexdigest() == image_id


def test_disk_full_during_ingest_exits_7_keeps_the_data_version_and_a_rerun_succeeds(tmp_path: Path) -> None:
    write_small_params(tmp_path, max_per_class=3)
    data = tmp_path / "data"
    with _tmpfs(data, "4m"):
        first = run_cli("ingest", "--json", cwd=tmp_path, timeout=300)
        assert first.returncode == 0, first.stderr[-3000:]
        seen, version = json.loads(first.stdout)["seen"], data_version(data / "manifest.parquet")
        filler = _fill(data, leave=16 * 1024)
        full = run_cli("ingest", "--json", "--set", "ingest.max_per_class=30", cwd=tmp_path, timeout=300)
        assert full.returncode == DISK_FULL_EXIT, full.stderr[-3000:]
        assert _clear_error(full.stderr, f"disk full: {data.resolve()} ("), full.stderr[-3000:]
        assert full.stdout == ""  # no result for a script to trust
        # What the next stage reads is still the previous version, whole.
        _check_data(data, seen)
        assert data_version(data / "manifest.parquet") == version

        filler.unlink()  # space freed: the same command now succeeds and leaves no temporary file
        again = run_cli("ingest", "--json", "--set", "ingest.max_per_class=30", cwd=tmp_path, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        summary = json.loads(again.stdout)
        assert summary["seen"] > seen
        _check_data(data, summary["seen"])
        assert data_version(data / "manifest.parquet") != version and not _temps(data)


def test_disk_full_is_found_along_the_cause_chain_and_names_the_file(tmp_path: Path) -> None:
    import errno

    from flows.cli import _disk_full, _disk_full_message

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.safetensors"))
    try:
        try:
            raise full
        except OSError as e:
            raise RuntimeError("worker failed") from e
    except RuntimeError as wrapped:
        assert _disk_full(wrapped) is full
    assert _disk_full(RuntimeError("Error while serializing: IoError(No space left on device (os error 28))"))
    assert _disk_full(OSError(errno.EACCES, "Permission denied")) is None
    assert _disk_full(ValueError("bad value")) is None
    message = _disk_full_message(full)
    assert (
        message.startswith(f"disk full: {tmp_path.resolve() / 'model.safetensors'} (")
        and "KiB free" in message
    )


@pytest.mark.slow
def test_disk_full_during_evaluate_exits_7_register_refuses_then_a_rerun_succeeds(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """outputs/ on a small tmpfs: evaluate fills it; register never reads a half-written evaluation."""
    from components.core.config import load_params
    from components.pipeline.stages import StagePaths

    write_small_params(
        tmp_path, max_per_class=10,
        evaluate={"robustness": {"max_images": 30, "families": ["contrast"]}, "adversarial": {"enabled": False}},
    )  # fmt: skip
    assert run_cli("ingest", cwd=tmp_path, timeout=300).returncode == 0
    outputs = tmp_path / "outputs"
    with _tmpfs(outputs, "16m"):
        shutil.copytree(tiny_model_dir, outputs / "train" / "model")
        params = load_params(tmp_path / "params.yaml")
        tracking.configure(None, state_dir=tmp_path / ".imgflow")
        run = tracking.start_run(
            tracking.ensure_experiment(params.register_.experiment, artifact_root=tmp_path / ".imgflow/mlartifacts"),
            run_name="tiny", params={}, tags={}, tracking_uri="local",
        )  # fmt: skip
        info = {**run.to_dict(), "data_version": data_version(tmp_path / "data/manifest.parquet"),
                "git_commit": "test", "params_hash": params.fingerprint()}  # fmt: skip
        (tmp_path / StagePaths(params).run_file).write_text(json.dumps(info))
        filler = _fill(outputs, leave=24 * 1024)
        full = run_cli("evaluate", cwd=tmp_path, timeout=600)
        assert full.returncode == DISK_FULL_EXIT, full.stderr[-3000:]
        assert _clear_error(full.stderr, f"disk full: {outputs.resolve()} ("), full.stderr[-3000:]
        refused = run_cli("register", cwd=tmp_path, timeout=300)
        assert refused.returncode == 2 and "imgflow evaluate" in refused.stderr, refused.stderr[-3000:]

        filler.unlink()
        assert run_cli("evaluate", cwd=tmp_path, timeout=600).returncode == 0
        registered = run_cli("register", "--json", cwd=tmp_path, timeout=600)
        assert registered.returncode in (0, 3), registered.stderr[-3000:]
        assert json.loads((outputs / "register" / "registration.json").read_text())["version"] == "1"
        assert not _temps(outputs)

"""One writer per project: two real processes on one project folder.

The holder is a separate Python process taking the product's lock (``components.core.lock``) the
way every writing command does; the second is the real ``imgflow`` CLI. Commands that get past the
lock are pointed at a source that does not exist, so they end at once with exit code 2 — proof
that they ran instead of waiting or exiting with the lock's code 6.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from components.core.errors import ConfigError
from components.core.lock import HOLDER_FILE, LOCKED_EXIT_CODE, ProjectLockedError, holds, project_lock
from tests.conftest import REPO, run_cli, write_small_params

HOLDER = """
import sys, time
from pathlib import Path
from components.core.lock import project_lock
with project_lock(Path(sys.argv[1]), command=sys.argv[2]):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
"""
MISSING_SOURCE = ("--source", "imagefolder:no-such-folder")


def _hold(project: Path, *, command: str = "pipeline", seconds: float = 60) -> subprocess.Popen[str]:
    """Another run holding ``project``'s lock (own session, so the test can kill it by PID)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(project / ".imgflow"), command, str(seconds)],
        cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    write_small_params(tmp_path)
    return tmp_path


def test_second_run_exits_with_the_lock_code_naming_the_holder(project: Path) -> None:
    holder = _hold(project, command="pipeline")
    try:
        for args in (("ingest",), ("pipeline",)):  # pipeline: refused before Prefect starts
            started = time.monotonic()
            proc = run_cli(*args, cwd=project, timeout=120)
            assert proc.returncode == LOCKED_EXIT_CODE, proc.stderr
            message = " ".join(proc.stderr.split())
            assert f"locked by `imgflow pipeline` (PID {holder.pid} on " in message, message
            assert "--wait SECONDS" in message and "started " in message
            assert time.monotonic() - started < 60
        assert not (project / "data" / "manifest.parquet").exists()  # nothing was written
    finally:
        _stop(holder)


def test_wait_lets_the_second_run_start_once_the_first_ends(project: Path) -> None:
    holder = _hold(project, seconds=3)
    try:
        started = time.monotonic()
        proc = run_cli("ingest", *MISSING_SOURCE, "--wait", "60", cwd=project, timeout=120)
        waited = time.monotonic() - started
    finally:
        _stop(holder)
    assert proc.returncode == 2, proc.stderr  # it ran: the missing folder is reported
    assert "no-such-folder" in proc.stderr and waited > 1.5
    assert not (project / ".imgflow" / HOLDER_FILE).exists()  # each holder removes its sidecar


def test_a_killed_holder_does_not_block(project: Path) -> None:
    holder = _hold(project, command="train")
    os.killpg(holder.pid, signal.SIGKILL)  # no clean-up runs: the sidecar stays behind
    holder.wait(timeout=30)
    assert (project / ".imgflow" / HOLDER_FILE).exists()
    proc = run_cli("ingest", *MISSING_SOURCE, cwd=project, timeout=120)
    assert proc.returncode == 2, proc.stderr  # the OS released the dead process's lock
    assert "no-such-folder" in proc.stderr


def test_the_flow_takes_the_lock_too(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduled run (no CLI around it) is refused the same way, before any stage runs."""
    from flows.pipeline import pipeline

    monkeypatch.chdir(project)
    holder = _hold(project, command="ingest")
    try:
        with pytest.raises(ProjectLockedError, match=rf"`imgflow ingest` \(PID {holder.pid} "):
            pipeline.fn(params_path=str(project / "params.yaml"))
    finally:
        _stop(holder)
    assert not (project / "data").exists()


def test_reentrant_in_one_process_across_threads(tmp_path: Path) -> None:
    """The flow holds it while its stages (maybe in other threads) take it again; released once."""
    state = tmp_path / ".imgflow"
    inner: list[object] = []
    with project_lock(state, command="pipeline") as outer:
        assert outer is not None and holds(state)
        worker = threading.Thread(target=lambda: inner.append(_enter(state)))
        worker.start()
        worker.join(timeout=30)
        with project_lock(state, command="ingest") as again:
            assert again is None and holds(state)
        assert holds(state)
    assert inner == [None] and not holds(state)
    assert not (state / HOLDER_FILE).exists()


def _enter(state: Path) -> object:
    with project_lock(state, command="audit", wait_s=0) as held:
        return held


def test_read_only_commands_do_not_take_it(project: Path) -> None:
    holder = _hold(project)
    try:
        proc = run_cli("models", "--json", cwd=project, timeout=300)
    finally:
        _stop(holder)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_negative_wait_is_a_usage_error(tmp_path: Path) -> None:
    with (
        pytest.raises(ConfigError, match="must be >= 0"),
        project_lock(tmp_path, command="ingest", wait_s=-1),
    ):
        pass

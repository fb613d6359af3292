"""Crash consistency: ``kill -9`` the real CLI stages at seeded random moments, then check what a
later stage would read.

Invariants after every kill: the manifest, the quarantine list and dataset.json are readable and
come from one run (``ingested + quarantined = seen`` for the source they name; every stored image
matches its content address); the issue ledger is readable without duplicate rows; a stage output
folder is either complete or marked incomplete, and then the next stage refuses it; registry
aliases agree with the promotion log (at most the one move the killed run had logged but not
applied, which the next lock holder completes). Then a normal re-run succeeds and leaves no
temporary file behind.

Default suite: 4 kills of ``imgflow ingest`` (two alternating sources) and 2 of ``imgflow audit``,
plus the registry's crash states on a local store. ``slow``: more kills, and ``imgflow evaluate`` /
``imgflow register`` against an MLflow server.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from components.core.errors import DataError
from components.data.manifest import data_version, read_manifest
from components.quality.ledger import read_ledger
from components.registry import promotion_log, registry, tracking
from tests.conftest import BIN, REPO, fmnist_arrays, png_bytes, run_cli, write_small_params

FMNIST = "fashion-mnist"
INCOMPLETE = ".incomplete.json"


# --------------------------------------------------------------------------- running and killing


def _start(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The installed CLI in its own session (so the whole process group can be killed by PID)."""
    full_env = dict(os.environ, PREFECT_HOME=str(project / ".prefect"))
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.update(env or {})
    return subprocess.Popen(
        [str(BIN / "imgflow"), *args], cwd=project, env=full_env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _kill_after(
    proc: subprocess.Popen[str], seconds: float, *, when: Callable[[], bool] | None = None
) -> bool:
    """SIGKILL ``proc``'s process group ``seconds`` after ``when()`` first holds (default: now);
    False when it finished first (then it must have succeeded; the invariants hold for that too)."""
    while when is not None and not when() and proc.poll() is None:
        time.sleep(0.02)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    if proc.poll() is not None:
        stderr = proc.communicate()[1]
        assert proc.returncode == 0, stderr[-3000:]  # a run the kill missed must have succeeded
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    return True


def _timed(project: Path, *args: str, env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.monotonic()
    proc = run_cli(*args, cwd=project, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.monotonic() - started, proc.stdout


def _temps(*folders: Path) -> list[Path]:
    return [
        p for f in folders if f.exists() for p in f.rglob("*") if p.name.endswith((".tmp", ".commit.json"))
    ]


# --------------------------------------------------------------------------- ingest


def _image_folder(root: Path) -> Path:
    """30 real images in 3 class folders, plus 3 that cannot be decoded and 2 byte-identical copies
    (named to sort first, so ingest.max_per_class keeps them)."""
    x, y = fmnist_arrays("t10k", 200)
    names = {0: "tshirt", 1: "trouser", 7: "sneaker"}
    kept = [(a, names[int(c)]) for a, c in zip(x, y, strict=True) if int(c) in names][:30]
    for i, (arr, label) in enumerate(kept):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i:03d}.png").write_bytes(png_bytes(arr))
    for i in range(3):
        (root / "sneaker" / f"0-broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image" + bytes([i]))
    for i, (_, label) in enumerate(kept[:2]):
        shutil.copy(root / label / f"{i:03d}.png", root / label / f"0-copy{i}.png")
    return root


def _check_data(data: Path, seen: dict[str, int]) -> None:
    """The three ingest files are whole and from one run; every stored image is what its row says."""
    manifest = read_manifest(data / "manifest.parquet")
    quarantine = pd.read_csv(data / "quarantine.csv", dtype=str, keep_default_na=False)
    info = json.loads((data / "dataset.json").read_text())
    source = info["source"]
    assert set(manifest["source"]) | set(quarantine["source"]) == {source}
    assert len(manifest) + len(quarantine) == seen[source], (source, len(manifest), len(quarantine))
    counted = sum(sum(per_class.values()) for per_class in info["counts"].values())
    assert counted == len(manifest)  # single-label: dataset.json counts the manifest it came with
    for rel, image_id in zip(manifest["path"], manifest["image_id"], strict=True):
        assert hashlib.sha256((data / rel).read_bytes()).hexdigest() == image_id


def _ingest_kill_loop(project: Path, *, kills: int, seed: int) -> None:
    folder = _image_folder(project / "photos")
    sources = [FMNIST, f"imagefolder:{folder}"]
    seen, took = {}, {}
    for spec in sources:  # a clean run of each: how many items each source lists, and how long it takes
        took[spec], out = _timed(project, "ingest", "--source", spec, "--json")
        summary = json.loads(out)
        seen[spec] = summary["seen"]
    assert summary["quarantined"] > 0  # the folder's broken files and copies: both files matter
    _kill_between_renames(project, FMNIST, seen)
    rng, killed = random.Random(seed), 0
    for i in range(kills):
        spec = sources[i % 2]
        proc = _start(project, "ingest", "--source", spec)
        killed += _kill_after(proc, rng.uniform(0.2, 1.0) * took[spec])
        _check_data(project / "data", seen)
    # Later runs are quicker than the timed first ones (warm caches): some kills come too late.
    assert killed >= 1, "every run ended before its kill: nothing was tested"
    _timed(project, "ingest", "--source", FMNIST)  # a normal re-run
    _check_data(project / "data", seen)
    assert not _temps(project / "data"), _temps(project / "data")


KILL_ON_QUARANTINE_RENAME = """
import os, signal, sys
real_replace = os.replace

def replace(src, dst, *args, **kwargs):
    # the ingest commit renames the manifest, then the quarantine list: die between the two
    if str(dst).endswith("quarantine.csv") and os.path.exists(os.path.join(os.path.dirname(dst), ".ingest.commit.json")):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)

os.replace = replace
from flows.cli import main
sys.argv = ["imgflow", "ingest", "--source", sys.argv[1]]
main()
"""


def _kill_between_renames(project: Path, spec: str, seen: dict[str, int]) -> None:
    """The narrowest window: ``kill -9`` after the new manifest is renamed into place and before the
    quarantine list is. On disk the two disagree; the next locked command completes the commit."""
    from components.core.lock import project_lock

    env = dict(os.environ, PREFECT_HOME=str(project / ".prefect"), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", KILL_ON_QUARANTINE_RENAME, spec], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    data = project / "data"
    assert (data / ".ingest.commit.json").exists()
    assert set(read_manifest(data / "manifest.parquet")["source"]) == {spec}  # new
    assert json.loads((data / "dataset.json").read_text())["source"] != spec  # still the old one
    with project_lock(project / ".imgflow", command="validate", complete=[data]):
        _check_data(data, seen)  # what every command sees: the new version, whole
    assert json.loads((data / "dataset.json").read_text())["source"] == spec


def test_ingest_killed_at_random_keeps_one_whole_data_version(tmp_path: Path) -> None:
    write_small_params(tmp_path, max_per_class=10)
    _ingest_kill_loop(tmp_path, kills=4, seed=22)


@pytest.mark.slow
def test_ingest_killed_many_times(tmp_path: Path) -> None:
    write_small_params(tmp_path, max_per_class=40)
    _ingest_kill_loop(tmp_path, kills=16, seed=2022)


# --------------------------------------------------------------------------- audit


def _check_audit(project: Path) -> None:
    """The ledger is readable with one row per (version, image, issue); the audit folder is either
    complete (its summary agrees with its exclusions) or marked, and then training refuses it."""
    from components.core.config import load_params
    from components.pipeline.stages import _exclusions

    ledger = read_ledger(project / ".imgflow" / "audit-ledger")
    assert not ledger.duplicated(["data_version", "image_id", "issue"]).any()
    out = project / "outputs" / "audit"
    params = load_params(project / "params.yaml", ["audit.action=exclude"])
    cwd = Path.cwd()
    os.chdir(project)
    try:
        if (out / INCOMPLETE).exists():
            with pytest.raises(DataError, match="incomplete.*run `imgflow audit` again"):
                _exclusions(params)
            return
        if not (out / "summary.json").exists():
            return  # killed before its first audit wrote anything
        summary = json.loads((out / "summary.json").read_text())
        excluded = pd.read_csv(_exclusions(params))
    finally:
        os.chdir(cwd)
    assert summary["excluded"] == len(excluded)
    assert summary["data_version"] == data_version(project / "data" / "manifest.parquet")


def _audit_kill_loop(project: Path, *, kills: int, seed: int) -> None:
    rng, killed = random.Random(seed), []
    marker = project / "outputs" / "audit" / INCOMPLETE
    for i in range(kills):
        # alternate the action: excluded.csv and summary.json differ between consecutive runs
        action = ("exclude", "report")[i % 2]
        proc = _start(project, "audit", "--set", f"audit.action={action}")
        # the interesting moments: once the audit starts writing (its folder is marked) until it ends
        killed.append(_kill_after(proc, rng.uniform(0.0, 1.5), when=marker.exists))
        _check_audit(project)
    assert any(killed), "every audit ended before its kill: nothing was tested"
    _timed(project, "audit", "--set", "audit.action=exclude")  # a normal re-run
    assert not marker.exists()
    _check_audit(project)
    assert not _temps(project / "outputs" / "audit", project / ".imgflow" / "audit-ledger")


def test_audit_killed_while_writing_leaves_ledger_and_outputs_consistent(tmp_path: Path) -> None:
    write_small_params(tmp_path, max_per_class=10)
    _timed(tmp_path, "ingest")
    _audit_kill_loop(tmp_path, kills=2, seed=7)


@pytest.mark.slow
def test_audit_killed_many_times(tmp_path: Path) -> None:
    write_small_params(tmp_path, max_per_class=20)
    _timed(tmp_path, "ingest")
    _audit_kill_loop(tmp_path, kills=8, seed=77)


# --------------------------------------------------------------------------- registry crash states


def _check_aliases(name: str, *, pending_ok: bool) -> None:
    """Every alias points where its last log entry says; with ``pending_ok`` an alias may still be
    at its last entry's ``from`` (a move the killed run logged and the next lock holder completes)."""
    last = {e["alias"]: e for e in registry.read_log(name)}
    now = registry.aliases(name)
    for alias, target in now.items():
        if alias not in last:
            assert target is None, (alias, target)
            continue
        entry = last[alias]
        allowed = {str(entry["to"])} | ({entry["from"] and str(entry["from"])} if pending_ok else set())
        assert target in allowed, (alias, target, entry)


def _version(client: MlflowClient, name: str, art: Path) -> str:
    exp = tracking.ensure_experiment("crash-tests", artifact_root=art)
    run = client.create_run(exp)
    client.log_text(run.info.run_id, "weights", "model/weights.txt")
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    tags = {"gates_passed": "true", "failed_gates": "", "test_accuracy": "0.9000"}
    return str(client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                           tags=tags).version)  # fmt: skip


HOLD_PROMOTION_LOCK = """
import sys, time
from components.registry import registry, tracking
from pathlib import Path
tracking.configure(sys.argv[1], state_dir=Path(sys.argv[2]))
with registry.promotion_lock(sys.argv[3]):
    print("held", flush=True)
    time.sleep(300)
"""


def test_registry_completes_a_half_done_move_and_breaks_a_killed_holders_lock(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.configure(uri, state_dir=tmp_path)
    client, name, art = MlflowClient(), "crash-reg", tmp_path / "artifacts"
    v1, v2 = _version(client, name, art), _version(client, name, art)
    registry.promote(name, v1)
    # What `kill -9` between a move's two writes leaves: the log says champion v1 -> v2 (written
    # first), the alias still says v1.
    entry = {"action": "promote", "alias": "champion", "from": v1, "to": v2, "who": "killed@run",
             "when": "2026-01-01T00:00:00+00:00", "why": "killed mid-move", "forced": False, "gates": {}}  # fmt: skip
    promotion_log.append(client, name, entry, registry.Retry())
    _check_aliases(name, pending_ok=True)
    # A register killed while holding the promotion lock: its lease runs 120 s, but the holder is
    # dead on this machine, so the next holder does not wait for the lease.
    holder = subprocess.Popen([sys.executable, "-c", HOLD_PROMOTION_LOCK, uri, str(tmp_path), name],
                              cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    started = time.monotonic()
    registry.record_registration(name, v2, gates_passed=True, lock_timeout_s=30)
    assert time.monotonic() - started < 30
    assert registry.aliases(name)["champion"] == v2  # the logged move was completed
    _check_aliases(name, pending_ok=False)
    assert registry.rollback(name)["to"] == v1  # the lineage the log tells is the real one
    _check_aliases(name, pending_ok=False)


def test_register_refuses_an_evaluation_a_kill_left_half_written(tmp_path: Path, monkeypatch) -> None:
    from components.core.config import load_params
    from components.pipeline.stages import run_register

    write_small_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "outputs" / "evaluate"
    out.mkdir(parents=True)
    (out / INCOMPLETE).write_text(json.dumps({"stage": "evaluate", "started_at": "2026-01-01T00:00:00"}))
    with pytest.raises(DataError, match=r"outputs/evaluate is incomplete.*run `imgflow evaluate` again"):
        run_register(load_params(tmp_path / "params.yaml"))


# --------------------------------------------------------------------------- evaluate and register (slow)


def _trained_project(project: Path, model_dir: Path, uri: str) -> dict[str, str]:
    """What `imgflow train` leaves: outputs/train/model (the tiny model) and run.json of an MLflow run."""
    from components.core.config import load_params
    from components.pipeline.stages import StagePaths

    write_small_params(
        project, max_per_class=20, register={"tracking_uri": uri, "model_name": "crash-test"},
        evaluate={"robustness": {"max_images": 50, "families": ["contrast"]}, "adversarial": {"enabled": False}},
    )  # fmt: skip
    env = {"MLFLOW_TRACKING_URI": uri}
    _timed(project, "ingest", env=env)
    params = load_params(project / "params.yaml")
    paths = StagePaths(params)
    shutil.copytree(model_dir, project / "outputs" / "train" / "model")
    tracking.configure(uri, state_dir=project / ".imgflow")
    run = tracking.start_run(tracking.ensure_experiment(params.register_.experiment), run_name="t", params={},
                             tags={}, tracking_uri=uri)  # fmt: skip
    manifest = project / "data" / "manifest.parquet"
    info = {**run.to_dict(), "data_version": data_version(manifest), "git_commit": "test",
            "params_hash": params.fingerprint()}  # fmt: skip
    (project / paths.run_file).write_text(json.dumps(info))
    return env


def _check_evaluation(project: Path) -> None:
    out = project / "outputs" / "evaluate"
    if (out / INCOMPLETE).exists() or not (out / "gates.json").exists():
        return  # register refuses a marked folder (tested below and in the default suite)
    gates = json.loads((out / "gates.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert np.isfinite(gates["temperature"]) and "champion" in report


@pytest.mark.slow
def test_evaluate_and_register_killed_at_random(
    tmp_path: Path, mlflow_server: dict, tiny_model_dir: Path
) -> None:
    uri = mlflow_server["uri"]
    env = _trained_project(tmp_path, tiny_model_dir, uri)
    rng = random.Random(11)
    took, _ = _timed(tmp_path, "evaluate", env=env)
    for _ in range(3):
        _kill_after(_start(tmp_path, "evaluate", env=env), rng.uniform(0.3, 1.0) * took)
        _check_evaluation(tmp_path)
    if (tmp_path / "outputs" / "evaluate" / INCOMPLETE).exists():
        refused = run_cli("register", cwd=tmp_path, env=env)
        assert refused.returncode == 2 and "run `imgflow evaluate` again" in refused.stderr
    _timed(tmp_path, "evaluate", env=env)
    _check_evaluation(tmp_path)

    tracking.configure(uri, state_dir=tmp_path / ".imgflow")
    took, _ = _timed(tmp_path, "register", env=env)
    _check_aliases("crash-test", pending_ok=False)
    for _ in range(5):
        _kill_after(_start(tmp_path, "register", env=env), rng.uniform(0.3, 1.0) * took)
        _check_aliases("crash-test", pending_ok=True)
    _, out = _timed(tmp_path, "register", "--json", env=env)
    _check_aliases("crash-test", pending_ok=False)
    registration = json.loads(out)
    assert json.loads((tmp_path / "outputs" / "register" / "registration.json").read_text()) == registration
    assert registration["aliases"] and "candidate" in registration["aliases"]
    assert not _temps(tmp_path / "outputs", tmp_path / "data")

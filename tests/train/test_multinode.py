"""A real two-node Ray cluster: `imgflow train` spreads its workers over both nodes, keeps its
checkpoints on shared storage (``train.storage_path``) and survives the loss of one node's worker.

Two Ray nodes on 127.0.0.1 (a head with one CPU and the dashboard, a worker node with one CPU and a
``second_node`` resource) in one process of their own session, so the test stops exactly what it
started, by process group. The driver is the `imgflow` CLI with ``RAY_ADDRESS`` set and nothing
else about the cluster; ``IMGFLOW_WORKER_EVENTS`` only lets the test see each worker's PID mid-epoch.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from ray.util.state import list_actors

from components.core.config import TrainConfig
from components.train.ray_adapter import storage_location
from tests.conftest import free_port, run_cli, write_small_params

EPOCHS = 4


@dataclass(frozen=True)
class Cluster:
    address: str
    dashboard: str
    head_node: str
    second_node: str
    """Node ids (hex) of the head and of the worker node."""


_CLUSTER_SCRIPT = """
import json, signal, sys, time
from ray.cluster_utils import Cluster

dash_port = int(sys.argv[1])
cluster = Cluster(
    initialize_head=True,
    head_node_args=dict(num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=True,
                        dashboard_host="127.0.0.1", dashboard_port=dash_port),
)
cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"second_node": 1})
cluster.wait_for_nodes()
signal.signal(signal.SIGTERM, lambda *_: (cluster.shutdown(), sys.exit(0)))
print(json.dumps({"address": cluster.address, "head_node": cluster.head_node.node_id,
                  "second_node": next(iter(cluster.worker_nodes)).node_id}), flush=True)
while True:
    time.sleep(1)
"""
"""Two Ray nodes on 127.0.0.1, kept up until SIGTERM (then shut down by Ray, node by node).

``ray.cluster_utils.Cluster`` rather than two ``ray start`` processes: ``ray start`` rewrites
``--node-ip-address=127.0.0.1`` to the machine's external address (and refuses to join a worker node
when told to stay on loopback), so its GCS would listen on every interface."""


def _start_cluster(temp_dir: str, dash_port: int) -> tuple[subprocess.Popen, dict[str, str]]:
    """The cluster process (its own session) and what it printed: address and node ids."""
    # RAY_TMPDIR: the nodes' sessions, and the "latest cluster" file a bare ray.init() would connect
    # to, stay in this cluster's folder (not /tmp/ray, where other Ray runtimes on the machine look).
    env = dict(os.environ, RAY_TMPDIR=temp_dir, RAY_USAGE_STATS_ENABLED="0", RAY_worker_niceness="0")
    with open(Path(temp_dir) / "cluster.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CLUSTER_SCRIPT, str(dash_port)],
            stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True,
        )  # fmt: skip
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 300)  # a cluster that never comes up: no hang
    line = proc.stdout.readline() if ready else ""
    if not line:
        _stop(proc, temp_dir)
        raise RuntimeError(
            f"the Ray cluster did not start: {(Path(temp_dir) / 'cluster.log').read_text()[-3000:]}"
        )
    return proc, json.loads(line)


def _stop(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the cluster process (Ray stops its nodes), SIGKILL its group if it lingers; then any
    process still running from this cluster's folder (a worker in a group of its own), by PID."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for p in psutil.process_iter(["pid", "cmdline"]):
        if temp_dir in " ".join(p.info["cmdline"] or []):
            p.kill()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix sockets live under it
    dash_port = free_port()
    proc, info = _start_cluster(temp_dir, dash_port)
    try:
        yield Cluster(
            info["address"], f"http://127.0.0.1:{dash_port}", info["head_node"], info["second_node"]
        )
    finally:
        _stop(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _train_workers(dashboard: str) -> dict[int, str]:
    """PID -> node id of every Ray Train worker actor the cluster has run (dead ones too)."""
    actors = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                         limit=1000)  # fmt: skip
    return {int(a.pid): a.node_id for a in actors if a.pid}


def _node_of(cluster: Cluster, pid: int) -> str | None:
    try:
        return _train_workers(cluster.dashboard).get(pid)
    except Exception:  # the state API timed out on a busy machine: ask again at the next event
        return None


def _kill_second_node_worker(
    events: Path, run_dir: Path, cluster: Cluster, *, killed: list[dict[str, Any]], stop: threading.Event
) -> None:
    """Once the controller has registered a checkpoint on the shared storage, SIGKILL (by PID) the
    worker running on the second node the next time it is inside an epoch."""
    registered_at = None
    while not stop.is_set():
        if registered_at is None:
            registered_at = time.time() if (run_dir / "checkpoint_manager_snapshot.json").exists() else None
        else:
            later = [e for e in _events(events) if e["phase"] == "mid_epoch" and e["time"] > registered_at]
            for event in later:
                if _node_of(cluster, event["pid"]) == cluster.second_node:
                    os.kill(event["pid"], signal.SIGKILL)
                    killed.append(event)
                    return
        time.sleep(0.05)


@pytest.mark.slow
def test_two_node_training_on_shared_storage_survives_a_killed_worker(
    cluster: Cluster, tmp_path: Path
) -> None:
    shared = tmp_path / "shared-storage"  # what every node mounts (NFS on a real cluster)
    write_small_params(
        tmp_path, max_per_class=100, epochs=EPOCHS,
        train={"workers": 2, "cpus_per_worker": 1, "batch_size": 16, "max_failures": 1,
               "storage_path": str(shared)},
    )  # fmt: skip
    assert run_cli("ingest", "--json", cwd=tmp_path).returncode == 0

    events = tmp_path / "worker-events.jsonl"
    env = {"RAY_ADDRESS": cluster.address, "IMGFLOW_WORKER_EVENTS": str(events)}
    killed: list[dict[str, Any]] = []
    stop = threading.Event()
    t0 = time.monotonic()
    killer = threading.Thread(target=_watch_and_kill, args=(events, shared, cluster, killed, stop))
    killer.start()
    try:
        done = run_cli("train", "--json", cwd=tmp_path, env=env, timeout=900)
    finally:
        stop.set()
        killer.join()
    seconds = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"2-node train with one worker killed: {seconds:.0f} s")

    # Workers on both nodes, before and after the restart (read from the cluster: actor -> node id).
    placed = _train_workers(cluster.dashboard)
    starts = [e for e in _events(events) if e["phase"] == "start"]
    assert len(starts) == 4, starts  # two workers, then the whole group once more after the kill
    first, second = sorted(starts, key=lambda e: e["time"])[:2], sorted(starts, key=lambda e: e["time"])[2:]
    for group in (first, second):
        assert {placed[e["pid"]] for e in group} == {cluster.head_node, cluster.second_node}, (group, placed)

    # The killed worker ran on the second node, mid-epoch; the group resumed from the last
    # checkpoint on the shared storage, not from scratch and not past the killed epoch.
    assert len(killed) == 1, "the second node's worker was never seen inside an epoch after a checkpoint"
    assert placed[killed[0]["pid"]] == cluster.second_node
    resumed = {e["start_epoch"] for e in second}
    assert len(resumed) == 1 and 1 <= resumed.pop() <= killed[0]["epoch"]

    history = json.loads((tmp_path / "outputs" / "train" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    assert history[-1]["val_accuracy"] > 0.3  # 10 classes: chance is 0.1
    (run_dir,) = [p for p in shared.iterdir() if p.is_dir()]
    assert sorted(p.name for p in run_dir.glob("checkpoint_*"))  # checkpoints on the shared storage
    assert not (tmp_path / ".imgflow" / "ray_results").exists()  # ... and not in the local default


def _watch_and_kill(
    events: Path, shared: Path, cluster: Cluster, killed: list[dict[str, Any]], stop: threading.Event
) -> None:
    """The run's folder appears under the shared storage once Ray Train starts; then kill."""
    while not stop.is_set():
        runs = [p for p in shared.glob("*") if p.is_dir()] if shared.exists() else []
        if runs:
            _kill_second_node_worker(events, runs[0], cluster, killed=killed, stop=stop)
            return
        time.sleep(0.1)


def test_storage_path_reaches_ray_train_as_a_uri_or_an_absolute_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quick half of the test above, in the default suite: what ``RunConfig.storage_path`` gets."""
    assert TrainConfig().storage_path is None  # one machine: <state_dir>/ray_results
    assert TrainConfig(storage_path="s3://bucket/runs").storage_path == "s3://bucket/runs"
    assert storage_location("s3://bucket/runs") == "s3://bucket/runs"  # any pyarrow/fsspec URI, as is
    monkeypatch.chdir(tmp_path)
    assert storage_location("shared/runs") == str(tmp_path.resolve() / "shared" / "runs")
    assert storage_location(Path("~/runs")) == str(Path.home().resolve() / "runs")

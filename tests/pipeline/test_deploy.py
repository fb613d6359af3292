"""Scheduling: a Prefect deployment with a cron schedule on a real Prefect server (127.0.0.1), run by a
real process worker; retrain-only-on-change across two scheduled runs."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from components.core.config import load_params
from tests.conftest import BIN, REPO, run_cli, stop_process_group, write_small_params
from tests.pipeline.test_notify import webhook_listener  # noqa: F401  (fixture)

CRON = "0 3 * * 1"


def _deployment(api: str, full_name: str) -> dict:
    r = httpx.get(f"{api}/deployments/name/{full_name}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _deploy(project: Path, api: str, *args: str) -> dict:
    proc = run_cli("deploy", "--json", *args, cwd=project, env={"PREFECT_API_URL": api}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_deploy_creates_a_cron_deployment_on_a_process_pool(prefect_server: str, tmp_path: Path) -> None:
    write_small_params(tmp_path)
    out = _deploy(
        tmp_path, prefect_server, "--cron", CRON, "--name", "unit-weekly", "--work-pool", "unit-pool"
    )
    assert out["name"] == "imgflow-pipeline/unit-weekly" and out["work_pool_created"] is True
    dep = _deployment(prefect_server, "imgflow-pipeline/unit-weekly")
    assert dep["id"] == out["deployment_id"]
    ((sched,),) = [[s["schedule"] for s in dep["schedules"]]]
    assert sched["cron"] == CRON and sched["timezone"] == "UTC"
    assert dep["work_pool_name"] == "unit-pool" and dep["entrypoint"] == "flows.pipeline.pipeline"
    assert dep["parameters"] == {"params_path": "params.yaml", "overrides": [], "force": False}
    # Runs execute in the project folder (the pull step), with the loopback-only environment.
    (step,) = dep["pull_steps"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == str(tmp_path.resolve())
    assert dep["job_variables"]["env"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    pool = httpx.get(f"{prefect_server}/work_pools/unit-pool", timeout=30).json()
    assert pool["type"] == "process"
    # Deploying again updates the same deployment (new cron), it does not add one.
    again = _deploy(
        tmp_path, prefect_server, "--cron", "30 4 * * *", "--name", "unit-weekly", "--work-pool", "unit-pool"
    )
    assert again["deployment_id"] == out["deployment_id"] and again["work_pool_created"] is False
    dep = _deployment(prefect_server, "imgflow-pipeline/unit-weekly")
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["30 4 * * *"]
    bad = run_cli("deploy", "--cron", "every monday", cwd=tmp_path, env={"PREFECT_API_URL": prefect_server})
    assert bad.returncode == 2 and "bad --cron 'every monday'" in bad.stderr


def test_deploy_without_a_server_says_what_to_do(tmp_path: Path) -> None:
    write_small_params(tmp_path)
    proc = run_cli("deploy", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "PREFECT_API_URL" in proc.stderr


def test_prefect_yaml_declares_the_same_deployment(prefect_server: str, tmp_path: Path) -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    assert dep["entrypoint"] == "flows.pipeline.pipeline" and dep["name"] == "weekly-retrain"
    assert dep["schedules"][0]["cron"] == CRON and dep["work_pool"]["name"] == "imgflow-process"
    # `prefect deploy` itself accepts it (the pool must exist, as `imgflow deploy` or the UI makes it).
    write_small_params(tmp_path)
    env = dict(
        os.environ, PREFECT_API_URL=prefect_server, PREFECT_HOME=str(tmp_path / ".prefect"), PWD=str(tmp_path)
    )
    httpx.post(
        f"{prefect_server}/work_pools/", json={"name": "imgflow-process", "type": "process"}, timeout=30
    )
    proc = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file", str(REPO / "prefect.yaml"), "--name", "weekly-retrain"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    created = _deployment(prefect_server, "imgflow-pipeline/weekly-retrain")
    assert [s["schedule"]["cron"] for s in created["schedules"]] == [CRON]
    (step,) = created["pull_steps"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == str(tmp_path)


@pytest.mark.e2e
def test_pipeline_again_with_nothing_changed_is_up_to_date(
    pipeline_project: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`imgflow pipeline` on the e2e project (already trained, champion set): ingest, compare, stop."""
    project = pipeline_project["project"]
    assert pipeline_project["proc"].returncode == 0, pipeline_project["proc"].stderr[-3000:]
    trained = (project / "outputs" / "train" / "run.json").read_text()
    # Its own Prefect home (run_cli): the project's home keeps the first run alone (test_pipeline_e2e.py).
    proc = run_cli("pipeline", "--json", cwd=project, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["status"] == "up to date" and "train" not in out
    fresh = out["freshness"]
    assert fresh["retrain"] is False and fresh["champion_version"] == "1"
    assert fresh["data_version"] == out["ingest"]["data_version"]
    assert (project / "outputs" / "train" / "run.json").read_text() == trained  # no new training run
    # In-process from here (`imgflow models` itself is run by tests/pipeline/test_pipeline_e2e.py).
    monkeypatch.chdir(project)
    from components.pipeline.models import list_models
    from components.pipeline.stages import run_check_freshness

    assert [m["version"] for m in list_models(load_params("params.yaml"))] == ["1"]
    # The check itself against the same registry: a change that matters is seen, --force is honoured.
    assert run_check_freshness(load_params("params.yaml")).retrain is False
    epochs = run_check_freshness(load_params("params.yaml", ["train.epochs=1"]))
    assert epochs.retrain and epochs.reason.startswith("changed since champion: training params")
    assert run_check_freshness(load_params("params.yaml"), force=True).reason == "forced (--force)"


# --------------------------------------------------------------------------- must show: scheduled runs


def _start_worker(project: Path, api: str, pool: str) -> subprocess.Popen:
    env = dict(
        os.environ,
        PREFECT_API_URL=api,
        PREFECT_HOME=str(project / ".prefect"),
        PREFECT_WORKER_QUERY_SECONDS="2",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(project / "worker.log", "w")  # noqa: SIM115 (lives as long as the worker)
    return subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
        cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _run_deployment(api: str, name: str, timeout: float) -> dict:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        run = run_deployment(name, timeout=timeout, poll_interval=2, as_subflow=False)
    return {"id": str(run.id), "state": run.state.type.value if run.state else None, "name": run.name}


def _artifacts(api: str, flow_run_id: str) -> dict[str, dict]:
    body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    arts = httpx.post(f"{api}/artifacts/filter", json=body, timeout=30).json()
    return {a["key"]: a for a in arts if a.get("key")}


def _task_names(api: str, flow_run_id: str) -> list[str]:
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}}
    runs = httpx.post(f"{api}/task_runs/filter", json=body, timeout=30).json()
    return sorted(r["name"] for r in runs)


@pytest.mark.slow
@pytest.mark.e2e
def test_scheduled_deployment_trains_once_then_is_up_to_date(
    prefect_server: str,
    tmp_path: Path,
    webhook_listener: dict,  # noqa: F811
) -> None:
    api, pool = prefect_server, "must-show-pool"
    write_small_params(
        tmp_path,  # 30 per class, 4 epochs: the small run the e2e tests use; a lenient accuracy gate
        gates={"min_accuracy": 0.3},
        notify={"webhook_url": webhook_listener["url"], "events": ["gate_failed", "run_failed", "up_to_date", "promoted"]},
        audit={"enabled": False},
    )  # fmt: skip
    out = _deploy(tmp_path, api, "--cron", CRON, "--name", "must-show", "--work-pool", pool)
    dep = _deployment(api, "imgflow-pipeline/must-show")
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == [CRON] and dep["id"] == out["deployment_id"]
    worker = _start_worker(tmp_path, api, pool)
    try:
        t0 = time.monotonic()
        first = _run_deployment(api, "imgflow-pipeline/must-show", timeout=600)
        first_s = time.monotonic() - t0
        assert first["state"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-6000:]
        arts = _artifacts(api, first["id"])
        assert {"retrain-check", "gate-verdict", "gate-table", "registration"} <= set(arts)
        assert (
            arts["gate-verdict"]["type"] == "markdown"
            and "# Gate verdict: PASSED" in arts["gate-verdict"]["data"]
        )
        assert "MLflow run" in arts["gate-verdict"]["data"] and arts["gate-table"]["type"] == "table"
        assert "no champion yet" in arts["retrain-check"]["data"]
        names = _task_names(api, first["id"])
        assert any(n.startswith("train-model-on-ray [") and n.endswith(", 4 epochs]") for n in names), names

        t0 = time.monotonic()
        second = _run_deployment(api, "imgflow-pipeline/must-show", timeout=300)
        second_s = time.monotonic() - t0
        assert second["state"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-6000:]
        arts2 = _artifacts(api, second["id"])
        assert "gate-verdict" not in arts2 and "Up to date" in arts2["retrain-check"]["data"]
        names2 = _task_names(api, second["id"])
        assert not any(n.startswith(("train-", "evaluate-", "register-")) for n in names2), names2
        assert any(n.startswith("ingest-images") for n in names2)
    finally:
        stop_process_group(worker)
    assert [p["event"] for p in webhook_listener["posts"]] == ["promoted", "up_to_date"]
    models = json.loads(run_cli("models", "--json", cwd=tmp_path).stdout)
    assert [m["version"] for m in models] == ["1"]  # the second run registered nothing
    print(f"\nfirst scheduled run {first_s:.1f} s, second (up to date) {second_s:.1f} s")
    assert second_s < first_s / 2


# --------------------------------------------------------------------------- make ui + screenshot


def _register_with_aliases(project: Path, name: str) -> None:
    """A registered model with versions 1 (challenger) and 2 (champion) in the project's sqlite store."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / '.imgflow' / 'mlflow.db'}")
    exp = client.create_experiment(
        "imgflow", artifact_location=(project / ".imgflow" / "mlartifacts").as_uri()
    )
    client.create_registered_model(name)
    for _ in range(2):
        run = client.create_run(exp)
        client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "challenger", "1")
    client.set_registered_model_alias(name, "champion", "2")


@pytest.mark.slow
def test_make_ui_serves_both_uis_and_the_screenshot_shows_the_aliases(tmp_path: Path) -> None:
    from tests.conftest import free_port

    (tmp_path / ".imgflow").mkdir()
    _register_with_aliases(tmp_path, "imgflow-ui-test")
    ports = {"PREFECT_PORT": str(free_port()), "MLFLOW_PORT": str(free_port())}
    env = dict(os.environ, **ports, PREFECT_HOME=str(tmp_path / ".prefect"))
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    ui = str(REPO / "scripts" / "ui.sh")
    started = subprocess.run(
        [ui, "start"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
    )
    pids = [int(line.split()[1]) for line in (tmp_path / ".imgflow" / "ui" / "pids").read_text().splitlines()]
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        assert f"http://127.0.0.1:{ports['PREFECT_PORT']}" in started.stdout
        assert f"http://127.0.0.1:{ports['MLFLOW_PORT']}" in started.stdout
        assert (
            httpx.get(f"http://127.0.0.1:{ports['PREFECT_PORT']}/api/health", timeout=10).status_code == 200
        )
        shot = subprocess.run(
            [str(BIN / "python"), str(REPO / "scripts" / "screenshot_mlflow.py"), "--url",
             f"http://127.0.0.1:{ports['MLFLOW_PORT']}", "--model", "imgflow-ui-test", "--expect", "champion",
             "--expect", "challenger", "--out", str(tmp_path / "model.png")],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        result = json.loads(shot.stdout.strip().splitlines()[-1])
        if result["status"] == "skipped":
            pytest.skip(result["reason"])
        assert shot.returncode == 0 and result["found"] == ["champion", "challenger"], (
            shot.stdout + shot.stderr
        )
        assert (tmp_path / "model.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "model.png").stat().st_size > 10_000
    finally:
        stopped = subprocess.run(
            [ui, "stop"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
    assert stopped.returncode == 0, stopped.stderr
    for pid in pids:  # gone (or a zombie waiting for init to reap it)
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "State:\tZ" in status.read_text(), pid
    assert not (tmp_path / ".imgflow" / "ui" / "pids").exists()

"""Notifications: JSON posted to a webhook (a real HTTP listener on 127.0.0.1), and the summaries the
Prefect UI shows (gate verdict, retrain check)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from components.core.config import load_params
from components.evaluate.gates import GateReport, GateResult
from components.pipeline import notify
from components.pipeline.records import Evaluation
from tests.conftest import run_cli, write_small_params


@pytest.fixture()
def webhook_listener():
    """A local webhook: records every JSON POST; answers 500 to paths starting with /fail."""
    posts: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.startswith("/fail"):
                self.send_response(500)
            else:
                posts.append(json.loads(body))
                self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {
            "url": f"http://127.0.0.1:{server.server_port}/hook",
            "posts": posts,
            "port": server.server_port,
        }
    finally:
        server.shutdown()
        server.server_close()


def _gates(*, failing: bool) -> dict:
    gates = [
        GateResult(name="min_accuracy", passed=not failing, value=0.42 if failing else 0.93, threshold=0.9,
                   message="test accuracy vs 0.90"),
        GateResult(name="max_ece", passed=True, value=0.01, threshold=0.03, message="ECE", comparison="<="),
    ]  # fmt: skip
    return GateReport.of(gates).to_dict()


def test_post_webhook_delivers_json_to_a_local_listener(webhook_listener: dict) -> None:
    payload = notify.build_payload("gate_failed", summary="m v3 FAILED", model="m", version="3")
    assert notify.post_webhook(webhook_listener["url"], payload, timeout_s=5) == 204
    assert webhook_listener["posts"] == [
        {"event": "gate_failed", "text": "imgflow: m v3 FAILED", "model": "m", "version": "3"}
    ]


def test_post_webhook_errors_name_the_problem(webhook_listener: dict) -> None:
    with pytest.raises(notify.NotifyError, match="answered 500"):
        notify.post_webhook(webhook_listener["url"].replace("/hook", "/fail"), {"event": "x"}, timeout_s=5)
    port = webhook_listener["port"]
    with pytest.raises(notify.NotifyError, match="unreachable"):
        notify.post_webhook(
            f"http://127.0.0.1:{port + 1 if port < 65535 else 1}/x", {"event": "x"}, timeout_s=2
        )
    with pytest.raises(ValueError, match="unknown event"):
        notify.build_payload("finished", summary="?")


def test_notify_task_uses_params_then_env_and_only_listed_events(
    webhook_listener: dict, tmp_path: Path
) -> None:
    """The entry point's ``webhook_url`` (params, else ``$IMGFLOW_WEBHOOK_URL``) is what the task posts to."""
    from flows.environment import WEBHOOK_ENV, webhook_url
    from tasks.stages import notify as notify_task

    params = load_params(write_small_params(tmp_path))
    assert webhook_url(params, {}) is None
    assert notify_task.fn(params, webhook_url(params, {}), "gate_failed", "no url anywhere", {}) is None
    from_env = webhook_url(params, {WEBHOOK_ENV: webhook_listener["url"]})
    assert from_env == webhook_listener["url"]
    assert notify_task.fn(params, from_env, "gate_failed", "from env", {"version": "2"}) == 204
    assert notify_task.fn(params, from_env, "promoted", "not in notify.events", {}) is None
    own = load_params(tmp_path / "params.yaml", [f"notify.webhook_url={webhook_listener['url']}?p=1"])
    url = webhook_url(own, {WEBHOOK_ENV: "http://127.0.0.1:9/never-used"})
    assert url == f"{webhook_listener['url']}?p=1"  # params win over the environment
    assert notify_task.fn(own, url, "run_failed", "params win over env", {}) == 204
    assert [p["text"] for p in webhook_listener["posts"]] == [
        "imgflow: from env",
        "imgflow: params win over env",
    ]


def test_failed_run_posts_run_failed(webhook_listener: dict, tmp_path: Path) -> None:
    """A real flow run (ephemeral Prefect: the shared server's run list stays the e2e test's) fails in
    ingest; the flow's on_failure hook posts; the user's error is not retried (-v: Prefect's INFO lines,
    where a retry would be announced, are on the console)."""
    write_small_params(tmp_path, ingest={"source": f"imagefolder:{tmp_path / 'no-such-folder'}"})
    proc = run_cli(
        "pipeline", "-v", cwd=tmp_path, env={"IMGFLOW_WEBHOOK_URL": webhook_listener["url"]}, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Beginning flow run" in proc.stderr  # -v: Prefect's INFO lines are shown
    assert (
        "Finished in state Failed" in proc.stderr and "Retry 1/2 will start" not in proc.stderr
    )  # not retried
    (post,) = webhook_listener["posts"]
    assert post["event"] == "run_failed" and "no-such-folder" in post["message"]
    assert post["text"].startswith("imgflow: pipeline run ") and post["flow_run_id"]


def _evaluation(gates: GateReport) -> Evaluation:
    return Evaluation(
        task="singlelabel", headline="accuracy", value=0.42, accuracy=0.42, gates=gates, temperature=1.2,
        thresholds=None, report_html=Path("outputs/evaluate/report.html"),
        report_json=Path("outputs/evaluate/report.json"), out_dir=Path("outputs/evaluate"), run_id="abc123",
        seconds=3.0,
    )  # fmt: skip


def test_gate_markdown_shows_the_verdict_each_gate_and_the_run() -> None:
    evaluated = _evaluation(GateReport.from_dict(_gates(failing=True)))
    ref = notify.mlflow_run_ref("http://127.0.0.1:5000", "1", "abc123")
    assert ref == "[MLflow run abc123](http://127.0.0.1:5000/#/experiments/1/runs/abc123)"
    md = notify.gate_markdown(evaluated, run_ref=ref)
    assert md.startswith("# Gate verdict: FAILED") and "(min_accuracy)" in md and ref in md
    assert "test accuracy 0.4200 (temperature 1.200)" in md and "`outputs/evaluate/report.html`" in md
    rows = notify.gate_rows(evaluated.gates.to_dict())
    assert [(r["gate"], r["status"], r["threshold"]) for r in rows] == [
        ("min_accuracy", "FAIL", ">= 0.9"), ("max_ece", "pass", "<= 0.03"),
    ]  # fmt: skip
    local = notify.mlflow_run_ref("sqlite:///x/mlflow.db", "1", "abc123")
    assert "mlflow ui --backend-store-uri sqlite:///x/mlflow.db" in local and "(http" not in local


def test_io_tasks_retry_io_failures_but_not_the_users_input() -> None:
    from prefect.states import Failed

    from components.core.errors import ConfigError, DataError, DataUnavailableError, TrackingError
    from tasks.stages import retry_on_io

    def retried(exc: BaseException) -> bool:
        return retry_on_io(None, None, Failed(data=exc))

    assert retried(TrackingError("MLflow down")) and retried(DataUnavailableError("offline"))
    assert retried(OSError("connection reset")) and retried(notify.NotifyError("webhook 503"))
    assert not retried(DataError("no such folder")) and not retried(ConfigError("bad key"))

"""Screenshot the MLflow UI's registry pages in headless Chromium and check what they show.

    make ui
    python scripts/screenshot_mlflow.py --url http://127.0.0.1:5000 --model imgflow-fashion-mnist \
        --out outputs/ui/mlflow-model.png [--version 3]

    python scripts/screenshot_mlflow.py --demo --out outputs/ui/mlflow-model.png

Talks to Chromium over the DevTools protocol (loopback only): opens ``<url>/#/models/<model>``, waits
until the rendered page shows the expected text (default ``champion``), then saves a PNG; with
``--version N`` also that version's page (``<out>-v<N>.png``). Prints one JSON line per page.

``--demo`` starts its own ``mlflow server`` on 127.0.0.1 over a temporary store, registers a model
the way the register stage does (Markdown descriptions, a failed and passed gates, promotions, a
forced promotion and a rollback), and checks three pages: the model page (description rendered,
no promotion-log JSON among its tags), the failed version's page (its gate verdict and failed gate)
and the promotion log's experiment (one run per event); then stops the server it started.

Exit code 0 when every page showed what it should (or Chromium is absent: ``skipped``), 1 when not.
Needs the Debian package ``chromium``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_report import find_chromium, free_port, page_ws  # shared headless-Chromium helpers

TEXT = "JSON.stringify({text: document.body ? document.body.innerText : '', title: document.title})"


class _DevTools:
    def __init__(self, ws: Any) -> None:
        self.ws, self.next_id = ws, 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # skip events until our answer arrives
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                return dict(msg.get("result", {}))


def capture(
    url: str,
    out: Path,
    *,
    expect: list[str],
    chromium: str,
    timeout: float = 90.0,
    forbid: list[str] | None = None,
) -> dict[str, Any]:
    """Open ``url``, wait until every string in ``expect`` is in the page text, save a PNG.

    ``status`` is ``ok`` when every ``expect`` string showed and no ``forbid`` string did."""
    port = free_port()
    # ignore_cleanup_errors: a Chromium helper may still write to its profile as the folder goes
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={profile}", "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            with connect(page_ws(port), max_size=64 * 2**20) as ws:
                dt = _DevTools(ws)
                dt.call("Page.enable")
                dt.call("Page.navigate", url=url)
                deadline, page = time.monotonic() + timeout, {"text": "", "title": ""}
                while time.monotonic() < deadline:
                    got = dt.call("Runtime.evaluate", expression=TEXT, returnByValue=True)
                    page = json.loads(got["result"]["value"])
                    if all(e in page["text"] for e in expect):
                        break
                    time.sleep(0.5)
                time.sleep(0.5)  # let the last layout settle before the picture
                shot = dt.call("Page.captureScreenshot", format="png")
        finally:
            _stop(proc)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(shot["data"]))
    found = [e for e in expect if e in page["text"]]
    forbidden = [f for f in forbid or [] if f in page["text"]]
    status = "missing" if found != expect else ("unexpected" if forbidden else "ok")
    return {"status": status, "url": url, "png": str(out), "found": found, "expected": expect,
            "forbidden_found": forbidden, "title": page["title"]}  # fmt: skip


def _stop(proc: subprocess.Popen[Any]) -> None:
    """Stop a process this script started in its own session, and its children (by PID)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


# --------------------------------------------------------------------------- --demo


@contextmanager
def mlflow_server(store: Path) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 over ``store``; yields its URL, stops it by PID."""
    port = free_port()
    store.mkdir(parents=True, exist_ok=True)
    log = open(store / "server.log", "a")  # noqa: SIM115 - the child writes to it until stopped
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"mlflow server did not come up: see {store / 'server.log'}")
        yield url
    finally:
        _stop(proc)  # its own session: the server and its workers
        log.close()


def _version(name: str, gates_passed: bool, failed: tuple[str, ...], *, expected_from: Any) -> str:
    """One registration as the register stage makes it (a stand-in model and gate report)."""
    from mlflow import MlflowClient

    from components.registry import registry, tracking

    client = MlflowClient()
    run = client.create_run(tracking.ensure_experiment("imgflow-demo"), run_name="train imgflow_cnn")
    client.log_text(run.info.run_id, "(weights)", "model/model.safetensors")
    client.log_text(run.info.run_id, "<h1 id=verdict>gate report</h1>", "evaluate/report.html")
    verdict = ("PASSED: all 6 blocking gates hold." if gates_passed else
               f"FAILED: {len(failed)} of 6 gates failed (min_class_recall[Shirt]). The model must not be promoted.")  # fmt: skip
    card = registry.ModelCard(
        task="single-label", data_version="9f1c2ab7e4d05c31", git_commit="4be2c1d0a9f87e65",
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"),
        headline="accuracy 0.9312" if gates_passed else "accuracy 0.8874", gates_passed=gates_passed,
        gate_verdict=verdict, failed_gates=failed,
    )  # fmt: skip
    # the tags run_register writes
    verdicts = {
        "min_accuracy": "pass",
        "min_class_recall[Shirt]": "pass" if gates_passed else "FAIL",
        "max_ece": "pass",
    }
    tags = {"data_version": card.data_version, "git_commit": card.git_commit, "params_hash": "5d41402abc4b2a76",
            "training_run_id": run.info.run_id, "gates_passed": str(gates_passed).lower(),
            "failed_gates": "" if gates_passed else "min_class_recall[Shirt]",
            "test_accuracy": card.headline.split()[-1], "task": "singlelabel", "temperature": "1.2031",
            "gate_verdicts": json.dumps(verdicts)}  # fmt: skip
    reg = registry.register_version(f"{run.info.artifact_uri}/model", name=name, run_id=run.info.run_id,
                                    tags=tags, card=card, auto_promote=True, expected_from=expected_from)  # fmt: skip
    return reg.version


def demo(out: Path, *, chromium: str, timeout: float) -> list[dict[str, Any]]:
    """Register a model with a few promotions on a fresh server, then check its pages."""
    import mlflow

    from components.registry import promotion_log, registry, tracking

    name = "imgflow-fashion-mnist"
    with tempfile.TemporaryDirectory(prefix="imgflow-ui-") as tmp, mlflow_server(Path(tmp)) as url:
        tracking.configure(url, state_dir=Path(tmp))
        v1 = _version(name, True, (), expected_from=None)
        v2 = _version(name, False, ("recall of 'Shirt' 0.58 < 0.60 (Wilson lower bound)",), expected_from=v1)
        v3 = _version(name, True, (), expected_from=v1)
        registry.promote(name, v2, force=True, reason="hotfix for the Shirt class, approved by QA")
        registry.rollback(name, reason="canary: error rate up 3x")
        v4 = _version(name, True, (), expected_from=v3)
        exp = mlflow.MlflowClient().get_experiment_by_name(promotion_log.experiment_name(name))
        pages = [
            (f"{url}/#/models/{name}", out, ["Promotion log", "Latest registration", "T-shirt/top", "champion"],
             [registry.LOG_PREFIX, '"seq"', "**"]),
            (f"{url}/#/models/{name}/versions/{v2}", out.with_name(f"{out.stem}-v{v2}{out.suffix}"),
             ["Gates: FAILED", "recall of 'Shirt' 0.58 < 0.60", "Gate report", "Training run"], ["**", "| |"]),
            (f"{url}/#/experiments/{exp.experiment_id}/runs", out.with_name(f"{out.stem}-promotions{out.suffix}"),
             [f"champion: v{v3} → v{v4} (promote)", f"champion: v{v3} → v{v2} (promote, forced)",
              f"champion: v{v2} → v{v3} (rollback)"], []),
        ]  # fmt: skip
        return [
            capture(u, png, expect=e, forbid=f, chromium=chromium, timeout=timeout) for u, png, e, f in pages
        ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:5000", help="MLflow server (make ui prints it)")
    ap.add_argument("--model", default="imgflow-fashion-mnist", help="registered model name")
    ap.add_argument(
        "--expect", action="append", help="text the page must show (repeatable; default: champion)"
    )
    ap.add_argument("--version", action="append", default=[], help="also this version's page (repeatable)")
    ap.add_argument("--demo", action="store_true", help="own server + a registered model with promotions")
    ap.add_argument("--out", type=Path, default=Path("outputs/ui/mlflow-model.png"))
    ap.add_argument("--timeout", type=float, default=90.0)
    args = ap.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print(json.dumps({"status": "skipped", "reason": "chromium not found (apt-get install -y chromium)"}))
        return 0
    if args.demo:
        results = demo(args.out, chromium=chromium, timeout=args.timeout)
    else:
        base = f"{args.url.rstrip('/')}/#/models/{args.model}"
        pages = [(base, args.out, args.expect or ["champion"])] + [
            (f"{base}/versions/{v}", args.out.with_name(f"{args.out.stem}-v{v}{args.out.suffix}"), [f"Version {v}"])
            for v in args.version
        ]  # fmt: skip
        results = [capture(u, png, expect=e, chromium=chromium, timeout=args.timeout) for u, png, e in pages]
    for result in results:
        print(json.dumps(result))
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

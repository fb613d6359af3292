"""Screenshot the MLflow UI's registered-model page (versions and their aliases) in headless Chromium.

    make ui
    python scripts/screenshot_mlflow.py --url http://127.0.0.1:5000 --model imgflow-fashion-mnist \
        --out outputs/ui/mlflow-model.png

Talks to Chromium over the DevTools protocol (loopback only): opens ``<url>/#/models/<model>``, waits
until the rendered page shows the expected aliases (default ``champion``), then saves a PNG. Prints a
JSON line. Exit code 0 when the aliases were visible (or Chromium is absent: ``skipped``), 1 when the
page never showed them. Needs the Debian package ``chromium``.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
    url: str, out: Path, *, expect: list[str], chromium: str, timeout: float = 90.0
) -> dict[str, Any]:
    """Open ``url``, wait until every string in ``expect`` is in the page text, save a PNG."""
    port = free_port()
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={profile}", "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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
            proc.terminate()
            proc.wait(timeout=30)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(shot["data"]))
    found = [e for e in expect if e in page["text"]]
    return {"status": "ok" if found == expect else "missing", "url": url, "png": str(out), "found": found,
            "expected": expect, "title": page["title"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:5000", help="MLflow server (make ui prints it)")
    ap.add_argument("--model", default="imgflow-fashion-mnist", help="registered model name")
    ap.add_argument(
        "--expect", action="append", help="text the page must show (repeatable; default: champion)"
    )
    ap.add_argument("--out", type=Path, default=Path("outputs/ui/mlflow-model.png"))
    ap.add_argument("--timeout", type=float, default=90.0)
    args = ap.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print(json.dumps({"status": "skipped", "reason": "chromium not found (apt-get install -y chromium)"}))
        return 0
    url = f"{args.url.rstrip('/')}/#/models/{args.model}"
    result = capture(
        url, args.out, expect=args.expect or ["champion"], chromium=chromium, timeout=args.timeout
    )
    print(json.dumps(result))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())

"""Open a gate report in headless Chromium and check that its verdict is visible.

    python scripts/check_report.py outputs/evaluate/report.html

Talks to Chromium over the DevTools protocol (loopback only): loads the page, then asks the
rendered page for the verdict banner's text, CSS visibility, position and colours. Exit code 0
when the verdict (PASSED/FAILED) is visible in the first screen, 1 when not, 2 when Chromium is
missing. Needs the Debian package ``chromium`` (``apt-get install -y chromium``).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

PROBE = """(() => {
  const el = document.getElementById('verdict');
  if (!el) return JSON.stringify(null);
  const r = el.getBoundingClientRect(), s = getComputedStyle(el);
  return JSON.stringify({text: el.innerText, visible: el.checkVisibility({checkOpacity: true,
    checkVisibilityCSS: true}), top: r.top, bottom: r.bottom, height: r.height,
    viewport: window.innerHeight, color: s.color, background: s.backgroundColor,
    title: document.title});
})()"""


def find_chromium() -> str | None:
    return next(
        (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def page_ws(port: int, timeout: float = 60.0) -> str:
    """The DevTools socket of Chromium's first page (on ``port``), once the endpoint answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pages = [
                t
                for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                if t["type"] == "page"
            ]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    raise TimeoutError("Chromium's DevTools endpoint did not come up")


def _evaluate(ws: Any, expression: str) -> Any:
    ws.send(json.dumps({"id": 1, "method": "Runtime.evaluate",
                        "params": {"expression": expression, "returnByValue": True}}))  # fmt: skip
    return json.loads(ws.recv(timeout=30))["result"]["result"].get("value")


def probe_verdict(report: Path, *, chromium: str) -> dict[str, Any] | None:
    """Render ``report`` and return what the page says about its ``#verdict`` element."""
    port = free_port()
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={profile}", "--window-size=1280,900", report.resolve().as_uri()],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            with connect(page_ws(port), max_size=None) as ws:
                # The tab may still hold the initial blank document: ask until the report's
                # document is complete (or give up after ~20 s and report what is there).
                expression = f"document.readyState === 'complete' && location.href === {json.dumps(report.resolve().as_uri())}"
                for _ in range(100):
                    if _evaluate(ws, expression):
                        break
                    time.sleep(0.2)
                return json.loads(_evaluate(ws, PROBE))
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def check(info: dict[str, Any] | None) -> list[str]:
    """Problems with the rendered verdict (empty: it is visible and says PASSED or FAILED)."""
    if info is None:
        return ["the page has no #verdict element"]
    problems = []
    if not str(info["text"]).startswith(("PASSED", "FAILED")):
        problems.append(f"verdict text does not start with PASSED/FAILED: {info['text']!r}")
    if not info["visible"] or info["height"] <= 0:
        problems.append("verdict is not visible (CSS hides it or it has no height)")
    if info["top"] < 0 or info["bottom"] > info["viewport"]:
        problems.append(
            f"verdict is not in the first screen (top {info['top']}, viewport {info['viewport']})"
        )
    if info["color"] == info["background"]:
        problems.append("verdict text has the colour of its background")
    return problems


def main(argv: list[str]) -> int:
    report = Path(argv[0] if argv else "outputs/evaluate/report.html")
    chromium = find_chromium()
    if chromium is None:
        print("chromium is not installed: apt-get install -y chromium", file=sys.stderr)
        return 2
    if not report.is_file():
        print(f"{report} does not exist: run `imgflow evaluate` first", file=sys.stderr)
        return 1
    info = probe_verdict(report, chromium=chromium)
    problems = check(info)
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    if not problems and info is not None:
        print(f"ok: verdict visible at the top of {report}: {info['text']}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Open imgflow's HTML reports in headless Chromium and check that they render and read.

    python scripts/check_report.py                       # the gate, validation and audit reports in outputs/
    python scripts/check_report.py outputs/evaluate/report.html --screenshots outputs/ui
    python scripts/check_report.py outputs/audit/report.html --no-verdict

Talks to Chromium over the DevTools protocol (loopback only): loads each page, then asks the
rendered page what a reader sees. A report passes when its title (``<h1>``) and, for the gate and
validation reports, its verdict banner (PASSED/FAILED, ``#verdict``) are visible in the first
screen, the verdict's text differs in colour from its background, the page was drawn with the
report kit (``components.core.report``: one stylesheet, and it applied), no picture is broken and
nothing makes the page wider than the window. ``--screenshots DIR`` saves a full-page PNG of each.

Exit code 0 when every report passes, 1 when one does not (or is missing), 2 when Chromium is
missing. Needs the Debian package ``chromium`` (``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import base64
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

# The reports of a pipeline run, and whether each states a verdict.
DEFAULT_REPORTS = {
    "outputs/evaluate/report.html": True,
    "outputs/validate/report.html": True,
    "outputs/audit/report.html": False,
}

PROBE = """(() => {
  const box = el => { const r = el.getBoundingClientRect(); return {top: r.top, bottom: r.bottom, height: r.height}; };
  const shown = el => el.checkVisibility({checkOpacity: true, checkVisibilityCSS: true});
  const v = document.getElementById('verdict'), h1 = document.querySelector('h1');
  const layout = document.querySelector('.page'), kit = document.querySelector('meta[name=generator]');
  const root = document.documentElement;
  return JSON.stringify({
    title: document.title, viewport: window.innerHeight,
    verdict: v && {text: v.innerText, visible: shown(v), ...box(v), color: getComputedStyle(v).color,
                   background: getComputedStyle(v).backgroundColor},
    heading: h1 && {text: h1.innerText, visible: shown(h1), ...box(h1)},
    style_blocks: document.querySelectorAll('style').length,
    kit: kit ? kit.content : null,
    layout: layout ? getComputedStyle(layout).display : null,
    images: document.images.length,
    broken_images: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length,
    overflow: root.scrollWidth - root.clientWidth,
    sections: [...document.querySelectorAll('main > section > h2')].map(h => h.innerText),
    height: root.scrollHeight, width: root.clientWidth,
  });
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


class _DevTools:
    """Numbered DevTools calls on one page socket (no domain is enabled, so no events arrive)."""

    def __init__(self, ws: Any) -> None:
        self.ws, self.next_id = ws, 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                return dict(msg.get("result", {}))

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def probe(report: Path, *, chromium: str, screenshot: Path | None = None) -> dict[str, Any]:
    """Render ``report`` at 1280 x 900 and return what the page shows (see :data:`PROBE`);
    with ``screenshot``, also save a PNG of the whole page there."""
    port, uri = free_port(), report.resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={profile}", "--window-size=1280,900", uri],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            with connect(page_ws(port), max_size=None) as ws:
                dt = _DevTools(ws)
                # The tab may still hold the initial blank document: ask until the report's
                # document is complete, pictures included (or give up after ~20 s and say what is there).
                for _ in range(100):
                    if dt.evaluate(
                        f"document.readyState === 'complete' && location.href === {json.dumps(uri)}"
                    ):
                        break
                    time.sleep(0.2)
                info: dict[str, Any] = json.loads(dt.evaluate(PROBE))
                if screenshot is not None:
                    _save_screenshot(dt, screenshot, width=info["width"], height=info["height"])
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return info


def _save_screenshot(dt: _DevTools, path: Path, *, width: int, height: int) -> None:
    # The whole page, not just the first screen; capped so a huge page stays a viewable PNG.
    clip = {"x": 0, "y": 0, "width": width, "height": min(height, 16000), "scale": 1}
    shot = dt.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def check(info: dict[str, Any], *, verdict: bool = True) -> list[str]:
    """Problems a reader would meet on the rendered page (empty: none). verdict: the page must
    state one (a verdict that is there is checked either way)."""
    problems = _check_verdict(info) if verdict or info.get("verdict") else []
    heading = info.get("heading")
    if not heading or not heading["visible"] or heading["height"] <= 0:
        problems.append("the page has no visible <h1> title")
    elif heading["top"] < 0 or heading["bottom"] > info["viewport"]:
        problems.append("the title is not in the first screen")
    if not str(info.get("kit") or "").startswith("imgflow report kit"):
        problems.append("the page was not drawn with the report kit (no generator meta)")
    if info.get("style_blocks") != 1:
        problems.append(
            f"expected the report kit's one stylesheet, found {info.get('style_blocks')} <style> blocks"
        )
    if info.get("layout") != "grid":
        problems.append("the report kit's stylesheet did not apply (.page is not laid out)")
    if info.get("broken_images"):
        problems.append(f"{info['broken_images']} of {info['images']} pictures do not show")
    if info.get("overflow", 0) > 1:
        problems.append(f"something is {info['overflow']} px wider than the window (scrolls sideways)")
    return problems


def _check_verdict(info: dict[str, Any]) -> list[str]:
    v = info.get("verdict")
    if v is None:
        return ["the page has no #verdict element"]
    problems = []
    if not str(v["text"]).startswith(("PASSED", "FAILED")):
        problems.append(f"verdict text does not start with PASSED/FAILED: {v['text']!r}")
    if not v["visible"] or v["height"] <= 0:
        problems.append("verdict is not visible (CSS hides it or it has no height)")
    if v["top"] < 0 or v["bottom"] > info["viewport"]:
        problems.append(f"verdict is not in the first screen (top {v['top']}, viewport {info['viewport']})")
    if v["color"] == v["background"]:
        problems.append("verdict text has the colour of its background")
    return problems


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="*", type=Path, help="HTML reports (default: the three in outputs/)")
    parser.add_argument(
        "--no-verdict", action="store_true", help="the given reports state no verdict (audit)"
    )
    parser.add_argument("--screenshots", type=Path, help="save a full-page PNG of each report in this folder")
    args = parser.parse_args(argv)
    reports = dict.fromkeys(args.reports, not args.no_verdict) or {
        Path(p): v for p, v in DEFAULT_REPORTS.items()
    }
    chromium = find_chromium()
    if chromium is None:
        print("chromium is not installed: apt-get install -y chromium", file=sys.stderr)
        return 2
    failed = 0
    for report, needs_verdict in reports.items():
        if not report.is_file():
            print(f"FAIL: {report} does not exist: run the pipeline (`imgflow run`) first", file=sys.stderr)
            failed += 1
            continue
        shot = args.screenshots / f"{report.parent.name}-{report.stem}.png" if args.screenshots else None
        info = probe(report, chromium=chromium, screenshot=shot)
        problems = check(info, verdict=needs_verdict)
        for p in problems:
            print(f"FAIL: {report}: {p}", file=sys.stderr)
        if not problems:
            said = f"verdict {info['verdict']['text']!r}" if info.get("verdict") else "no verdict"
            print(f"ok: {report} ({info['title']}; {said}; {len(info['sections'])} sections, {info['images']} pictures)"
                  + (f"; screenshot {shot}" if shot else ""))  # fmt: skip
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

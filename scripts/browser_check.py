#!/usr/bin/env python3
"""Browser check of the explorer: start it headless, open it in headless Chromium, wait until it
has rendered, take a screenshot of the main page, and fail if the page shows an error.

    python scripts/browser_check.py [--out explorer.png] [--timeout 180] [--width 1600]

Needs the ``app`` extra (streamlit, altair) and Debian's ``chromium`` package
(``apt-get update && apt-get install -y chromium``). Everything stays on 127.0.0.1: the app on a
free port, Chromium's DevTools on another, no network access asked of either. Exit status 0: the
page rendered its headline cards and charts without an error element; 1: it showed an error
(a traceback, an error box, a lost connection) or never finished rendering; 2: a prerequisite is
missing. The screenshot is written in every case where the page could be reached, so a failure
can be looked at.

Chromium is driven over the DevTools protocol (its websocket, through the ``websockets`` package
that Streamlit installs): Streamlit draws the page with JavaScript after the load event, so a
plain ``chromium --screenshot`` would capture the skeleton before the app has run.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "explorer.py"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-default-apps", "--disable-extensions", "--mute-audio",
                  "--no-default-browser-check", "--hide-scrollbars"]

# What the page looks like, read in the browser (Streamlit's data-testid attributes).
PROBE_JS = r"""
(() => {
  const q = s => Array.from(document.querySelectorAll(s));
  const text = el => (el.innerText || "").trim().slice(0, 400);
  const main = document.querySelector('[data-testid="stMain"]') || document.body;
  return JSON.stringify({
    metrics: q('[data-testid="stMetric"]').length,
    charts: q('[data-testid="stVegaLiteChart"]').length,
    drawn: q('[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg').length,
    running: q('[data-testid="stStatusWidget"]').some(e => /running/i.test(e.innerText || "")
      || e.querySelector('[data-testid^="stStatusWidgetRunning"]')),
    skeletons: q('[data-testid="stSkeleton"]').length,
    exceptions: q('[data-testid="stException"]').map(text),
    errors: q('[data-testid="stAlertContentError"]').map(e => text(
      e.querySelector('[data-testid="stMarkdownContainer"]') || e)),
    connection: q('[data-testid="stConnectionStatus"]').map(text).filter(t => t),
    traceback: /Traceback \(most recent call last\)/.test(document.body.innerText || ""),
    height: Math.max(main.scrollHeight, document.body.scrollHeight),
    title: document.title,
  });
})()
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, deadline: float, proc: subprocess.Popen, what: str) -> str:
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
            time.sleep(0.3)
    raise TimeoutError(f"{what} did not answer at {url} ({last})")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


CLICK_JS = r"""
((label) => {
  const cands = Array.from(document.querySelectorAll('button, label, [role="tab"]'));
  const el = cands.find(e => (e.innerText || "").trim() === label)
          || cands.find(e => (e.innerText || "").trim().includes(label));
  if (!el) return false;
  el.scrollIntoView({block: "center"});
  el.click();
  return true;
})
"""


class CDP:
    """The few DevTools-protocol calls this check needs, over one page's websocket."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.next_id = 0

    def call(self, method: str, timeout: float = 60.0, **params):
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"DevTools call {method} timed out")
            msg = json.loads(self.ws.recv(timeout=left))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expr: str):
        res = self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        return res.get("result", {}).get("value")

    def probe(self) -> dict:
        try:
            return json.loads(self.evaluate(PROBE_JS) or "{}")
        except Exception:  # noqa: BLE001 - page still loading
            return {}

    def wait_rendered(self, deadline: float, settle: float, min_charts: int) -> tuple[dict, bool]:
        """Poll until the page has run the script and drawn its charts, and stayed so for
        ``settle`` seconds, or shows an error. Returns (last state, finished)."""
        state: dict = {}
        stable_since = None
        while time.monotonic() < deadline:
            time.sleep(0.5)
            state = self.probe()
            failed = bool(state.get("exceptions") or state.get("errors")
                          or state.get("traceback"))
            # an error ends the wait too, once the script has finished (so the screenshot
            # shows the whole failing page)
            done = (not state.get("running") and not state.get("skeletons")
                    and state.get("drawn", 0) >= state.get("charts", 0)
                    and (failed or (state.get("metrics", 0) >= 4
                                    and state.get("charts", 0) >= min_charts)))
            if done:
                stable_since = stable_since or time.monotonic()
                if time.monotonic() - stable_since >= settle:
                    return state, True
            else:
                stable_since = None
        return state, False


def stop(proc: subprocess.Popen | None) -> None:
    """Stop a process this script started (and its process group)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait(timeout=5)


def shoot(cdp: CDP, url: str, args, deadline: float, out: Path, failures: list[str]) -> str:
    """Open ``url``, wait for the app, do the clicks, screenshot, and check for errors."""
    cdp.call("Page.enable")
    cdp.call("Emulation.setDeviceMetricsOverride", width=args.width, height=1200,
             deviceScaleFactor=1, mobile=False)
    cdp.call("Page.navigate", url=url)
    state, ok = cdp.wait_rendered(deadline, args.settle, min_charts=6)
    if not ok:
        failures.append(f"the page did not finish rendering in {args.timeout:.0f} s "
                        f"(last state: {json.dumps(state)[:400]})")
    for label in args.click if ok else []:
        before = state.get("charts", 0)
        if not cdp.evaluate(f"{CLICK_JS}({json.dumps(label)})"):
            failures.append(f"nothing to click labelled {label!r}")
            break
        time.sleep(1.0)
        state, ok = cdp.wait_rendered(deadline, args.settle, min_charts=before)
        if not ok:
            failures.append(f"the page did not settle after clicking {label!r}")
            break
    # the whole main page: make the viewport as tall as the content (a capture beyond the
    # viewport would leave Streamlit's sticky sidebar out)
    height = int(min(max(state.get("height") or 1200, 800), 16000))
    cdp.call("Emulation.setDeviceMetricsOverride", width=args.width, height=height,
             deviceScaleFactor=1, mobile=False)
    time.sleep(1.0)
    state = cdp.probe() or state
    shot = cdp.call("Page.captureScreenshot", format="png")
    out.write_bytes(base64.b64decode(shot["data"]))
    for e in state.get("exceptions", []):
        failures.append(f"exception on the page: {e}")
    for e in state.get("errors", []):
        failures.append(f"error box on the page: {e}")
    if state.get("traceback"):
        failures.append("a Python traceback is shown on the page")
    for e in state.get("connection", []):
        failures.append(f"connection problem: {e}")
    if state.get("metrics", 0) < 4:
        failures.append(f"expected 4 headline cards, found {state.get('metrics', 0)}")
    return (f"{state.get('metrics', 0)} cards, {state.get('charts', 0)} charts "
            f"({state.get('drawn', 0)} drawn), page height {height}px; screenshot {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "moesim-explorer.png"),
                    help="screenshot path (PNG)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds for the whole check")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--settle", type=float, default=1.5,
                    help="seconds the page must stay finished before the screenshot")
    ap.add_argument("--query", default="",
                    help="URL query, e.g. example=deepseek-v3_8xh200_ep8_fp8 (opens an example)")
    ap.add_argument("--click", action="append", default=[], metavar="TEXT",
                    help="after the page is ready, click the button / label with this text "
                         "(repeatable, in order), e.g. --click 'Pin this scenario'")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + args.timeout

    import importlib.util

    for mod in ("streamlit", "websockets"):
        if importlib.util.find_spec(mod) is None:
            print(f"browser_check: missing {mod}: pip install -e '.[app]'", file=sys.stderr)
            return 2
    chromium = find_chromium()
    if chromium is None:
        print("browser_check: no chromium: apt-get update && apt-get install -y chromium",
              file=sys.stderr)
        return 2

    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="moesim-browser-check-"))
    app_port, cdp_port = free_port(), free_port()
    app_log = open(work / "streamlit.log", "w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                  "")]).strip(
        os.pathsep), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    app = browser = None
    failures: list[str] = []
    try:
        app = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
             "--server.address", "127.0.0.1", "--server.port", str(app_port),
             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
             "--server.runOnSave", "false", "--global.developmentMode", "false"],
            cwd=ROOT, env=env, stdout=app_log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"http://127.0.0.1:{app_port}/_stcore/health", deadline, app, "streamlit")
        url = f"http://127.0.0.1:{app_port}/"

        with open(work / "chromium.log", "w") as chromium_log:
            browser = subprocess.Popen(
                [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={work / 'profile'}",
                 "--remote-debugging-address=127.0.0.1", f"--remote-debugging-port={cdp_port}",
                 f"--window-size={args.width},1200", "about:blank"],
                stdout=chromium_log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"http://127.0.0.1:{cdp_port}/json/version", deadline, browser, "chromium")
        pages = json.loads(wait_http(f"http://127.0.0.1:{cdp_port}/json/list", deadline, browser,
                                     "chromium"))
        page = next(p for p in pages if p.get("type") == "page")
        from websockets.sync.client import connect

        with connect(page["webSocketDebuggerUrl"], max_size=256 * 1024 * 1024,
                     open_timeout=max(5.0, deadline - time.monotonic())) as ws:
            cdp = CDP(ws)
            summary = shoot(cdp, url + (f"?{args.query}" if args.query else ""), args,
                            deadline, out, failures)
        print(f"browser_check: {summary}, {time.monotonic() - t_start:.1f} s")
    except Exception as exc:  # noqa: BLE001 - report, clean up, fail
        failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        stop(browser)
        stop(app)
        app_log.close()
        log = (work / "streamlit.log").read_text(errors="replace") if (work / "streamlit.log"
                                                                          ).exists() else ""
        if "Traceback (most recent call last)" in log:
            failures.append("the app logged a traceback:\n" + log[-2000:])
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        for f in failures:
            print(f"browser_check: FAIL: {f}", file=sys.stderr)
        return 1
    print("browser_check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

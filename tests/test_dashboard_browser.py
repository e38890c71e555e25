"""The dashboard in a real browser: Debian's headless Chromium, driven over the DevTools protocol.

uvicorn serves the dashboard on 127.0.0.1 over a run directory written with the
ServerApp's own writer; Chromium loads the run page, which must render its table
and SVG charts with no console error, and show a round recorded during the test
without a reload. A screenshot is kept (``tmp_path``, and ``$MEDFED_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dashboard.app import create_app
from server.run_dir import RunDirectory
from test_dashboard import append_round, round_record, write_run

CHROMIUM = next((found for name in ("chromium", "chromium-browser", "google-chrome")
                 if (found := shutil.which(name))), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; "
                                                          ".ci/run installs it)")
#: Seconds a recorded round may take to appear (the page polls every 2 s).
LIVE_WITHIN = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served_runs(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``(base URL, runs folder)`` of a dashboard served by uvicorn in this process."""
    import uvicorn

    root = tmp_path / "runs"
    write_run(root)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app([root], rescan_seconds=0.5), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", root
    server.should_exit = True
    thread.join(timeout=10)


class DevTools:
    """A minimal Chrome DevTools Protocol client for one page (commands, and the events seen meanwhile)."""

    def __init__(self, url: str) -> None:
        from websockets.sync.client import connect

        self.socket = connect(url, max_size=64 * 2**20, open_timeout=30)
        self.events: list[dict[str, Any]] = []
        self._next = 0

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Run one command; returns its result (events that arrive meanwhile are kept)."""
        self._next += 1
        self.socket.send(json.dumps({"id": self._next, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self._next:
                assert "error" not in message, (method, message["error"])
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float) -> float:
        """Seconds until ``expression`` is truthy in the page (fails after ``timeout``)."""
        start = time.monotonic()
        while not self.evaluate(expression):
            assert time.monotonic() - start < timeout, f"not true within {timeout} s: {expression}"
            time.sleep(0.2)
        return time.monotonic() - start

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads / CSP violations the browser logged."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(f"{params['entry'].get('text')} ({params['entry'].get('url', '')})")
        return found


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[DevTools]:
    profile = tmp_path / "chromium-profile"
    process = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
         "--remote-allow-origins=*", f"--user-data-dir={profile}", "--window-size=1280,1500", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert process.poll() is None, f"chromium exited with {process.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as answer:
            pages = [t for t in json.load(answer) if t.get("type") == "page"]
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        for domain in ("Runtime", "Log", "Page"):
            tools.send(f"{domain}.enable")
        yield tools
        tools.socket.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _keep_screenshot(tools: DevTools, tmp_path: Path) -> Path:
    png = base64.b64decode(tools.send("Page.captureScreenshot", format="png")["data"])
    shot = tmp_path / "dashboard.png"
    shot.write_bytes(png)
    artifacts = os.environ.get("MEDFED_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / "dashboard.png")
    return shot


ROUND_NUMBERS = "Array.from(document.querySelectorAll('table.rounds tbody tr')).map(r => r.cells[0].textContent)"


def test_run_page_renders_and_shows_a_new_round_without_reload(served_runs, browser: DevTools,
                                                              tmp_path: Path) -> None:
    base, root = served_runs
    browser.send("Page.navigate", url=f"{base}/")
    browser.wait_for("document.readyState === 'complete' && !!document.querySelector('table.runs')", timeout=30)
    assert browser.evaluate("document.querySelector('table.runs a').textContent") == "demo"

    browser.send("Page.navigate", url=f"{base}/run/demo")
    browser.wait_for("document.readyState === 'complete' && document.querySelectorAll('svg.chart').length === 3",
                     timeout=30)
    assert browser.evaluate(ROUND_NUMBERS) == ["2", "1", "0"]
    charts = browser.evaluate("Array.from(document.querySelectorAll('svg.chart')).map(s => "
                              "[s.dataset.chart, s.querySelectorAll('polyline').length, "
                              "Math.round(s.getBoundingClientRect().width)])")
    assert [c[:2] for c in charts] == [["metric", 2], ["loss", 3], ["epsilon", 1]]
    assert all(width > 200 for *_, width in charts)  # laid out, not collapsed
    assert browser.evaluate("getComputedStyle(document.querySelector('.state')).color") == "rgb(255, 255, 255)"

    browser.evaluate("window.__sameDocument = 42")
    append_round(RunDirectory(root / "demo"), round_record(3, auc=0.93))
    seconds = browser.wait_for(f"{ROUND_NUMBERS}[0] === '3'", timeout=LIVE_WITHIN)
    assert browser.evaluate("window.__sameDocument") == 42  # updated in place, never reloaded
    assert int(browser.evaluate("document.getElementById('live').dataset.updates")) >= 1
    assert browser.evaluate("document.querySelector('table.rounds tbody tr').cells[1].textContent") == "0.9300"
    assert browser.evaluate("document.getElementById('live-status').className") == "ok"
    shot = _keep_screenshot(browser, tmp_path)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    assert browser.errors() == []
    print(f"round 3 appeared {seconds:.1f} s after it was recorded; screenshot {shot}")

"""Debian's headless Chromium driven over the Chrome DevTools Protocol: no browser download, no
driver binary, one websocket. Enough for the dashboard test: open a page, read the DOM with
JavaScript, click, take screenshots, and collect every console error, uncaught exception and
failed request, and every URL the page asked for.

    with Browser.launch("/usr/bin/chromium", tmp_path / "profile") as page:
        page.goto("http://127.0.0.1:8470/ui/")
        page.wait_for("document.querySelector('h1')?.textContent === 'Fleet'")
"""
from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect
from websockets.sync.connection import Connection

from demo.scenario import stop_process

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1200,900"]
START_TIMEOUT_S = 30.0


class BrowserError(AssertionError):
    """The page did not do what the test waited for."""


@dataclass
class Page:
    ws: Connection
    errors: list[str] = field(default_factory=list)      # console errors, exceptions, failed loads
    requested: list[str] = field(default_factory=list)   # every URL the page asked for
    _next_id: int = 0

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        mine = self._next_id
        self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == mine:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def _event(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append("exception: " + details.get("exception", {}).get("description", details.get("text", "")))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}".strip())
        elif method == "Network.requestWillBeSent":
            self.requested.append(params["request"]["url"])

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited if a promise)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout:.0f}s waiting for {expression}\npage: {self.text()[:3000]}")
            time.sleep(0.2)

    def text(self, selector: str = "body") -> str:
        return self.evaluate(f"document.querySelector({json.dumps(selector)})?.innerText ?? ''")

    def click(self, selector: str, timeout: float = 20.0) -> None:
        """Click the element once it is there and enabled (a page renders after its API calls return)."""
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
                                " if (!el || el.disabled) return false; el.click(); return true; })()"):
            if time.monotonic() > deadline:
                raise BrowserError(f"nothing enabled to click at {selector} after {timeout:.0f}s\n"
                                   f"page: {self.text()[:2000]}")
            time.sleep(0.2)

    def fill(self, selector: str, value: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).value = {json.dumps(value)}")

    def screenshot(self, path: Path) -> bytes:
        """A PNG of the whole page (up to 2,400 px tall)."""
        height = min(2400, int(self.evaluate("document.documentElement.scrollHeight")))
        self.send("Emulation.setDeviceMetricsOverride", width=1200, height=height, deviceScaleFactor=1, mobile=False)
        png = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        self.send("Emulation.clearDeviceMetricsOverride")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        return png


class Browser:
    @staticmethod
    @contextlib.contextmanager
    def launch(chromium: str, profile: Path) -> Iterator[Page]:
        """A fresh headless Chromium (its own profile) with one blank page; closed after."""
        profile.mkdir(parents=True)
        log = profile.parent / f"{profile.name}.log"
        with open(log, "wb") as out:  # a file, not a pipe: chromium is chatty and a full pipe would stall it
            proc = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            port = _devtools_port(proc, profile / "DevToolsActivePort", log)
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            with connect(url, max_size=64 * 1024 * 1024, open_timeout=10) as ws:
                page = Page(ws)
                for domain in ("Page", "Runtime", "Log", "Network"):
                    page.send(f"{domain}.enable")
                yield page
        finally:
            stop_process(proc, 10)


def _devtools_port(proc: subprocess.Popen, port_file: Path, log: Path) -> int:
    """Chromium writes the port it chose (--remote-debugging-port=0) into the profile."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrowserError(f"chromium exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        if port_file.exists() and (lines := port_file.read_text().splitlines()):
            return int(lines[0])
        time.sleep(0.1)
    raise BrowserError(f"chromium wrote no {port_file} within {START_TIMEOUT_S:.0f}s")

"""A small Chrome DevTools Protocol client over Debian's headless ``chromium`` (no browser download, no Playwright).

Every host but 127.0.0.1 resolves to nothing (``--host-resolver-rules``), so a page that reached for a CDN or a web
font would visibly fail. WebGL2 comes from SwiftShader (software), which is what NiiVue needs headless.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import websocket

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BLOCK_ALL_BUT_LOCALHOST = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


class Browser:
    """One headless chromium with one page; ``with Browser(tmp) as b: b.goto(url)``."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 800) -> None:
        self.profile, self.width, self.height = profile, width, height
        self.proc: subprocess.Popen | None = None
        self.ws: websocket.WebSocket | None = None
        self._id = 0
        self.events: list[dict] = []

    def __enter__(self) -> Browser:
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self) -> Browser:
        assert CHROMIUM, "chromium is not installed"
        self.profile.mkdir(parents=True, exist_ok=True)
        args = [
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu-sandbox", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--metrics-recording-only", "--mute-audio",
            f"--host-resolver-rules={BLOCK_ALL_BUT_LOCALHOST}", "--use-angle=swiftshader",
            "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist", f"--window-size={self.width},{self.height}",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1", f"--user-data-dir={self.profile}", "about:blank",
        ]  # fmt: skip
        port_file = self.profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)  # a reused profile's port is stale
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            assert self.proc.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port in 60 s"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Network.enable")
        size = {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False}
        self.send("Emulation.setDeviceMetricsOverride", **size)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.ws is not None:
            self.ws.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)

    def send(self, method: str, **params: Any) -> dict:
        """Call a DevTools method and return its result (events that arrive meanwhile are kept in ``events``)."""
        assert self.ws is not None
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)
        raise TimeoutError(f"{method}: no answer in 60 s")

    def goto(self, url: str, seconds: float = 60) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", seconds)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, seconds: float = 60) -> Any:
        """Poll a JavaScript expression until it is truthy (bounded); returns its value."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"{expression!r} still false after {seconds:.0f} s")

    def set_files(self, selector: str, files: list[Path]) -> None:
        """Choose files in an ``<input type=file>`` as a user would (fires its change event)."""
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        assert node, f"no element {selector}"
        self.send("DOM.setFileInputFiles", nodeId=node, files=[str(f) for f in files])

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def console_errors(self) -> list[str]:
        """Messages of uncaught exceptions and console.error calls seen so far."""
        out = []
        for e in self.events:
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(json.dumps(e["params"]["exceptionDetails"])[:500])
            elif e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error":
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in e["params"]["args"]))
        return out

    def failed_requests(self) -> list[str]:
        """URLs the page asked for that failed (a CDN, a font, a missing asset)."""
        urls = {
            e["params"]["requestId"]: e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent"
        }
        failed = [e["params"] for e in self.events if e.get("method") == "Network.loadingFailed"]
        return [f"{urls.get(p['requestId'], '?')} ({p.get('blockedReason') or p['errorText']})" for p in failed]

    def requested_urls(self) -> list[str]:
        """Every URL the page asked the network for (blocked ones included)."""
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

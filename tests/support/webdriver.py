"""A real headless Chromium driven over the W3C WebDriver HTTP API (chromedriver), with urllib.

``browser`` fixture: a started chromedriver and one browser session with a fresh
profile; skips (fails under SMTPGW_STRICT=1) when chromium or chromedriver is
missing. Only the few commands the console tests use are here.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import urllib.error
import urllib.request
from typing import Any, Iterator

import pytest

from tests.support.components import require
from tests.support.net import free_port, listening, wait_until

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # W3C WebDriver §12 web element identifier
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900"]


class WebDriverError(AssertionError):
    pass


class Browser:
    def __init__(self, driver_port: int, profile: str, binary: str) -> None:
        self.base = f"http://127.0.0.1:{driver_port}"
        caps = {"browserName": "chrome",
                "goog:chromeOptions": {"binary": binary, "args": [*CHROMIUM_ARGS, f"--user-data-dir={profile}"]}}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return json.load(answer)["value"]
        except urllib.error.HTTPError as exc:
            raise WebDriverError(f"{method} {path}: {exc.code} {exc.read()[:500]!r}") from None

    def cmd(self, method: str, path: str, body: dict | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    @property
    def url(self) -> str:
        return self.cmd("GET", "/url")

    @property
    def source(self) -> str:
        return self.cmd("GET", "/source")

    def find(self, css: str) -> str:
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def find_all(self, css: str) -> list[str]:
        return [e[ELEMENT] for e in self.cmd("POST", "/elements", {"using": "css selector", "value": css})]

    def type(self, css: str, text: str) -> None:
        self.cmd("POST", f"/element/{self.find(css)}/value", {"text": text})

    def click(self, css: str, timeout: float = 20.0) -> None:
        """Click a link or a form's button and wait for the next page: the old page's root
        element going stale (W3C WebDriver §12.2) says it has been replaced."""
        old = self.find("html")
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

        def replaced() -> bool:
            try:
                self.cmd("GET", f"/element/{old}/name")
                return False
            except WebDriverError as exc:
                # Chromium says "stale element", or, mid-navigation, that the node left the document
                if "stale element" not in str(exc) and "does not belong to the document" not in str(exc):
                    raise
                return True
        wait_until(replaced, timeout, f"the page after clicking {css}")

    def text(self, css: str = "body") -> str:
        return self.cmd("GET", f"/element/{self.find(css)}/text")

    def cookie(self, name: str) -> str:
        return self.cmd("GET", f"/cookie/{name}")["value"]

    def screenshot(self, path: str) -> bytes:
        data = base64.b64decode(self.cmd("GET", "/screenshot"))
        with open(path, "wb") as f:
            f.write(data)
        return data

    def wait_text(self, url: str, pattern: str, timeout: float = 20.0) -> str:
        """Load ``url`` until its text matches the regular expression ``pattern`` (a page the
        server renders anew each time)."""
        def shown() -> str | None:
            self.get(url)
            text = self.text()
            return text if re.search(pattern, text) else None
        return wait_until(shown, timeout, f"/{pattern}/ on {url}")  # type: ignore[return-value]

    def close(self) -> None:
        try:
            self.cmd("DELETE", "")
        except (WebDriverError, OSError):
            pass


@pytest.fixture
def browser(tmp_path) -> Iterator[Browser]:
    binary = require("chromium")
    driver = require("chromedriver", "chromium-driver")
    port = free_port()
    proc = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: listening(port), 20, "chromedriver listening")
        session = Browser(port, str(tmp_path / "chromium-profile"), binary)
        try:
            yield session
        finally:
            session.close()
    finally:
        proc.terminate()
        proc.wait(10)

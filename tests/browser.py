"""A small headless-Chromium driver: open a page, press keys, take screenshots.

Used by ``tests/test_interactive.py`` and, as a script, by CI on the built book::

    python tests/browser.py check-sliders _build/html/some_chapter.html [...]

opens each page with the network off, moves every slider of every
interactive figure (``dgmlab.interactive``) with the keyboard, as a reader
would, and exits non-zero unless each figure's picture follows its sliders.

It talks to Chromium over the DevTools protocol through ``tornado.websocket``
(no other dependency). Chromium runs with a proxy that does not exist, so a
page that reaches for the network fails to load what it asked for, and every
such request is recorded in :attr:`Browser.external_requests`.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tornado.websocket import WebSocketClientConnection, websocket_connect

__all__ = ["Browser", "BrowserError", "find_chromium", "INSTALL_HINT", "check_sliders", "main"]

INSTALL_HINT = "no Chromium found: install Debian's `chromium` package (apt-get install chromium)."

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_FLAGS = (
    "--headless",
    "--no-sandbox",  # needed as root (CI containers); the pages are our own files
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    # The network is off: any request that is not a local file goes to a dead proxy.
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--remote-debugging-port=0",
)

_KEY_CODES = {"ArrowLeft": 37, "ArrowUp": 38, "ArrowRight": 39, "ArrowDown": 40,
              "Home": 36, "End": 35, "PageUp": 33, "PageDown": 34, "Tab": 9}

_LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:", "chrome:", "chrome-extension:", "devtools:")


async def _connect(url: str) -> WebSocketClientConnection:
    # Inside a coroutine, so tornado binds the connection to the loop that runs it.
    return await websocket_connect(url, max_message_size=1 << 30)


class BrowserError(RuntimeError):
    """Chromium failed to start, answer, or run a script."""


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable (``$CHROMIUM`` first), or None."""
    override = os.environ.get("CHROMIUM")
    if override:
        return override if shutil.which(override) else None
    for name in _CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _end_group(process: subprocess.Popen) -> None:
    """End the browser we started, then any helper left in its process group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            continue
        # The browser is gone; a helper that outlived it is killed on the second turn.


class Browser:
    """One headless Chromium with one tab; use as a context manager so it is always killed.

    >>> with Browser() as b:
    ...     b.open_page(Path("page.html").resolve().as_uri())
    ...     before = b.screenshot()
    ...     b.press_key("input[type=range]", "ArrowRight")
    ...     after = b.screenshot()
    """

    def __init__(self, executable: str | None = None, *, width: int = 1000, height: int = 800,
                 timeout: float = 30.0):
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise BrowserError(INSTALL_HINT)
        self.width, self.height, self.timeout = width, height, timeout
        self.external_requests: list[str] = []
        self._events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._profile = tempfile.mkdtemp(prefix="dgmlab-chromium-")
        self._process: subprocess.Popen | None = None
        self._socket: WebSocketClientConnection | None = None
        self._session: str | None = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ lifecycle

    def _start(self) -> None:
        log = open(Path(self._profile) / "stderr.log", "wb")
        with log:
            self._process = subprocess.Popen(
                [self.executable, *_FLAGS, f"--user-data-dir={self._profile}",
                 f"--window-size={self.width},{self.height}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True,  # its helpers share the group, so close() ends them all
            )
        port_file = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise BrowserError(f"Chromium did not start; its log:\n{self._log_tail()}")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self._socket = self._run(_connect(f"ws://127.0.0.1:{port}{path}"))
        target = self._call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                   session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self._call(f"{domain}.enable")
        self._call("Emulation.setDeviceMetricsOverride",
                   {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})

    def close(self) -> None:
        """Kill Chromium (and its helper processes) and remove its profile folder."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._process is not None:
            _end_group(self._process)
        if not self._loop.is_closed():
            self._loop.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def _log_tail(self) -> str:
        try:
            return (Path(self._profile) / "stderr.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ protocol

    def _run(self, awaitable: Any) -> Any:
        try:
            return self._loop.run_until_complete(asyncio.wait_for(awaitable, self.timeout))
        except asyncio.TimeoutError:
            raise BrowserError(f"Chromium did not answer within {self.timeout:g} s.") from None

    async def _receive(self) -> dict[str, Any]:
        text = await self._socket.read_message()
        if text is None:
            raise BrowserError(f"the DevTools connection closed; Chromium's log:\n{self._log_tail()}")
        message = json.loads(text)
        if message.get("method") == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if not url.startswith(_LOCAL_SCHEMES):
                self.external_requests.append(url)
        return message

    async def _call_async(self, method: str, params: dict[str, Any], session: bool) -> dict[str, Any]:
        ident = next(self._ids)
        message = {"id": ident, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        await self._socket.write_message(json.dumps(message))
        while True:
            reply = await self._receive()
            if reply.get("id") == ident:
                if "error" in reply:
                    raise BrowserError(f"{method} failed: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self._events.append(reply)

    def _call(self, method: str, params: dict[str, Any] | None = None, *, session: bool = True) -> dict[str, Any]:
        """Send one DevTools command (to the tab, unless ``session=False``) and return its result."""
        return self._run(self._call_async(method, params or {}, session))

    async def _wait_event_async(self, name: str) -> dict[str, Any]:
        while True:
            for k, event in enumerate(self._events):
                if event["method"] == name:
                    return self._events.pop(k)
            self._events.append(await self._receive())

    # ------------------------------------------------------------------ page API

    def open_page(self, url: str) -> None:
        """Load ``url`` in the tab and wait for its load event (images and scripts done)."""
        self._events.clear()
        result = self._call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"could not open {url}: {result['errorText']}")
        self._run(self._wait_event_async("Page.loadEventFired"))

    def evaluate(self, expression: str) -> Any:
        """Value of a JavaScript expression in the page (promises are awaited); raise on JS errors."""
        result = self._call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                 "awaitPromise": True, "userGesture": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript error in {expression[:80]!r}: {text}")
        return result["result"].get("value")

    def settle(self) -> None:
        """Wait until every image is decoded and two frames were painted, so screenshots are current."""
        self.evaluate(
            "Promise.all(Array.from(document.images, i => i.decode().catch(() => null)))"
            ".then(() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r))))"
        )

    def screenshot(self, selector: str | None = None) -> bytes:
        """PNG of the viewport, or of the element matching ``selector`` (scrolled into view)."""
        params: dict[str, Any] = {"format": "png"}
        if selector is not None:
            box = self.evaluate(
                f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                " if (!e) return null; e.scrollIntoView({block: 'center'});"
                " const r = e.getBoundingClientRect();"
                " return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}; })()"
            )
            if box is None:
                raise BrowserError(f"no element matches {selector!r}.")
            params.update(clip={**box, "scale": 1}, captureBeyondViewport=True)
        self.settle()
        return base64.b64decode(self._call("Page.captureScreenshot", params)["data"])

    def press_key(self, selector: str, key: str) -> None:
        """Focus the element matching ``selector`` and press ``key`` (e.g. ``"ArrowRight"``) as a reader would."""
        if key not in _KEY_CODES:
            raise ValueError(f"key should be one of {sorted(_KEY_CODES)}, got {key!r}.")
        found = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return false; e.focus(); return document.activeElement === e; })()"
        )
        if not found:
            raise BrowserError(f"no focusable element matches {selector!r}.")
        code = _KEY_CODES[key]
        for kind in ("rawKeyDown", "keyUp"):
            self._call("Input.dispatchKeyEvent", {"type": kind, "key": key, "code": key,
                                                  "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code})
        self.settle()


# ---------------------------------------------------------------------- check-sliders

_FIGURES_JS = """
Array.from(document.querySelectorAll('.dgmlab-interactive'), root => ({
  id: root.id,
  bound: root.hasAttribute('data-bound'),
  sliders: Array.from(root.querySelectorAll('input[type=range]'), s => s.id),
}))
"""


def _figure_state(browser: Browser, figure_id: str) -> dict[str, Any]:
    """Slider positions, shown values, the image source and the frame the data says it should be."""
    return browser.evaluate(f"""(() => {{
      const root = document.getElementById({json.dumps(figure_id)});
      const data = JSON.parse(root.querySelector('script.dgmlab-frames').textContent);
      const positions = Array.from(root.querySelectorAll('input[type=range]'), s => Number(s.value));
      const maxima = Array.from(root.querySelectorAll('input[type=range]'), s => Number(s.max));
      let index = 0;
      positions.forEach((p, k) => {{ index = index * data.values[k].length + p; }});
      return {{
        positions, maxima,
        shown: Array.from(root.querySelectorAll('output'), o => o.textContent),
        expected_shown: positions.map((p, k) => data.values[k][p]),
        src: root.querySelector('img').src,
        expected_src: 'data:image/png;base64,' + data.frames[index],
      }};
    }})()""")


def _check_figure(browser: Browser, figure: dict[str, Any]) -> list[str]:
    """Move each slider of one figure one step; return what went wrong (empty if nothing)."""
    problems: list[str] = []
    if not figure["bound"]:
        return [f"{figure['id']}: its script did not run (no data-bound attribute)"]
    moved_picture = False
    for k, slider in enumerate(figure["sliders"]):
        before = _figure_state(browser, figure["id"])
        if before["maxima"][k] == 0:
            continue  # a control with a single value cannot move
        key = "ArrowRight" if before["positions"][k] < before["maxima"][k] else "ArrowLeft"
        shot_before = browser.screenshot(f"#{figure['id']}")
        browser.press_key(f"#{slider}", key)
        after = _figure_state(browser, figure["id"])
        shot_after = browser.screenshot(f"#{figure['id']}")
        where = f"{figure['id']} slider {k + 1} ({key})"
        if after["positions"][k] == before["positions"][k]:
            problems.append(f"{where}: the slider did not move")
        if after["shown"] != after["expected_shown"]:
            problems.append(f"{where}: shows {after['shown']}, expected {after['expected_shown']}")
        if after["src"] != after["expected_src"]:
            problems.append(f"{where}: the image is not the frame for positions {after['positions']}")
        if after["src"] != before["src"]:
            if shot_after == shot_before:
                problems.append(f"{where}: a new frame was set but the screenshot did not change")
            else:
                moved_picture = True
    if not problems and not moved_picture:
        problems.append(f"{figure['id']}: no slider changed the picture")
    return problems


def check_sliders(paths: list[str | os.PathLike], *, strict_network: bool = False,
                  browser: Browser | None = None) -> list[str]:
    """Check every interactive figure on each HTML page; return the problems found (empty: all good)."""
    problems: list[str] = []
    n_figures = 0
    own = browser is None
    browser = browser or Browser()
    try:
        for path in paths:
            page = Path(path).resolve()
            if not page.is_file():
                problems.append(f"{path}: no such file")
                continue
            browser.external_requests.clear()
            browser.open_page(page.as_uri())
            figures = browser.evaluate(_FIGURES_JS)
            n_figures += len(figures)
            page_problems = [p for f in figures for p in _check_figure(browser, f)]
            print(f"{path}: {len(figures)} interactive figure(s), "
                  f"{'ok' if not page_problems else f'{len(page_problems)} problem(s)'}")
            problems += [f"{path}: {p}" for p in page_problems]
            if browser.external_requests:
                note = f"{path}: asked the network for {sorted(set(browser.external_requests))}"
                print(("" if strict_network else "warning: ") + note, file=sys.stderr)
                if strict_network:
                    problems.append(note)
    finally:
        if own:
            browser.close()
    if n_figures == 0:
        problems.append("no interactive figure found on any page (is the widget view shown instead of text/html?)")
    return problems


def main(argv: list[str] | None = None) -> int:
    """``check-sliders PAGE.html [...] [--strict-network]``: exit status 0 only if every figure responds."""
    args = list(sys.argv[1:] if argv is None else argv)
    strict = "--strict-network" in args
    args = [a for a in args if a != "--strict-network"]
    if len(args) < 2 or args[0] != "check-sliders":
        print("usage: python tests/browser.py check-sliders PAGE.html [...] [--strict-network]\n"
              "Moves every slider of every interactive figure on the pages; exit status 1 unless each\n"
              "figure's picture follows its sliders. --strict-network: also fail on any network request.",
              file=sys.stderr)
        return 2
    if find_chromium() is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    problems = check_sliders(args[1:], strict_network=strict)
    for problem in problems:
        print("FAIL", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

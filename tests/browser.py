"""Drive headless Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``):
no websocket library, no driver binary. Chromium reads NUL-terminated JSON commands on fd 3
and writes replies and events on fd 4.

``--dump-dom`` is not enough for a live page: it either dumps before the page's scripts have
fetched anything, or (with a virtual-time budget) waits forever on the open event stream.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["Browser", "find_chromium"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One headless Chromium with one page; ``close()`` ends it (always call it)."""

    def __init__(self, binary: str, width: int = 1280, height: int = 860) -> None:
        self._profile = tempfile.mkdtemp(prefix="fedbus-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire() -> None:  # in the child, before exec: the pipes become fds 3 and 4
            # Move both out of the way first: either may already be 3 or 4, and dup2 onto
            # itself would keep the close-on-exec flag.
            high_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={self._profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire, close_fds=False,  # the child only dup2s, then execs
            # its own temporary files (the singleton socket's folder) inside the profile,
            # which close() removes: a killed Chromium left /tmp/org.chromium.Chromium.* behind
            env={**os.environ, "TMPDIR": self._profile},
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next = 0
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget",
                                 {"targetId": page["targetId"], "flatten": True})["sessionId"]

    def call(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout: float = 120) -> Any:
        # generous: a bound on a hang; Chromium starting on a busy machine is slow
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise TimeoutError("chromium did not answer")
            if not select.select([self._from_child], [], [], left)[0]:
                continue
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                raise TimeoutError("chromium closed its pipe")
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        result: dict[str, Any] = json.loads(raw)
        return result

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url}, self.session)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                           self.session)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise AssertionError(f"page never satisfied {expression!r}")
            time.sleep(0.1)  # polling the page's DOM; bounded by the deadline

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png"}, self.session)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=60)
        finally:
            os.close(self._to_child)
            os.close(self._from_child)
            shutil.rmtree(self._profile, ignore_errors=True)

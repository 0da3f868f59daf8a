"""The live dashboard in a real browser: headless Chromium loads the page during a run and the
DOM shows the nodes, their presence, the rounds so far and the chart (issue #13)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from fedbus.broker import free_port
from tests.browser import Browser, find_chromium
from tests.test_cli import FEDBUS, ROOT, toy

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def chromium() -> str:
    found = find_chromium()
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is missing: `make setup` installs it (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


def get(url: str, host: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_state(url: str, ready: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            last = json.loads(get(url + "state")[1])
            if ready(last):
                return last
        except OSError:
            pass  # not listening yet
        time.sleep(0.2)  # polling an HTTP endpoint; bounded by the deadline
    raise AssertionError(f"dashboard never got ready: {last}")


def test_dashboard_shows_a_running_job(tmp_path: Path) -> None:
    # Prepare: a job slow enough to be looked at while it runs
    binary = chromium()
    path = toy(tmp_path, job="dash", rounds=300, task={"params": {"size": 100, "delay_s": 0.3}})
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = subprocess.Popen([*FEDBUS, "run", str(path), "--dashboard", str(port), "--runs-dir",
                             str(tmp_path / "runs")], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_state(url, lambda s: s["round"] >= 2 and all(
            n["status"] == "online" for n in s["nodes"]), timeout=240)
        metrics = get(url + "metrics")[1].decode()
        forbidden = get(url + "state", host="evil.example:80")[0]
        # Execute: a real browser renders the page (scripts, fetch, server-sent events)
        browser = Browser(binary)
        try:
            browser.goto(url)
            browser.wait_for("document.body.dataset.live === 'events' && "
                             "+document.getElementById('round').textContent >= 2", timeout=120)
            first = int(browser.evaluate("document.getElementById('round').textContent"))
            # the stream keeps the page current: a later round shows up without a reload
            browser.wait_for(f"+document.getElementById('round').textContent > {first}",
                             timeout=120)
            dom = browser.evaluate("document.documentElement.outerHTML")
            if os.environ.get("FEDBUS_SCREENSHOT"):
                browser.screenshot(Path(os.environ["FEDBUS_SCREENSHOT"]))
        finally:
            browser.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    # Assert: what a person sees
    assert 'id="job">dash<' in dom
    assert int(re.search(r'id="round">(\d+)<', dom).group(1)) >= 2  # type: ignore[union-attr]
    rows = re.findall(r'<tr data-node="([^"]+)">.*?class="status">.*?</span>(\w+)</td>', dom)
    assert dict(rows) == {"aggregator": "online", "t0": "online", "t1": "online",
                          "t2": "online"}
    tree = re.findall(r'<li data-node="([^"]+)">', dom)
    assert tree == ["aggregator", "t0", "t1", "t2"]  # trainers nested under the aggregator
    assert re.search(r'<ul><li data-node="t0">', dom)
    points = int(re.search(r'data-series="loss" data-points="(\d+)"', dom).group(1))  # type: ignore[union-attr]
    assert points >= 2
    # the table shows the last 10 rounds: under load the job may be past round 11 by now
    shown = int(re.search(r'id="round">(\d+)<', dom).group(1))  # type: ignore[union-attr]
    assert f'data-round="{shown}"' in dom
    assert 1 <= len(re.findall(r'<tr data-round="', dom)) <= 10
    assert 'fedbus_round{job="dash"}' in metrics and "fedbus_nodes_online" in metrics
    assert forbidden == 403
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]

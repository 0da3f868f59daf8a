"""What `fedbus run` leaves behind and how it stops: run folders, models, signals.

Run-folder tests use the in-process memory bus (fast); the signal tests use the private
mosquitto, since leaking it is the trap they guard against.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from safetensors.numpy import load_file

from fedbus.broker import MosquittoProcess
from fedbus.modelfile import read_safetensors, write_safetensors
from tests.test_cli import FEDBUS, ROOT, fedbus, toy


def only_run(root: Path, job: str = "toy") -> Path:
    runs = list((root / job).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_run_writes_a_run_folder(tmp_path: Path) -> None:
    # Prepare
    path = toy(tmp_path, rounds=4)
    runs = tmp_path / "runs"
    # Execute
    r = fedbus("run", str(path), "--memory", "--runs-dir", str(runs), "--rounds", "3")
    # Assert: the final line stays machine-readable and last
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith("final loss=")
    assert sum(ln.startswith("round ") for ln in lines) == 3  # plain lines: not a terminal
    folder = only_run(runs)
    # the manifest as run (with the override), one metrics row a round, models, logs, summary
    assert yaml.safe_load((folder / "manifest.yaml").read_text())["rounds"] == 3
    rows = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert row["participants"] == 3 and row["lost"] == [] and row["rejected"] == {}
        assert row["loss"] > 0 and row["seconds"] > 0
        # three updates of 1000 float32 deltas (zstd barely shrinks them) came in
        assert row["bytes_sent"] > 0 and row["bytes_received"] > 3 * 3000
        assert sorted(row["accepted"]) == ["t0", "t1", "t2"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_done"] == 3
    assert summary["final"]["loss"] == pytest.approx(rows[-1]["loss"])
    assert summary["best"]["round"] == 3  # the toy loss falls every round
    assert {p.name for p in (folder / "logs").iterdir()} >= {"aggregator.jsonl", "t0.jsonl"}
    first = json.loads((folder / "logs/aggregator.jsonl").read_text().splitlines()[0])
    assert first["node"] == "aggregator" and "event" in first


def test_models_load_with_safetensors(tmp_path: Path) -> None:
    # Prepare / Execute
    path = toy(tmp_path, rounds=2)
    r = fedbus("run", str(path), "--memory", "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr[-2000:]
    folder = only_run(tmp_path / "runs")
    # Assert: the reference loader reads our files; the model is the toy's 1000-vector
    final = load_file(str(folder / "model-final.safetensors"))
    best = load_file(str(folder / "model-best.safetensors"))
    assert final["w"].shape == (1000,) and final["w"].dtype == np.float32
    np.testing.assert_array_equal(final["w"], best["w"])  # last round is the best here
    assert np.abs(final["w"]).sum() > 0  # trained away from the zero initial model


def test_safetensors_roundtrip_dtypes(tmp_path: Path) -> None:
    weights = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
               "b": np.array([1, -2], dtype=np.int64), "c": np.array([True, False]),
               "d": np.zeros((0, 4), dtype=np.float16)}
    write_safetensors(tmp_path / "m.safetensors", weights, {"round": "3"})
    theirs = load_file(str(tmp_path / "m.safetensors"))
    ours = read_safetensors(tmp_path / "m.safetensors")
    for name, value in weights.items():
        np.testing.assert_array_equal(theirs[name], value)
        np.testing.assert_array_equal(ours[name], value)
        assert theirs[name].dtype == value.dtype and theirs[name].shape == value.shape


def test_ls_and_show(tmp_path: Path) -> None:
    # Prepare: two runs
    path = toy(tmp_path, rounds=2)
    runs = str(tmp_path / "runs")
    for _ in range(2):
        assert fedbus("run", str(path), "--memory", "--runs-dir", runs).returncode == 0
    # Execute
    ls = fedbus("ls", "--runs-dir", runs)
    show = fedbus("show", "toy", "--runs-dir", runs)
    missing = fedbus("show", "nope", "--runs-dir", runs)
    # Assert
    listed = [ln for ln in ls.stdout.splitlines() if ln.startswith("toy/")]
    assert len(listed) == 2 and all("finished" in ln and "2/2" in ln for ln in listed)
    latest = sorted(p.name for p in (tmp_path / "runs/toy").iterdir())[-1]
    assert f"toy/{latest}" in show.stdout
    assert "model-best.safetensors, model-final.safetensors" in show.stdout
    assert "best      loss=" in show.stdout
    assert missing.returncode == 1 and "no run 'nope'" in missing.stderr
    # one node's log, and every node's events merged in time order
    t1 = fedbus("show", "toy", "--runs-dir", runs, "--logs", "t1")
    assert t1.returncode == 0 and "update_sent" in t1.stdout
    assert {ln.split()[2] for ln in t1.stdout.splitlines()} == {"t1"}
    merged = fedbus("show", "toy", "--runs-dir", runs, "--logs").stdout.splitlines()
    assert {"aggregator", "t0", "t2"} <= {ln.split()[2] for ln in merged}
    assert merged == sorted(merged, key=lambda ln: ln.split()[0])


def _leftovers(marker: str) -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if any(marker in arg for arg in cmd):
            found.append(f"{p.info['pid']}: {' '.join(cmd)}")
    return found


def _slow_toy(tmp_path: Path) -> tuple[Path, dict[str, str], Path]:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    path = toy(tmp_path, rounds=100, task={"params": {"size": 100, "delay_s": 0.5}})
    # The private broker's temp folder and config land under TMPDIR: our marker for leaks.
    return path, {**os.environ, "TMPDIR": str(tmp)}, tmp


def _stopped_during_a_round(path: Path, env: dict[str, str], runs: Path,
                            sig: signal.Signals) -> tuple[int, str]:
    """`fedbus run`, its whole process group sent ``sig`` once its first round is reported
    (nodes, broker and threads all up: a condition, not a delay), as `timeout` and a
    terminal's Ctrl-C signal a group; its exit code and stderr."""
    proc = subprocess.Popen([*FEDBUS, "run", str(path), "--runs-dir", str(runs)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        # bounded by pytest's timeout: a run that never reports a round fails there
        line = proc.stdout.readline()
        while line and not line.startswith("round "):
            line = proc.stdout.readline()
        assert line.startswith("round "), line
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


@pytest.mark.broker
def test_sigterm_leaves_no_process_and_no_temp_folder(tmp_path: Path) -> None:
    # Prepare
    path, env, tmp = _slow_toy(tmp_path)
    runs = tmp_path / "runs"
    # Execute: what CI's `timeout` and a service manager do: SIGTERM mid-run
    code, err = _stopped_during_a_round(path, env, runs, signal.SIGTERM)
    # Assert
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err
    folder = only_run(runs)
    events = (folder / "logs/fedbus.jsonl").read_text()
    assert "broker_started" in events  # a private mosquitto did run ...
    assert _leftovers(str(tmp)) == []  # ... and is gone
    assert list(tmp.iterdir()) == []
    assert json.loads((folder / "summary.json").read_text())["status"] == "stopped"


@pytest.mark.broker
def test_sigint_stops_every_child(tmp_path: Path) -> None:
    # Prepare
    path, env, tmp = _slow_toy(tmp_path)
    # Execute
    code, err = _stopped_during_a_round(path, env, tmp_path / "runs", signal.SIGINT)
    # Assert
    assert code == 130, err[-2000:]
    assert "stopped by SIGINT" in err
    assert _leftovers(str(tmp)) == []
    assert list(tmp.iterdir()) == []


def test_run_does_not_import_from_cwd_only(tmp_path: Path) -> None:
    # `fedbus run` from another folder finds the example's task through the manifest's path
    r = subprocess.run([*FEDBUS, "run", str(ROOT / "examples/toy/manifest.yaml"), "--memory",
                        "--runs-dir", str(tmp_path / "runs"), "--quiet"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines() == [r.stdout.strip().splitlines()[-1]]  # quiet
    assert r.stdout.strip().startswith("final loss=")


def test_plot_writes_pngs_of_several_runs(tmp_path: Path) -> None:
    # Prepare: a synchronous and an asynchronous run of the toy task
    pytest.importorskip("matplotlib")
    from fedbus.plots import SIZE_PX

    runs = str(tmp_path / "runs")
    sync = toy(tmp_path, rounds=3)
    assert fedbus("run", str(sync), "--memory", "--runs-dir", runs).returncode == 0
    (tmp_path / "a").mkdir()
    async_ = toy(tmp_path / "a", rounds=30, strategy={"name": "fedasync"},
                 task={"params": {"size": 100, "speeds": [0.01, 0.02, 0.05]}})
    r = fedbus("run", str(async_), "--memory", "--runs-dir", runs)
    assert r.returncode == 0, r.stderr[-2000:]
    ids = sorted(p.name for p in (tmp_path / "runs/toy").iterdir())
    # Execute
    r = fedbus("plot", *ids, "--runs-dir", runs, "--out", str(tmp_path / "plots"))
    # Assert: every chart exists, is a PNG of the documented size, and is not blank
    assert r.returncode == 0, r.stderr[-2000:]
    names = {"accuracy_loss.png", "participation.png", "round_time.png", "staleness.png"}
    assert {Path(p).name for p in r.stdout.split()} == names
    for name in names:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert (width, height) == SIZE_PX
        assert len(data) > 15_000, name  # axes, lines and labels, not an empty canvas


@pytest.mark.broker
async def test_serve_aggregator_records_its_run(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    # Prepare: the aggregator and the trainers as two `fedbus serve` processes
    path = toy(tmp_path, rounds=3, broker={"host": mosquitto.host, "port": mosquitto.port})
    runs = tmp_path / "runs"
    trainers = await asyncio.create_subprocess_exec(
        *FEDBUS, "serve", str(path), "--node", "t*", cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        # Execute
        agg = await asyncio.create_subprocess_exec(
            *FEDBUS, "serve", str(path), "--node", "aggregator", "--runs-dir", str(runs),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, agg_err = await asyncio.wait_for(agg.communicate(), 300)
        trainers.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(trainers.communicate(), 120)
    finally:
        if trainers.returncode is None:
            trainers.kill()
            await trainers.wait()
    # Assert: the aggregator's run folder, and a service manager's stop is a clean exit
    assert agg.returncode == 0, agg_err.decode()[-2000:]
    assert out.decode().strip().splitlines()[-1].startswith("final loss=")
    folder = only_run(runs)
    assert json.loads((folder / "summary.json").read_text())["status"] == "finished"
    assert load_file(str(folder / "model-final.safetensors"))["w"].shape == (1000,)
    assert trainers.returncode == 0, err.decode()[-2000:]


def test_prometheus_metrics_of_the_aggregator(tmp_path: Path) -> None:
    # Prepare: a slow in-memory run exporting metrics
    pytest.importorskip("prometheus_client")
    from fedbus.broker import free_port

    path = toy(tmp_path, rounds=200, task={"params": {"size": 100, "delay_s": 0.1}})
    port = free_port()
    proc = subprocess.Popen([*FEDBUS, "run", str(path), "--memory", "--no-record",
                             "--metrics", f"127.0.0.1:{port}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    text = ""
    try:
        # Execute: scrape until three rounds are in
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                text = ""
            if re.search(r'^fedbus_round\{job="toy"\} ([3-9]|\d\d+)', text, re.M):
                break
            time.sleep(0.2)  # polling an HTTP endpoint; bounded by the deadline
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)

    # Assert: the documented series, with values from real rounds
    def value(name: str) -> float:
        found = re.search(rf'^{name}\{{job="toy"\}} (\S+)', text, re.M)
        assert found, (name, text[-1500:])
        return float(found.group(1))

    assert value("fedbus_round") >= 3
    assert value("fedbus_participants") == 3 and value("fedbus_selected") == 3
    assert value("fedbus_round_seconds") > 0.05  # the trainers sleep 0.1 s
    assert value("fedbus_bytes_received_total") > 3 * 3 * 400  # 3 rounds x 3 updates
    assert value("fedbus_loss") > 0
    assert "# TYPE fedbus_rejections_total counter" in text


def test_a_resumed_job_continues_its_run_folder(tmp_path: Path) -> None:
    # Prepare: the checkpointed toy, killed outright (SIGKILL: no clean-up) after round 3
    data = yaml.safe_load((ROOT / "examples/toy/checkpoint-manifest.yaml").read_text())
    data["rounds"] = 8
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(data))
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDBUS_CHECKPOINT_DIR": str(tmp_path / "ck")}
    argv = [*FEDBUS, "run", str(path), "--memory", "--runs-dir", str(runs)]
    first = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert first.stdout is not None
        for line in first.stdout:  # bounded by the run itself (8 rounds), and pytest's timeout
            if line.startswith("round   3/8"):
                break
        first.kill()
    finally:
        first.kill()
        first.wait()
    killed = only_run(runs, "toy-durable")
    crashed = json.loads((killed / "summary.json").read_text())
    # Execute: the same command again
    again = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    # Assert: one folder, every round once, finished, saying where it resumed
    assert again.returncode == 0, again.stderr[-2000:]
    assert crashed["status"] == "running" and crashed["rounds_done"] >= 3  # not "0/8"
    assert only_run(runs, "toy-durable") == killed
    assert f"continuing run folder {killed}" in again.stderr
    rounds = [json.loads(line)["round"]
              for line in (killed / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((killed / "summary.json").read_text())
    (resumed,) = summary["resumed"]
    # a round committed by the killed process but not yet recorded is named, not hidden
    assert rounds == [r for r in range(1, 9) if r not in resumed["missing"]]
    assert resumed["missing"] in ([], [resumed["round"] - 1])
    assert summary["status"] == "finished" and summary["rounds_done"] == len(rounds)
    assert 3 <= resumed["round"] <= 5
    assert summary["started"] == crashed["started"]
    assert (killed / "logs" / "ckpt.jsonl").is_file()

"""`docker-compose up` of what `fedbus compose` generates for the digits example, for real.

The job runs in containers (broker, redis, checkpointer, aggregator, trainers) on the host's
network with a free port each, while the check kills a trainer mid-round, kills the
aggregator, and brings the whole project down and up again. It records what happened and the
final model; the caller compares that with `fedbus run` of the same manifest.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import yaml

from tests.deploy.dockerd import Dockerd, wait_until
from tests.deploy.images import ROOT

__all__ = ["ComposeResult", "Job", "Reference", "run_compose_job"]

MANIFEST: Final = "examples/digits/compose-manifest.yaml"
_ROUND = re.compile(r"^round\s+(\d+)/(\d+)\s+participants\s+(\d+)/(\d+)", re.M)
_FINAL = re.compile(r"^final accuracy=([0-9.]+)", re.M)
_RESTORED = re.compile(r"restored.*?\bround=(\d+)")
_STARTED = re.compile(r"round_started.*?\bround=(\d+)")


@dataclass(frozen=True)
class Job:
    """The digits job's size (``FEDBUS_ROUNDS`` / ``FEDBUS_TRAINERS``) and when to strike."""

    rounds: int = 20
    trainers: int = 10
    kill_trainer_after: int = 3  # kill trainer-3 early in the round after this one
    kill_aggregator_after: int = 8
    down_up_after: int = 13
    deadline_s: int = 60

    @property
    def env(self) -> dict[str, str]:
        return {"FEDBUS_ROUNDS": str(self.rounds), "FEDBUS_TRAINERS": str(self.trainers),
                "FEDBUS_DEADLINE_S": str(self.deadline_s)}


@dataclass
class ComposeResult:
    accuracy: float | None = None
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    healthy: set[str] = field(default_factory=set)
    trainer_restarts: int = 0
    trainer_rejoined_round: int | None = None
    trainer_round_full: bool = False
    trainer_lost_in_round: int | None = None
    aggregator_restarts: int = 0
    restored_after_kill: int | None = None
    restored_after_up: int | None = None
    rounds_seen: list[int] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, predicate: Callable[[], Any], timeout_s: float, poll_s: float = 0.5) -> Any:
    return wait_until(what, predicate, timeout_s, poll_s)


def _keep_logs_and_down(p: Project, services: list[str], workdir: Path,
                        res: ComposeResult) -> None:
    """Keep each service's log next to the check's other output, then take the project down;
    what fails is noted in ``res``, not raised (this runs in ``finally``)."""
    for s in services:
        try:
            (workdir / f"{s}.log").write_text(p.logs(s))
        except Exception as exc:
            res.note(f"no log of {s}: {exc}")
    try:
        p.compose("down", "-v", "--remove-orphans", timeout=300)
    except AssertionError as exc:
        res.note(f"down failed: {exc}")


class Project:
    """One compose project on the private daemon; every look at it also notes which
    services are healthy (at most every 2 s) into ``res``."""

    def __init__(self, d: Dockerd, workdir: Path, env: dict[str, str], services: list[str],
                 res: ComposeResult) -> None:
        self.d = d
        self.workdir = workdir
        self.file = workdir / "compose.yaml"
        self.name = "fedbusck"
        self.env = env
        self.services = services
        self.res = res
        self._ids: dict[str, str] = {}
        self._health_at = 0.0

    def compose(self, *args: str, timeout: float = 900) -> str:
        self._ids = {}  # up/down make new containers
        r = self.d.compose(ROOT, self.file, self.name, *args, env=self.env, check=False,
                           timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed:\n{r.stderr[-2000:]}")
        return r.stdout

    def cid(self, service: str) -> str:
        if service not in self._ids:
            project = f"label=com.docker.compose.project={self.name}"
            out = self.d.out("ps", "-a", "--filter", project,
                             "--format", '{{.Label "com.docker.compose.service"}} {{.ID}}')
            self._ids = dict(line.split() for line in out.splitlines() if line.strip())
        return self._ids.get(service, "")

    def inspect(self, service: str) -> dict[str, Any]:
        cid = self.cid(service)
        if not cid:
            return {}
        data = json.loads(self.d.out("inspect", cid))
        return data[0] if data else {}

    def logs(self, service: str) -> str:
        cid = self.cid(service)
        if not cid:
            return ""
        r = self.d.docker("logs", cid, check=False, capture=True, timeout=60)
        return r.stdout + r.stderr

    def health(self, service: str) -> str:
        state = self.inspect(service).get("State", {})
        return str((state.get("Health") or {}).get("Status", state.get("Status", "")))

    def rounds_started(self) -> set[int]:
        return {int(n) for n in _STARTED.findall(self.logs("aggregator"))}

    def last_round(self) -> int:
        """The aggregator's last printed round (and a look at the services' health)."""
        if time.monotonic() - self._health_at > 2:
            self._health_at = time.monotonic()
            for s in self.services:
                if s not in self.res.healthy and self.health(s) == "healthy":
                    self.res.healthy.add(s)
                    self.res.note(f"{s} healthy")
        rounds = rounds_in(self.logs("aggregator"))
        return rounds[-1][0] if rounds else 0


def rounds_in(log: str) -> list[tuple[int, int, int]]:
    """(round, participants, selected) of every round line the aggregator printed."""
    return [(int(m[0]), int(m[2]), int(m[3])) for m in _ROUND.findall(log)]


def generate(workdir: Path, job: Job, broker_port: int, redis_port: int) -> Path:
    out = workdir / "compose.yaml"
    env = {**job.env, "FEDBUS_BROKER_PORT": str(broker_port), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "fedbus.cli", "compose", MANIFEST, "--network", "host",
                    "--redis", "--redis-port", str(redis_port), "--out", str(out),
                    "--config-dir", str(workdir / "brokers")],
                   cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, check=True,
                   capture_output=True, text=True)
    return out


def run_compose_job(d: Dockerd, workdir: Path, job: Job, images: dict[str, str],
                    torch_index: str, *, strike: bool = True) -> ComposeResult:
    """Build, up, strike (trainer kill, aggregator kill, down/up), wait for the end, read the
    final model and the logs; everything it made is removed (``down -v``, ``rmi``)."""
    res = ComposeResult()
    broker_port, redis_port = free_port(), free_port()
    doc = yaml.safe_load(generate(workdir, job, broker_port, redis_port).read_text())
    env = {**job.env, "FEDBUS_MOSQUITTO_IMAGE": images["mosquitto"],
           "FEDBUS_REDIS_IMAGE": images["redis"], "FEDBUS_PYTHON_IMAGE": images["python"],
           "FEDBUS_TORCH_INDEX": torch_index}
    # one service per image the file builds (fedbus:dev, fedbus-trainer:dev)
    first: dict[str, str] = {}
    for name, svc in doc["services"].items():
        if "build" in svc:
            first.setdefault(svc["image"], name)
    builders = list(first.values())
    services = ["mosquitto", "redis", "aggregator", "checkpointer",
                *(f"trainer-{i}" for i in range(job.trainers))]
    p = Project(d, workdir, env, services, res)
    started = time.monotonic()
    try:
        p.compose("build", *builders, timeout=3600)
        res.timings["build_s"] = time.monotonic() - started
        res.note(f"docker-compose build {' '.join(builders)}: {res.timings['build_s']:.0f} s")
        started = time.monotonic()
        p.compose("up", "-d")
        res.note("up")
        if strike:
            _strike(p, job, res)

        def finished() -> str | None:
            p.last_round()
            return _finished(p)

        done = _wait("the aggregator to finish", finished, 60 * job.rounds + 600, poll_s=2)
        res.timings["job_s"] = time.monotonic() - started
        log = p.logs("aggregator")
        res.rounds_seen = [r for r, _, _ in rounds_in(log)]
        m = _FINAL.search(log)
        res.accuracy = float(m[1]) if m else None
        res.note(f"aggregator exited {done}; final accuracy={res.accuracy}")
        res.weights = _final_model(p, workdir)
    finally:
        _keep_logs_and_down(p, services, workdir, res)
        built = sorted({doc["services"][b]["image"] for b in builders})
        d.docker("rmi", "-f", *built, check=False, capture=True, timeout=300)
    return res


def _finished(p: Project) -> str | None:
    state = p.inspect("aggregator").get("State", {})
    if state.get("Status") != "exited":
        return None
    if state.get("ExitCode") != 0:
        raise AssertionError(f"aggregator exited {state.get('ExitCode')}:\n"
                             f"{p.logs('aggregator')[-3000:]}")
    return "0"


def crash(p: Project, service: str) -> None:
    """SIGKILL the container's main process from the host: a crash (or the OOM killer) as
    Docker sees it. ``docker kill`` would not do: Docker 20.10 takes it for a manual stop
    and no restart policy applies (test_docker_kill_is_a_manual_stop)."""
    pid = int(p.inspect(service)["State"]["Pid"])
    os.kill(pid, signal.SIGKILL)


def _strike(p: Project, job: Job, res: ComposeResult) -> None:
    # 1. A trainer dies mid-round, holding the round's order and owing its update: killed as
    # the round starts (the aggregator's round_started), while trainer-3 waits out its 4 s
    # (the manifest's `speeds`) before training. Selected, then lost: the round waits for it.
    struck = job.kill_trainer_after + 1
    _wait(f"round {struck} to start", lambda: struck in p.rounds_started(),
          60 * struck + 300, poll_s=0.2)
    victim = "trainer-3"
    before = p.inspect(victim)
    crash(p, victim)
    res.note(f"kill -9 of {victim}'s process as round {struck} started")

    def back() -> bool:
        info = p.inspect(victim)
        return bool(info.get("RestartCount", 0) > before.get("RestartCount", 0)
                    and info.get("State", {}).get("Running"))

    _wait(f"{victim} restarted by its restart policy", back, 120)
    res.trainer_restarts = int(p.inspect(victim).get("RestartCount", 0))
    _wait(f"{victim} healthy again", lambda: p.health(victim) == "healthy", 120, poll_s=2)
    res.note(f"{victim} restarted (RestartCount={res.trainer_restarts}) and healthy")
    # it owed round `struck` its update: the round must close with every trainer in it
    _wait(f"round {struck}", lambda: p.last_round() >= struck, 3 * job.deadline_s + 120)
    for number, got, selected in rounds_in(p.logs("aggregator")):
        if number == struck:
            res.trainer_round_full = got == selected == job.trainers
            res.trainer_rejoined_round = number
    lost = re.findall(r"node_lost_in_round.*?peer=trainer-3.*?round=(\d+)",
                      p.logs("aggregator"))
    res.trainer_lost_in_round = int(lost[-1]) if lost else None
    res.note(f"round {struck} closed with trainer-3's update: {res.trainer_round_full} "
             f"(lost in round {res.trainer_lost_in_round}, then recounted)")

    # 2. The aggregator dies; restart: on-failure brings it back and the checkpointer's
    # state puts it back at the last committed round.
    _wait(f"round {job.kill_aggregator_after}",
          lambda: p.last_round() >= job.kill_aggregator_after, 60 * job.rounds)
    agg_before = p.inspect("aggregator")
    committed = p.last_round()
    crash(p, "aggregator")
    res.note(f"kill -9 of the aggregator's process after round {committed}")

    def agg_restored() -> int | None:
        info = p.inspect("aggregator")
        if info.get("RestartCount", 0) <= agg_before.get("RestartCount", 0):
            return None
        found = _RESTORED.findall(p.logs("aggregator"))
        return int(found[-1]) if found else None

    res.restored_after_kill = _wait("the aggregator restarted and restored", agg_restored, 300)
    res.aggregator_restarts = int(p.inspect("aggregator").get("RestartCount", 0))
    res.note(f"aggregator restarted (RestartCount={res.aggregator_restarts}), restored round "
             f"{res.restored_after_kill}")

    # 3. docker-compose down, then up: volumes (redis, checkpointer, broker) carry the job.
    _wait(f"round {job.down_up_after}", lambda: p.last_round() >= job.down_up_after,
          60 * job.rounds)
    committed = p.last_round()
    p.compose("down", timeout=300)
    res.note(f"docker-compose down after round {committed}")
    p.compose("up", "-d")
    res.note("docker-compose up")
    found = _wait("the aggregator restored after up",
                  lambda: _RESTORED.findall(p.logs("aggregator")), 300, poll_s=2)
    res.restored_after_up = int(found[-1])
    res.note(f"after up the aggregator restored round {res.restored_after_up}")


def _final_model(p: Project, workdir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = workdir / "agg-state"
    out.mkdir(exist_ok=True)
    p.d.docker("cp", f"{p.cid('aggregator')}:/var/lib/fedbus/runs", str(out), capture=True)
    finals = sorted((out / "runs").rglob("model-final.safetensors"),
                    key=lambda f: f.stat().st_mtime)
    if not finals:
        raise AssertionError(f"no model-final.safetensors in the aggregator's volume ({out})")
    return dict(load_file(str(finals[-1])))


class Reference:
    """`fedbus run` of the same manifest and size, on the in-process bus, in the background:
    ``with Reference(workdir, job) as ref: ...; accuracy, weights = ref.result()``."""

    def __init__(self, workdir: Path, job: Job, manifest: str = MANIFEST,
                 env: dict[str, str] | None = None) -> None:
        self.dir = workdir / "reference"
        self.job = job
        self.manifest = manifest
        self.env = job.env if env is None else env
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Reference:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedbus.cli", "run", str(ROOT / self.manifest), "--memory",
             "--runs-dir", str(self.dir / "runs")], cwd=self.dir, text=True,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **self.env},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def result(self) -> tuple[float, dict[str, np.ndarray]]:
        from safetensors.numpy import load_file

        assert self.proc is not None
        out, err = self.proc.communicate(timeout=60 * self.job.rounds + 300)
        if self.proc.returncode != 0:
            raise AssertionError(f"fedbus run failed:\n{err[-2000:]}")
        m = _FINAL.search(out)
        assert m, out[-1000:]
        final = next((self.dir / "runs").rglob("model-final.safetensors"))
        return float(m[1]), dict(load_file(str(final)))


BRIDGED: Final = "examples/compose/three-level-bridged.yaml"


def run_bridged_job(d: Dockerd, workdir: Path, images: dict[str, str], torch_index: str,
                    rounds: int = 3) -> tuple[float | None, list[str], str]:
    """`fedbus compose` of a two-broker manifest on the host's network: the site broker
    bridged to the root one, trainers on the site, the aggregator on the root. Returns the
    final accuracy, the services, and the site broker's generated config."""
    ports = {"FEDBUS_ROOT_PORT": str(free_port()), "FEDBUS_SITE_PORT": str(free_port())}
    env = {"FEDBUS_ROUNDS": str(rounds), "FEDBUS_ROOT_HOST": "127.0.0.1",
           "FEDBUS_SITE_HOST": "127.0.0.1", **ports}
    out = workdir / "compose.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "fedbus.cli", "compose", BRIDGED, "--network", "host",
                    "--out", str(out), "--config-dir", str(workdir / "brokers")],
                   cwd=ROOT, env={**env, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
                   check=True, capture_output=True, text=True)
    doc = yaml.safe_load(out.read_text())
    services = list(doc["services"])
    res = ComposeResult()
    p = Project(d, workdir, {**env, "FEDBUS_MOSQUITTO_IMAGE": images["mosquitto"],
                             "FEDBUS_PYTHON_IMAGE": images["python"],
                             "FEDBUS_TORCH_INDEX": torch_index}, services, res)
    p.name = "fedbusbridged"
    try:
        p.compose("build", "aggregator", timeout=3600)  # every node here loads the torch task
        p.compose("up", "-d")

        def finished() -> str | None:
            p.last_round()
            return _finished(p)

        _wait("the bridged job to finish", finished, 600 + 120 * rounds, poll_s=2)
        m = _FINAL.search(p.logs("aggregator"))
        accuracy = float(m[1]) if m else None
    finally:
        _keep_logs_and_down(p, services, workdir, res)
        d.docker("rmi", "-f", "fedbus-trainer:dev", check=False, capture=True, timeout=300)
    return accuracy, services, (workdir / "brokers" / "broker-site.conf").read_text()

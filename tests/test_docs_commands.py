"""Every command the documents and `--help` show runs as written, in a test.

- Each command of a shell block in README.md and docs/*.md (tests/docs.py reads them) is listed
  in ``DOC_COMMANDS`` with the test that runs it, or why no test can (it installs packages or
  starts system services). A command added to the docs without an entry fails here.
- Each example of `fedbus COMMAND --help` is run by ``test_help_examples_run_as_written`` in a
  scratch project (its ``manifest.yaml`` is the toy task under the job name ``digits``, with
  trainers ``trainer-0..3``, on a broker of the test's own), or is listed in ``HELP_ELSEWHERE``
  with the test that runs it. What the scratch run changes, to share the machine: a fixed
  broker address (``127.0.0.1:1883``, ``10.0.0.5:1883``) becomes the test's broker, port 8765
  a free port, ``/tmp/runs`` a folder of the test, and the placeholder run ids real ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedbus.broker import MosquittoProcess, free_port
from fedbus.cli import _parser
from tests.docs import ROOT, all_commands, block_with

# Generous bounds: they only cut a hang short, and hold on a busy machine.
_STEP_S = 300.0

_COMPOSE = "tests/deploy/test_compose_up.py::test_compose_digits_job_recovers_the_clean_runs_model"
_SYSTEMD = "tests/deploy/test_systemd.py::test_systemd_node_survives_kill_and_reboot"

#: Every command of the documents' shell blocks -> the test that runs it ("path::name"), or
#: "not run: why".
DOC_COMMANDS: dict[str, str] = {
    "make demo": "not run: it installs packages; its run is tests/test_e2e_mqtt.py::"
                 "test_digits_demo_reaches_90_percent, its `fedbus plot digits` runs in "
                 "tests/test_docs_commands.py::test_help_examples_run_as_written",
    "make test": "not run: it is the test suite",
    "fedbus run examples/digits/store-manifest.yaml":
        "tests/test_docs_commands.py::test_the_store_and_review_blocks_run_as_written",
    "fedbus query examples/digits/store-manifest.yaml malicious":
        "tests/test_docs_commands.py::test_the_store_and_review_blocks_run_as_written",
    "fedbus query examples/digits/store-manifest.yaml contribution --arg permutations=16":
        "tests/test_docs_commands.py::test_the_store_and_review_blocks_run_as_written",
    "fedbus query examples/digits/store-manifest.yaml personalization --arg k=2 --arg "
    "client=trainer-3 --save models/":
        "tests/test_docs_commands.py::test_the_store_and_review_blocks_run_as_written",
    "fedbus compose examples/digits/compose-manifest.yaml --redis --out compose.yaml":
        "tests/test_compose_generated.py::test_compose_yaml_is_what_fedbus_compose_generates",
    # the deployment checks run these (tests/deploy; `make deploy-check`, docs/deploy.md)
    "docker-compose build aggregator checkpointer": _COMPOSE,
    "docker-compose up -d": _COMPOSE,
    "sudo FEDBUS_BROKER_HOST=192.168.1.10 edge/install.sh --no-torch --node pi-0 --manifest "
    "examples/toy/edge-manifest.yaml": _SYSTEMD,
    "sudo systemctl enable --now fedbus-pi-0": _SYSTEMD,
    "FEDBUS_BROKER_PORT=<free> fedbus compose examples/digits/compose-manifest.yaml "
    "--network host \\": _COMPOSE,
    "--redis --redis-port <free> --out compose.yaml --config-dir <dir>": _COMPOSE,
    "FEDBUS_BROKER_HOST=127.0.0.1 FEDBUS_BROKER_PORT=<port> edge/install.sh --no-torch \\":
        _SYSTEMD,
    "--node pi-0 --manifest examples/toy/edge-manifest.yaml": _SYSTEMD,
    "systemctl enable --now fedbus-pi-0": _SYSTEMD,
    "fedbus acl examples/toy/secure-manifest.yaml --out examples/toy/secure --operator ops "
    "--group mosquitto":
        "tests/test_readme_security.py::test_readme_securing_commands_run_a_federation",
    "mosquitto -c examples/toy/secure/broker.conf":
        "tests/test_readme_security.py::test_readme_securing_commands_run_a_federation",
    "fedbus run examples/toy/secure-manifest.yaml":
        "tests/test_readme_security.py::test_readme_securing_commands_run_a_federation",
    "fedbus watch examples/toy/secure-manifest.yaml --user ops":
        "tests/test_readme_security.py::test_readme_securing_commands_run_a_federation",
    "fedbus certs examples/toy/mtls-manifest.yaml --out examples/toy/certs --host "
    "broker.example.org":
        "tests/test_readme_security.py::test_readme_mutual_tls_commands_run_a_federation",
    "fedbus acl examples/toy/mtls-manifest.yaml --out examples/toy/secure --certs "
    "examples/toy/certs --group mosquitto":
        "tests/test_readme_security.py::test_readme_mutual_tls_commands_run_a_federation",
    "fedbus run examples/toy/mtls-manifest.yaml":
        "tests/test_readme_security.py::test_readme_mutual_tls_commands_run_a_federation",
    "fedbus keys MANIFEST --rotate t0":
        "tests/test_signing.py::test_a_key_rotates_while_the_federation_runs",
    "fedbus keys MANIFEST --promote t0":
        "not run: tests/test_signing.py::test_a_key_rotates_while_the_federation_runs does "
        "step 3 by hand (one shared keys folder); tests/test_signing.py::test_promote_"
        "finishes_a_rotation runs it",
    "fedbus keys examples/toy/signed-manifest.yaml":
        "tests/test_signing.py::test_the_documented_signing_commands_run_as_written",
    "fedbus run examples/toy/signed-manifest.yaml":
        "tests/test_signing.py::test_the_documented_signing_commands_run_as_written",
    ".venv/bin/fedbus run examples/topologies/star.yaml":
        "tests/test_topologies.py::test_the_star_reference_learns",
    ".venv/bin/fedbus run examples/topologies/hierarchy.yaml":
        "tests/test_topologies.py::test_topology_example_reaches_the_star_accuracy",
    ".venv/bin/fedbus run examples/topologies/three-level-bridged.yaml":
        "tests/test_topologies.py::test_topology_example_reaches_the_star_accuracy",
    ".venv/bin/fedbus run examples/topologies/async-relays.yaml":
        "tests/test_topologies.py::test_topology_example_reaches_the_star_accuracy",
    ".venv/bin/fedbus run examples/topologies/hybrid-ring.yaml":
        "tests/test_topologies.py::test_topology_example_reaches_the_star_accuracy",
    "fedbus ls": "tests/test_docs_commands.py::test_the_store_and_review_blocks_run_as_written",
    "fedbus show digits":
        "tests/test_docs_commands.py::test_the_store_and_review_blocks_run_as_written",
    "fedbus show 20261201-2215":
        "tests/test_docs_commands.py::test_the_store_and_review_blocks_run_as_written",
    "fedbus show digits --logs trainer-3":
        "tests/test_docs_commands.py::test_the_store_and_review_blocks_run_as_written",
    "fedbus show digits --logs --level warning":
        "tests/test_docs_commands.py::test_the_store_and_review_blocks_run_as_written",
    "fedbus run manifest.yaml --dashboard 8765":
        "tests/test_docs_commands.py::test_help_examples_run_as_written",
    "fedbus dashboard manifest.yaml --broker HOST:PORT --port 8765":
        "tests/test_docs_commands.py::test_help_examples_run_as_written",
    "fedbus new mytask": "tests/test_new.py::test_new_project_runs",
    "cd mytask": "tests/test_new.py::test_new_project_runs",
    "fedbus validate manifest.yaml": "tests/test_new.py::test_new_project_runs",
    "fedbus run manifest.yaml": "tests/test_new.py::test_new_project_runs",
}

#: `--help` examples run by another test (or, where they would touch the machine, parsed only).
HELP_ELSEWHERE: dict[str, str] = {
    "fedbus compose examples/compose/three-level-bridged.yaml --out compose.yaml":
        "tests/test_compose_generated.py::test_compose_runs_one_broker_per_brokers_entry_with_"
        "the_bridges generates it (compose_config, as the command does); "
        "tests/deploy/test_compose_up.py::test_compose_two_bridged_brokers_finish_the_job "
        "brings it up",
    "fedbus keys manifest.yaml --out keys/ --operator ops":
        "tests/test_signing.py::test_the_documented_signing_commands_run_as_written",
    "fedbus run examples/digits/manifest.yaml":
        "tests/test_e2e_mqtt.py::test_digits_demo_reaches_90_percent",
    "fedbus run sim.yaml --broker 127.0.0.1:1883 --remote-workers 2":
        "parsed only: tests/test_sim.py::test_two_worker_processes_through_mosquitto_match_one_"
        "process runs `fedbus worker` twice beside the same simulation started in-process",
    "fedbus worker sim.yaml --broker 127.0.0.1:1883":
        "tests/test_sim.py::test_two_worker_processes_through_mosquitto_match_one_process",
    "fedbus serve manifest.yaml --node aggregator --runs-dir /var/lib/fedbus/runs":
        "parsed only: writes under /var/lib; tests/test_runs.py::test_serve_aggregator_"
        "records_its_run serves an aggregator with --runs-dir",
    "fedbus serve manifest.yaml --node aggregator --metrics 0.0.0.0:9108":
        "parsed only: listens on every interface; the same exporter is served by `fedbus run "
        "--metrics` in tests/test_runs.py::test_prometheus_metrics_of_the_aggregator",
    "fedbus watch secure-manifest.yaml --user ops":
        "tests/test_readme_security.py::test_readme_securing_commands_run_a_federation",
    "fedbus dashboard secure-manifest.yaml --user ops":
        "tests/test_readme_security.py::test_readme_securing_commands_run_a_federation",
    "fedbus query manifest.yaml summary":
        "parsed only: needs a store; the README's query block runs in "
        "tests/test_docs_commands.py::test_the_store_and_review_blocks_run_as_written",
    "fedbus query manifest.yaml malicious --arg threshold=2.5": "parsed only: as above",
    "fedbus query manifest.yaml contribution --round 5 --arg permutations=64":
        "parsed only: as above",
    "fedbus query manifest.yaml personalization --arg client=trainer-3 --save models/":
        "parsed only: as above",
    "fedbus new mytask && cd mytask && fedbus run manifest.yaml":
        "tests/test_new.py::test_new_project_runs",
    "mosquitto -c secure/broker.conf":
        "tests/test_readme_security.py::test_readme_securing_commands_run_a_federation "
        "(it listens on 0.0.0.0 with /var/lib/mosquitto: run there with a private listener)",
}


def _test_exists(ref: str) -> bool:
    path, _, name = ref.partition("::")
    file = ROOT / path
    return file.is_file() and re.search(rf"^(async )?def {re.escape(name)}\(",
                                        file.read_text(), re.M) is not None


def test_every_documented_command_is_run_by_a_test() -> None:
    documented = {c.text: c for c in all_commands()}
    missing = [str(c) for text, c in documented.items() if text not in DOC_COMMANDS]
    stale = [text for text in DOC_COMMANDS if text not in documented]
    refs = {*DOC_COMMANDS.values(), *HELP_ELSEWHERE.values()}
    broken = [r for r in refs if not r.startswith(("not run:", "parsed only:"))
              and not _test_exists(r.split(" ")[0])]
    assert not missing, "documented commands no test runs (add them to DOC_COMMANDS):\n" + \
        "\n".join(missing)
    assert not stale, f"DOC_COMMANDS entries no document shows any more: {stale}"
    assert not broken, f"tests named that do not exist: {broken}"


# --- `--help` examples ------------------------------------------------------------------------

def help_examples() -> list[str]:
    """Every example line of every subcommand's `--help` (descriptions after two spaces cut,
    continuation lines joined)."""
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    epilogs = [parser.epilog or "", *(p.epilog or "" for p in sub.choices.values())]
    found: list[str] = []
    for epilog in epilogs:
        text = re.sub(r"\s*\\\n\s*", " ", epilog)
        for line in text.splitlines():
            line = line.strip()
            if line.startswith(("fedbus ", "mosquitto ")):
                example = re.split(r"\s{2,}", line)[0]
                if example not in found:
                    found.append(example)
    return found


def test_every_help_example_parses() -> None:
    parser = _parser()
    for example in help_examples():
        for part in example.split("&&"):
            words = shlex.split(part.split(">>")[0])
            if words[0] != "fedbus":
                continue
            try:
                parser.parse_args(words[1:])
            except SystemExit:
                pytest.fail(f"`{example}` from --help is refused by the argument parser")


class _Scratch:
    """A scratch project; runs command lines in it through bash, `fedbus` being this one."""

    def __init__(self, folder: Path, broker: str) -> None:
        self.folder = folder
        self.broker = broker
        self.env = {k: v for k, v in os.environ.items() if k != "FEDBUS_RUNS_DIR"}
        self.env["PYTHONPATH"] = str(ROOT)
        self.subst: dict[str, str] = {"127.0.0.1:1883": broker, "10.0.0.5:1883": broker,
                                      "/tmp/runs": str(folder / "tmp-runs")}
        self.background: list[asyncio.subprocess.Process] = []
        self.drains: list[asyncio.Task[None]] = []
        self.stderr: dict[int, list[str]] = {}

    def script(self, line: str) -> str:
        for old, new in self.subst.items():
            line = line.replace(old, new)
        return f'fedbus() {{ {shlex.quote(sys.executable)} -m fedbus.cli "$@"; }}\n{line}\n'

    async def run(self, line: str, cwd: Path | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", self.script(line), cwd=cwd or self.folder, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(_STEP_S):
                out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, f"`{line}` exited {proc.returncode}: {err.decode()[-2000:]}"
        return proc.returncode, out.decode(), err.decode()

    async def start(self, line: str, ready: str) -> asyncio.subprocess.Process:
        """Start ``line`` in the background; return once its stderr says ``ready``. Its
        stderr is read all along (``self.stderr[pid]``), so it never blocks on a full pipe."""
        # exec: the signal the test sends reaches fedbus itself, not a shell around it
        assert line.startswith("fedbus ")
        line = f"exec {shlex.quote(sys.executable)} -m fedbus.cli {line[len('fedbus '):]}"
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", self.script(line), cwd=self.folder, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self.background.append(proc)
        lines = self.stderr[proc.pid] = []
        seen = asyncio.Event()

        async def drain() -> None:
            assert proc.stderr is not None
            async for raw in proc.stderr:
                lines.append(raw.decode(errors="replace"))
                if ready in lines[-1]:
                    seen.set()
            seen.set()  # it ended

        self.drains.append(asyncio.create_task(drain()))
        async with asyncio.timeout(_STEP_S):
            await seen.wait()
        assert any(ready in x for x in lines), \
            f"`{line}` ended before saying {ready!r}: {''.join(lines)[-2000:]}"
        return proc

    async def stop(self) -> None:
        for p in self.background:
            if p.returncode is None:
                p.kill()
            await p.wait()
        for d in self.drains:
            d.cancel()


async def _exit(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    """Wait for a background command to end; its exit code and stdout."""
    assert proc.stdout is not None
    async with asyncio.timeout(_STEP_S):
        out = await proc.stdout.read()
        code = await proc.wait()
    return code, out.decode()


def _state(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/state", timeout=_STEP_S) as resp:
        state: dict[str, Any] = json.loads(resp.read())
        return state


def _project(folder: Path, broker: MosquittoProcess | None = None) -> Path:
    folder.mkdir()
    shutil.copytree(ROOT / "examples", folder / "examples",
                    ignore=shutil.ignore_patterns("secure", "certs", "__pycache__"))
    if broker is not None:
        data = yaml.safe_load((ROOT / "examples/toy/manifest.yaml").read_text())
        data.update(job="digits", rounds=2,
                    broker={"host": broker.host, "port": broker.port,
                            "max_queued_messages": 100000},
                    trainers={"count": 4, "prefix": "trainer-", "parent": "aggregator"})
        data["round"]["min_clients"] = 4
        (folder / "manifest.yaml").write_text(yaml.safe_dump(data))
    return folder


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_help_examples_run_as_written(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    examples = help_examples()
    s = _Scratch(_project(tmp_path / "project", mosquitto), f"{mosquitto.host}:{mosquitto.port}")
    ran: list[str] = []
    deploy = s.folder / "deploy"
    deploy.mkdir()
    secured = yaml.safe_load((s.folder / "manifest.yaml").read_text())
    secured["broker"]["password_file"] = "secure/passwords/{node}"
    # systemd units hand a node its password through the environment (fedbus units --secure)
    secured["broker"]["password_env"] = "FEDBUS_BROKER_PASSWORD"
    (deploy / "manifest.yaml").write_text(yaml.safe_dump(secured))

    async def run(example: str, cwd: Path | None = None) -> str:
        assert example in examples, f"not a --help example any more: {example}"
        ran.append(example)
        return (await s.run(example, cwd))[1]

    async def start(example: str, ready: str) -> asyncio.subprocess.Process:
        assert example in examples, f"not a --help example any more: {example}"
        ran.append(example)
        return await s.start(example, ready)

    try:
        # deployment files, for the manifest with passwords (its own folder)
        await run("fedbus validate examples/digits/manifest.yaml")
        await run("fedbus compose examples/digits/compose-manifest.yaml --out compose.yaml")
        await run("fedbus certs manifest.yaml --out certs/ --host broker.lan", deploy)
        await run("fedbus acl manifest.yaml --out secure/ --operator ops", deploy)
        await run("fedbus units manifest.yaml --node trainer-3 --out units/ --secure secure/",
                  deploy)
        await run("fedbus compose manifest.yaml --secure secure/ --out compose.yaml", deploy)
        await run("fedbus bridge examples/topologies/three-level-bridged.yaml --broker site "
                  "--parent-address 10.0.0.5:1883 >> site.conf")
        # a job on the broker, watched and on the dashboard
        page = free_port()
        s.subst["8765"] = str(page)
        watchers = [await start("fedbus watch manifest.yaml --broker 127.0.0.1:1883",
                                "watch_started"),
                    await start("fedbus watch manifest.yaml --broker 127.0.0.1:1883 "
                                "--timeout 300", "watch_started")]
        dash = await start("fedbus dashboard manifest.yaml --broker 127.0.0.1:1883 --port 8765",
                           "dashboard on")
        await run("fedbus run manifest.yaml --rounds 5 --runs-dir /tmp/runs")
        watched = [await _exit(w) for w in watchers]
        state = await asyncio.to_thread(_state, page)
        dash.send_signal(signal.SIGTERM)
        await _exit(dash)
        await run("fedbus run manifest.yaml --memory --quiet")
        s.subst["8765"] = str(free_port())
        await run("fedbus run manifest.yaml --dashboard 8765")
        # the same job served node by node
        trainers = await start("fedbus serve manifest.yaml --node 'trainer-*'",
                               "connect_broker")
        await run("fedbus serve manifest.yaml --node aggregator --broker 10.0.0.5:1883")
        trainers.send_signal(signal.SIGTERM)
        await _exit(trainers)
        # reviewing the runs
        ids = sorted(p.name for p in (s.folder / "runs/digits").iterdir())
        s.subst.update({"20261201-2215-ab12": ids[-1], "run-a": ids[0], "run-b": ids[-1]})
        listed = await run("fedbus ls")
        await run("fedbus ls && fedbus show digits")
        await run("fedbus ls digits --runs-dir /tmp/runs")
        shown = await run("fedbus show digits")
        await run("fedbus show 20261201-2215-ab12")
        await run("fedbus show runs/digits/20261201-2215-ab12")
        logs = await run("fedbus show digits --logs trainer-3")
        await run("fedbus show digits --logs --level warning")
        await run("fedbus plot digits")
        await run("fedbus plot run-a run-b --out compare/")
    finally:
        await s.stop()
    # Assert: what each step should leave or say
    assert (s.folder / "site.conf").read_text().count("address " + s.broker) == 1
    assert (deploy / "units/fedbus-trainer-3.service").is_file()
    assert "secure/passwords" in (deploy / "compose.yaml").read_text()
    assert all(code == 0 and out.count("round ") >= 2 for code, out in watched)
    assert state["round"] >= 2 and state["job"] == "digits"
    assert dash.returncode == 0 and trainers.returncode == 0
    assert listed.count("digits/") == 2 and "finished" in listed
    assert f"digits/{ids[-1]}" in shown and "trainer-3" in logs
    assert len(list((s.folder / "compare").glob("*.png"))) >= 3
    unaccounted = [e for e in examples if e not in ran and e not in HELP_ELSEWHERE]
    assert not unaccounted, f"--help examples no test runs: {unaccounted}"


# --- the README's store block and docs/cli.md's review block ----------------------------------

@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.timeout(1200)
async def test_the_store_and_review_blocks_run_as_written(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    s = _Scratch(_project(tmp_path / "project"), "")
    store = block_with(ROOT / "README.md", "fedbus query ")
    review = block_with(ROOT / "docs/cli.md", "fedbus ls")
    outputs = {}
    for line in store:
        outputs[line] = (await s.run(line))[1]
    run_id = next((s.folder / "runs/digits").iterdir()).name
    s.subst["20261201-2215"] = run_id[:13]
    for line in review:
        outputs[line] = (await s.run(line))[1]
    # Assert: the job ran, the store answered, the review found the run
    assert outputs[store[0]].strip().splitlines()[-1].startswith("final accuracy=")
    for line in store[1:]:
        assert json.loads(outputs[line])["ok"] is True, line
    assert any((s.folder / "models").iterdir())
    assert f"digits/{run_id}" in outputs["fedbus ls"]
    assert f"digits/{run_id}" in outputs["fedbus show digits"]
    assert "trainer-3" in outputs["fedbus show digits --logs trainer-3"]

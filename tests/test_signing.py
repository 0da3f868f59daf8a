"""Signed messages: on an anonymous broker with ``security.sign: required`` nobody can speak
for a node it is not. Forged orders, updates and presence are refused and counted, and the
federation ends with the clean run's model."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from federation import federate

from fedbus import topics
from fedbus.broker import MosquittoProcess
from fedbus.bus import MqttOptions
from fedbus.bus.mqtt import MqttBus
from fedbus.bus.signed import SignedBus
from fedbus.codec import Envelope, encode
from fedbus.connect import make_bus
from fedbus.errors import ManifestError
from fedbus.manifest import Manifest, parse_manifest
from fedbus.signing import SignatureError, Signer, Verifier, generate_key, read_key, write_key_pair
from fedbus.wire import ROUND, UPDATE, presence

pytest.importorskip("cryptography")


# --- the primitives --------------------------------------------------------------------------

def test_a_signed_payload_verifies_and_any_change_is_refused() -> None:
    # Prepare
    alice, alice_pub = generate_key()
    _, bob_pub = generate_key()
    signed = Signer("alice", alice).sign(b"payload")
    strict = Verifier({"alice": alice_pub, "bob": bob_pub}, required=True)
    lenient = Verifier({"alice": alice_pub}, required=False)
    # Execute / Assert
    assert strict.verify(signed) == (b"payload", "alice")
    tampered = b"Payload" + signed[7:]
    as_bob = signed.replace(b"alice", b"bob\x00\x00")  # the trailer names another signer
    for bad, reason in ((tampered, "bad_signature"), (b"payload", "unsigned"),
                        (signed[:-70] + signed[-69:], "bad_signature")):
        with pytest.raises(SignatureError) as err:
            strict.verify(bad)
        assert err.value.reason == reason, (bad, err.value)
    with pytest.raises(SignatureError):
        strict.verify(as_bob)
    with pytest.raises(SignatureError) as err:
        Verifier({"bob": bob_pub}, required=True).verify(signed)
    assert err.value.reason == "unknown_signer"
    assert lenient.verify(b"unsigned") == (b"unsigned", None)


def test_keys_are_written_private(tmp_path: Path) -> None:
    write_key_pair(tmp_path, "t0")
    assert stat.S_IMODE((tmp_path / "t0.key").stat().st_mode) == 0o600
    assert len(read_key(tmp_path / "t0.key")) == len(read_key(tmp_path / "t0.pub")) == 32


def test_a_simulation_cannot_ask_for_signatures() -> None:
    with pytest.raises(ManifestError, match=r"security\.sign"):
        parse_manifest({"version": 1, "job": "s", "rounds": 1,
                        "task": {"ref": "examples.toy.task:make_task"},
                        "population": {"clients": 10, "per_round": 2},
                        "nodes": [{"id": "agg", "role": "aggregator"}],
                        "security": {"sign": "required"}})


# --- a federation on an anonymous broker -----------------------------------------------------

def manifest(broker: MosquittoProcess, keys: Path, sign: str) -> Manifest:
    return parse_manifest({
        "version": 1, "job": "signed", "rounds": 3, "seed": 4, "strategy": "fedavg",
        "broker": {"host": broker.host, "port": broker.port},
        "round": {"deadline_s": 20, "quorum": 1.0, "min_clients": 3, "start_timeout_s": 20},
        # each round lasts a while (0.3 s of "training"): the forgeries land inside the job
        "task": {"ref": "examples.toy.task:make_task",
                 "params": {"size": 64, "lr": 0.5, "delay_s": 0.3}},
        "nodes": [{"id": "agg", "role": "aggregator"}],
        "trainers": {"count": 3, "prefix": "t", "parent": "agg"},
        "security": {"sign": sign, "keys": str(keys)},
    })


async def attack(m: Manifest, mallory_key: bytes | None, started: asyncio.Event) -> int:
    """Forgeries aimed at every kind of node, each well formed: an order on the aggregator's
    topic, an update and an offline presence as t0. Signed with mallory's own (valid, known)
    key when she has one, else unsigned. Returns how many were sent."""
    bus: Any = MqttBus("mallory", m.broker.host, m.broker.port,  # type: ignore[union-attr]
                       options=MqttOptions())
    sent = 0
    async with bus, bus.subscribe(topics.model(m.job, "agg")) as sub:
        await started.wait()
        await sub.get(timeout=30)  # the first real order: every node is listening by now
        order = Envelope(kind=ROUND, job=m.job, sender="agg", round=1,
                         meta={"selected": ["t0", "t1", "t2"], "config": {}, "epoch": "x"},
                         tensors={"m/w": np.full(64, 1e3, np.float32)})
        update = Envelope(kind=UPDATE, job=m.job, sender="t0", round=1,
                          meta={"num_examples": 10**6},
                          tensors={"m/w": np.full(64, 1e3, np.float32)})
        forged = [(topics.model(m.job, "agg"), encode(order)),
                  (topics.update(m.job, "agg", "t0"), encode(update)),
                  (topics.presence(m.job, "t0"),
                   encode(presence(m.job, "t0", "trainer", "offline")))]
        for _ in range(3):
            for topic, payload in forged:
                if mallory_key is not None:
                    payload = Signer("mallory", mallory_key).sign(payload)
                await bus.publish(topic, payload)
                sent += 1
    return sent


async def run(m: Manifest, forge: bool = False, mallory: bytes | None = None
              ) -> tuple[Any, dict[str, Any]]:
    buses: dict[str, Any] = {}

    def bus_for(node: Any) -> Any:
        buses[node.id] = make_bus(m, node)
        return buses[node.id]

    started = asyncio.Event()
    attacker = None
    if forge:
        attacker = asyncio.create_task(attack(m, mallory, started))
    fed = asyncio.create_task(federate(m, bus_for, timeout=90))
    while not buses or not all(  # noqa: ASYNC110 - connection state has no event to await
            getattr(b, "inner", b).connected for b in buses.values()):
        await asyncio.sleep(0.05)
    started.set()
    agg = await fed
    if attacker is not None:
        await attacker
    return agg, buses


@pytest.mark.broker
@pytest.mark.parametrize("mallory_signs", [False, True], ids=["unsigned", "own_key"])
async def test_forgeries_are_refused_and_the_model_is_the_clean_one(
        mosquitto: MosquittoProcess, tmp_path: Path, mallory_signs: bool) -> None:
    # Prepare: keys for every node, and for mallory as if she were a known operator
    keys = tmp_path / "keys"
    m = manifest(mosquitto, keys, "required")
    for node in [n.id for n in m.nodes] + ["mallory"]:
        write_key_pair(keys, node)
    clean, _ = await run(m)
    # Execute
    agg, buses = await run(m, True, read_key(keys / "mallory.key") if mallory_signs else None)
    # Assert: the same model as the clean run, to the bit
    assert [len(r.accepted) for r in agg.history] == [3, 3, 3]
    np.testing.assert_array_equal(agg.weights["w"], clean.weights["w"])
    if mallory_signs:  # a valid signature, of someone else than the sender: the front door
        assert agg.rejections.counts["wrong_signer"] >= 1
    else:  # no signature at all: refused by every node's bus, never delivered
        refused = {n: b.refused["unsigned"] for n, b in buses.items()}
        assert refused["agg"] >= 1 and all(v >= 1 for v in refused.values()), refused
    assert all(isinstance(b, SignedBus) for b in buses.values())


@pytest.mark.broker
def test_the_documented_signing_commands_run_as_written(tmp_path: Path) -> None:
    # Prepare: the example's folder in a scratch checkout (keys are written beside it)
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "examples").mkdir()
    shutil.copy(root / "examples" / "__init__.py", tmp_path / "examples")
    shutil.copytree(root / "examples" / "toy", tmp_path / "examples" / "toy",
                    ignore=shutil.ignore_patterns("keys", "secure", "certs", "__pycache__"))
    env = {**os.environ, "FEDBUS_RUNS_DIR": str(tmp_path / "runs")}

    def fedbus(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fedbus.cli", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)

    # Execute: docs/security.md's block, and `fedbus keys --help`'s example
    made = fedbus("keys", "examples/toy/signed-manifest.yaml")
    ran = fedbus("run", "examples/toy/signed-manifest.yaml")
    (tmp_path / "manifest.yaml").write_text(
        (tmp_path / "examples/toy/signed-manifest.yaml").read_text())
    helped = fedbus("keys", "manifest.yaml", "--out", "keys/", "--operator", "ops")
    # Assert
    assert made.returncode == 0, made.stderr[-2000:]
    keys = tmp_path / "examples" / "toy" / "keys"
    assert sorted(p.name for p in keys.glob("*.key")) == [
        "aggregator.key", "t0.key", "t1.key", "t2.key"]
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.splitlines()[-1].startswith("final loss=")
    assert helped.returncode == 0 and (tmp_path / "keys" / "ops.key").is_file(), helped.stderr


@pytest.mark.broker
async def test_a_key_rotates_while_the_federation_runs(
        mosquitto: MosquittoProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a signed job of 6 rounds; files are looked at every 50 ms instead of 5 s
    import subprocess
    import sys

    import fedbus.signing

    monkeypatch.setattr(fedbus.signing, "KEY_CHECK_S", 0.05)
    keys = tmp_path / "keys"
    m = parse_manifest({**_spec(mosquitto.host, mosquitto.port, keys), "rounds": 6})
    for node in [n.id for n in m.nodes]:
        write_key_pair(keys, node)
    old_key = read_key(keys / "t0.key")
    path = tmp_path / "manifest.yaml"
    path.write_text(json.dumps({**_spec(mosquitto.host, mosquitto.port, keys),  # YAML reads it
                                "rounds": 6}))

    def keys_cmd(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "fedbus.cli", "keys", str(path), *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr

    async def rotate(agg_history: list[Any]) -> None:
        # every node shares this folder, so "copy to every node" is already done
        while len(agg_history) < 1:  # noqa: ASYNC110 - the round reports have no event here
            await asyncio.sleep(0.02)
        await asyncio.to_thread(keys_cmd, "--rotate", "t0")        # 1. both keys accepted
        await asyncio.sleep(0.3)
        os.replace(keys / "t0.key.next", keys / "t0.key")           # 2. t0 signs with the new
        # retire the old key once a whole round went by under the new one: a message t0
        # signed just before it saw its new key can still be on its way (under load, seconds)
        after = min(len(agg_history) + 2, 6)
        while len(agg_history) < after:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        os.replace(keys / "t0.pub.next", keys / "t0.pub")           # 3. the old one retired

    # Execute
    from federation import run_root

    from fedbus.node import build_node

    buses = {n.id: make_bus(m, n) for n in m.nodes}
    services = {i: build_node(m, i, bus) for i, bus in buses.items()}
    for bus in buses.values():
        await bus.__aenter__()
    try:
        rotation = asyncio.create_task(rotate(services["agg"].history))
        agg, _ = await run_root(services, "agg", 120)
        await rotation
    finally:
        for bus in buses.values():
            await bus.__aexit__(None, None, None)
    # Assert: every round had all three, nothing was refused, and the old key is refused now
    assert [len(r.accepted) for r in agg.history] == [3] * 6
    assert all(sum(b.refused.values()) == 0 for b in buses.values())
    assert read_key(keys / "t0.key") != old_key
    await asyncio.sleep(0.1)
    with pytest.raises(SignatureError, match="bad_signature"):
        buses["agg"].verifier.verify(Signer("t0", old_key).sign(b"late"))


def _spec(host: str, port: int, keys: Path) -> dict[str, Any]:
    return {
        "version": 1, "job": "rotating", "rounds": 3, "seed": 4, "strategy": "fedavg",
        "broker": {"host": host, "port": port},
        "round": {"deadline_s": 20, "quorum": 1.0, "min_clients": 3, "start_timeout_s": 20},
        "task": {"ref": "examples.toy.task:make_task",
                 "params": {"size": 64, "lr": 0.5, "delay_s": 0.3}},
        "nodes": [{"id": "agg", "role": "aggregator"}],
        "trainers": {"count": 3, "prefix": "t", "parent": "agg"},
        "security": {"sign": "required", "keys": str(keys)},
    }


def test_promote_finishes_a_rotation(tmp_path: Path) -> None:
    # Prepare: a job's keys, then t0's rotation started
    import subprocess
    import sys

    path = tmp_path / "manifest.yaml"
    path.write_text(json.dumps(_spec("127.0.0.1", 1883, tmp_path / "keys")))

    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fedbus.cli", "keys", str(path), *args],
                              capture_output=True, text=True, timeout=120)

    assert keys().returncode == 0
    before = read_key(tmp_path / "keys" / "t0.pub")
    started = keys("--rotate", "t0")
    new = read_key(tmp_path / "keys" / "t0.pub.next")
    # Execute
    done = keys("--promote", "t0")
    again = keys("--promote", "t0")
    # Assert: the .next pair is t0's now, the old one gone; promoting twice says why not
    assert started.returncode == 0 and "t0.pub.next" in started.stdout
    assert done.returncode == 0, done.stderr
    assert read_key(tmp_path / "keys" / "t0.pub") == new != before
    assert not (tmp_path / "keys" / "t0.pub.next").exists()
    assert again.returncode != 0 and "--rotate t0" in again.stderr

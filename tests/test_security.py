"""Broker security generated from a manifest, proven against a real mosquitto.

A federation runs to completion behind a broker that knows only the manifest's nodes, while a
client holding one trainer's credentials tries what a trainer must never do; every refusal
comes back to that client as an error it can count, not as silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedbus import topics
from fedbus.bus import MqttOptions
from fedbus.bus.mqtt import MqttBus
from fedbus.connect import make_bus
from fedbus.credentials import node_credentials
from fedbus.deploy.local import SecureMosquitto
from fedbus.deploy.passwords import hash_password, read_secrets_file, verify_password
from fedbus.deploy.security import acl_text, node_rights, write_broker_security
from fedbus.errors import ConnectError, DeployError, ManifestError, PublishDenied, SubscribeDenied
from fedbus.manifest import Manifest, compile_wiring, parse_manifest
from fedbus.manifest.wiring import KNOWN_ROLES, role_wiring
from fedbus.node import build_node
from fedbus.services.aggregator import Aggregator
from tests.conftest import SecureBrokerFactory

JOB = "sec"


def _manifest(rounds: int = 4, **broker: Any) -> Manifest:
    # 4 trainers declared, 3 run: t3's credentials are the attacker's. chunk_bytes at its
    # minimum makes every update a chunked upload, which needs the aggregator's grant on
    # control/<trainer>: a federation that finishes proves that grant is allowed.
    return parse_manifest({
        "version": 1, "job": JOB, "rounds": rounds, "seed": 1,
        "broker": {"host": "127.0.0.1", "port": 1883, "chunk_bytes": 1024, **broker},
        "round": {"deadline_s": 20, "quorum": 0.75, "min_clients": 3, "start_timeout_s": 20},
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": 4000, "lr": 0.5}},
        "nodes": [{"id": "aggregator", "role": "aggregator"}],
        "trainers": {"count": 4, "prefix": "t"},
    })


# ----------------------------------------------------------------------------- unit


def test_password_hash_is_mosquittos_format() -> None:
    # Prepare / Execute
    hashed = hash_password("s3cret")
    # Assert: $7$<iterations>$<salt>$<digest>, verifiable, and salted (two hashes differ)
    assert hashed.startswith("$7$101$")
    assert verify_password("s3cret", hashed)
    assert not verify_password("S3cret", hashed)
    assert hash_password("s3cret") != hashed


def test_we_verify_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed")
    path = tmp_path / "pw"
    # Execute
    subprocess.run([tool, "-c", "-b", str(path), "t0", "pa ss"], check=True)
    # Assert
    user, hashed = path.read_text().strip().split(":", 1)
    assert user == "t0" and verify_password("pa ss", hashed)


def test_acl_gives_each_node_exactly_its_wiring() -> None:
    m = _manifest()
    # Execute
    text = acl_text(m, node_rights(m))
    # Assert: a trainer writes only its update and presence; reads its parent's model and
    # its own orders (and presence: it contradicts a forged "offline" about itself)
    block = text.split("user t1\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert sorted(block) == sorted([
        f"topic read {topics.model(JOB, 'aggregator')}",
        f"topic read {topics.control(JOB, 't1')}",
        f"topic write {topics.update(JOB, 'aggregator', 't1')}",
        f"topic readwrite {topics.presence(JOB, 't1')}",
        # chunk repair: NACKs for its update come to it; its NACKs go to its parent only
        f"topic read {topics.nacks_for(JOB, 't1')}",
        f"topic write {topics.nack(JOB, 'aggregator', 't1')}",
        # asynchronous work orders: its own, from its parent only
        f"topic read {topics.work(JOB, 't1', 'aggregator')}",
    ])
    agg = text.split("user aggregator\n", 1)[1].split("\n\n", 1)[0]
    for t in ("t0", "t1", "t2", "t3"):
        assert f"topic write {topics.control(JOB, t)}\n" in agg + "\n"
        assert f"topic write {topics.work(JOB, t, 'aggregator')}\n" in agg + "\n"
    assert "pattern" not in text  # no rule that applies to users not in the manifest


def test_every_role_has_wiring_and_only_parents_publish_models() -> None:
    # Execute
    wirings = {role: role_wiring(JOB, "n1", role, parent="root", children=("c1",))
               for role in KNOWN_ROLES}
    # Assert: valid filters everywhere; models come only from aggregating roles
    for role, w in wirings.items():
        for f in (*w.subscribe, *w.publish):
            topics.validate_filter(f)
        publishes_model = any(topics.matches(p, topics.model(JOB, "n1")) for p in w.publish)
        assert publishes_model == (role in ("aggregator", "relay")), role
        assert not any(topics.matches(p, topics.state(JOB, "root")) for p in w.publish), role


def test_secrets_file_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "secrets.env"
    path.write_text("# comment\nt0=alpha\nt9=beta\n")
    # Execute / Assert
    with pytest.raises(DeployError, match=r"secrets.env:3: 't9' is not a node"):
        read_secrets_file(path, ["t0", "t1"])
    assert read_secrets_file(path, ["t0", "t9"]) == {"t0": "alpha", "t9": "beta"}


def test_passwords_are_kept_across_regeneration_and_given_ones_win(tmp_path: Path) -> None:
    m = _manifest()
    first = write_broker_security(m, tmp_path, plugin="/x.so")
    # Execute
    second = write_broker_security(m, tmp_path, plugin="/x.so", passwords={"t0": "chosen"})
    # Assert
    assert second.passwords["t1"] == first.passwords["t1"]
    assert second.passwords["t0"] == "chosen"
    assert (tmp_path / "passwords" / "t0").read_text().strip() == "chosen"
    assert (tmp_path / "passwords" / "t0").stat().st_mode & 0o077 == 0
    line = next(x for x in second.passwd.read_text().splitlines() if x.startswith("t0:"))
    assert verify_password("chosen", line.split(":", 1)[1])


def test_node_credentials_read_the_nodes_own_password_file(tmp_path: Path) -> None:
    (tmp_path / "pw").mkdir()
    (tmp_path / "pw" / "t2").write_text("t2-secret\n")
    m = dataclasses.replace(_manifest(password_file="pw/{node}"),
                            source=str(tmp_path / "m.yaml"))
    # Execute
    creds = node_credentials(m, "t2")
    # Assert: user = node id, password from its own file, never in a repr
    assert (creds.username, creds.password) == ("t2", "t2-secret")
    assert "t2-secret" not in repr(creds)
    with pytest.raises(ManifestError, match=r"broker\.password_file"):
        node_credentials(m, "t1")


def test_validate_never_prints_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("version: 1\njob: j\nrounds: 1\ntask: examples.toy.task:make_task\n"
                    "broker: {host: h, password_env: FEDBUS_TEST_PW}\n"
                    "nodes: [{id: a, role: aggregator}, {id: t, role: trainer}]\n")
    # Execute
    out = subprocess.run(
        [sys.executable, "-m", "fedbus.cli", "validate", str(path)], capture_output=True,
        text=True,
        env={"FEDBUS_TEST_PW": "hunter2-very-secret", "PATH": "/usr/bin:/bin",
             "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        cwd=Path(__file__).resolve().parents[1], check=False,
    )
    # Assert
    assert out.returncode == 0, out.stderr
    assert "password from $FEDBUS_TEST_PW" in out.stdout
    assert "hunter2" not in out.stdout + out.stderr


# ----------------------------------------------------------------------------- real broker


async def _federation_under_attack(
    sb: SecureMosquitto, *, tls: bool
) -> tuple[Aggregator, dict[str, Any], dict[str, str]]:
    """Run the aggregator and t0..t2, each on its own connection; attack once round 1 is in."""
    m = sb.manifest
    buses = {n: make_bus(m, m.node(n)) for n in ("aggregator", "t0", "t1", "t2")}
    services = {n: build_node(m, n, bus) for n, bus in buses.items()}
    agg = services["aggregator"]
    assert isinstance(agg, Aggregator)
    seen: dict[str, str] = {}

    async def attack_mid_job() -> None:
        await agg.reports.get()  # round 1 finished: the job is under way
        seen.update(await _attack(sb, tls=tls))

    async with contextlib.AsyncExitStack() as stack:
        for bus in buses.values():
            await stack.enter_async_context(bus)
        async with asyncio.timeout(60), asyncio.TaskGroup() as tg:
            for n, svc in services.items():
                tg.create_task(svc.run(), name=n)
            tg.create_task(attack_mid_job(), name="attacker")
    return agg, buses, seen


async def _attack(sb: SecureMosquitto, *, tls: bool) -> dict[str, str]:
    """What a client holding t3's credentials tries; each outcome as the client saw it."""
    creds: dict[str, Any] = (
        {"tls_ca": str(sb.certs.ca), "tls_cert": str(sb.certs.cert("t3")),
         "tls_key": str(sb.certs.key("t3"))} if tls and sb.certs
        else {"username": "t3", "password": sb.password("t3")})
    seen: dict[str, str] = {}
    # Asking for the aggregator's client id: the broker names the session after the user.
    async with MqttBus("t3", sb.host, sb.port, client_id="aggregator",
                       options=MqttOptions(**creds)) as bus:
        forbidden = {
            "global_model": topics.model(JOB, "aggregator"),
            "state": topics.state(JOB, "aggregator"),
            "forged_update": topics.update(JOB, "aggregator", "t0"),
            "order_to_trainer": topics.control(JOB, "t0"),
        }
        for what, topic in forbidden.items():
            try:
                await bus.publish(topic, b"forged")
                seen[what] = "accepted"
            except PublishDenied as exc:
                seen[what] = f"denied 0x{exc.code:02X}"
        for what, f in {"read_updates": topics.updates_for(JOB, "aggregator"),
                        "read_other_update": topics.update(JOB, "aggregator", "t0"),
                        "read_state": topics.state_all(JOB)}.items():
            try:
                async with bus.subscribe(f):
                    seen[what] = "accepted"
            except SubscribeDenied as exc:
                seen[what] = f"denied 0x{exc.code:02X}"
        await bus.publish(topics.update(JOB, "aggregator", "t3"), b"own topic is fine")
        seen["counted"] = f"{bus.stats['publish_denied']}+{bus.stats['subscribe_denied']}"
    return seen


@pytest.mark.broker
@pytest.mark.parametrize("tls", [False, True], ids=["password", "mtls"])
async def test_trainer_credentials_are_refused_while_the_federation_finishes(
    secure_mosquitto: SecureBrokerFactory, tls: bool
) -> None:
    if tls:
        pytest.importorskip("cryptography", reason="mTLS certificates need the security extra")
    # Prepare: a broker that knows only the manifest's nodes (dynsec backend)
    sb = await secure_mosquitto(_manifest(), tls=tls)
    # Execute: the federation, and the attacker once the job is under way
    agg, buses, seen = await _federation_under_attack(sb, tls=tls)
    # Assert: every forbidden act refused and reported to the attacker's client ...
    denied = "denied 0x87"
    assert seen == {
        "global_model": denied, "state": denied, "forged_update": denied,
        "order_to_trainer": denied, "read_updates": denied, "read_other_update": denied,
        "read_state": denied, "counted": "4+3",
    }
    # ... while the federation finished every round with chunked (granted) uploads, and the
    # attacker's choice of client id never kicked the aggregator off the broker
    assert [r.round for r in agg.history] == [1, 2, 3, 4]
    assert all(r.aggregated and len(r.accepted) >= 3 for r in agg.history)
    assert buses["aggregator"].stats["connection_losses"] == 0
    assert all(b.stats["publish_denied"] == 0 for b in buses.values())


@pytest.mark.broker
async def test_acl_file_backend_refuses_publishes_and_filters_reads(
    secure_mosquitto: SecureBrokerFactory,
) -> None:
    # Prepare: the classic password_file + acl_file
    sb = await secure_mosquitto(_manifest(), backend="acl_file")
    agg_bus = make_bus(sb.manifest, sb.manifest.node("aggregator"))
    spy = MqttBus("t3", sb.host, sb.port,
                  options=MqttOptions(username="t3", password=sb.password("t3")))
    async with agg_bus, spy, spy.subscribe(topics.updates_for(JOB, "aggregator")) as stolen:
        async with agg_bus.subscribe(topics.updates_for(JOB, "aggregator")) as legit:
            # Execute
            with pytest.raises(PublishDenied) as refused:
                await spy.publish(topics.model(JOB, "aggregator"), b"forged")
            await spy.publish(topics.update(JOB, "aggregator", "t3"), b"mine")
            got = await legit.get(timeout=5)
            # Assert: the publish refusal is visible; mosquitto 2.0's acl_file grants the
            # SUBSCRIBE but delivers nothing the ACL does not allow (silent, hence dynsec)
            assert refused.value.code == 0x87
            assert got.payload == b"mine"
            with pytest.raises(TimeoutError):
                await stolen.get(timeout=0.5)


@pytest.mark.broker
async def test_wrong_password_is_refused_at_connect(
    secure_mosquitto: SecureBrokerFactory,
) -> None:
    sb = await secure_mosquitto(_manifest())
    # Execute / Assert: refused for good (no retry loop), saying why
    with pytest.raises(ConnectError, match="Not authorized"):
        async with MqttBus("t0", sb.host, sb.port,
                           options=MqttOptions(username="t0", password="guess",
                                               connect_timeout_s=5)):
            pass
    assert compile_wiring(sb.manifest)  # the manifest pointed at the broker still compiles


def _cli(*args: str) -> str:
    # A subprocess: the CLI configures logging for its process, not for the test's.
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "fedbus.cli", *args], capture_output=True,
                          text=True, cwd=root, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_cli_acl_and_certs_write_an_mtls_broker_config(tmp_path: Path) -> None:
    pytest.importorskip("cryptography", reason="`fedbus certs` needs the security extra")
    toy = str(Path(__file__).resolve().parents[1] / "examples/toy/secure-manifest.yaml")
    certs, secure = tmp_path / "certs", tmp_path / "secure"
    # Execute: the README's mTLS commands
    out = _cli("certs", toy, "--out", str(certs), "--host", "broker.example.org")
    out += _cli("acl", toy, "--out", str(secure), "--certs", str(certs),
                "--plugin", "/usr/lib/mosquitto_dynamic_security.so")
    # Assert: one certificate per node, the broker requires them and names users after them
    assert {p.name for p in (certs / "nodes").iterdir()} == {
        f"{n}.{ext}" for n in ("aggregator", "t0", "t1", "t2") for ext in ("crt", "key")}
    conf = (secure / "broker.conf").read_text()
    for line in ("require_certificate true", "use_identity_as_username true",
                 f"cafile {certs}/ca.crt", "listener 1883 0.0.0.0", "allow_anonymous false"):
        assert line in conf
    assert not any(p.read_text().strip() in out for p in (secure / "passwords").iterdir())
    openssl = shutil.which("openssl")
    if openssl:
        ok = subprocess.run([openssl, "verify", "-CAfile", str(certs / "ca.crt"),
                             str(certs / "nodes" / "t1.crt"), str(certs / "broker.crt")],
                            capture_output=True, text=True, check=False)
        assert ok.returncode == 0, ok.stdout + ok.stderr


@pytest.mark.broker
async def test_a_refused_chunked_publish_raises_once_and_stops(
    secure_mosquitto: SecureBrokerFactory,
) -> None:
    sb = await secure_mosquitto(_manifest())
    big = bytes(range(256)) * 64  # 16 KiB: 16 chunks of 1 KiB
    async with MqttBus("t3", sb.host, sb.port,
                       options=MqttOptions(username="t3", password=sb.password("t3"),
                                           chunk_bytes=1024)) as bus:
        # Execute
        with pytest.raises(PublishDenied) as refused:
            await asyncio.wait_for(bus.publish(topics.model(JOB, "aggregator"), big), 10)
        await bus.publish(topics.update(JOB, "aggregator", "t3"), big)
        stats = bus.stats
    # Assert: refused for the model, while the node's own (chunked) update still goes through
    assert refused.value.topic == topics.model(JOB, "aggregator")
    assert refused.value.node == "t3"
    assert 1 <= stats["publish_denied"] <= 16
    assert stats["published"] == 1


@pytest.mark.broker
async def test_an_alias_has_exactly_its_nodes_rights(secure_mosquitto: SecureBrokerFactory) -> None:
    # Prepare: mallory holds t0's rights (the fuzz tests' attacker) while t0 is connected
    sb = await secure_mosquitto(_manifest(), aliases={"mallory": "t0"})
    t0 = make_bus(sb.manifest, sb.manifest.node("t0"))
    mallory = MqttBus("mallory", sb.host, sb.port,
                      options=MqttOptions(username="mallory", password=sb.password("mallory")))
    async with t0, mallory:
        # Execute: t0's own update topic is allowed, a model is not
        await mallory.publish(topics.update(JOB, "aggregator", "t0"), b"forged as t0")
        with pytest.raises(PublishDenied):
            await mallory.publish(topics.model(JOB, "aggregator"), b"forged model")
        # Assert: the real t0 was never kicked off
        assert t0.stats["connection_losses"] == 0

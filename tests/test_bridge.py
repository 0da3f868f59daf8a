"""Several brokers: the manifest's `brokers:` tree, bridges derived from the wiring, and a
federation whose trainers reach the root only through two chained bridges."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

import numpy as np
import pytest
from federation import federate

from fedbus.bus.memory import MemoryBroker
from fedbus.connect import make_bus
from fedbus.deploy.bridge import bridge_config, bridge_topics
from fedbus.deploy.local import spawn_bridged
from fedbus.errors import ManifestError
from fedbus.manifest import Manifest, describe, parse_manifest, with_node_broker
from fedbus.services.aggregator import Aggregator

TASK = {"ref": "examples.toy.task:make_task", "params": {"size": 64, "lr": 0.4}}
T = "fedbus/v1/toy/"


def chain(**over: Any) -> dict[str, Any]:
    """agg on root; relay r1 on region (bridged to root); relay r2 and its trainers on site
    (bridged to region): the model crosses two bridges down, updates two up."""
    data: dict[str, Any] = {
        "version": 1, "job": "toy", "rounds": 3, "seed": 9, "task": TASK,
        "round": {"deadline_s": 10, "quorum": 1.0, "min_clients": 1, "start_timeout_s": 10},
        "brokers": {"root": None, "region": {"parent": "root"}, "site": {"parent": "region"}},
        "nodes": [{"id": "agg", "role": "aggregator"},
                  {"id": "r1", "role": "relay", "parent": "agg", "broker": "region"},
                  {"id": "r2", "role": "relay", "parent": "r1", "broker": "site"},
                  {"id": "t0", "role": "trainer", "parent": "r2", "partition": 0},
                  {"id": "t1", "role": "trainer", "parent": "r2", "partition": 1}],
    }
    data.update(over)
    return data


def test_nodes_inherit_their_parents_broker_and_the_root_defaults_to_the_root_broker() -> None:
    # Prepare / Execute
    m = parse_manifest(chain())

    # Assert
    assert {n.id: n.broker for n in m.nodes} == {
        "agg": "root", "r1": "region", "r2": "site", "t0": "site", "t1": "site"}
    assert m.broker is None  # fedbus run starts the root broker
    assert "site (embedded) bridged to region, 3 nodes" in describe(m)


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"brokers": {"root": None, "site": {"parent": "nowhere"}}}, "brokers.site.parent",
     "unknown broker 'nowhere'"),
    ({"brokers": {"a": {"parent": "b"}, "b": {"parent": "a"}}}, "brokers",
     "exactly one broker (the root) has no parent, found 0"),
    ({"brokers": {"a": None, "b": None}}, "brokers", "found 2: a, b"),
    ({"brokers": {"root": None, "a": {"parent": "b"}, "b": {"parent": "a"}}},
     "brokers.a.parent", "loop"),
    ({"brokers": {"root": {"chunk_bytes": 4096}}}, "brokers.root", "no host/port"),
    ({"broker": {"host": "h", "port": 1}}, "brokers", "exclude each other"),
])
def test_broker_tree_mistakes_name_the_field(change: dict[str, Any], field: str,
                                             words: str) -> None:
    # Prepare
    data = chain(**change)
    if "broker" in change:
        data["brokers"] = chain()["brokers"]

    # Execute
    with pytest.raises(ManifestError) as caught:
        parse_manifest(data)

    # Assert
    assert caught.value.field == field
    assert words in str(caught.value)


def test_a_node_naming_an_unknown_or_absent_broker_is_refused() -> None:
    # Prepare
    bad = chain()
    bad["nodes"][3] = {**bad["nodes"][3], "broker": "mars"}
    single = chain()
    del single["brokers"]
    single["nodes"] = [{k: v for k, v in n.items() if k != "broker"} for n in single["nodes"]]
    single["nodes"][4]["broker"] = "site"

    # Execute / Assert
    with pytest.raises(ManifestError, match="unknown broker 'mars'; known: root, region, site"):
        parse_manifest(bad)
    with pytest.raises(ManifestError, match="no `brokers:` section") as caught:
        parse_manifest(single)
    assert caught.value.field == "nodes[4].broker"


def test_each_bridge_forwards_exactly_what_crosses_it() -> None:
    # Prepare
    m = parse_manifest(chain())

    # Execute
    site = {t.topic: t.direction for t in bridge_topics(m, "site")}
    region = {t.topic: t.direction for t in bridge_topics(m, "region")}

    # Assert: site <-> region: r2 talks to its parent r1 (model, orders, repair)
    assert site == {
        T + "model/r1": "in", T + "control/r2": "in", T + "nack/r2/r1": "in",
        T + "update/r1/r2": "out", T + "nack/r1/r2": "out",
        T + "work/r2/r1": "in",  # asynchronous work orders, r2's own
        # r2 watches every presence (its children's among them), the root's too
        T + "presence/r1": "in", T + "presence/agg": "in",
        T + "presence/r2": "out", T + "presence/t0": "out", T + "presence/t1": "out",
    }
    # region <-> root: r1 talks to agg; the site's presences travel on up (agg watches all)
    assert region == {
        T + "model/agg": "in", T + "control/r1": "in", T + "nack/r1/agg": "in",
        T + "update/agg/r1": "out", T + "nack/agg/r1": "out", T + "work/r1/agg": "in",
        T + "presence/agg": "in",
        T + "presence/r1": "out", T + "presence/r2": "out", T + "presence/t0": "out",
        T + "presence/t1": "out",
    }
    # no wildcard ever crosses: every line is one exact topic
    assert not any("+" in t or "#" in t for t in (*site, *region))
    conf = bridge_config(m, "site", {"region": ("127.0.0.1", 1884)})
    assert "address 127.0.0.1:1884" in conf
    assert f"topic {T}update/r1/r2 out 1" in conf.splitlines()


def test_the_root_and_single_broker_manifests_have_no_bridge() -> None:
    # Prepare
    m = parse_manifest(chain())
    single = parse_manifest({**chain(), "brokers": None,
                             "nodes": [{k: v for k, v in n.items() if k != "broker"}
                                       for n in chain()["nodes"]]})

    # Execute / Assert
    with pytest.raises(ManifestError, match="root broker: it bridges to nothing"):
        bridge_config(m, "root")
    with pytest.raises(ManifestError, match="no broker 'moon'"):
        bridge_config(m, "moon")
    with pytest.raises(ManifestError, match="one broker and so no bridge"):
        bridge_topics(single, "site")


async def _federate(m: Manifest, memory: MemoryBroker | None) -> Aggregator:
    agg: Aggregator = await federate(
        m, lambda n: make_bus(with_node_broker(m, n.id), n, memory=memory))
    return agg


def _clients(log: str) -> set[str]:
    # spawn_bridged's own probe (waiting for the bridge to come up) aside
    return {c for c in re.findall(r"New client connected from \S+ as (\S+) ", log)
            if not c.endswith(".probe")}


@pytest.mark.broker
async def test_a_federation_across_two_chained_bridges_gives_the_one_bus_model() -> None:
    # Prepare: three mosquittos, site -> region -> root, each bridge generated
    pytest.importorskip("fedbus.bus.mqtt")
    m = parse_manifest(chain())
    bridged = await spawn_bridged(m)
    try:
        # Execute: every node on its own broker, then the same job on one in-process bus
        agg = await _federate(bridged.manifest, None)
        logs = {name: p.log_tail(100_000) for name, p in bridged.procs.items()}
    finally:
        await bridged.stop()
    alone = await _federate(m, MemoryBroker())

    # Assert: the trainers and r2 only ever connected to "site"; their updates reached the
    # root through both bridges, and the model is the one-bus model
    job = "fedbus.toy."
    assert _clients(logs["root"]) == {job + "agg", job + "bridge.region"}
    assert _clients(logs["region"]) == {job + "r1", job + "bridge.site"}
    assert _clients(logs["site"]) == {job + "r2", job + "t0", job + "t1"}
    assert [len(r.accepted) for r in agg.history] == [1, 1, 1]
    for key, value in alone.weights.items():
        np.testing.assert_allclose(agg.weights[key], value, atol=1e-6)


@pytest.mark.broker
async def _until_retained(host: str, port: int, topic: str, timeout: float = 10) -> None:
    from fedbus.bus.mqtt import MqttBus

    async with asyncio.timeout(timeout):
        for attempt in range(10_000):  # a fresh client id each time: no session carries over
            async with MqttBus(f"probe{attempt}", host, port) as probe, \
                    probe.subscribe(topic) as sub:
                with contextlib.suppress(TimeoutError):
                    if (await sub.get(timeout=0.5)).retain:
                        return


async def test_retained_presence_and_wills_cross_the_bridge() -> None:
    # Prepare: a trainer on "site" announces itself (retained) before anyone on "root" listens
    from fedbus.bus import Will
    from fedbus.bus.mqtt import MqttBus

    m = parse_manifest(chain())
    bridged = await spawn_bridged(m)
    root, site = bridged.procs["root"], bridged.procs["site"]
    presence = T + "presence/t0"
    try:
        t0 = MqttBus("t0", site.host, site.port, will=Will(presence, b"offline", retain=True))
        await t0.__aenter__()
        await t0.publish(presence, b"online", retain=True)
        # the bridge forwards asynchronously: wait until root holds it, or a subscriber that
        # came first would get it live (retain flag off) and the assertion would race
        await _until_retained(root.host, root.port, presence)
        async with MqttBus("agg", root.host, root.port) as agg, \
                agg.subscribe(T + "presence/+") as sub:
            # Execute: a late subscriber on root, then the trainer dies (no DISCONNECT)
            first = await sub.get(timeout=10)
            await t0.kill()
            second = await sub.get(timeout=10)
    finally:
        await bridged.stop()

    # Assert: the retained "online" was kept on root (two bridges up), the will came too
    assert (first.topic, first.payload, first.retain) == (presence, b"online", True)
    assert (second.topic, second.payload) == (presence, b"offline")


def test_fedbus_bridge_and_validate_on_the_bridged_example() -> None:
    # Prepare
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    example = "examples/topologies/three-level-bridged.yaml"

    def fedbus(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fedbus.cli", *args], cwd=root,
                              capture_output=True, text=True, timeout=60, check=False)

    # Execute
    site = fedbus("bridge", example, "--broker", "site", "--parent-address", "10.0.0.5:1883")
    rooted = fedbus("bridge", example, "--broker", "root")
    unaddressed = fedbus("bridge", example, "--broker", "site")
    valid = fedbus("validate", example)

    # Assert
    assert site.returncode == 0, site.stderr
    lines = site.stdout.splitlines()
    assert "address 10.0.0.5:1883" in lines
    assert "topic fedbus/v1/topo-bridged/update/region/site-a out 1" in lines
    assert "topic fedbus/v1/topo-bridged/model/region in 1" in lines
    assert sum(line.startswith("topic ") for line in lines) == 25  # incl. 2 work-order topics
    assert rooted.returncode == 2 and "root broker" in rooted.stderr
    # the parent's address is `fedbus run`'s to choose here: the error names the flag
    assert unaddressed.returncode == 2 and "--parent-address HOST:PORT" in unaddressed.stderr
    assert valid.returncode == 0, valid.stderr
    assert "site (embedded) bridged to root, 12 nodes" in valid.stdout


@pytest.mark.broker
async def test_a_bridge_logs_in_to_a_secured_parent_with_its_generated_user(
        secure_mosquitto: Any) -> None:
    # Prepare: root locked down by `fedbus acl`'s users and rights (the bridge user among
    # them); the site broker's bridge reads its password where the manifest says
    import dataclasses
    from types import MappingProxyType

    from fedbus.deploy.bridge import bridge_name
    from fedbus.manifest import BrokerSpec

    m = parse_manifest(chain(brokers={"root": None, "site": {"parent": "root"}},
                             nodes=[{**n, "broker": "root" if n["id"] in ("agg", "r1")
                                     else "site"} for n in chain()["nodes"]]))
    sb = await secure_mosquitto(m)
    assert bridge_name(m, "site") in sb.files.users
    root = dataclasses.replace(m.brokers["root"], spec=BrokerSpec(
        host=sb.host, port=sb.port, password_file=str(sb.files.password_dir / "{node}")))
    secured = dataclasses.replace(m, brokers=MappingProxyType({**m.brokers, "root": root}))
    conf = bridge_config(secured, "site")
    assert f"remote_username {bridge_name(m, 'site')}" in conf.splitlines()

    # Execute: the site broker comes up only once its bridge is logged in; then the job runs
    bridged = await spawn_bridged(secured)
    try:
        agg = await _federate(bridged.manifest, None)
    finally:
        await bridged.stop()

    # Assert: r2's updates crossed into the secured root (r1 folded them every round)
    assert [len(r.accepted) for r in agg.history] == [1, 1, 1]


def test_validate_checks_each_brokers_files(tmp_path: Any) -> None:
    # Prepare: the site broker names a CA file that is not there
    from fedbus.checks import check_files

    m = parse_manifest(chain(brokers={
        "root": None, "region": {"parent": "root"},
        "site": {"parent": "region", "host": "10.0.0.7", "port": 8883,
                 "tls_ca": str(tmp_path / "missing-ca.crt")}}))

    # Execute / Assert
    with pytest.raises(ManifestError, match=r"missing-ca\.crt' does not exist") as caught:
        check_files(m)
    assert caught.value.field == "brokers.site.tls_ca"


def test_compose_refuses_brokers_without_an_address_and_says_what_to_do() -> None:
    # Prepare: `fedbus run` starts these brokers itself; a compose file needs their addresses
    from fedbus.deploy.compose import compose_config
    from fedbus.errors import DeployError

    # Execute / Assert (tests/test_compose_generated.py deploys one that has them)
    with pytest.raises(DeployError, match=r"has no host and port.*give each one where its "
                                          r"nodes reach it"):
        compose_config(parse_manifest(chain()), "manifest.yaml")

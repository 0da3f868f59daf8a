"""A second, independent MQTT 5 broker (ejabberd's mod_mqtt): a whole federation on it gives
the in-process bus's model. The bus contract runs on it too (tests/test_bus_contract.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from federation import federate

from fedbus.broker import MosquittoProcess
from fedbus.bus.memory import MemoryBroker
from fedbus.connect import make_bus
from fedbus.manifest import Manifest, parse_manifest
from fedbus.services.aggregator import Aggregator

pytestmark = pytest.mark.broker


def star(broker: dict[str, Any] | None) -> Manifest:
    return parse_manifest({
        "version": 1, "job": "toy", "rounds": 3, "seed": 4,
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": 20_000, "lr": 0.4}},
        # chunks of 64 kB: each model and update crosses the broker in several pieces
        **({"broker": {**broker, "chunk_bytes": 65_536}} if broker else {}),
        "round": {"deadline_s": 20, "quorum": 1.0, "min_clients": 3, "start_timeout_s": 20},
        "nodes": [{"id": "agg", "role": "aggregator"}],
        "trainers": {"count": 3, "prefix": "t"},
    })


async def run_star(m: Manifest, memory: MemoryBroker | None) -> Aggregator:
    agg: Aggregator = await federate(m, lambda n: make_bus(m, n, memory=memory))
    return agg


async def test_a_federation_on_ejabberd_gives_the_one_bus_model(
        ejabberd: MosquittoProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: every node logs in as itself (ejabberd's anonymous mode takes any password)
    monkeypatch.setenv("FEDBUS_TEST_EJABBERD_PW", "anonymous")
    m = star({"host": ejabberd.host, "port": ejabberd.port,
              "password_env": "FEDBUS_TEST_EJABBERD_PW"})

    # Execute
    agg = await run_star(m, None)
    alone = await run_star(star(None), MemoryBroker())

    # Assert
    assert [sorted(r.accepted) for r in agg.history] == [["t0", "t1", "t2"]] * 3
    for key, value in alone.weights.items():
        np.testing.assert_allclose(agg.weights[key], value, atol=1e-6)


async def test_a_share_subscription_is_refused_with_a_reason_and_the_bus_goes_on(
        ejabberd: MosquittoProcess) -> None:
    # Prepare: ejabberd's CONNACK says it has no shared subscriptions; sending one anyway
    # would make it drop the whole connection
    from fedbus.bus import MqttOptions
    from fedbus.bus.mqtt import MqttBus
    from fedbus.errors import SubscribeDenied

    topic = "fedbus/v1/toy/metrics/agg"
    async with MqttBus("worker", ejabberd.host, ejabberd.port,
                       options=MqttOptions(username="worker", password="anonymous",
                                           connect_timeout_s=10, publish_timeout_s=10)) as bus:
        # Execute
        with pytest.raises(SubscribeDenied) as refused:
            async with bus.subscribe("$share/workers/" + topic):
                pass
        async with bus.subscribe(topic) as sub:
            await bus.publish(topic, b"still connected")
            got = await sub.get(timeout=10)

    # Assert: refused by the client, with the MQTT 5 reason; the connection stayed usable
    assert refused.value.code == 0x9E
    assert "$share" in str(refused.value) and "Shared Subscriptions" in str(refused.value)
    assert got.payload == b"still connected"

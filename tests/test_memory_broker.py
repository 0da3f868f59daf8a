"""The memory broker's indexes: the subscription trie and the retained-message tree match
exactly what ``topics.matches`` says, and a publish costs what it matches."""

from __future__ import annotations

import itertools
import random

from fedbus.bus import MemoryBroker, MemoryBus
from fedbus.topics import matches

LEVELS = ("a", "b", "$sys", "c")


def _topics() -> list[str]:
    out = []
    for depth in (1, 2, 3):
        out += ["/".join(p) for p in itertools.product(LEVELS, repeat=depth)]
    return out


def _filters(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        depth = rng.randint(1, 4)
        levels = [rng.choice((*LEVELS, "+", "+")) for _ in range(depth)]
        if rng.random() < 0.4:
            levels[-1] = "#"
        f = "/".join(levels)
        out.append(f"$share/g{rng.randint(0, 1)}/{f}" if rng.random() < 0.2 else f)
    return out


async def test_trie_matches_exactly_like_the_reference_matcher() -> None:
    # Prepare: many random filters (wildcards, '#', $share, $-topics) on one bus each.
    rng = random.Random(7)
    broker = MemoryBroker()
    filters = _filters(rng, 300)
    entries = {}
    for i, f in enumerate(filters):
        bus = MemoryBus(broker, f"n{i}")
        await bus.__aenter__()
        broker._subscribe(bus, f)
        entries[(bus, f)] = f
    # Execute + Assert: the trie's matches equal a scan with topics.matches, in order.
    for topic in _topics():
        got = [(e.bus.node_id, e.topic_filter) for e in broker._trie.match(topic)]
        want = [(b.node_id, f) for (b, f) in entries if matches(f, topic)]
        assert got == want, topic


async def test_unsubscribe_prunes_the_trie() -> None:
    broker = MemoryBroker()
    async with MemoryBus(broker, "x") as bus:
        for f in ("a/+/c", "a/#", "a/b/c", "$share/g/a/b/c"):
            broker._subscribe(bus, f)
            broker._subscribe(bus, f)  # refcounted: the second unsubscribe removes it
        for f in ("a/+/c", "a/#", "a/b/c", "$share/g/a/b/c"):
            broker._unsubscribe(bus, f)
        assert broker.subscriptions == 4
        for f in ("a/+/c", "a/#", "a/b/c", "$share/g/a/b/c"):
            broker._unsubscribe(bus, f)
    assert broker.subscriptions == 0
    assert broker._trie.root.empty()


async def test_retained_tree_matches_like_the_reference_matcher() -> None:
    # Prepare: a retained message on every topic, then clear a third of them.
    rng = random.Random(3)
    broker = MemoryBroker()
    topics = _topics()
    for t in topics:
        broker._route(t, t.encode(), retain=True)
    cleared = set(rng.sample(topics, len(topics) // 3))
    for t in cleared:
        broker._route(t, b"", retain=True)
    kept = sorted(set(topics) - cleared)
    # Execute + Assert
    assert broker.retained_topics == kept
    for f in _filters(rng, 200):
        if f.startswith("$share/"):
            continue
        got = broker._retained.match(f)
        assert got == [(t, t.encode()) for t in kept if matches(f, t)], f


async def _steps_for_one_publish(n_subscribers: int) -> tuple[int, int]:
    """Matcher work and deliveries for one publish with ``n_subscribers`` other nodes, each
    subscribed to its own control topic, plus one subscriber of the published topic."""
    broker = MemoryBroker()
    async with MemoryBus(broker, "pub") as pub, MemoryBus(broker, "agg") as agg:
        many = MemoryBus(broker, "many")
        await many.__aenter__()
        for i in range(n_subscribers):
            broker._subscribe(many, f"fedbus/v1/job/control/t{i}")
        async with agg.subscribe("fedbus/v1/job/update/agg/+") as sub:
            before = broker.match_steps
            await pub.publish("fedbus/v1/job/update/agg/t7", b"x")
            steps = broker.match_steps - before
            await sub.get(timeout=1)
            delivered = agg.stats["delivered"]
        await many.__aexit__(None, None, None)
    return steps, delivered


async def test_a_publish_costs_what_it_matches_not_the_subscriber_count() -> None:
    # Execute: the same publish with 10 and with 10,000 unrelated subscriptions.
    few = await _steps_for_one_publish(10)
    lots = await _steps_for_one_publish(10_000)
    # Assert: identical matcher work (trie nodes visited), one delivery each.
    assert few == lots
    assert lots[0] <= 8 and lots[1] == 1

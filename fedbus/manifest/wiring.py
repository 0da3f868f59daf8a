"""Who may publish and subscribe where, per role: the one table services, ACLs and bridges share,
and ``compile_wiring``, which applies it to every node of a manifest.

``role_wiring`` answers for every role that exists or is planned (aggregator, trainer, relay,
checkpointer, store, operator), so broker ACLs generated from a manifest stay right when a role
is added: the manifest only has to let the role through validation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from fedbus import topics
from fedbus.errors import BusError
from fedbus.manifest.model import GroupSpec, Manifest, thaw
from strategies.base import AsyncStrategy
from strategies.registry import make_strategy

__all__ = ["KNOWN_ROLES", "Wiring", "compile_wiring", "feeds_sketches", "ring_wiring",
           "role_wiring", "store_feed", "with_ring"]

KNOWN_ROLES: Final = ("aggregator", "trainer", "relay", "checkpointer", "store", "operator")


@dataclass(frozen=True, slots=True)
class Wiring:
    """What one node subscribes to and publishes on; the base of broker ACLs.

    ``subscribe`` holds topic filters (``+`` allowed), ``publish`` exact topics or filters
    (``control/+`` for an operator), all built by ``fedbus.topics``.
    """

    node: str
    subscribe: tuple[str, ...]
    publish: tuple[str, ...]


def _toward_children(job: str, node: str, children: Iterable[str]) -> tuple[list[str], list[str]]:
    # An aggregating node reads the updates addressed to it and everyone's presence (liveness),
    # publishes the model and its per-round metrics, and grants uploads on each child's
    # control topic (the upload gate).
    # Chunk repair: it serves NACKs for its model and sends NACKs for its children's updates.
    sub = [topics.updates_for(job, node), topics.presence_all(job), topics.nacks_for(job, node)]
    # Asynchronous work orders go to one child each (work/<child>/<node>), never to all.
    pub = [topics.model(job, node), topics.metrics(job, node)]
    return sub, (pub + [topics.control(job, c) for c in children]
                 + [topics.nack(job, c, node) for c in children]
                 + [topics.work(job, c, node) for c in children])


def _toward_parent(job: str, node: str, parent: str) -> tuple[list[str], list[str]]:
    # A contributing node reads its parent's model, the grants and asynchronous work orders
    # meant for it, and writes only its own update.
    # Chunk repair: NACKs to the parent for its model, from the parent for this update.
    sub = [topics.model(job, parent), topics.control(job, node), topics.nacks_for(job, node),
           topics.work(job, node, parent)]
    return sub, [topics.update(job, parent, node), topics.nack(job, parent, node)]


def role_wiring(job: str, node: str, role: str, *, parent: str | None = None,
                children: Iterable[str] = (), checkpointer: str | None = None,
                asks_store: str | None = None, sketch_feed: bool = False) -> Wiring:
    """Exactly the topics ``node`` (of ``role``) subscribes to and publishes on.

    Aggregator and trainer are what the services do (tests/test_hostile.py spies on them);
    the planned roles are what they will need. Every node writes its own presence. Raises
    ``BusError`` for a role this version does not know. ``sketch_feed``: an aggregator that
    publishes sketch records for a store, or a store fed by them (fedbus.store.feed).
    """
    kids = tuple(children)
    presence = topics.presence(job, node)
    if role == "aggregator":
        sub, pub = _toward_children(job, node, kids)
        if checkpointer is not None:
            # state out to the checkpointer, its acks and restores back on its state topic,
            # restore requests on its control topic
            sub.append(topics.state(job, checkpointer))
            pub += [topics.state(job, node), topics.control(job, checkpointer)]
        if asks_store is not None:
            # a ranked selector's live ranking: ask the store, read its reply
            sub.append(topics.reply(job, node))
            pub.append(topics.query(job, asks_store, node))
        if sketch_feed:
            # per round, the sketches of the updates it accepted, for its store
            pub.append(topics.sketch(job, node))
        return Wiring(node, tuple(sub), (pub[0], pub[1], presence, *pub[2:]))
    if role in ("trainer", "relay") and parent is None:
        raise BusError(f"{role} {node!r} has no parent aggregator")
    if role == "trainer":
        assert parent is not None
        sub, pub = _toward_parent(job, node, parent)
        # its own presence too: a trainer contradicts a forged "offline" about itself
        return Wiring(node, (*sub, presence), (*pub, presence))
    if role == "relay":
        assert parent is not None
        down_sub, down_pub = _toward_children(job, node, kids)
        up_sub, up_pub = _toward_parent(job, node, parent)
        # as a trainer of its parent it watches its own presence too (fedbus.services.relay)
        return Wiring(node, (*down_sub, *up_sub, presence), (*down_pub, *up_pub, presence))
    own_control = topics.control(job, node)
    if role == "checkpointer":
        # Persists every aggregator's state snapshots; acknowledges them and serves them back
        # on its own state topic; takes restore requests on its control topic.
        return Wiring(node, (topics.state_all(job), own_control),
                      (topics.state(job, node), presence))
    if role == "store":
        # Records one aggregator's rounds from what the broker already carries for it (its
        # updates, model and metrics: trainers upload once, the aggregator sends nothing
        # more) and answers workload queries; replies go to whoever asked (reply/<asker>).
        if parent is None:
            raise BusError(f"store {node!r} has no aggregator to record (parent)")
        # Fed sketches (fedbus.store.feed), it reads the aggregator's per-round sketch
        # record instead of a second copy of every update.
        updates = topics.sketch(job, parent) if sketch_feed else topics.updates_for(job, parent)
        return Wiring(node, (updates, topics.model(job, parent),
                             topics.work_from(job, parent),
                             topics.metrics(job, parent), topics.queries_for(job, node)),
                      (topics.replies_all(job), presence))
    if role == "operator":
        # People and dashboards: watch progress and liveness, send commands to any node,
        # ask stores for workloads (`fedbus query`) and read their own replies.
        return Wiring(node, (topics.metrics_all(job), topics.presence_all(job),
                             topics.reply(job, node)),
                      (topics.control_all(job), topics.queries_by(job, node), presence))
    raise BusError(f"role {role!r} has no wiring; known roles: {', '.join(KNOWN_ROLES)}")


def with_ring(w: Wiring, job: str, group: str, members: Iterable[str]) -> Wiring:
    """A trainer's wiring with what its ring group needs (fedbus.services.ring).

    A member reads the reduce steps addressed to it and the other members' presence (a will
    makes the group fall back at once), and writes only to the other members of its group.
    """
    others = [m for m in members if m != w.node]
    return Wiring(w.node,
                  (*w.subscribe, topics.ring_inbox(job, group, w.node),
                   *(topics.presence(job, m) for m in others)),
                  (*w.publish, *(topics.ring(job, group, m, w.node) for m in others)))


def ring_wiring(job: str, groups: Sequence[GroupSpec],
                wiring: dict[str, Wiring]) -> dict[str, Wiring]:
    """``compile_wiring``'s table with each group member's ring topics added to its own."""
    for g in groups:
        wiring.update((m, with_ring(wiring[m], job, g.id, g.members)) for m in g.members)
    return wiring


def compile_wiring(m: Manifest) -> dict[str, Wiring]:
    """Per node id, exactly the filters it subscribes to and the topics it publishes on,
    built only through ``fedbus.topics``. tests/test_hostile.py checks the running services
    against it, so the ACLs and bridges generated from it allow what the protocol needs and
    nothing more."""
    children: dict[str, list[str]] = {}
    for n in m.nodes:
        if n.parent is not None:
            children.setdefault(n.parent, []).append(n.id)
    # The role table (role_wiring above) is shared with the ACL generator (fedbus.deploy).
    ckpt = m.checkpointer
    wire = {n.id: role_wiring(m.job, n.id, n.role, parent=n.parent,
                              children=children.get(n.id, ()),
                              checkpointer=ckpt.id if ckpt is not None else None,
                              asks_store=_ranking_store(m) if n.role == "aggregator" else None,
                              sketch_feed=(feeds_sketches(m, n.id) if n.role == "aggregator"
                                           else n.role == "store" and store_feed(m) == "sketches"))
            for n in m.nodes}
    return ring_wiring(m.job, m.groups, wire)


def store_feed(m: Manifest) -> str:
    """How the manifest's stores get each update: ``updates`` or ``sketches`` (``auto``
    resolved: sketches when no full update is kept and the aggregator is synchronous)."""
    feed = m.store.feed
    if feed != "auto":
        return feed
    if m.store.full_update_rounds > 0 or isinstance(
            make_strategy(m.strategy.name, thaw(m.strategy.params)), AsyncStrategy):
        return "updates"
    return "sketches"


def feeds_sketches(m: Manifest, node_id: str) -> bool:
    """Does aggregator ``node_id`` publish sketch records (a store recording it wants them)?"""
    return store_feed(m) == "sketches" and any(
        n.role == "store" and n.parent == node_id for n in m.nodes)


def _ranking_store(m: Manifest) -> str | None:
    """The store a ``ranked`` selector asks before every round (its ``store`` parameter)."""
    store = m.selector.params.get("store") if m.selector.name == "ranked" else None
    return store if isinstance(store, str) else None

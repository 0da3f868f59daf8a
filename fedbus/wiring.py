"""Who may publish and subscribe where, per role: the one table services, ACLs and bridges share.

``role_wiring`` answers for every role that exists or is planned (aggregator, trainer, relay,
checkpointer, store, operator), so broker ACLs generated from a manifest stay right when a role
is added: the manifest only has to let the role through validation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from fedbus import topics
from fedbus.errors import BusError

__all__ = ["KNOWN_ROLES", "Wiring", "role_wiring"]

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
    # and publishes the model to its children and upload grants on each child's control topic.
    sub = [topics.updates_for(job, node), topics.presence_all(job)]
    pub = [topics.model(job, node)] + [topics.control(job, c) for c in children]
    return sub, pub


def _toward_parent(job: str, node: str, parent: str) -> tuple[list[str], list[str]]:
    # A contributing node reads its parent's model and presence, and writes only its own update.
    sub = [topics.model(job, parent), topics.presence(job, parent)]
    pub = [topics.update(job, parent, node)]
    return sub, pub


def role_wiring(job: str, node: str, role: str, *, parent: str | None = None,
                children: Iterable[str] = ()) -> Wiring:
    """The topics ``node`` (of ``role``) subscribes to and publishes on.

    Every node reads its own control topic and writes its own presence and metrics; the rest
    depends on the role. Raises ``BusError`` for a role this version does not know.
    """
    kids = tuple(children)
    own_sub = [topics.control(job, node)]
    own_pub = [topics.metrics(job, node), topics.presence(job, node)]
    if role == "aggregator":
        sub, pub = _toward_children(job, node, kids)
        # Order kept stable: tests and generated ACLs read better with the model first.
        pub = [pub[0], *own_pub, topics.state(job, node), *pub[1:]]
        return Wiring(node, (*sub, *own_sub), tuple(pub))
    if role == "trainer":
        if parent is None:
            raise BusError(f"trainer {node!r} has no parent aggregator")
        sub, pub = _toward_parent(job, node, parent)
        return Wiring(node, (*sub, *own_sub), (*pub, *own_pub))
    if role == "relay":
        if parent is None:
            raise BusError(f"relay {node!r} has no parent aggregator")
        down_sub, down_pub = _toward_children(job, node, kids)
        up_sub, up_pub = _toward_parent(job, node, parent)
        return Wiring(node, (*down_sub, *up_sub, *own_sub),
                      (*down_pub, *up_pub, *own_pub, topics.state(job, node)))
    if role == "checkpointer":
        # Persists every aggregator's state snapshots; serves them back on its own state topic.
        return Wiring(node, (topics.state_all(job), topics.presence_all(job), *own_sub),
                      (*own_pub, topics.state(job, node)))
    if role == "store":
        # Keeps per-round records: the models and metrics aggregators publish.
        return Wiring(node, (topics.model_all(job), topics.metrics_all(job),
                             topics.presence_all(job), *own_sub),
                      (*own_pub, topics.state(job, node)))
    if role == "operator":
        # People and dashboards: watch progress and liveness, send commands to any node.
        return Wiring(node, (topics.metrics_all(job), topics.presence_all(job), *own_sub),
                      (topics.control_all(job), *own_pub))
    raise BusError(f"role {role!r} has no wiring; known roles: {', '.join(KNOWN_ROLES)}")

"""The topic grammar: the only place topic strings are built, parsed and matched.

Every topic is ``fedbus/v1/<job>/<channel>/<a>[/<b>]``. Identifiers (job, node ids) must be
one MQTT level of ``[A-Za-z0-9_.-]``, so they can never inject ``/``, ``+`` or ``#``.

Channels:
  ``model/<aggregator>``            global model + round orders, aggregator -> its trainers
  ``update/<aggregator>/<sender>``  a trainer's (or relay's) update to its aggregator
  ``metrics/<node>``                per-round metrics and progress, for people and stores
  ``presence/<node>``               retained "online"; the broker publishes "offline" (last will)
  ``state/<node>``                  checkpoint / state snapshots published for the checkpointer
  ``control/<node>``                operator commands to one node (stop, ...)
  ``work/<trainer>/<aggregator>``   asynchronous work order (model + config) for one trainer or
                                    relay, so a trainer receives only its own orders
  ``query/<store>/<sender>``        a request to a store (workload + arguments)
  ``reply/<requester>``             the store's answer, correlated by the request's msg_id
  ``sketch/<aggregator>``           per round, the sketch of every update the aggregator
                                    accepted, for the stores that keep no full updates
  ``task/<worker>/<coordinator>``   simulation: one client's work, to the worker the coordinator
                                    gave it to
  ``result/<coordinator>/<item>/<client>``  simulation: a virtual client's update for work item
                                    ``<item>`` (a number), back to the coordinator
  ``ring/<group>/<to>/<sender>``    hybrid ring groups: one member's reduce step (or abort,
                                    commit) to another member of its group (fedbus.services.ring)
  ``nack/<owner>/<requester>``      chunk repair: "resend these chunks of your transfer", from a
                                    receiver to the node that owns (publishes) a model or update
                                    topic; the bus sends and serves these itself
  ``probe/<client>``                a client's message to itself: once it is back, every retained
                                    message of its earlier subscriptions has arrived
                                    (``fedbus.failover``); no node subscribes to it
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from fedbus.errors import BusError

__all__ = [
    "CHANNELS",
    "ParsedTopic",
    "control",
    "control_all",
    "lease",
    "leases",
    "matches",
    "metrics",
    "metrics_all",
    "model",
    "model_all",
    "nack",
    "nacks_for",
    "parse",
    "presence",
    "presence_all",
    "probe",
    "queries_by",
    "queries_for",
    "query",
    "repair_owner",
    "replies_all",
    "reply",
    "ring",
    "ring_inbox",
    "shared",
    "sim_result",
    "sim_results",
    "sim_tasks",
    "sketch",
    "state",
    "state_all",
    "strip_share",
    "update",
    "updates_for",
    "validate_filter",
    "validate_id",
    "work",
    "work_from",
]

ROOT: Final = "fedbus/v1"
CHANNELS: Final = frozenset({"model", "update", "metrics", "presence", "state", "control",
                             "query", "reply", "task", "result", "nack", "work",
                             "ring", "sketch", "probe", "lease"})
#: Channels whose chunked transfers are repaired by NACK: one publisher per topic, its last
#: level, so a receiver knows whom to ask (and asks no one else).
REPAIRED_CHANNELS: Final = frozenset({"model", "update", "work"})
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a safe single topic level, else raise ``BusError``."""
    if not isinstance(value, str) or not _ID.match(value):
        raise BusError(
            f"{what} {value!r} is not a valid identifier: "
            "use 1-64 of letters, digits, '_', '.', '-'"
        )
    return value


def _t(job: str, channel: str, *levels: str) -> str:
    validate_id(job, "job")
    for level in levels:
        validate_id(level, f"{channel} node id")
    return "/".join((ROOT, job, channel, *levels))


def model(job: str, aggregator: str) -> str:
    return _t(job, "model", aggregator)


def update(job: str, aggregator: str, sender: str) -> str:
    return _t(job, "update", aggregator, sender)


def updates_for(job: str, aggregator: str) -> str:
    """Filter for every update addressed to ``aggregator``."""
    return _t(job, "update", aggregator) + "/+"


def metrics(job: str, node: str) -> str:
    return _t(job, "metrics", node)


def metrics_all(job: str) -> str:
    return _t(job, "metrics") + "/+"


def presence(job: str, node: str) -> str:
    return _t(job, "presence", node)


def presence_all(job: str) -> str:
    return _t(job, "presence") + "/+"


def state(job: str, node: str) -> str:
    return _t(job, "state", node)


def control(job: str, node: str) -> str:
    return _t(job, "control", node)


def query(job: str, store: str, sender: str) -> str:
    return _t(job, "query", store, sender)


def queries_for(job: str, store: str) -> str:
    """Filter for every request addressed to ``store``."""
    return _t(job, "query", store) + "/+"


def queries_by(job: str, sender: str) -> str:
    """Filter for ``sender``'s requests to any store (an operator's publish right)."""
    return _t(job, "query") + "/+/" + validate_id(sender, "query node id")


def reply(job: str, requester: str) -> str:
    return _t(job, "reply", requester)


def replies_all(job: str) -> str:
    return _t(job, "reply") + "/+"


def control_all(job: str) -> str:
    """Filter for every node's control topic (operators write here; ACLs name it)."""
    return _t(job, "control") + "/+"


def model_all(job: str) -> str:
    """Filter for every aggregator's (and relay's) model topic: stores and monitors."""
    return _t(job, "model") + "/+"


def state_all(job: str) -> str:
    """Filter for every node's state snapshots: the checkpointer."""
    return _t(job, "state") + "/+"


def work(job: str, trainer: str, aggregator: str) -> str:
    """One asynchronous work order from ``aggregator`` to ``trainer``: published by the
    aggregator alone (the last level, as on every topic), read by that trainer alone."""
    return _t(job, "work", trainer, aggregator)


def work_from(job: str, aggregator: str) -> str:
    """Filter for every work order ``aggregator`` sends (a simulation hosting many clients)."""
    return _t(job, "work") + "/+/" + validate_id(aggregator, "work node id")


def sketch(job: str, aggregator: str) -> str:
    """Per round, the sketches of the updates ``aggregator`` accepted (fedbus.store.feed):
    published by that aggregator alone, read by the stores that record it."""
    return _t(job, "sketch", aggregator)


def sim_tasks(job: str, coordinator: str, worker: str) -> str:
    """Simulation work items (one virtual client each) that ``coordinator`` gives ``worker``."""
    return _t(job, "task", worker, coordinator)


def sim_result(job: str, coordinator: str, client: str, item: int) -> str:
    """``client``'s update for work item number ``item``, back to the coordinator."""
    return _t(job, "result", coordinator, str(int(item)), client)


def sim_results(job: str, coordinator: str) -> str:
    return _t(job, "result", coordinator) + "/+/+"


def probe(job: str, client: str) -> str:
    return _t(job, "probe", client)


def lease(job: str, node: str, candidate: str) -> str:
    """Where an instance of ``node`` that wants to become active says so (fedbus.failover)."""
    return _t(job, "lease", node, candidate)


def leases(job: str, node: str) -> str:
    return _t(job, "lease", node) + "/+"


def nack(job: str, owner: str, requester: str) -> str:
    return _t(job, "nack", owner, requester)


def nacks_for(job: str, owner: str) -> str:
    """Filter for every NACK addressed to ``owner`` (the bus of ``owner`` serves them)."""
    return _t(job, "nack", owner) + "/+"


def repair_owner(topic: str) -> tuple[str, str] | None:
    """(job, owner) of a topic whose lost chunks may be re-requested, else None."""
    try:
        parsed = parse(topic)
    except BusError:
        return None
    if parsed.channel not in REPAIRED_CHANNELS:
        return None
    return parsed.job, parsed.sender


def ring(job: str, group: str, to: str, sender: str) -> str:
    """A ring group member's message to another member of its group."""
    return _t(job, "ring", group, to, sender)


def ring_inbox(job: str, group: str, member: str) -> str:
    """Filter for every ring message addressed to ``member`` in ``group``."""
    return _t(job, "ring", group, member) + "/+"


def shared(group: str, topic_filter: str) -> str:
    """A ``$share`` subscription: the broker delivers each message to one group member."""
    validate_id(group, "share group")
    return f"$share/{group}/{topic_filter}"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    job: str
    channel: str
    levels: tuple[str, ...]

    @property
    def sender(self) -> str:
        """The node that published on this topic (last level for every channel)."""
        return self.levels[-1]


def parse(topic: str) -> ParsedTopic:
    parts = topic.split("/")
    if len(parts) < 5 or "/".join(parts[:2]) != ROOT or parts[3] not in CHANNELS:
        raise BusError(f"topic {topic!r} is not a fedbus topic ({ROOT}/<job>/<channel>/...)")
    for p in parts[2:3] + parts[4:]:
        validate_id(p, "topic level")
    return ParsedTopic(job=parts[2], channel=parts[3], levels=tuple(parts[4:]))


def validate_filter(topic_filter: str) -> str:
    """Check MQTT filter syntax: '+' fills a level, '#' only last; '$share/g/f' allowed."""
    f = topic_filter
    if f.startswith("$share/"):
        parts = f.split("/", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise BusError(f"shared subscription {f!r} must be $share/<group>/<filter>")
        f = parts[2]
    levels = f.split("/")
    for i, level in enumerate(levels):
        if level == "#" and i != len(levels) - 1:
            raise BusError(f"filter {topic_filter!r}: '#' must be the last level")
        if ("#" in level or "+" in level) and level not in ("#", "+"):
            raise BusError(f"filter {topic_filter!r}: wildcards must fill a whole level")
    return topic_filter


def strip_share(topic_filter: str) -> tuple[str | None, str]:
    """Split ``$share/group/filter`` into (group, filter); (None, filter) otherwise."""
    if topic_filter.startswith("$share/"):
        _, group, rest = topic_filter.split("/", 2)
        return group, rest
    return None, topic_filter


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching, including ``+``, ``#`` and ``$share/<group>/`` prefixes."""
    _, f = strip_share(topic_filter)
    flevels = f.split("/")
    tlevels = topic.split("/")
    if topic.startswith("$") and flevels[0] in ("+", "#"):
        return False  # MQTT: wildcards at the first level never match $-topics
    for i, fl in enumerate(flevels):
        if fl == "#":
            return True
        if i >= len(tlevels):
            return False
        if fl != "+" and fl != tlevels[i]:
            return False
    return len(tlevels) == len(flevels)

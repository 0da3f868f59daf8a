"""The ``nodes:`` and ``trainers:`` sections (and a population's clients as trainers): ids, roles,
the tree of parents, data partitions, and relays' group strategies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

from fedbus import topics
from fedbus.errors import BusError
from fedbus.manifest.model import ROLES, NodeSpec, PluginSpec, PopulationSpec, Role, thaw
from fedbus.manifest.parse.reader import Reader, kind
from fedbus.manifest.parse.strategy import parse_plugin
from strategies.base import AsyncStrategy
from strategies.registry import make_strategy

__all__ = ["parse_nodes", "relay_strategies"]


_PLANNED_ROLES: Final[tuple[str, ...]] = ()
#: Node keys beyond id, role, parent and partition (a relay's group ``strategy``, an async
#: relay's ``pre_aggregate``).
_NODE_EXTRA_KEYS: Final = ("strategy", "pre_aggregate")


def _node(read: Reader, value: Any, field: str) -> NodeSpec:
    t = read.table(value, field, ("id", "role", "parent", "partition", "broker",
                                  *_NODE_EXTRA_KEYS),
                   required=("id", "role"))
    verb = "is" if len(_PLANNED_ROLES) == 1 else "are"
    note = f" ({', '.join(_PLANNED_ROLES)} {verb} planned)" if _PLANNED_ROLES else ""
    role = read.choice(t["role"], f"{field}.role", ROLES, note)
    parent = t.get("parent")
    partition = t.get("partition")
    return NodeSpec(
        id=read.ident(t["id"], f"{field}.id"),
        role=cast(Role, role),
        parent=None if parent is None else read.ident(parent, f"{field}.parent"),
        partition=None if partition is None else read.integer(partition,
                                                              f"{field}.partition", lo=0),
        broker=None if t.get("broker") is None else read.ident(t["broker"],
                                                                f"{field}.broker"),
        strategy=_group_strategy(read, t, field, role),
        pre_aggregate=_pre_aggregate(read, t, field, role),
    )


def _pre_aggregate(read: Reader, t: Mapping[str, Any], field: str, role: str) -> int:
    if t.get("pre_aggregate") is None:
        return 1
    if role != "relay":
        read.fail(f"{field}.pre_aggregate", "only a relay (under an asynchronous root) "
                                            "pre-aggregates its children's updates")
    return read.integer(t["pre_aggregate"], f"{field}.pre_aggregate", lo=1, hi=1 << 16)


def _group_strategy(read: Reader, t: Mapping[str, Any], field: str, role: str) -> PluginSpec | None:
    """A relay's ``strategy``: a synchronous strategy folding its group's updates."""
    if t.get("strategy") is None:
        return None
    if role != "relay":
        read.fail(f"{field}.strategy", "only a relay folds updates with its own strategy; "
                                       "the aggregator's is the top-level `strategy:`")
    spec = parse_plugin(read, t["strategy"], f"{field}.strategy", make_strategy)
    made = make_strategy(spec.name, thaw(spec.params))
    if isinstance(made, AsyncStrategy):
        read.fail(f"{field}.strategy", f"{spec.name!r} is asynchronous; a relay's group "
                                       "strategy folds one synchronous round (fedavg, "
                                       "fedavgm, fedadam, ...)")
    if made.aux_models or made.client_aux_models:
        read.fail(f"{field}.strategy", f"{spec.name!r} exchanges extra tensors with its "
                                       "clients (control variates), which a relay's group "
                                       "does not carry; use it at the root")
    return spec


def relay_strategies(read: Reader, nodes: Sequence[NodeSpec], root: PluginSpec) -> None:
    """Under an asynchronous root a relay forwards each update on its own (exact
    staleness): a group strategy there would have nothing to fold."""
    if not isinstance(make_strategy(root.name, thaw(root.params)), AsyncStrategy):
        for i, n in enumerate(nodes):
            if n.pre_aggregate != 1:
                read.fail(f"nodes[{i}].pre_aggregate",
                          f"the job's strategy {root.name!r} is synchronous: relay {n.id!r} "
                          "folds one update per round already; remove `pre_aggregate:`")
        return
    for i, n in enumerate(nodes):
        if n.strategy is not None:
            read.fail(f"nodes[{i}].strategy",
                      f"the job's strategy {root.name!r} is asynchronous: relay {n.id!r} "
                      "forwards every update tagged with its model version instead of "
                      "folding a round; remove its `strategy:`")


def _shorthand(read: Reader, value: Any) -> list[tuple[NodeSpec, str]]:
    t = read.table(value, "trainers", ("count", "prefix", "parent"), required=("count",))
    count = read.integer(t["count"], "trainers.count", lo=1, hi=100_000)
    prefix = read.string(t.get("prefix", "trainer-"), "trainers.prefix")
    parent = t.get("parent")
    parent_id = None if parent is None else read.ident(parent, "trainers.parent")
    try:
        topics.validate_id(f"{prefix}{count - 1}", "trainer id")
    except BusError as exc:
        read.fail("trainers.prefix", str(exc))
    return [(NodeSpec(id=f"{prefix}{i}", role="trainer", parent=parent_id, partition=i),
             f"trainers[{i}]") for i in range(count)]


def parse_nodes(read: Reader, value: Any, shorthand: Any,
                population: PopulationSpec | None = None) -> tuple[NodeSpec, ...]:
    if not isinstance(value, list):
        read.fail("nodes", f"expected a list of {{id, role, parent, partition}}, "
                           f"got {kind(value)}")
    found = [(_node(read, v, f"nodes[{i}]"), f"nodes[{i}]") for i, v in enumerate(value)]
    if population is not None:
        for n, f in found:
            if n.role == "trainer":
                read.fail(f"{f}.role", "a manifest with `population:` has virtual clients "
                                       "as its trainers; remove the trainer nodes")
        # Plain ids, one small record each: the clients' data, models and state live in
        # the simulation's workers and state store, never one object per client.
        found += [(NodeSpec(id=f"{population.prefix}{i}", role="trainer", partition=i),
                   "population") for i in range(population.clients)]
    if shorthand is not None:
        found += _shorthand(read, shorthand)

    where: dict[str, str] = {}
    for n, f in found:
        if n.id in where:
            read.fail(f"{f}.id" if f.startswith("nodes") else f.split("[")[0],
                      f"duplicate node id {n.id!r} (already used by {where[n.id]}); "
                      "ids must be unique")
        where[n.id] = f

    roots = [(n, f) for n, f in found if n.role == "aggregator"]
    if not roots:
        read.fail("nodes", "no aggregator; add `- {id: aggregator, role: aggregator}`")
    if len(roots) > 1:
        read.fail(f"{roots[1][1]}.role", f"exactly one aggregator is allowed, "
                  f"{roots[0][1]} ({roots[0][0].id!r}) is already one; hierarchical relays "
                  "are planned")
    root, root_field = roots[0]
    if root.parent is not None:
        read.fail(f"{root_field}.parent", "the aggregator is the root and has no parent; "
                                          "remove it")
    if root.partition is not None:
        read.fail(f"{root_field}.partition", "only trainers have a data partition; remove it")

    roles = {n.id: n.role for n, _ in found}
    # trainers and relays hang under the aggregator or a relay (a hierarchy)
    aggregators = ", ".join(sorted(i for i, r in roles.items()
                                   if r in ("aggregator", "relay")))
    parents = {n.id: (n.parent or root.id) for n, _ in found if n.role == "relay"}
    trainers = [(n, f) for n, f in found if n.role == "trainer"]
    if not trainers:
        read.fail("nodes", "no trainers; add `trainers: {count: N}` or trainer nodes")
    out: list[NodeSpec] = []
    partitions: dict[int, str] = {}
    for n, f in found:
        if n.role == "trainer":
            pfield = f"{f}.parent" if f.startswith("nodes") else "trainers.parent"
            if n.parent is None:
                n = dataclasses.replace(n, parent=root.id)
            elif n.parent not in roles:
                read.fail(pfield, f"unknown node {n.parent!r}; a trainer's parent must be "
                                  f"an aggregator or relay: {aggregators}")
            elif roles[n.parent] not in ("aggregator", "relay"):
                read.fail(pfield, f"{n.parent!r} is a {roles[n.parent]}; a trainer's parent "
                                  f"must be an aggregator or relay: {aggregators}")
            if n.partition is not None:
                pf = f"{f}.partition" if f.startswith("nodes") else "trainers"
                if n.partition >= len(trainers):
                    read.fail(pf, f"partition {n.partition} is out of range: with "
                                  f"{len(trainers)} trainers partitions are "
                                  f"0..{len(trainers) - 1}")
                if n.partition in partitions:
                    read.fail(pf, f"partition {n.partition} is already used by "
                                  f"{partitions[n.partition]}; partitions must be unique")
                partitions[n.partition] = f
        elif n.role == "relay":
            n = _relay_node(read, n, f, root.id, roles, parents, aggregators)
        elif n.role == "store":
            n = _store_node(read, n, f, root.id, roles, aggregators)
        elif n.role == "checkpointer":
            if n.parent is not None or n.partition is not None:
                read.fail(f"{f}.parent" if n.parent is not None else f"{f}.partition",
                          "a checkpointer serves every aggregator and holds no data "
                          "partition; remove it")
            if any(o.role == "checkpointer" for o in out):
                read.fail(f"{f}.role", "at most one checkpointer per manifest")
        out.append(n)
    return tuple(out)


def _relay_node(read: Reader, n: NodeSpec, f: str, root: str, roles: Mapping[str, str],
                parents: Mapping[str, str], aggregators: str) -> NodeSpec:
    """A relay aggregates its children and is a trainer of its parent (the root by
    default): an aggregator or another relay, never itself through a loop."""
    if n.partition is not None:
        read.fail(f"{f}.partition", "only trainers have a data partition; remove it")
    parent = n.parent or root
    if roles.get(parent) not in ("aggregator", "relay"):
        what = "unknown node" if parent not in roles else f"a {roles[parent]}"
        read.fail(f"{f}.parent", f"{parent!r} is {what}; a relay's parent is an aggregator "
                                 f"or relay: {aggregators}")
    seen = {n.id}
    up = parent
    while up in parents:
        if up in seen:
            read.fail(f"{f}.parent", f"relays form a loop through {up!r}; every chain of "
                                     f"parents must end at the aggregator {root!r}")
        seen.add(up)
        up = parents[up]
    return dataclasses.replace(n, parent=parent)


def _store_node(read: Reader, n: NodeSpec, f: str, root: str, roles: Mapping[str, str],
                aggregators: str) -> NodeSpec:
    """A store watches one aggregator (its parent, the root by default) and has no data."""
    if n.partition is not None:
        read.fail(f"{f}.partition", "only trainers have a data partition; remove it")
    if n.parent is None:
        return dataclasses.replace(n, parent=root)
    if roles.get(n.parent) != "aggregator":
        what = "unknown node" if n.parent not in roles else f"a {roles[n.parent]}"
        read.fail(f"{f}.parent", f"{n.parent!r} is {what}; a store's parent is the "
                                 f"aggregator it records: {aggregators}")
    return n

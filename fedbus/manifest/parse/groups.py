"""The manifest's ``groups:`` section: hybrid ring groups of trainers (fedbus.services.ring).

    groups:
      - {id: ring-a, mode: ring, members: [trainer-0, trainer-1, trainer-2], step_timeout_s: 10}

A group is two or more trainers under the same parent (the aggregator or a relay); the parent
still selects them one by one, and the group's members sum their updates among themselves
before one of them uploads the group's result (the model's ``GroupSpec``; their topics are
``fedbus.manifest.wiring.ring_wiring``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from fedbus.manifest.model import CodecSpec, GroupSpec, NodeSpec, PluginSpec, RoundSpec
from fedbus.manifest.parse.reader import Reader

__all__ = ["RING_STRATEGIES", "parse_groups"]

#: Synchronous strategies whose aggregate is the example-weighted mean of the deltas (then perhaps a
#: server optimiser step): a group's one update of sum(n_i * delta_i) / sum(n_i) carrying
#: sum(n_i) examples is exactly its members' updates to them. Robust statistics, per-update
#: clipping (server-side DP), control variates (SCAFFOLD) and loss-weighted schemes are not.
RING_STRATEGIES: Final = frozenset({"fedavg", "fedavgm", "fedprox", "fedadagrad", "fedadam",
                                    "fedyogi", "dp_client"})
_KEYS: Final = ("id", "mode", "members", "parent", "step_timeout_s")


def parse_groups(p: Reader, value: Any, nodes: Sequence[NodeSpec], rnd: RoundSpec,
                 strategy: PluginSpec, codec: CodecSpec,
                 population: Any) -> tuple[GroupSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        p.fail("groups", "expected a list of {id, mode, members, step_timeout_s}")
    if value and population is not None:
        p.fail("groups", "a simulated population has no ring groups; remove `groups:`")
    why = _not_for_rings(strategy.name, strategy.params) if value else None
    if why is not None:
        p.fail("groups", f"{why}: a group's one summed update would not count as its "
                         f"members' updates; ring groups work with the example-weighted "
                         f"{', '.join(sorted(RING_STRATEGIES))}")
    if value and codec.update.mode != "none":
        p.fail("groups", f"codec.update {codec.update.mode!r} is lossy per trainer; a ring sums "
                         "exact deltas: remove codec.update or the groups")
    by_id: Mapping[str, NodeSpec] = {n.id: n for n in nodes}
    owner: dict[str, str] = {}
    out: list[GroupSpec] = []
    for i, raw in enumerate(value):
        f = f"groups[{i}]"
        t = p.table(raw, f, _KEYS, required=("id", "members"))
        gid = p.ident(t["id"], f"{f}.id")
        if gid in by_id or any(g.id == gid for g in out):
            p.fail(f"{f}.id", f"{gid!r} is already a node or group id; ids must be unique")
        p.choice(t.get("mode", "ring"), f"{f}.mode", ("ring",), " (tree is not built)")
        members = t["members"]
        if not isinstance(members, list) or len(members) < 2:
            p.fail(f"{f}.members", "expected a list of at least two trainer ids")
        ids = tuple(p.ident(m, f"{f}.members[{j}]") for j, m in enumerate(members))
        parents: set[str | None] = set()
        for j, m in enumerate(ids):
            mf = f"{f}.members[{j}]"
            node = by_id.get(m)
            if node is None or node.role != "trainer":
                what = "no such node" if node is None else f"a {node.role}"
                p.fail(mf, f"{m!r} is {what}; ring group members are trainers")
            if m in owner:
                p.fail(mf, f"{m!r} is already a member of {owner[m]!r}; a trainer is in at "
                           "most one group")
            owner[m] = gid
            parents.add(node.parent)
        if len(parents) != 1:
            p.fail(f"{f}.members", f"members report to different parents "
                                   f"{sorted(str(x) for x in parents)}; a group has one parent")
        parent = str(parents.pop())
        if t.get("parent") is not None and p.ident(t["parent"], f"{f}.parent") != parent:
            p.fail(f"{f}.parent", f"the members' parent is {parent!r}; remove `parent` or fix it")
        # by default a step may take a quarter of the round: a fallback still fits in it
        timeout = p.number(t.get("step_timeout_s", min(10.0, rnd.deadline_s / 4)),
                           f"{f}.step_timeout_s",
                           lambda x: 0 < x < rnd.deadline_s,
                           f"in (0, round.deadline_s={rnd.deadline_s:g})")
        out.append(GroupSpec(id=gid, members=ids, parent=parent, step_timeout_s=timeout))
    return tuple(out)


def _not_for_rings(name: str, params: Mapping[str, Any]) -> str | None:
    """Why a strategy cannot take ring groups' updates; None when it can."""
    if name not in RING_STRATEGIES:
        return f"strategy {name!r}"
    if params.get("weighted", True) is False:
        return f"strategy {name!r} with weighted: false (one vote per update)"
    if name == "dp_client":  # the server side is the wrapped strategy's
        inner = params.get("strategy")
        if isinstance(inner, str):
            return _not_for_rings(inner, {})
        if isinstance(inner, Mapping):
            return _not_for_rings(str(inner.get("name")), inner.get("params") or {})
    return None

"""What the dashboard knows about a job, built from the bus: nodes with their presence (retained
on the broker, so a late dashboard still sees who is there), the topology from the manifest,
every round report the aggregator published, and rejections by reason.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from fedbus import topics
from fedbus.codec import decode
from fedbus.errors import CodecError
from fedbus.manifest import Manifest

__all__ = ["JobState"]

# Node-id prefixes of read-only observers (`fedbus dashboard`, `fedbus watch`).
_OBSERVERS = ("dashboard-", "watch-")
# Only what a chart needs from each round report, so the page's state stays small.
_ROUND_KEYS = ("round", "selected", "participants", "lost", "seconds", "aggregated", "loss",
               "accuracy", "train_loss", "rejected", "staleness_mean", "in_flight")


class JobState:
    """Mutable view of one job; ``version`` grows with every change (the page's SSE cue)."""

    def __init__(self, m: Manifest, observer_id: str) -> None:
        self.m = m
        self.observer_id = observer_id
        self.presence: dict[str, dict[str, Any]] = {}
        self.rounds: list[dict[str, Any]] = []
        self.rejected: Counter[str] = Counter()
        self.version = 0
        self.bad_messages = 0
        self.prefix_metrics = topics.metrics(m.job, m.aggregator.id)

    def on_message(self, topic: str, payload: bytes) -> bool:
        """Fold one bus message in; True when the state changed."""
        try:
            env = decode(payload)
        except CodecError:
            self.bad_messages += 1
            return False
        if topic == self.prefix_metrics:
            row = {k: env.meta[k] for k in _ROUND_KEYS if k in env.meta}
            row.setdefault("round", env.round)
            self.rounds = [r for r in self.rounds if r["round"] != row["round"]] + [row]
            rejected = env.meta.get("rejected")
            if isinstance(rejected, dict):
                self.rejected.update({str(k): int(v) for k, v in rejected.items()
                                      if isinstance(v, int)})
        else:
            node = topic.rsplit("/", 1)[-1]
            if node == self.observer_id or node.startswith(_OBSERVERS):
                return False  # other dashboards and watchers are not part of the job
            self.presence[node] = {"status": str(env.meta.get("status", "unknown")),
                                   "role": str(env.meta.get("role", "")),
                                   "since": time.time()}
        self.version += 1
        return True

    def snapshot(self) -> dict[str, Any]:
        m = self.m
        known = {n.id for n in m.nodes}
        nodes = [{"id": n.id, "role": n.role, "parent": n.parent,
                  "status": self.presence.get(n.id, {}).get("status", "unknown")}
                 for n in m.nodes]
        # Nodes that announce themselves but are not in the manifest (a misconfigured client).
        nodes += [{"id": node, "role": p["role"] or "?", "parent": None, "status": p["status"],
                   "unknown": True}
                  for node, p in sorted(self.presence.items()) if node not in known]
        last = self.rounds[-1] if self.rounds else {}
        agg_status = self.presence.get(m.aggregator.id, {}).get("status", "unknown")
        done = bool(last) and int(last.get("round", 0)) >= m.rounds
        return {
            "job": m.job, "rounds_planned": m.rounds, "strategy": m.strategy.name,
            "status": "finished" if done else ("running" if agg_status == "online" else
                                              f"aggregator {agg_status}"),
            "round": int(last.get("round", 0)), "nodes": nodes, "rounds": self.rounds,
            "rejected": dict(self.rejected), "version": self.version,
        }

"""An asynchronous relay's pre-aggregation window: child updates waiting to go up as one.

A relay with ``pre_aggregate: N`` (the relay node's setting) does not forward its children's
updates one by one: it folds their dense deltas into a window and forwards one update per
window, standing for the window's ``count`` updates (``meta.count``), so the root receives
~N times fewer updates. What goes up, and why the root's math stays (near) the flat star's:

- Inside the window, members are summed per base version ``b`` (the model version they were
  trained from): ``S_b = Σ Δ_i`` over the members from ``b`` (a member that is itself a
  pre-aggregate of c counts c times its mean delta), in float64.
- At flush, with ``h`` the newest version the relay holds and ``B`` the newest base in the
  window, the forwarded delta and tag are

      D = (1/c) Σ_b  w(h − b) / w(h − B) · S_b,      base version B,   count c = Σ members

  where ``w`` is the root strategy's staleness weight (``AsyncStrategy.staleness_scale``:
  FedBuff 1/sqrt(1 + s), FedAsync's s(s)). The root takes it as c updates of D from B
  (``ClientUpdate.count``): FedBuff adds c · w(r − B) · D to its buffer, r the root's
  version on arrival.
- When every member shares one base (b = B), D is the plain mean and the root's buffer gets
  w(r − B) · Σ Δ_i: exactly what the members sent one by one would have added (float32
  rounding of D apart). Members from older versions are re-based onto B with the root's own
  weighting measured at the relay: exact when the root has not moved past ``h`` when the
  update lands (r = h), and otherwise member i is weighted w(r − B) · w(h − b)/w(h − B)
  instead of w(r − b) (for FedBuff, r = h + 1, b = B − 1 = h − 1: 0.50 instead of 0.58).
- The mean is unweighted by examples, because FedBuff and FedAsync ignore ``num_examples``
  (the paper's rule); ``num_examples`` going up is the members' sum, and ``train_loss`` their
  example-weighted mean.

A window holds one float64 model per base version in it (at most ``MAX_BASES``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np

__all__ = ["MAX_BASES", "Combined", "Window"]

#: Base versions one window may hold (one float64 model each); a member from another one
#: flushes the window first.
MAX_BASES: Final = 8


@dataclass(frozen=True, slots=True)
class Combined:
    """A flushed window, ready to go up."""

    base: int
    delta: dict[str, np.ndarray]
    count: int
    num_examples: int
    metrics: dict[str, float]
    #: Who made the members, and from which versions (for the root's report).
    origins: dict[str, int]
    bases: dict[int, int]
    #: The children whose updates are in it.
    senders: tuple[str, ...]


@dataclass(slots=True)
class Window:
    """Members waiting, summed per base version; ``combine`` makes the update that goes up."""

    opened: float = field(default_factory=time.monotonic)
    sums: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    counts: Counter[int] = field(default_factory=Counter)
    count: int = 0
    examples: int = 0
    loss_sum: float = 0.0
    loss_weight: float = 0.0
    origins: Counter[str] = field(default_factory=Counter)
    bases: Counter[int] = field(default_factory=Counter)
    senders: set[str] = field(default_factory=set)

    def fits(self, base: int) -> bool:
        return base in self.sums or len(self.sums) < MAX_BASES

    def add(self, sender: str, base: int, delta: Mapping[str, np.ndarray], *, count: int,
            num_examples: int, metrics: Mapping[str, float],
            origins: Mapping[str, int], bases: Mapping[int, int]) -> None:
        """One member: ``delta`` the mean of ``count`` updates from ``base`` (1: a child's)."""
        acc = self.sums.get(base)
        if acc is None:
            acc = self.sums[base] = {k: np.zeros(v.shape, np.float64) for k, v in delta.items()}
        for k, v in delta.items():
            np.add(acc[k], np.multiply(v, count, dtype=np.float64), out=acc[k])
        self.counts[base] += count
        self.count += count
        self.examples += num_examples
        loss = metrics.get("train_loss")
        if loss is not None and np.isfinite(loss):
            self.loss_sum += float(loss) * num_examples
            self.loss_weight += num_examples
        self.origins.update(origins or {sender: count})
        self.bases.update(bases or {base: count})
        self.senders.add(sender)

    def oldest(self) -> int:
        return min(self.sums)

    def combine(self, held: int, scale: Callable[[int], float],
                dtypes: Mapping[str, np.dtype]) -> Combined:
        """The window as one update, re-based onto its newest base (module docstring);
        ``held`` is the newest version the relay holds, ``scale`` the root's weighting."""
        newest = max(self.sums)
        top = scale(max(0, held - newest))
        out: dict[str, np.ndarray] = {}
        for b, acc in sorted(self.sums.items()):
            w = 1.0 if b == newest or top <= 0 else scale(max(0, held - b)) / top
            for k, v in acc.items():
                if k in out:
                    out[k] += w * v if w != 1.0 else v
                else:
                    out[k] = w * v if w != 1.0 else v.copy()
        delta = {k: (v / self.count).astype(dtypes[k], copy=False) for k, v in out.items()}
        metrics = {"train_loss": self.loss_sum / self.loss_weight} if self.loss_weight else {}
        return Combined(base=newest, delta=delta, count=self.count,
                        num_examples=self.examples, metrics=metrics,
                        origins=dict(self.origins), bases=dict(self.bases),
                        senders=tuple(sorted(self.senders)))

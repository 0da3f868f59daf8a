"""The synchronous aggregator: select, broadcast the model, collect updates, aggregate, repeat.

A round never blocks forever: it ends when every selected trainer has delivered or been lost
(last will), or at the deadline. Below quorum at the deadline it re-broadcasts once per
extension to the pending and to fresh replacement trainers (over-selection), keeping what it
already accumulated, since every update of the round was trained from the same model.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog

from fedbus import topics
from fedbus.bus import Bus, Subscription
from fedbus.checkpoint import AggregatorState
from fedbus.codec import Envelope, encode
from fedbus.compress import encode_model
from fedbus.errors import FedbusError, UpdateRejected
from fedbus.services._base import AggregatorBase, AggregatorSettings
from fedbus.services.observers import RoundObserver
from fedbus.task import EvalResult
from fedbus.wire import DONE, METRICS, ROUND, join_tensors
from strategies import ClientUpdate, Selector, Strategy, Weights

__all__ = ["Aggregator", "AggregatorConfig", "RoundReport"]

log = structlog.get_logger(__name__)

#: After the last pending node of a round is reported lost, how long the round stays open
#: for that report to be contradicted (manifest ``round.loss_grace_s``). A real crash costs
#: the round this much; a forged offline on an open broker no longer ends it.
LOSS_GRACE_S = 0.5
#: How often a waiting round wakes to check whether the broker connection was re-made.
_TICK_S = 1.0


@dataclass(frozen=True, slots=True)
class AggregatorConfig(AggregatorSettings):
    #: Deadlines added (with replacement trainers) when a round is below quorum.
    max_extensions: int = 1
    #: How long a round whose pending nodes were all reported lost waits for a contradiction
    #: (``round.loss_grace_s``, its default resolved: 0 for a simulated population).
    loss_grace_s: float = LOSS_GRACE_S


@dataclass(slots=True)
class RoundReport:
    round: int
    selected: list[str]
    accepted: list[str]
    lost: list[str]
    seconds: float
    aggregated: bool
    eval: EvalResult | None = None
    train_loss: float | None = None
    rejected: dict[str, int] = field(default_factory=dict)
    #: Data lost or refused on the way in (expired or dropped chunked transfers).
    bus_loss: dict[str, int] = field(default_factory=dict)
    #: What the strategy says about the round (DP wrappers: clip and noise multiplier used).
    strategy: dict[str, Any] = field(default_factory=dict)
    #: Seconds until the checkpointer acknowledged this round's state (None: not asked, or
    #: unacknowledged; then ``durable`` is False).
    checkpoint_s: float | None = None
    durable: bool | None = None
    #: Training examples behind the accepted updates.
    examples: int = 0

    def as_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "round": self.round,
            "selected": len(self.selected),
            "participants": len(self.accepted),
            "lost": self.lost,
            "seconds": round(self.seconds, 4),
            "aggregated": self.aggregated,
            "rejected": self.rejected,
        }
        if self.bus_loss:
            meta["bus_loss"] = self.bus_loss
        if self.durable is not None:
            meta["durable"] = self.durable
            if self.checkpoint_s is not None:
                meta["checkpoint_s"] = round(self.checkpoint_s, 4)
        if self.train_loss is not None:
            meta["train_loss"] = self.train_loss
        if self.strategy:
            meta["strategy"] = self.strategy
        if self.eval is not None:
            meta["loss"] = self.eval.loss
            meta.update({k: float(v) for k, v in self.eval.metrics.items()})
        return meta


class Coverage(Protocol):
    """What an admitted update counts for: a capability the aggregator is given, so that
    features which change it (hybrid ring groups) stay out of the round loop."""

    def check(self, meta: Mapping[str, Any], sender: str, selected: set[str],
              accepted: set[str]) -> None:
        """Raise ``UpdateRejected`` when what it claims to cover is not allowed."""
        ...

    def covered(self, meta: Mapping[str, Any], sender: str, n: int) -> dict[str, int]:
        """Who an admitted update delivers for, and their example counts."""
        ...


class SoloCoverage:
    """An update counts for its sender only; one that claims more is refused."""

    def check(self, meta: Mapping[str, Any], sender: str, selected: set[str],
              accepted: set[str]) -> None:
        if "covers" in meta:
            raise UpdateRejected("not_in_group", f"{sender} is in no ring group of this node")

    def covered(self, meta: Mapping[str, Any], sender: str, n: int) -> dict[str, int]:
        return {sender: n}


@dataclass(slots=True)
class _Round:
    number: int
    selected: set[str]
    pending: set[str]
    accepted: set[str] = field(default_factory=set)
    lost: set[str] = field(default_factory=set)
    loss_sum: float = 0.0
    loss_weight: float = 0.0
    #: Training examples behind the accepted updates (a relay reports them upward).
    examples: int = 0
    started: float = field(default_factory=time.monotonic)
    #: When a pending node was last reported lost (``LOSS_GRACE_S``).
    last_loss: float = 0.0
    #: Seconds from the round's start to each accepted update (system speed, for selectors).
    arrivals: dict[str, float] = field(default_factory=dict)
    #: Statistical utility per accepted node (OORT): the trainer's own ``utility`` metric, or
    #: ``num_examples * train_loss`` as a stand-in when it reports none.
    utility: dict[str, float] = field(default_factory=dict)
    #: Ring members whose group's update was refused as ``double_count`` (a member's own
    #: fallback upload got in first): re-asked at once for their own updates (``due``), each
    #: at most once a round (``asked``), so replayed or forged group updates cannot make the
    #: round re-broadcast the model more often than it has members.
    overlap_due: set[str] = field(default_factory=set)
    overlap_asked: set[str] = field(default_factory=set)


class Aggregator(AggregatorBase[AggregatorConfig]):
    """Runs ``config.rounds`` synchronous rounds over ``bus`` and returns the final weights.

    ``evaluate`` (optional) scores a model on held-out data in a worker thread; it is the
    aggregator's copy of the task. ``start_round`` and the strategy/selector state let a
    restarted aggregator continue from a checkpoint.
    """

    grants_with_order = True

    def __init__(
        self,
        config: AggregatorConfig,
        bus: Bus,
        strategy: Strategy,
        selector: Selector,
        weights: Weights,
        *,
        evaluate: Callable[[Weights], EvalResult] | None = None,
        start_round: int = 1,
        observers: Sequence[RoundObserver] = (),
        coverage: Coverage | None = None,
    ) -> None:
        self.config = config
        self.bus = bus
        self.strategy = strategy
        self.selector = selector
        self.weights = {k: np.ascontiguousarray(v) for k, v in weights.items()}
        self.evaluate = evaluate
        self.start_round = start_round
        self.history: list[RoundReport] = []
        #: Every finished round's report, for displays; unbounded but one small item a round.
        self.reports: asyncio.Queue[RoundReport] = asyncio.Queue()
        self._round = 0
        self._state: _Round | None = None
        self._log = log.bind(node=config.node_id, role="aggregator", job=config.job)
        #: What an update counts for: its sender (default), or the members of a ring group
        #: it covers (``fedbus.services.ring.RingCoverage``, given by node.py).
        self.coverage: Coverage = coverage or SoloCoverage()
        #: Features riding along the rounds (fedbus.services.observers).
        self.observers: list[RoundObserver] = list(observers)
        self._init_intake(strategy.aux_models)

    # --- main loop -------------------------------------------------------------------------
    async def run(self) -> Weights:
        c = self.config
        async with self.subscribe() as sub:
            await self._publish_presence("online")
            try:
                restored = await self._restore(sub)
                if restored is not None:
                    self._apply(restored)
                await self.wait_for_clients(sub, c.round.min_clients, c.round.start_timeout_s)
                for number in range(self.start_round, c.rounds + 1):
                    report = await self.run_round(sub, number)
                    if self.durability is not None and self.durability.due(number, c.rounds):
                        # the round is committed once the checkpointer has it
                        latency = await self._checkpoint(sub, self._state_after(number, report))
                        report.checkpoint_s = latency
                        report.durable = latency is not None
                    self.history.append(report)
                    self.reports.put_nowait(report)
                    await self._publish(topics.metrics(c.job, c.node_id), METRICS, number,
                                        report.as_meta())
                await self._publish(topics.model(c.job, c.node_id), DONE, c.rounds,
                                    {"rounds": c.rounds})
            finally:
                # A stop (SIGTERM: compose down, systemctl stop) disconnects cleanly, so no will
                # fires: say goodbye, or the retained `online` keeps the next instance waiting
                # as a standby for good (fedbus.failover). Best effort, as the trainer's.
                with contextlib.suppress(FedbusError):
                    await self._publish_presence("offline")
        for observer in self.observers:
            observer.close()
        return self.weights

    async def run_round(self, sub: Subscription, number: int) -> RoundReport:
        """One synchronous round from ``self.weights``: select, broadcast, gather until the
        deadline and quorum, fold. ``self.weights`` is the new model when it aggregated."""
        c = self.config
        started = time.monotonic()
        if not self.online & c.trainers:
            # min_clients gates the first round only: a federation that lost a trainer goes
            # on with who is left, but never runs a round with nobody at all.
            await self.wait_for_clients(sub, 1, c.round.start_timeout_s)
        for observer in self.observers:  # e.g. a fresh ranking from a store
            await observer.round_starting(number, self.bus)
        available = sorted(self.online & c.trainers)
        selected = set(self.selector.select(available, number)) if available else set()
        state = _Round(number, selected=set(selected), pending=set(selected), started=started)
        self._round = number
        self._state = state
        self._gate.reset()
        self.strategy.begin(self.weights, number)
        need = max(1, math.ceil(c.round.quorum * len(selected))) if selected else 1
        await self._broadcast(state)
        self._log.info("round_started", round=number, selected=len(selected), quorum=need)
        extensions = 0
        reconnects = self._reconnects()
        deadline = started + c.round.deadline_s
        while True:
            while state.pending or self._in_grace(state):
                if self._reconnects() > reconnects:
                    # The broker went away and came back: what was sent to us meanwhile may
                    # be gone with it. Ask the pending trainers again; those that delivered
                    # send the same update again (deduplicated if it did arrive).
                    reconnects = self._reconnects()
                    self._log.warning("round_reasked", round=number,
                                      pending=sorted(state.pending))
                    await self._broadcast(state)
                now = time.monotonic()
                left = deadline - now
                if not state.pending:
                    # Everyone pending was reported lost: give a contradiction (the node is
                    # alive and says so) a moment to arrive before the round closes.
                    left = min(left, state.last_loss + c.loss_grace_s - now)
                if left <= 0:
                    break
                wait = min(left, _TICK_S)  # wake now and then to notice a reconnect
                try:
                    msg = await sub.get(timeout=wait)
                except TimeoutError:
                    if wait < left:
                        continue
                    break
                await self.dispatch(msg)
                if state.overlap_due:
                    await self._reask_overlap(state)
            if len(state.accepted) >= need or extensions >= c.max_extensions:
                break
            # Below quorum: over-select replacements among idle online trainers and give the
            # round one more deadline. Accumulated updates stay: same model, same round.
            extensions += 1
            idle = sorted((self.online & c.trainers) - state.selected)
            extra = set(self.selector.select(idle, number)) if idle else set()
            extra = set(sorted(extra)[: need - len(state.accepted)])
            state.selected |= extra
            state.pending |= extra
            self._log.warning("round_extended", round=number, accepted=len(state.accepted),
                              quorum=need, replacements=sorted(extra),
                              missing=sorted(state.pending))
            await self._broadcast(state)
            deadline = time.monotonic() + c.round.deadline_s
        for node in sorted(state.pending):
            self._log.warning("update_missing", round=number, node=node)
        aggregated = len(state.accepted) >= need
        self._state = None  # late updates from here on are stale
        if aggregated:
            self.weights = await self._offload(self.strategy.finish)
        else:
            self._log.error("round_failed", round=number, accepted=len(state.accepted),
                            quorum=need, detail="model unchanged")
        for node in sorted(state.selected):
            self.selector.report(node, number, completed=node in state.accepted,
                                 duration_s=state.arrivals.get(node),
                                 utility=state.utility.get(node))
        for observer in self.observers:  # inside the round's time: measured with it
            await observer.round_closed(number, sorted(state.selected), aggregated, self.bus)
        report = RoundReport(
            round=number,
            selected=sorted(state.selected),
            accepted=sorted(state.accepted),
            lost=sorted(state.lost),
            seconds=time.monotonic() - started,
            aggregated=aggregated,
            train_loss=state.loss_sum / state.loss_weight if state.loss_weight else None,
            examples=state.examples,
            # everything since the last report: what landed between rounds counts too
            rejected=self.rejections.since_report(),
            bus_loss=self._bus_losses(),
            strategy=_plain(self.strategy.report()) if aggregated else {},
        )
        if self.evaluate is not None and (number % c.evaluate.every == 0 or number == c.rounds):
            report.eval = await asyncio.to_thread(self.evaluate, self.weights)
        report.seconds = time.monotonic() - started
        self._log.info("round_finished", **report.as_meta())
        return report

    # --- checkpoints ------------------------------------------------------------------------
    def _state_after(self, number: int, report: RoundReport) -> AggregatorState:
        return AggregatorState(
            job=self.config.job, node=self.config.node_id, round=number, weights=self.weights,
            strategy=self.strategy.state_dict(), selector=self.selector.state_dict(),
            info={"strategy": type(self.strategy).__name__, "aggregated": report.aggregated},
        )

    def _apply(self, state: AggregatorState) -> None:
        """Continue from a checkpoint: the model, the strategy's and the selector's state."""
        if state.weights.keys() != self.weights.keys():
            raise FedbusError(f"checkpoint of round {state.round} holds tensors "
                              f"{sorted(state.weights)[:5]}, the model has "
                              f"{sorted(self.weights)[:5]}: not this job's model")
        self.weights = {k: np.ascontiguousarray(v) for k, v in state.weights.items()}
        self.strategy.load_state_dict(state.strategy)
        self.selector.load_state_dict(state.selector)
        self.start_round = state.round + 1
        self._log.warning("restored", round=state.round, next_round=self.start_round,
                          epoch=self.epoch)

    # --- incoming: the intake's hooks -----------------------------------------------------
    def _grant_round(self, node: str) -> int:
        return self._round

    def _reconnects(self) -> int:
        stats = getattr(self.bus, "stats", None)
        return int(stats.get("reconnects", 0)) if isinstance(stats, Mapping) else 0

    def _in_grace(self, state: _Round) -> bool:
        grace = self.config.loss_grace_s
        return bool(state.lost) and time.monotonic() - state.last_loss < grace

    def _on_lost(self, node: str) -> None:
        state = self._state
        if state is not None and node in state.pending:
            self._log.warning("node_lost_in_round", peer=node, round=state.number)
            state.pending.discard(node)
            state.lost.add(node)
            state.last_loss = time.monotonic()

    def node_online(self, node: str) -> None:
        # Reported lost, yet here it is (a forged offline, or a will that crossed a quick
        # reconnect): it still owes this round its update.
        state = self._state
        if state is not None and node in state.lost and node not in state.accepted:
            self._log.warning("node_recounted", peer=node, round=state.number)
            state.lost.discard(node)
            state.pending.add(node)

    def expects_ready(self, sender: str, number: int) -> bool:
        state = self._state
        return state is not None and number == state.number and sender in state.pending

    def admit(self, env: Envelope, sender: str) -> int:
        state = self._state
        if state is None or env.round != state.number:
            raise UpdateRejected("stale", f"update for round {env.round}, "
                                          f"current {state.number if state else None}")
        if sender not in state.selected:
            raise UpdateRejected("not_selected", f"round {env.round}")
        if sender in state.accepted:
            raise UpdateRejected("duplicate", f"second update in round {env.round}")
        try:
            self.coverage.check(env.meta, sender, state.selected, state.accepted)
        except UpdateRejected as exc:
            if exc.reason == "double_count":  # a ring group's update, overlapping
                self._overlap(state, env.meta)
            raise  # still refused whole, and counted
        return 0

    def _overlap(self, state: _Round, meta: Mapping[str, Any]) -> None:
        """A group's update covers a member whose own update is already in (its ring step
        timed out and it fell back while another member committed): the sum cannot be split,
        so the others it covers owe their own updates. Each member holds its own update for
        a resend (the trainer's ``update_resent``): ask them now, not at the deadline."""
        covers = meta.get("covers")
        assert isinstance(covers, dict)  # check_covers passed that far
        owed = {m for m in covers if m in state.pending} - state.overlap_asked
        state.overlap_due |= owed
        state.overlap_asked |= owed

    async def _reask_overlap(self, state: _Round) -> None:
        named, state.overlap_due = state.overlap_due & state.pending, set()
        if not named:
            return  # delivered meanwhile
        self._log.warning("group_overlap_reasked", round=state.number, pending=sorted(named))
        await self._broadcast(state, named)

    def fold(self, update: ClientUpdate, env: Envelope) -> None:
        state = self._state
        assert state is not None  # admit() passed
        self.strategy.accumulate(update)
        sender, n = update.sender, update.num_examples
        state.examples += n
        for member in self.coverage.covered(env.meta, sender, n):  # a group's: several
            state.pending.discard(member)
            state.lost.discard(member)  # reported offline, yet it delivered: it counts
            state.accepted.add(member)
            state.arrivals[member] = time.monotonic() - state.started
        loss = update.metrics.get("train_loss")
        if loss is not None:
            state.loss_sum += float(loss) * n
            state.loss_weight += n
        utility = update.metrics.get("utility")
        if utility is not None:
            state.utility[sender] = float(utility)
        elif loss is not None:
            state.utility[sender] = float(loss) * n

    def folded(self, update: ClientUpdate, env: Envelope, norm: float, nbytes: int) -> None:
        state = self._state
        if state is None:
            return
        arrival = state.arrivals.get(update.sender, time.monotonic() - state.started)
        for observer in self.observers:
            observer.update_folded(state.number, update, env.meta, norm, nbytes, arrival)

    # --- outgoing ------------------------------------------------------------------------
    async def _broadcast(self, state: _Round, named: set[str] | None = None) -> None:
        """The round's order to ``named`` (default: every pending node)."""
        c = self.config
        config = {"round": state.number, "seed": c.seed,
                  **self.strategy.client_config(state.number)}
        selected = sorted(state.pending if named is None else named)
        meta = {"selected": selected, "deadline_s": c.round.deadline_s, "config": config,
                "upload_gate_bytes": c.gate_bytes, "epoch": self.epoch}
        count, each = self._pregrants
        if (room := count - self._gate.pregranted) > 0:
            # the first uploads need no ready -> grant round trip: this order grants them
            granted = selected[:room]
            self._gate.pregrant(granted, each)
            meta.update(granted=granted, granted_bytes=each)
        aux = self.strategy.client_tensors(state.number)

        def build() -> bytes:  # quantizing a big model is worth the worker thread too
            model, codec_meta = encode_model(self.weights, c.model_codec, self._model_rng)
            return encode(Envelope(kind=ROUND, job=c.job, sender=c.node_id, round=state.number,
                                   meta={**meta, **codec_meta}, tensors=join_tensors(model, aux)),
                          c.compression)

        payload = await self._offload(build)
        await self.bus.publish(topics.model(c.job, c.node_id), payload)


def _plain(report: Any) -> dict[str, Any]:
    """A strategy's report as msgpack-safe scalars (anything else is dropped)."""
    if not isinstance(report, Mapping):
        return {}
    return {str(k): (v.item() if isinstance(v, np.generic) else v) for k, v in report.items()
            if isinstance(v, (int, float, str, bool, np.generic)) or v is None}

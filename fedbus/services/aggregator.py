"""The synchronous aggregator: select, broadcast the model, collect updates, aggregate, repeat.

A round never blocks forever: it ends when every selected trainer has delivered or been lost
(last will), or at the deadline. Below quorum at the deadline it re-broadcasts once per
extension to the pending and to fresh replacement trainers (over-selection), keeping what it
already accumulated, since every update of the round was trained from the same model.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from fedbus import topics
from fedbus.bus import Bus, Message, Subscription
from fedbus.codec import Envelope, encode
from fedbus.errors import FedbusError, UpdateRejected
from fedbus.services._base import OFFLOAD_BYTES, AggregatorBase, AggregatorSettings
from fedbus.services._intake import (
    checked_num_examples,
    client_update,
    open_update,
    presence_status,
)
from fedbus.services._wire import (
    DONE,
    METRICS,
    READY,
    ROUND,
    UPDATE,
    Rejections,
    SeenIds,
    UploadGate,
    join_tensors,
)
from fedbus.task import EvalResult
from strategies import Selector, Strategy, StrategyError, Weights

__all__ = ["Aggregator", "AggregatorConfig", "RoundReport"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class AggregatorConfig(AggregatorSettings):
    #: Fraction of the selected trainers whose updates a round needs, in (0, 1].
    quorum: float = 1.0
    #: Deadlines added (with replacement trainers) when a round is below quorum.
    max_extensions: int = 1


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
    #: What the strategy says about the round (DP wrappers: clip and noise multiplier used).
    strategy: dict[str, Any] = field(default_factory=dict)

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
        if self.train_loss is not None:
            meta["train_loss"] = self.train_loss
        if self.strategy:
            meta["strategy"] = self.strategy
        if self.eval is not None:
            meta["loss"] = self.eval.loss
            meta.update({k: float(v) for k, v in self.eval.metrics.items()})
        return meta


@dataclass(slots=True)
class _Round:
    number: int
    selected: set[str]
    pending: set[str]
    accepted: set[str] = field(default_factory=set)
    lost: set[str] = field(default_factory=set)
    loss_sum: float = 0.0
    loss_weight: float = 0.0
    started: float = field(default_factory=time.monotonic)
    #: Seconds from the round's start to each accepted update (system speed, for selectors).
    arrivals: dict[str, float] = field(default_factory=dict)
    #: Statistical utility per accepted node (OORT): the trainer's own ``utility`` metric, or
    #: ``num_examples * train_loss`` as a stand-in when it reports none.
    utility: dict[str, float] = field(default_factory=dict)


class Aggregator(AggregatorBase[AggregatorConfig]):
    """Runs ``config.rounds`` synchronous rounds over ``bus`` and returns the final weights.

    ``evaluate`` (optional) scores a model on held-out data in a worker thread; it is the
    aggregator's copy of the task. ``start_round`` and the strategy/selector state let a
    restarted aggregator continue from a checkpoint.
    """

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
    ) -> None:
        self.config = config
        self.bus = bus
        self.strategy = strategy
        self.selector = selector
        self.weights = {k: np.ascontiguousarray(v) for k, v in weights.items()}
        self.evaluate = evaluate
        self.start_round = start_round
        self.online: set[str] = set()
        self.rejections = Rejections(config.node_id)
        self.history: list[RoundReport] = []
        #: Every finished round's report, for displays; unbounded but one small item a round.
        self.reports: asyncio.Queue[RoundReport] = asyncio.Queue()
        self._seen = SeenIds()
        self._gate = UploadGate(config.max_uploads, timeout_s=config.deadline_s)
        self._round = 0
        self._log = log.bind(node=config.node_id, role="aggregator", job=config.job)

    async def _on_idle(self, msg: Message) -> None:
        await self._dispatch(msg, None)

    # --- main loop -------------------------------------------------------------------------
    async def run(self) -> Weights:
        c = self.config
        filters = (topics.updates_for(c.job, c.node_id), topics.presence_all(c.job))
        async with self.bus.subscribe(*filters) as sub:
            await self._publish_presence("online")
            await self._wait_for_clients(sub, c.min_clients, c.start_timeout_s)
            for number in range(self.start_round, c.rounds + 1):
                report = await self._run_round(sub, number)
                self.history.append(report)
                self.reports.put_nowait(report)
                await self._publish(topics.metrics(c.job, c.node_id), METRICS, number,
                                    report.as_meta())
            await self._publish(topics.model(c.job, c.node_id), DONE, c.rounds,
                                {"rounds": c.rounds})
            await self._publish_presence("offline")
        return self.weights

    async def _run_round(self, sub: Subscription, number: int) -> RoundReport:
        c = self.config
        started = time.monotonic()
        rejected_before = dict(self.rejections.counts)
        if not self.online & c.trainers:
            # min_clients gates the first round only: a federation that lost a trainer goes
            # on with who is left, but never runs a round with nobody at all.
            await self._wait_for_clients(sub, 1, c.start_timeout_s)
        available = sorted(self.online & c.trainers)
        selected = set(self.selector.select(available, number)) if available else set()
        state = _Round(number, selected=set(selected), pending=set(selected), started=started)
        self._round = number
        self._gate.reset()
        self.strategy.begin(self.weights, number)
        need = max(1, math.ceil(c.quorum * len(selected))) if selected else 1
        await self._broadcast(state)
        self._log.info("round_started", round=number, selected=len(selected), quorum=need)
        extensions = 0
        deadline = started + c.deadline_s
        while True:
            while state.pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    msg = await sub.get(timeout=left)
                except TimeoutError:
                    break
                await self._dispatch(msg, state)
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
            deadline = time.monotonic() + c.deadline_s
        for node in sorted(state.pending):
            self._log.warning("update_missing", round=number, node=node)
        aggregated = len(state.accepted) >= need
        if aggregated:
            self.weights = await self._offload(self.strategy.finish)
        else:
            self._log.error("round_failed", round=number, accepted=len(state.accepted),
                            quorum=need, detail="model unchanged")
        for node in sorted(state.selected):
            self.selector.report(node, number, completed=node in state.accepted,
                                 duration_s=state.arrivals.get(node),
                                 utility=state.utility.get(node))
        report = RoundReport(
            round=number,
            selected=sorted(state.selected),
            accepted=sorted(state.accepted),
            lost=sorted(state.lost),
            seconds=time.monotonic() - started,
            aggregated=aggregated,
            train_loss=state.loss_sum / state.loss_weight if state.loss_weight else None,
            rejected={k: v - rejected_before.get(k, 0) for k, v in self.rejections.counts.items()
                      if v - rejected_before.get(k, 0)},
            strategy=_plain(getattr(self.strategy, "last_report", None)) if aggregated else {},
        )
        if self.evaluate is not None and (number % c.evaluate_every == 0 or number == c.rounds):
            report.eval = await asyncio.to_thread(self.evaluate, self.weights)
        report.seconds = time.monotonic() - started
        self._log.info("round_finished", **report.as_meta())
        return report

    # --- incoming ------------------------------------------------------------------------
    async def _dispatch(self, msg: Message, state: _Round | None) -> None:
        try:
            parsed = topics.parse(msg.topic)
        except FedbusError as exc:
            self.rejections.reject("bad_topic", str(exc), topic=msg.topic)
            return
        if parsed.channel == "presence":
            self._on_presence(msg, parsed.sender, state)
        elif parsed.channel == "update":
            if len(msg.payload) >= OFFLOAD_BYTES:
                await asyncio.to_thread(self._on_update, msg, parsed.sender, state)
            else:
                self._on_update(msg, parsed.sender, state)
        await self._grant_due()

    def _grant_round(self, node: str) -> int:
        return self._round

    def _on_presence(self, msg: Message, node: str, state: _Round | None) -> None:
        if node not in self.config.trainers:
            return
        status = presence_status(msg.payload, node, self.config.limits, self.rejections)
        if status == "online":
            if node not in self.online:
                self._log.info("node_joined", peer=node)
            self.online.add(node)
        elif status == "offline":
            if node in self.online:
                self._log.warning("node_lost", peer=node,
                                  round=state.number if state else None)
            self.online.discard(node)
            self._gate.release(node)
            if state is not None and node in state.pending:
                state.pending.discard(node)
                state.lost.add(node)

    def _on_update(self, msg: Message, sender: str, state: _Round | None) -> None:
        reject = self.rejections.reject
        env = open_update(msg.payload, sender, job=self.config.job, limits=self.config.limits,
                          seen=self._seen, rejections=self.rejections, kinds=(UPDATE, READY))
        if env is None:
            return
        if env.kind == READY:
            if state is None or env.round != state.number or sender not in state.pending:
                reject("unexpected_ready", f"ready for round {env.round}", sender=sender)
            else:
                self._gate.request(sender)
            return
        try:
            self._fold(env, sender, state)
        finally:
            self._gate.release(sender)  # its upload is in, good or bad: the slot is free

    def _fold(self, env: Envelope, sender: str, state: _Round | None) -> None:
        reject = self.rejections.reject
        if state is None or env.round != state.number:
            reject("stale", f"update for round {env.round}", sender=sender,
                   round=state.number if state else None)
            return
        if sender not in state.selected:
            reject("not_selected", f"round {env.round}", sender=sender)
            return
        if sender in state.accepted:
            reject("duplicate", f"second update in round {env.round}", sender=sender)
            return
        try:
            n = checked_num_examples(env.meta, self.config.max_examples)
        except UpdateRejected as exc:
            reject(exc.reason, exc.detail, sender=sender)
            return
        try:
            update = client_update(env, sender, n, self.weights)
            self.strategy.accumulate(update)
        except (UpdateRejected, StrategyError) as exc:
            reason = exc.reason if isinstance(exc, UpdateRejected) else "strategy_rejected"
            reject(reason, str(exc), sender=sender)
            return
        state.pending.discard(sender)
        state.accepted.add(sender)
        state.arrivals[sender] = time.monotonic() - state.started
        loss = update.metrics.get("train_loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            state.loss_sum += float(loss) * n
            state.loss_weight += n
        utility = update.metrics.get("utility")
        if isinstance(utility, (int, float)) and math.isfinite(utility):
            state.utility[sender] = float(utility)
        elif isinstance(loss, (int, float)) and math.isfinite(loss):
            state.utility[sender] = float(loss) * n
        self._log.debug("update_accepted", peer=sender, round=env.round, examples=n)

    # --- outgoing ------------------------------------------------------------------------
    async def _broadcast(self, state: _Round) -> None:
        c = self.config
        config = {"round": state.number, "seed": c.seed,
                  **self.strategy.client_config(state.number)}
        env = Envelope(
            kind=ROUND,
            job=c.job,
            sender=c.node_id,
            round=state.number,
            meta={"selected": sorted(state.pending), "deadline_s": c.deadline_s, "config": config,
                  "upload_gate_bytes": c.gate_bytes},
            tensors=join_tensors(self.weights, self.strategy.client_tensors(state.number)),
        )
        payload = await self._offload(lambda: encode(env, c.compression))
        await self.bus.publish(topics.model(c.job, c.node_id), payload)


def _plain(report: Any) -> dict[str, Any]:
    """A strategy's report as msgpack-safe scalars (anything else is dropped)."""
    if not isinstance(report, Mapping):
        return {}
    return {str(k): (v.item() if isinstance(v, np.generic) else v) for k, v in report.items()
            if isinstance(v, (int, float, str, bool, np.generic)) or v is None}

"""The relay: an aggregator toward its children, a trainer toward its parent.

Built from the two services rather than beside them. The parent side is a ``Trainer`` whose
task is "run one round of my group": when the parent's order names the relay, the trainer
calls the task's ``fit``, which runs a round of the inner ``Aggregator`` (the same intake,
upload gate, liveness and deadlines as the root) on the event loop and returns the group's
model; the trainer sends the difference upward as one update carrying the group's example
count, so the level above weighs it as it would the group's trainers. With FedAvg at both
levels the hierarchy gives the flat star's model (to float rounding).

A relay's death is its will: the parent drops its whole subtree from the round at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import numpy as np
import structlog

from fedbus.bus import Bus, Subscription
from fedbus.errors import FedbusError
from fedbus.services.aggregator import Aggregator, RoundReport
from fedbus.services.trainer import Trainer, TrainerConfig
from fedbus.task import EvalResult, FitResult

__all__ = ["Relay"]

log = structlog.get_logger(__name__)


class _GroupRound:
    """The relay's task: its "training" is one round of its group."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.loop: asyncio.AbstractEventLoop | None = None
        self._start: dict[str, np.ndarray] = {}

    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self.relay.group.weights.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self._start = {k: np.ascontiguousarray(v) for k, v in weights.items()}

    def fit(self, config: Mapping[str, Any], extra: Mapping[str, np.ndarray]) -> FitResult:
        # called in the trainer's worker thread: the group's round runs on the event loop
        assert self.loop is not None
        number = int(config.get("round", 0))
        future = asyncio.run_coroutine_threadsafe(
            self.relay.group_round(self._start, number), self.loop)
        report = future.result()
        if not report.aggregated or report.examples <= 0:
            raise FedbusError(f"group round {number}: {len(report.accepted)} of "
                              f"{len(report.selected)} children delivered, below quorum")
        metrics = {"participants": float(len(report.accepted))}
        if report.train_loss is not None:
            metrics["train_loss"] = float(report.train_loss)
        return FitResult(num_examples=report.examples, metrics=metrics)

    def evaluate(self) -> EvalResult:
        raise FedbusError("a relay does not evaluate; the root aggregator does")


class Relay:
    def __init__(self, group: Aggregator, config: TrainerConfig, bus: Bus) -> None:
        self.group = group
        self.bus = bus
        self.task = _GroupRound(self)
        self.upward = Trainer(config, bus, self.task)  # type: ignore[arg-type]
        self._sub: Subscription | None = None
        self._log = log.bind(node=config.node_id, role="relay", job=config.job)

    @property
    def history(self) -> list[RoundReport]:
        return self.group.history

    async def run(self) -> int:
        """Serve the parent's rounds until it says the job is done; the rounds taken part in."""
        self.task.loop = asyncio.get_running_loop()
        g = self.group.config
        async with self.group._subscribe() as sub:
            self._sub = sub
            # announce itself to the parent only once its group can work
            await self.group._wait_for_clients(sub, g.min_clients, g.start_timeout_s)
            return await self.upward.run()

    async def group_round(self, weights: Mapping[str, np.ndarray], number: int) -> RoundReport:
        sub = self._sub
        assert sub is not None
        while True:  # what came in between rounds (presence) first
            try:
                msg = await sub.get(timeout=0)
            except TimeoutError:
                break
            await self.group._dispatch(msg)
        self.group.weights = {k: np.ascontiguousarray(v) for k, v in weights.items()}
        report = await self.group._run_round(sub, number)
        self.group.history.append(report)
        self._log.info("group_round_finished", round=number, participants=len(report.accepted),
                       examples=report.examples)
        return report

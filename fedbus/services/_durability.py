"""The aggregator's side of checkpoints: what it sends the checkpointer, and what it takes back.

Only messages on ``state/<checkpointer>`` from the checkpointer itself, about this node, are
taken: an acknowledgement of a round it sent, or the restore it asked for (by request id).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from fedbus import topics
from fedbus.checkpoint import AggregatorState, state_envelope, state_from
from fedbus.codec import Envelope, Limits
from fedbus.door import Entry, Rejections
from fedbus.manifest import CheckpointSpec
from fedbus.services.checkpointer import CHECKPOINT_ACK, RESTORE, RESTORE_REQUEST

__all__ = ["Durability", "DurabilitySettings"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class DurabilitySettings:
    """The checkpointer the wiring names, and the manifest's ``checkpoint:`` section as it
    is (how often, how long to wait for an ack, what then, how long to wait for a restore)."""

    checkpointer: str
    checkpoint: CheckpointSpec = CheckpointSpec()


@dataclass(slots=True)
class Durability:
    job: str
    node_id: str
    settings: DurabilitySettings
    limits: Limits
    rejections: Rejections
    acked: dict[int, float] = field(default_factory=dict)
    #: The message id of the checkpoint sent for each recent round.
    sent: dict[int, str] = field(default_factory=dict)
    restore_request: str | None = None
    restored: Envelope | None = None
    restore_answered: bool = False

    @property
    def topic(self) -> str:
        """Where the checkpointer answers (the aggregator subscribes to it)."""
        return topics.state(self.job, self.settings.checkpointer)

    def due(self, number: int, last: int) -> bool:
        return number % self.settings.checkpoint.every == 0 or number == last

    def checkpoint_frame_envelope(self, state: AggregatorState) -> Envelope:
        env = state_envelope(state)
        # an ack counts only for the checkpoint sent (its message id), nothing else
        self.sent[state.round] = env.msg_id
        while len(self.sent) > 16:
            del self.sent[min(self.sent)]
        return env

    def request(self) -> Envelope:
        """A restore request; the checkpointer's answer names its message id."""
        env = Envelope(kind=RESTORE_REQUEST, job=self.job, sender=self.node_id, round=0)
        self.restore_request = env.msg_id
        self.restore_answered = False
        self.restored = None
        return env

    def entry(self) -> Entry:
        """What the aggregator's front door accepts from its checkpointer: acks and restores
        on the checkpointer's topic, no bigger than a state."""
        return Entry(self.topic, frozenset({CHECKPOINT_ACK, RESTORE}),
                     senders=frozenset({self.settings.checkpointer}), limits=self.limits,
                     label="checkpointer_", dedupe=False)

    def on_message(self, env: Envelope) -> None:
        """An ack or restore that passed the front door."""
        meta: dict[str, Any] = dict(env.meta)
        if meta.get("node") != self.node_id:
            return  # about another aggregator
        if env.kind == CHECKPOINT_ACK:
            if meta.get("of") != self.sent.get(env.round):
                # an ack for a checkpoint this aggregator never sent (a replay, a forgery):
                # the round would be reported durable with nothing stored
                self.rejections.reject("checkpointer_unexpected_ack",
                                       f"ack for round {env.round} of {meta.get('of')!r}")
                return
            self.acked[env.round] = time.monotonic()
        elif env.kind == RESTORE and meta.get("request") == self.restore_request \
                and self.restore_request is not None:
            self.restore_answered = True
            self.restored = None if meta.get("empty") else env
        else:
            self.rejections.reject("checkpointer_unexpected", f"{env.kind} round {env.round}")

    def restored_state(self) -> AggregatorState | None:
        """The state the checkpointer sent back (``None``: it had none)."""
        env = self.restored
        if env is None:
            return None
        inner = Envelope(kind="checkpoint", job=env.job, sender=self.node_id, round=env.round,
                         meta=env.meta.get("state", {}), tensors=env.tensors)
        return state_from(inner)

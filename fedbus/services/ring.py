"""Hybrid ring groups (Flame's hybrid mode): the trainers of a group sum their updates among
themselves over the bus, and one of them uploads the group's result for all.

A round's ring is the group's members that the parent's order selects, by rank (their order
in the manifest's ``groups:``). Each trains as usual, turns its delta into ``n_i * delta_i``
(one flat vector in the model's dtype) and the ring runs reduce-scatter then all-gather in
``len(ring)`` chunks on ``ring/<group>/<to>/<from>``: every member ends holding
``sum(n_i * delta_i)`` and everyone's example counts, so any of them can commit. The first
member commits: ONE update, the mean delta with ``sum(n_i)`` examples and ``covers``
({member: examples}); the aggregator counts each covered member as delivered
(``check_covers``). A member whose committer went offline before committing commits in its
place if it is the first live one by rank.

Fallback, never a hang: a ring member's will, a step not in within ``step_timeout_s`` or an
abort from a member makes a member tell the others (abort) and upload its own update as in
the star; the round completes with the survivors. A member that has heard a commit for its
ring does not fall back: the committer held every member's counts, so the group's update
covers it, and uploading its own too would only race that update. Every member keeps its own
encoded update as the trainer's last sent one (the committer too: not the group's), resent
when the parent asks again.

The aggregator takes each member once, first come, so a fallback racing a commit is never
counted twice; but a group update that arrives after one of its members' own uploads is
refused whole (``double_count``: a sum cannot be split), and the aggregator then re-asks the
other members it covered at once, each at most once a round (``group_overlap_reasked``), and
they resend their own updates: nobody's contribution waits for the deadline.

Trust: a ring message is taken only on its member's inbox, from a member of the group (the
topic's sender level, tied to credentials by the ACL, and the envelope agreeing), for the
current ring's epoch and round, in step order, of the chunk's exact length and finite; a
message for a round not started yet waits in a small bounded buffer. Everything else is
counted in the trainer's rejections. Memory: one flat model-sized vector and the incoming
chunks of at most one lap of the ring.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import structlog

from fedbus import topics
from fedbus.bus import Message, Subscription
from fedbus.codec import Envelope, Limits, encode
from fedbus.door import Door, Entry, SeenIds
from fedbus.errors import BusError, FedbusError, UpdateRejected
from fedbus.services._gate import upload_threshold
from fedbus.services.trainer import Trainer
from fedbus.task import FitResult
from fedbus.wire import PRESENCE, UPDATE, join_tensors

__all__ = ["RING", "RingConfig", "RingCoverage", "RingMember", "check_covers", "covered"]

log = structlog.get_logger(__name__)

RING: Final = "ring"  # member -> member: a reduce step, an abort or a commit
_RS, _AG, _ABORT, _COMMIT = "rs", "ag", "abort", "commit"
_PHASES: Final = (_RS, _AG, _ABORT, _COMMIT)


@dataclass(frozen=True, slots=True)
class RingConfig:
    group: str
    #: Members by rank (the manifest's order).
    members: tuple[str, ...]
    step_timeout_s: float = 10.0


class _Layout:
    """How a model's tensors map onto one flat vector, and its chunks."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        self.keys = sorted(weights)
        self.shapes = {k: weights[k].shape for k in self.keys}
        self.dtypes = {k: weights[k].dtype for k in self.keys}
        self.size = sum(int(weights[k].size) for k in self.keys)
        floats = all(d.kind == "f" for d in self.dtypes.values())
        self.dtype = np.result_type(*self.dtypes.values()) if floats else np.dtype(np.float64)

    def weighted(self, delta: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        out = np.empty(self.size, dtype=self.dtype)
        pos = 0
        for k in self.keys:
            seg = out[pos:pos + delta[k].size]
            np.multiply(delta[k].reshape(-1), n, out=seg, casting="unsafe")
            pos += seg.size
        return out

    def mean(self, total: np.ndarray, n: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        pos = 0
        for k in self.keys:
            size = math.prod(self.shapes[k])
            seg = total[pos:pos + size].astype(np.float64) / n
            out[k] = seg.astype(self.dtypes[k]).reshape(self.shapes[k])
            pos += size
        return out

    def chunks(self, parts: int) -> list[slice]:
        edges = np.linspace(0, self.size, parts + 1).astype(np.int64)
        return [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]


class _Abandon(Exception):
    """Control flow inside this module (the ring gives up): never raised out of it."""

    def __init__(self, reason: str, *, tell: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tell = tell


@dataclass(slots=True)
class _Round:
    epoch: str
    number: int
    ring: tuple[str, ...]
    #: (sender, envelope) of this round's messages; sender "" with None: a member was lost
    inbox: asyncio.Queue[tuple[str, Envelope | None]] = field(default_factory=asyncio.Queue)
    committed: bool = False
    lost: set[str] = field(default_factory=set)


class RingMember:
    """A trainer in a ring group: the same ``Trainer``, whose delivery goes through the ring."""

    def __init__(self, trainer: Trainer, config: RingConfig) -> None:
        c = trainer.config
        if c.node_id not in config.members or len(config.members) < 2:
            raise FedbusError(f"{c.node_id!r} is not in ring group {config.group!r} "
                              f"{list(config.members)} of two or more members")
        self.trainer = trainer
        self.config = config
        self.bus = trainer.bus
        self.me = c.node_id
        self.rejections = trainer.rejections
        self.layout = _Layout(trainer.source.get_weights())
        chunk = -(-self.layout.size // 2) * self.layout.dtype.itemsize
        self._limits = Limits(max_frame_bytes=chunk + chunk // 64 + (64 << 10),
                              max_header_bytes=64 << 10, max_decompressed_bytes=chunk,
                              max_tensors=1)
        #: Rings by outcome: committed (this member uploaded the group's update), covered
        #: (another did), fallback (uploaded its own).
        self.outcomes: Counter[str] = Counter()
        self.online: set[str] = set()
        self._round: _Round | None = None
        self._last: tuple[str, int] | None = None
        self._early: deque[tuple[str, Envelope]] = deque()
        self._seen = SeenIds(capacity=4096)
        self._inbox = topics.ring_inbox(c.job, config.group, self.me)
        self._presence = {topics.presence(c.job, m): m for m in config.members if m != self.me}
        # The member's front door, counting into its trainer's rejections: ring steps only
        # from the other members, on this member's inbox, no bigger than a chunk; their
        # presence.
        others = frozenset(m for m in config.members if m != self.me)
        self.door = Door(c.job, self.me, rejections=trainer.rejections, seen=self._seen)
        self.door.expect(Entry(self._inbox, frozenset({RING}), senders=others,
                               limits=self._limits, label="ring_"))
        for topic in self._presence:
            self.door.expect(Entry(topic, frozenset({PRESENCE}), senders=others,
                                   label="presence_", dedupe=False))
        self._log = log.bind(node=self.me, role="trainer", group=config.group, job=c.job)
        trainer.ring = self

    @property
    def rounds_trained(self) -> int:
        return self.trainer.rounds_trained

    async def run(self) -> int:
        """The trainer's service, with the ring's inbox and the members' presence beside it."""
        backlog = 2 * len(self.config.members) * self._limits.max_frame_bytes + (1 << 20)
        async with self.bus.subscribe(self._inbox, *self._presence, admit=self._admit,
                                      max_queued_bytes=backlog, screen=self.door.screen) as sub:
            listener = asyncio.create_task(self._listen(sub), name=f"ring-{self.me}")
            try:
                return await self.trainer.run()
            finally:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener

    # --- the trainer's hook ---------------------------------------------------------------
    def joins(self, order: Envelope, result: FitResult) -> bool:
        """Does this update go through the ring? Synchronous orders selecting two or more
        members, and no strategy extras (those are per trainer)."""
        return (order.meta.get("mode") != "async" and not result.aux
                and len(self._ring_of(order)) >= 2)

    def reducing(self, epoch: str, number: int) -> bool:
        """Is this member inside its ring for round ``number`` of run ``epoch``?"""
        r = self._round
        return r is not None and (r.epoch, r.number) == (epoch, number)

    def flatten(self, delta: Mapping[str, np.ndarray], result: FitResult) -> np.ndarray:
        """``n * delta`` as the one flat vector the ring sums (the delta can go after this)."""
        return self.layout.weighted(delta, result.num_examples)

    async def reduce(self, order: Envelope, epoch: str, vec: np.ndarray, result: FitResult,
                     own: bytes) -> None:
        """Sum ``vec`` with the ring and commit, or fall back to delivering ``own``."""
        r = _Round(epoch, order.round, self._ring_of(order))
        self._round, self._last = r, (epoch, order.round)
        early, self._early = self._early, deque()
        for sender, env in early:
            if (env.meta.get("epoch"), env.round) == (epoch, order.round) and sender in r.ring:
                r.inbox.put_nowait((sender, env))
            else:
                self.rejections.reject("ring_stale", f"early message for round {env.round}",
                                       sender=sender)
        gate = upload_threshold(order.meta, self.trainer.config.node_id)
        started = time.monotonic()
        try:
            outcome = await self._reduce(r, vec, result, gate)
        except _Abandon as exc:
            if r.committed:
                # A member committed, so it held every member's counts and with them the
                # whole sum, ours included: uploading ours too would only make the two race
                # at the parent (double_count). Our lap is cut short, we are covered; our
                # own update stays the trainer's ``_last_sent``, resent if the parent asks.
                self.outcomes["covered"] += 1
                self._log.info("ring_cut_after_commit", round=r.number, reason=exc.reason)
                return
            self.outcomes["fallback"] += 1
            self._log.warning("ring_fallback", round=r.number, reason=exc.reason)
            if exc.tell:
                await self._tell(r, _ABORT, exc.reason)
            await self.trainer._deliver(r.number, epoch, own, gate)
            return
        finally:
            self._round = None
        self.outcomes[outcome] += 1
        self._log.info("ring_done", round=r.number, outcome=outcome, members=len(r.ring),
                       seconds=round(time.monotonic() - started, 3))

    # --- the ring -------------------------------------------------------------------------
    async def _reduce(self, r: _Round, vec: np.ndarray, result: FitResult, gate: Any) -> str:
        down = sorted(set(r.ring) - self.online - {self.me})
        if down:
            raise _Abandon(f"{down} offline at the start")
        size = len(r.ring)
        rank = r.ring.index(self.me)
        succ, pred = r.ring[(rank + 1) % size], r.ring[(rank - 1) % size]
        cut = self.layout.chunks(size)
        examples = {self.me: int(result.num_examples)}
        loss = result.metrics.get("train_loss")
        losses = {self.me: float(loss)} if loss is not None else {}
        for phase in (_RS, _AG):
            for step in range(size - 1):
                # reduce-scatter: pass a partial sum on, add ours to the one coming in; after
                # size-1 steps chunk rank+1 is complete here. all-gather: pass complete ones.
                out = (rank - step) % size if phase == _RS else (rank + 1 - step) % size
                into = (out - 1) % size
                await self._send(r, succ, phase, step, out, vec[cut[out]], examples, losses)
                env = await self._expect(r, pred, phase, step, into,
                                         cut[into].stop - cut[into].start)
                assert env is not None
                got = env.tensors["c"]
                if phase == _RS:
                    vec[cut[into]] += got
                else:
                    vec[cut[into]] = got
                _merge(examples, env.meta.get("examples"), r.ring, int)
                _merge(losses, env.meta.get("losses"), r.ring, float)
        if set(examples) != set(r.ring):
            raise _Abandon(f"example counts missing for {sorted(set(r.ring) - set(examples))}")
        # Everyone holds the sum now: the first member commits, or the first live one by
        # rank if those before it went offline without committing.
        while not r.committed:
            if self._committer(r) == self.me:
                await self._commit(r, vec, examples, losses, gate)
                return "committed"
            await self._expect(r, None, _COMMIT, 0, 0, 0)
        return "covered"

    async def _commit(self, r: _Round, vec: np.ndarray, examples: dict[str, int],
                      losses: dict[str, float], gate: Any) -> None:
        c = self.trainer.config
        total = sum(examples.values())
        mean = await asyncio.to_thread(self.layout.mean, vec, total)
        metrics = {}
        if set(losses) == set(examples):
            metrics["train_loss"] = sum(losses[m] * examples[m] for m in examples) / total
        update = Envelope(kind=UPDATE, job=c.job, sender=self.me, round=r.number,
                          meta={"num_examples": total, "metrics": metrics, "covers": examples,
                                "group": self.config.group},
                          tensors=join_tensors(mean))
        payload = await asyncio.to_thread(encode, update, c.compression)
        del update, mean
        await self.trainer._deliver(r.number, r.epoch, payload, gate)
        self._log.info("ring_committed", round=r.number, covers=sorted(examples),
                       examples=total, bytes=len(payload))
        await self._tell(r, _COMMIT, "")

    async def _send(self, r: _Round, to: str, phase: str, step: int, chunk: int,
                    data: np.ndarray, examples: dict[str, int],
                    losses: dict[str, float]) -> None:
        c = self.trainer.config
        env = Envelope(kind=RING, job=c.job, sender=self.me, round=r.number,
                       meta={"epoch": r.epoch, "group": self.config.group, "phase": phase,
                             "step": step, "chunk": chunk, "examples": examples,
                             "losses": losses},
                       tensors={"c": np.ascontiguousarray(data)})
        payload = encode(env, c.compression) if data.nbytes < (1 << 20) else \
            await asyncio.to_thread(encode, env, c.compression)
        await self.bus.publish(topics.ring(c.job, self.config.group, to, self.me), payload)

    async def _tell(self, r: _Round, phase: str, reason: str) -> None:
        """An abort or commit to every other member of the ring (best effort)."""
        c = self.trainer.config
        env = Envelope(kind=RING, job=c.job, sender=self.me, round=r.number,
                       meta={"epoch": r.epoch, "group": self.config.group, "phase": phase,
                             "reason": reason[:200]})
        payload = encode(env)
        for m in r.ring:
            if m != self.me and m not in r.lost:
                with contextlib.suppress(BusError):
                    await self.bus.publish(topics.ring(c.job, self.config.group, m, self.me),
                                           payload)

    async def _expect(self, r: _Round, sender: str | None, phase: str, step: int, chunk: int,
                      length: int) -> Envelope | None:
        """The next message of the ring: from ``sender`` (the predecessor) in step order, or
        a commit or a loss (None) when ``sender`` is None. Raises ``_Abandon`` on an abort, a
        timeout, or a loss while a step is awaited."""
        deadline = time.monotonic() + self.config.step_timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                who, env = await asyncio.wait_for(r.inbox.get(), left)
            except TimeoutError:
                what = f"{phase} step {step} from {sender}" if sender else "a commit"
                # waiting for a commit, the lap is done: the others need no abort
                raise _Abandon(f"no {what} within {self.config.step_timeout_s:g}s",
                               tell=sender is not None) from None
            if env is None:  # a member went offline
                if sender is None:
                    return None  # perhaps the committer: see who commits now
                raise _Abandon(f"{who} went offline")
            got = env.meta.get("phase")
            if got == _ABORT:
                raise _Abandon(f"{who} abandoned the ring: {env.meta.get('reason', '')}",
                               tell=False)
            if got == _COMMIT:
                # from the committer, or from the member that took over when it went offline
                # (perhaps before this member heard of that): the group's update is up
                r.committed = True
                if sender is None:
                    return env
                continue  # the committer is done; this member still finishes its lap
            if sender is None or who != sender or (got, env.meta.get("step"),
                                                   env.meta.get("chunk")) != (phase, step, chunk):
                self.rejections.reject("ring_out_of_order",
                                       f"{got} step {env.meta.get('step')} chunk "
                                       f"{env.meta.get('chunk')} from {who}; expected {phase} "
                                       f"step {step} chunk {chunk} from {sender}",
                                       sender=who, round=r.number)
                continue
            data = env.tensors.get("c")
            if data is None or data.shape != (length,) or data.dtype != self.layout.dtype \
                    or not np.isfinite(data).all():
                self.rejections.reject("ring_bad_chunk", f"chunk {chunk} is not {length} "
                                       f"finite {self.layout.dtype}", sender=who,
                                       round=r.number)
                continue
            return env

    def _committer(self, r: _Round) -> str:
        live = [m for m in r.ring if m not in r.lost]
        return live[0] if live else r.ring[0]

    def _ring_of(self, order: Envelope) -> tuple[str, ...]:
        selected = order.meta.get("selected", [])
        if not isinstance(selected, list):
            return ()
        chosen = set(selected)
        return tuple(m for m in self.config.members if m in chosen)

    # --- incoming -------------------------------------------------------------------------
    def _admit(self, topic: str, total: int) -> bool:
        return topics.matches(self._inbox, topic) and total <= self._limits.max_frame_bytes

    async def _listen(self, sub: Subscription) -> None:
        async for msg in sub:
            if msg.topic in self._presence:
                self._on_presence(msg, self._presence[msg.topic])
            else:
                await self._on_ring(msg)

    def _on_presence(self, msg: Message, member: str) -> None:
        adm = self.door.open_now(msg)  # small: PRESENCE_LIMITS
        if adm is None:
            return
        status = adm.env.meta.get("status")
        if status not in ("online", "offline"):
            self.rejections.reject("bad_presence", f"status {status!r}", sender=member)
            return
        if status == "online":
            self.online.add(member)
            return
        self.online.discard(member)
        r = self._round
        if r is not None and member in r.ring and member not in r.lost:
            r.lost.add(member)
            r.inbox.put_nowait((member, None))

    async def _on_ring(self, msg: Message) -> None:
        c = self.trainer.config
        adm = await self.door.open(msg)
        if adm is None:
            return
        env, sender = adm.env, adm.sender
        if env.meta.get("group") != self.config.group:
            self.rejections.reject("ring_spoofed_sender", f"group {env.meta.get('group')!r} "
                                   f"on {msg.topic}", sender=sender)
            return
        if env.meta.get("phase") not in _PHASES or set(env.tensors) - {"c"}:
            self.rejections.reject("ring_bad_kind", f"phase {env.meta.get('phase')!r}",
                                   sender=sender)
            return
        epoch = env.meta.get("epoch")
        r = self._round
        if r is not None and (epoch, env.round) == (r.epoch, r.number):
            if sender not in r.ring:
                self.rejections.reject("ring_not_member", f"{sender} is not in round "
                                       f"{r.number}'s ring", sender=sender)
                return
            if r.inbox.qsize() >= 2 * len(r.ring):  # a lap, aborts and commits: no more
                self.rejections.reject("ring_flood", "more than a lap of messages waiting",
                                       sender=sender)
                return
            r.inbox.put_nowait((sender, env))
            return
        last = self._last
        if last == (epoch, env.round) and env.meta.get("phase") in (_ABORT, _COMMIT):
            return  # a member's word after this member's ring ended: nothing left to do
        if not isinstance(epoch, str) or not 1 <= env.round <= c.rounds or (
                last is not None and epoch == last[0] and env.round <= last[1]):
            self.rejections.reject("ring_stale", f"round {env.round} of run {epoch!r}",
                                   sender=sender)
            return
        # A member that got the order first and trained faster: its first steps wait here
        # until this member's ring starts (at most one lap of the ring).
        if len(self._early) >= 2 * len(self.config.members):
            self.rejections.reject("ring_flood", "too many messages ahead of the ring",
                                   sender=sender)
            return
        self._early.append((sender, env))


def _merge(into: dict[str, Any], more: Any, ring: tuple[str, ...], kind: type) -> None:
    """Fold a message's known per-member numbers into ours (members of the ring only)."""
    if not isinstance(more, dict):
        return
    for k, v in more.items():
        if k in ring and isinstance(v, (int, float)) and not isinstance(v, bool) \
                and math.isfinite(v) and v >= 0 and (kind is float or isinstance(v, int)):
            into.setdefault(k, kind(v))


# --- the aggregator's side -------------------------------------------------------------------

def covered(meta: Mapping[str, Any], sender: str, n: int) -> dict[str, int]:
    """Who an admitted update delivers for: its ``covers``, or just its sender."""
    covers = meta.get("covers")
    return dict(covers) if isinstance(covers, dict) else {sender: n}


def check_covers(meta: Mapping[str, Any], sender: str, groups: Mapping[str, frozenset[str]],
                 selected: set[str], accepted: set[str]) -> None:
    """A group's update must come from a member of a declared group of this aggregator and
    cover only members of that group, selected this round and not yet delivered (each member
    counts once, first come), with example counts that add up to the update's."""
    covers = meta.get("covers")
    if not isinstance(covers, dict) or not covers:
        raise UpdateRejected("bad_covers", f"covers is {type(covers).__name__}")
    group = groups.get(sender)
    if group is None:
        raise UpdateRejected("not_in_group", f"{sender} is in no ring group of this node")
    counts = list(covers.values())
    if sender not in covers or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0
                                   for v in counts) or sum(counts) != meta.get("num_examples"):
        raise UpdateRejected("bad_covers", f"covers {covers!r} for "
                                           f"{meta.get('num_examples')!r} examples")
    strangers = sorted(str(m) for m in covers if m not in group)
    if strangers:
        raise UpdateRejected("ring_not_member", f"covers {strangers[:5]}, not in "
                                                f"{sender}'s group")
    unselected = sorted(m for m in covers if m not in selected)
    if unselected:
        raise UpdateRejected("not_selected", f"covers {unselected[:5]}")
    twice = sorted(m for m in covers if m in accepted)
    if twice:
        raise UpdateRejected("double_count", f"covers {twice[:5]}, already delivered")


class RingCoverage:
    """What an update counts for at an aggregator with ring groups beneath it: a group's
    update (``meta.covers``) delivers for several members. The aggregator is given one by
    ``node.py`` (``Aggregator(coverage=...)``) and never imports the ring."""

    def __init__(self, groups: tuple[tuple[str, ...], ...]) -> None:
        self.groups = {m: frozenset(g) for g in groups for m in g}

    def check(self, meta: Mapping[str, Any], sender: str, selected: set[str],
              accepted: set[str]) -> None:
        if "covers" in meta:
            check_covers(meta, sender, self.groups, selected, accepted)

    def covered(self, meta: Mapping[str, Any], sender: str, n: int) -> dict[str, int]:
        return covered(meta, sender, n)

"""Hostile messages for a manifest's wiring: what a fuzzer (or an attacker) would publish.

``Fuzzer(manifest, model).messages(n)`` yields ``n`` messages spread over every topic some
node of the manifest subscribes to (``compile_wiring``): garbage, truncated frames, honest
and lying zstd bombs, wrong shapes and dtypes, NaN/Inf, forged but well-formed control
messages of every kind (``done``, far-ahead and stale rounds, grants, readies, presence,
asynchronous work orders, ring steps, checkpoints, acks and restore replies, store queries),
chunk floods and replays of real traffic (``observe`` what went by first). Deterministic for
a seed. ``Fuzzer(..., only=[...])`` draws from some categories alone. Used by
tests/test_fuzz.py, tests/test_fuzz_kinds.py and ``python -m benchmarks.bench_fuzz``.
"""

from __future__ import annotations

import os
import random
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import numpy as np
import zstandard

from fedbus import topics
from fedbus.bus._chunking import CHUNK_MAGIC, FRAME_VERSION, HEADER
from fedbus.codec import Compression, Envelope, encode
from fedbus.compress import MODEL_META_KEY
from fedbus.manifest import Manifest, compile_wiring
from fedbus.wire import DONE, GRANT, READY, ROUND, UPDATE, join_tensors, presence

__all__ = ["CATEGORIES", "FuzzMessage", "Fuzzer", "listened_topics"]

#: category -> relative weight
CATEGORIES: Final[dict[str, int]] = {
    "garbage": 12,
    "truncated": 8,
    "honest_bomb": 3,
    "lying_bomb": 3,
    "wrong_shape": 6,
    "wrong_dtype": 5,
    "non_finite": 6,
    "forged_update": 6,
    "forged_done": 4,
    "forged_round": 8,
    "forged_grant": 4,
    "forged_ready": 4,
    "forged_presence": 6,
    "chunk_flood": 15,
    "replay": 10,
    "forged_work": 5,
    "forged_ring": 4,
    "forged_state": 6,
    "forged_query": 4,
}
#: Store workloads a forged query names (and one that no store has).
_WORKLOADS: Final = ("summary", "lineage", "scheduling", "malicious", "debugging",
                     "clustering", "personalization", "contribution", "no-such-workload")
_BOMB_BYTES: Final = 1 << 30


def listened_topics(m: Manifest, strangers: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Every filter some node of ``m`` subscribes to, its wildcards filled with the job's node
    ids and ``strangers``' ids (``$share/...`` prefixes dropped)."""
    out: list[str] = []
    ids = [n.id for n in m.nodes] + list(strangers)
    for wiring in compile_wiring(m).values():
        for f in wiring.subscribe:
            _, f = topics.strip_share(f)
            if "#" in f:
                continue
            out += [f.replace("+", i) for i in ids] if "+" in f else [f]
    return sorted(set(out))


@dataclass(frozen=True, slots=True)
class FuzzMessage:
    category: str
    topic: str
    payload: bytes
    retain: bool = False


class Fuzzer:
    """Generates hostile traffic for ``manifest``'s topics; ``model`` gives names and shapes
    so that well-formed forgeries look like the real thing."""

    def __init__(self, manifest: Manifest, model: Mapping[str, np.ndarray], *,
                 seed: int = 0, strangers: int = 3,
                 only: list[str] | tuple[str, ...] | None = None) -> None:
        self.m = manifest
        self.model = {k: np.asarray(v) for k, v in model.items()}
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.job = manifest.job
        self.agg = manifest.aggregator.id
        self.trainers = [t.id for t in manifest.trainers_of(self.agg)]
        self.strangers = [f"stranger-{i}" for i in range(strangers)]
        self.epoch = "0" * 12
        self._replays: deque[tuple[str, bytes]] = deque(maxlen=256)
        self._topics = self._concrete_topics()
        self._topic_set = frozenset(self._topics)
        # built once: compressing 1 GiB of zeros takes a moment, and its frame is ~32 KB
        self._bomb_frame = self._make_honest_bomb()
        self._zeros_64m = zstandard.ZstdCompressor(level=1).compress(b"\0" * (64 << 20))
        chosen = CATEGORIES if only is None else {k: CATEGORIES[k] for k in only}
        self._weights = list(chosen.values())
        self._names = list(chosen)
        ckpt = manifest.checkpointer
        self.checkpointer = ckpt.id if ckpt is not None else "checkpointer"
        self.store = next((n.id for n in manifest.nodes if n.role == "store"), "store")
        self.groups = [(g.id, list(g.members)) for g in manifest.groups]

    # -- what the fuzzer learns from real traffic ----------------------------------------

    def observe(self, topic: str, payload: bytes) -> None:
        """Remember real traffic on the federation's own topics for replays; learn the
        aggregator's epoch from its orders."""
        if topic in self._topic_set:
            self._replays.append((topic, payload))
        if topic == topics.model(self.job, self.agg):
            from fedbus.codec import decode  # lazy: only what observe needs
            from fedbus.signing import split_signed

            try:
                parts = split_signed(payload)  # a signed job's: the trailer is not secret
                env = decode(payload if parts is None else bytes(parts[0]))
            except Exception:  # anything goes on an open broker
                return
            epoch = env.meta.get("epoch")
            if isinstance(epoch, str):
                self.epoch = epoch

    # -- generation ------------------------------------------------------------------------

    def messages(self, n: int) -> Iterator[FuzzMessage]:
        for _ in range(n):
            category = self.rng.choices(self._names, self._weights)[0]
            yield getattr(self, f"_{category}")()

    def _concrete_topics(self) -> list[str]:
        return listened_topics(self.m, self.strangers)

    def _any_topic(self) -> str:
        return self.rng.choice(self._topics)

    def _update_topic(self) -> str:
        return topics.update(self.job, self.agg, self.rng.choice(self.trainers + self.strangers))

    def _envelope(self, kind: str, sender: str, round: int, **meta: object) -> Envelope:
        return Envelope(kind=kind, job=self.job, sender=sender, round=round, meta=dict(meta))

    def _update(self, sender: str, tensors: Mapping[str, np.ndarray], **meta: object) -> bytes:
        env = Envelope(kind=UPDATE, job=self.job, sender=sender,
                       round=self.rng.randint(0, self.m.rounds + 2),
                       meta={"num_examples": self.rng.choice([1, 10, 10**6, -1]), **meta},
                       tensors=join_tensors(tensors))
        return encode(env, Compression(level=0))

    def _sender_of(self, topic: str) -> str:
        return topic.rsplit("/", 1)[1]

    # one method per category --------------------------------------------------------------

    def _garbage(self) -> FuzzMessage:
        size = self.rng.choice([0, 1, 7, 100, 1000, 4096])
        return FuzzMessage("garbage", self._any_topic(), os.urandom(size))

    def _truncated(self) -> FuzzMessage:
        topic = self._update_topic()
        whole = self._update(self._sender_of(topic), self._like_model())
        return FuzzMessage("truncated", topic, whole[: self.rng.randint(0, len(whole) - 1)])

    def _honest_bomb(self) -> FuzzMessage:
        return FuzzMessage("honest_bomb", self._any_topic(), self._bomb_frame)

    def _lying_bomb(self) -> FuzzMessage:
        # a header for a few bytes, then a zstd frame that inflates to 64 MiB
        topic = self._update_topic()
        small = encode(Envelope(kind=UPDATE, job=self.job, sender=self._sender_of(topic),
                                round=1, meta={"num_examples": 1},
                                tensors={"m/x": np.zeros(64, np.uint8)}),
                       Compression(level=1, min_bytes=0))
        hlen = int.from_bytes(small[4:8], "little")
        return FuzzMessage("lying_bomb", topic, small[: 8 + hlen] + self._zeros_64m)

    def _wrong_shape(self) -> FuzzMessage:
        topic = self._update_topic()
        bad = {k: np.zeros((*v.shape, 2) if self.rng.random() < 0.5 else (1, v.size), v.dtype)
               for k, v in self.model.items()}
        return FuzzMessage("wrong_shape", topic, self._update(self._sender_of(topic), bad))

    def _wrong_dtype(self) -> FuzzMessage:
        topic = self._update_topic()
        dtype = self.rng.choice([np.float64, np.int32, np.float16, np.uint8])
        bad = {k: np.zeros(v.shape, dtype) for k, v in self.model.items()}
        return FuzzMessage("wrong_dtype", topic, self._update(self._sender_of(topic), bad))

    def _non_finite(self) -> FuzzMessage:
        topic = self._update_topic()
        value = self.rng.choice([np.nan, np.inf, -np.inf, 1e38])
        bad = {k: np.full(v.shape, value, v.dtype) for k, v in self.model.items()}
        return FuzzMessage("non_finite", topic, self._update(self._sender_of(topic), bad))

    def _forged_update(self) -> FuzzMessage:
        # well-formed, finite, the right shape: only who sent it, and when, is wrong
        topic = self._update_topic()
        sender = self.rng.choice([self._sender_of(topic), *self.trainers])
        return FuzzMessage("forged_update", topic, self._update(sender, self._like_model()))

    def _forged_done(self) -> FuzzMessage:
        env = self._envelope(DONE, self.agg, self.rng.choice([1, self.m.rounds, 10**9]),
                             epoch=self.epoch, rounds=self.m.rounds)
        return FuzzMessage("forged_done", topics.model(self.job, self.agg), encode(env))

    def _forged_round(self) -> FuzzMessage:
        number = self.rng.choice([0, 1, self.m.rounds, self.m.rounds + 1, 10**9, -5])
        model = self._like_model()
        meta: dict[str, Any] = {"selected": list(self.trainers), "config": {"round": number},
                                "epoch": self.rng.choice([self.epoch, "forged"]),
                                "deadline_s": 1, "upload_gate_bytes": 1 << 30}
        if self.rng.random() < 0.3:
            # a compressed broadcast (codec.model) whose declared shapes are a lie: 1 GiB
            # each if believed, and the tensors are not even packed
            meta[MODEL_META_KEY] = {"mode": "int8", "block": 256,
                                    "tensors": {k: ["<f4", [1 << 28]] for k in model}}
        env = Envelope(kind=ROUND, job=self.job, sender=self.agg, round=number, meta=meta,
                       tensors=join_tensors(model))
        return FuzzMessage("forged_round", topics.model(self.job, self.agg),
                           encode(env, Compression(level=0)))

    def _forged_grant(self) -> FuzzMessage:
        node = self.rng.choice(self.trainers)
        env = self._envelope(GRANT, self.agg, self.rng.randint(0, self.m.rounds + 1),
                             epoch=self.epoch)
        return FuzzMessage("forged_grant", topics.control(self.job, node), encode(env))

    def _forged_ready(self) -> FuzzMessage:
        topic = self._update_topic()
        env = self._envelope(READY, self._sender_of(topic),
                             self.rng.randint(0, self.m.rounds + 1), bytes=1 << 30)
        return FuzzMessage("forged_ready", topic, encode(env))

    def _forged_presence(self) -> FuzzMessage:
        node = self.rng.choice(self.trainers + self.strangers + [self.agg])
        status = self.rng.choice(["offline", "offline", "online", "zombie"])
        env = presence(self.job, node, "trainer", status)
        return FuzzMessage("forged_presence", topics.presence(self.job, node), encode(env),
                           retain=self.rng.random() < 0.3)

    def _chunk_flood(self) -> FuzzMessage:
        # the first chunk of a transfer that never completes, claiming a big total
        topic = self.rng.choice([*self._topics, topics.model(self.job, self.agg)])
        total = self.rng.choice([3000, 300_000, 1 << 30])
        data = os.urandom(1024)
        first = HEADER.pack(CHUNK_MAGIC, FRAME_VERSION, 0, os.urandom(16), 0,
                            -(-total // 1024), total, zlib.crc32(data), zlib.crc32(os.urandom(4)))
        return FuzzMessage("chunk_flood", topic, first + data)

    def _replay(self) -> FuzzMessage:
        if not self._replays:
            return self._garbage()
        topic, payload = self.rng.choice(self._replays)
        return FuzzMessage("replay", topic, payload)

    def _forged_work(self) -> FuzzMessage:
        # an asynchronous order "from the aggregator" on one trainer's own work topic, with a
        # model far from the real one: trained and delivered, it would be folded as an update
        trainer = self.rng.choice(self.trainers)
        meta: dict[str, Any] = {"mode": "async", "selected": [trainer], "config": {},
                                "epoch": self.rng.choice([self.epoch, "forged"]),
                                "version": self.rng.choice([0, 1, 10**9])}
        model = {k: np.full(v.shape, self.rng.choice([1e3, -1e3]), v.dtype)
                 for k, v in self.model.items()}
        env = Envelope(kind=ROUND, job=self.job, sender=self.agg,
                       round=self.rng.randint(0, self.m.rounds), meta=meta,
                       tensors=join_tensors(model))
        return FuzzMessage("forged_work", topics.work(self.job, trainer, self.agg),
                           encode(env, Compression(level=0)))

    def _forged_ring(self) -> FuzzMessage:
        # a reduce step, abort or commit "from" one ring member into another's inbox
        if not self.groups:
            group, members = "ring-x", list(self.trainers[:3] or [self.agg])
        else:
            group, members = self.rng.choice(self.groups)
        to, frm = self.rng.choice(members), self.rng.choice(members)
        size = self.rng.choice([8, 64, 1 << 16])
        env = Envelope(kind="ring", job=self.job, sender=frm,
                       round=self.rng.choice([1, self.m.rounds, 10**9]),
                       meta={"epoch": self.rng.choice([self.epoch, "forged"]), "group": group,
                             "phase": self.rng.choice(["rs", "ag", "abort", "commit", "x"]),
                             "step": self.rng.randint(0, 4), "chunk": self.rng.randint(0, 4)},
                       tensors={"c": np.full(size, 1e9, np.float32)})
        return FuzzMessage("forged_ring", topics.ring(self.job, group, to, frm),
                           encode(env, Compression(level=0)))

    def _forged_state(self) -> FuzzMessage:
        from fedbus.checkpoint import AggregatorState, state_envelope  # lazy: as observe
        from fedbus.services.checkpointer import CHECKPOINT_ACK, RESTORE

        which = self.rng.choice(["checkpoint", "ack", "restore"])
        number = self.rng.choice([1, self.m.rounds, self.m.rounds + 1, 999_999_998])
        state = state_envelope(AggregatorState(self.job, self.agg, number,
                                               self._like_model()))
        if which == "checkpoint":
            # kept as the newest, it would end every later restart of the aggregator at once
            return FuzzMessage("forged_state", topics.state(self.job, self.agg),
                               encode(state, Compression(level=0)))
        meta: dict[str, Any] = {"node": self.agg}
        if which == "ack":  # a round reported durable with nothing stored
            env = Envelope(kind=CHECKPOINT_ACK, job=self.job, sender=self.checkpointer,
                           round=number, meta={**meta, "of": os.urandom(8).hex()})
        else:  # a restore "answer" racing the checkpointer's
            env = Envelope(kind=RESTORE, job=self.job, sender=self.checkpointer, round=number,
                           meta={**meta, "request": os.urandom(8).hex(),
                                 "state": dict(state.meta)}, tensors=state.tensors)
        return FuzzMessage("forged_state", topics.state(self.job, self.checkpointer),
                           encode(env, Compression(level=0)))

    def _forged_query(self) -> FuzzMessage:
        # a workload query "from" a node or a stranger: every answer costs the store work
        sender = self.rng.choice([*self.trainers, self.agg, *self.strangers])
        args: dict[str, Any] = self.rng.choice(
            [{}, {"round": 10**9}, {"k": -1}, {"by": "x" * 1000}, {"round": "1"}])
        env = Envelope(kind="query", job=self.job, sender=sender, round=0,
                       meta={"workload": self.rng.choice(_WORKLOADS), "args": args})
        return FuzzMessage("forged_query", topics.query(self.job, self.store, sender),
                           encode(env))

    def _like_model(self) -> dict[str, np.ndarray]:
        return {k: self.np_rng.normal(0, 0.01, v.shape).astype(v.dtype)
                for k, v in self.model.items()}

    def _make_honest_bomb(self) -> bytes:
        """A frame whose header honestly declares 1 GiB of data, compressed to ~32 KB."""
        env = Envelope(kind=UPDATE, job=self.job, sender=self.trainers[0], round=1,
                       meta={"num_examples": 1},
                       tensors={"m/bomb": np.zeros(16, np.uint8)})
        frame = encode(env, Compression(level=0))
        hlen = int.from_bytes(frame[4:8], "little")
        header = msgpack.unpackb(frame[8 : 8 + hlen], raw=False)
        header["t"] = [["m/bomb", "|u1", [_BOMB_BYTES], 0, _BOMB_BYTES, False]]
        header["n"] = _BOMB_BYTES
        packed: bytes = msgpack.packb(header, use_bin_type=True)
        cctx = zstandard.ZstdCompressor(level=1, write_content_size=True)
        zc = cctx.compressobj(size=_BOMB_BYTES)
        block = b"\0" * (1 << 24)
        data = b"".join(zc.compress(block) for _ in range(_BOMB_BYTES // len(block)))
        data += zc.flush()
        return frame[:2] + bytes([frame[2], 0x01]) + len(packed).to_bytes(4, "little") \
            + packed + data

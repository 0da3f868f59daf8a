"""The manifest: one validated, frozen model of a federated job, and its per-node topic wiring.

``load_manifest`` is the one place a manifest is read; every mistake becomes one
``ManifestError`` naming the file, the dotted field (``nodes[3].parent``) and what is allowed.

Environment variables: any string value may use ``${VAR}`` or ``${VAR:-default}`` (the default
is used when VAR is unset or empty, as in sh and compose); ``$$`` is a literal ``$``. An unset
VAR without a default is an error. Typed fields (``broker.port: ${PORT:-1883}``) convert the
expanded text to their type; inside free-form ``params`` an expanded value is read as a YAML
scalar, so ``epochs: ${EPOCHS:-2}`` is the integer 2. An optional field that expands to the
empty string (``username: ${USER_NAME:-}``) is unset. Mapping keys are never expanded.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal, NoReturn, cast

import yaml

from fedbus import topics
from fedbus._manifest_groups import GroupSpec, parse_groups, ring_wiring
from fedbus._manifest_yaml import VAR_NAME, Expanded, expand, load_yaml
from fedbus.compress import MODEL_MODES, UpdateCodec
from fedbus.compress import MODES as UPDATE_MODES
from fedbus.errors import BusError, ManifestError
from fedbus.wiring import Wiring, role_wiring
from strategies.base import AsyncStrategy, StrategyError
from strategies.registry import make_selector, make_strategy

__all__ = [
    "ROLES",
    "BrokerNode",
    "BrokerSpec",
    "CheckpointSpec",
    "CodecSpec",
    "EvalSpec",
    "GroupSpec",
    "Manifest",
    "NodeSpec",
    "PluginSpec",
    "PopulationSpec",
    "RoundSpec",
    "StoreSpec",
    "TaskSpec",
    "Wiring",
    "compile_wiring",
    "describe",
    "feeds_sketches",
    "load_manifest",
    "parse_manifest",
    "store_feed",
    "thaw",
    "with_broker",
    "with_node_broker",
]

Role = Literal["aggregator", "trainer", "checkpointer", "store", "relay"]
ROLES: Final[tuple[str, ...]] = ("aggregator", "trainer", "checkpointer", "store", "relay")
_PLANNED_ROLES: Final[tuple[str, ...]] = ()
VERSION: Final = 1
_MQTT_MAX_PACKET: Final = 268_435_455


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True, slots=True)
class BrokerSpec:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    #: Name of the environment variable holding the password (never the password itself).
    password_env: str | None = None
    #: A file holding the password; ``{node}`` is replaced by the node id, so one manifest
    #: serves every node (``fedbus acl`` writes ``<dir>/passwords/<node>``). Relative paths
    #: are relative to the manifest's directory, like the TLS files below.
    password_file: str | None = None
    tls_ca: str | None = None
    #: Client certificate and key (mTLS, from ``fedbus certs``); ``{node}`` as above.
    tls_cert: str | None = None
    tls_key: str | None = None
    chunk_bytes: int = 1_000_000
    #: MQTT keepalive. Crashes are seen at once (TCP closes, the will fires); this only
    #: bounds how long a hung or cut-off node goes unnoticed (1.5x), and must outlast the
    #: event-loop stalls of a busy small device, or healthy nodes get dropped.
    keepalive_s: int = 30
    #: The broker's per-client queue limit (mosquitto ``max_queued_messages``; its default is
    #: 1000, the configs in brokers/ set 100000). Checked at start against the chunking: a
    #: queue that cannot hold one model's chunks loses them silently.
    max_queued_messages: int = 1000


@dataclass(frozen=True, slots=True)
class BrokerNode:
    """One broker of a multi-broker manifest (``brokers:``), bridged to its ``parent``'s.

    ``spec`` is None for a broker that ``fedbus run`` starts itself (embedded, a free loopback
    port); otherwise where it listens and how nodes log in, as for ``broker:``.
    """

    name: str
    parent: str | None = None
    spec: BrokerSpec | None = None


@dataclass(frozen=True, slots=True)
class CodecSpec:
    level: int = 1  # zstd level; 0 = no compression
    shuffle: bool = False
    max_message_mb: int = 1024
    #: How trainers compress their updates (fedbus.compress): none, fp16, int8, topk.
    update: UpdateCodec = UpdateCodec()
    #: How aggregators and relays compress the model they broadcast: none, fp16, int8
    #: (rounded to nearest unless ``stochastic: true``). Their own model stays exact.
    model: UpdateCodec = UpdateCodec(stochastic=False)


@dataclass(frozen=True, slots=True)
class PluginSpec:
    """A strategy or selector: a registry name (or ``module:Class``) and its parameters."""

    name: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class RoundSpec:
    deadline_s: float = 60.0
    #: Fraction of the selected trainers whose updates close a round early, in (0, 1].
    quorum: float = 1.0
    #: Online trainers needed before a round starts.
    min_clients: int = 1
    start_timeout_s: float = 120.0
    #: Chunked (large) updates uploading at once: the aggregator grants upload slots so its
    #: memory is bounded by this many in-flight models, not by the number of trainers.
    max_uploads: int = 4
    #: Refuse updates whose delta has a larger L2 norm (None: no bound). A bound stops a
    #: faulty or malicious trainer's huge update; a robust strategy (median, trimmed mean,
    #: krum) is the answer to subtler poisoning by an authenticated trainer.
    max_update_norm: float | None = None
    #: Refuse updates that claim more training examples (the weight in every FedAvg).
    max_examples: int = 1 << 40
    #: A round whose pending trainers were all just reported lost stays open this long for
    #: a contradiction (a forged or stale offline). None: 0.5 s, or 0 for a simulated
    #: population, where nothing can forge a presence.
    loss_grace_s: float | None = None


@dataclass(frozen=True, slots=True)
class EvalSpec:
    where: Literal["server", "none"] = "server"
    every: int = 1


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """``ref`` is ``module:attr`` naming a task factory; it is imported only by trainers."""

    ref: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """The metadata store (``role: store`` nodes): where it keeps rounds, what, how long."""

    #: Folder of the on-disk store; default ``fedbus-store/<job>/<node>`` under the cwd.
    dir: str | None = None
    #: In-memory LRU cache in front of the disk, in MiB (bounded by bytes, not entries).
    cache_mb: int = 256
    #: Optional shared cache (``redis://host:port/db``) for stores run by several processes.
    redis_url: str | None = None
    #: Dimensions of the seeded random projection kept for every update of every round.
    sketch_dim: int = 2048
    #: Full per-client updates are kept for the last K rounds only (0, the default: none;
    #: the store is then fed sketches and does not slow rounds, see docs/store.md).
    full_update_rounds: int = 0
    #: Global models kept for the last K rounds (0: every round).
    model_rounds: int = 0
    #: Rounds kept at all (metrics, sketches); 0: every round.
    keep_rounds: int = 0
    #: Messages waiting to be written, in MiB; beyond it the store drops (and counts) them.
    backlog_mb: int = 512
    #: Load the task's evaluation copy (as the aggregator does) for leave-one-out / Shapley.
    evaluate: bool = True
    #: Stop when the job is done (``fedbus run``); false keeps answering queries.
    exit_on_done: bool = True
    #: Nice value (0-19) of the store's recording thread (0: see docs/store.md before raising).
    work_nice: int = 0
    #: Leave-one-out and Shapley values of each closed round computed in idle time.
    precompute: bool = True
    #: Shapley permutations of that precomputation (the contribution query's default).
    precompute_permutations: int = 32
    #: How the store gets each update: ``updates`` (a second copy of every update from the
    #: broker), ``sketches`` (the aggregator's per-round sketch record, ``sketch/<agg>``; no
    #: full updates), or ``auto``: sketches when it keeps none (``full_update_rounds: 0``)
    #: and the aggregator is synchronous. See docs/store.md, "How it gets the data".
    feed: str = "auto"


@dataclass(frozen=True, slots=True)
class NodeSpec:
    id: str
    role: Role
    parent: str | None = None
    partition: int | None = None
    #: The broker (a ``brokers:`` name) this node connects to; None with a single broker.
    #: Unset in the file, it is the parent's (a relay's subtree shares its broker).
    broker: str | None = None
    #: A relay's own group strategy (synchronous roots): how it folds its children's updates
    #: before forwarding one; None: FedAvg.
    strategy: PluginSpec | None = None


@dataclass(frozen=True, slots=True)
class CheckpointSpec:
    """How the checkpointer keeps state and how the aggregator waits for it (docs/
    architecture.md, "Checkpoints")."""

    #: Folder of the disk store (relative: to the directory the checkpointer runs in).
    dir: str = "checkpoints"
    #: Checkpoints kept per aggregator.
    keep: int = 3
    #: ``redis://host:port/db``: Redis as the store, the disk backing it up.
    redis: str | None = None
    #: Checkpoint after every this many rounds (and always after the last).
    every: int = 1
    #: How long the aggregator waits for the checkpointer's acknowledgement.
    wait_s: float = 10.0
    #: Unacknowledged after ``wait_s``: ``continue`` (say so, go on without durability) or
    #: ``wait`` (hold the next round until the checkpointer is back).
    on_unacked: Literal["continue", "wait"] = "continue"
    #: At start, how long the aggregator waits for a checkpoint to restore.
    restore_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class PopulationSpec:
    """Virtual clients for a simulation (``fedbus.sim``): a population hosted by a few workers.

    Each client is a partition of the task's data with its own id (``prefix`` + index); only
    ``per_round`` of them train per round (synchronous) or are in flight (asynchronous).
    Heterogeneity is drawn per client from the job's seed, so a run is repeatable.
    """

    clients: int
    per_round: int
    prefix: str = "client-"
    #: How the task splits its data among clients: ``iid`` or ``dirichlet`` (label skew).
    partition: Literal["iid", "dirichlet"] = "iid"
    #: Dirichlet concentration (smaller: more skewed); used when partition is dirichlet.
    alpha: float = 0.5
    #: Worker objects (one task and one model each) running clients; 0 = one per CPU core.
    workers: int = 0
    #: Client speeds are lognormal(0, speed_sigma) (0: all equal); they order asynchronous
    #: arrivals on the simulation's virtual clock.
    speed_sigma: float = 0.0
    #: Probability that a selected client is available in a round (else it drops out).
    availability: float = 1.0
    #: Probability that a selected, available client fails during training.
    dropout: float = 0.0
    #: Probability that a client's update is stale: asynchronous, it lands ``stale_delay``
    #: virtual seconds late; synchronous, it was trained from the model of ``ceil(stale_delay)``
    #: rounds ago and is folded into the current round (FLUTE's stale updates).
    stale_prob: float = 0.0
    stale_delay: float = 5.0
    #: Where per-client strategy state (SCAFFOLD c_i, FedDyn gradients) is kept; None: a
    #: temporary folder removed at the end.
    state_dir: str | None = None
    #: Keep the best model seen by the periodic evaluation (accuracy, else lowest loss).
    keep_best: bool = True
    #: Server-side rehearsal: after each aggregation the server task's ``rehearse(weights)``
    #: takes a training step on server data (the task must provide it).
    rehearsal: bool = False


@dataclass(frozen=True, slots=True)
class Manifest:
    job: str
    rounds: int
    seed: int
    broker: BrokerSpec | None  # None: start an embedded broker
    codec: CodecSpec
    strategy: PluginSpec
    selector: PluginSpec
    round: RoundSpec
    evaluate: EvalSpec
    task: TaskSpec
    nodes: tuple[NodeSpec, ...]
    source: str = "<string>"
    #: Virtual clients (simulation); None for a deployment with real trainers.
    population: PopulationSpec | None = None
    #: Hybrid ring groups of trainers (``groups:``, fedbus.services.ring).
    groups: tuple[GroupSpec, ...] = ()
    store: StoreSpec = StoreSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    #: Several brokers bridged into a tree (``brokers:``), by name; empty with one broker.
    brokers: Mapping[str, BrokerNode] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))

    @property
    def checkpointer(self) -> NodeSpec | None:
        """The checkpointer node, if the manifest declares one (at most one)."""
        return next((n for n in self.nodes if n.role == "checkpointer"), None)

    def node(self, node_id: str) -> NodeSpec:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise ManifestError(self.source, "nodes",
                            f"no node {node_id!r}; known ids: {_preview(n.id for n in self.nodes)}")

    @property
    def aggregator(self) -> NodeSpec:
        """The root aggregator (validation guarantees exactly one)."""
        return next(n for n in self.nodes if n.role == "aggregator" and n.parent is None)

    def children_of(self, node_id: str) -> tuple[NodeSpec, ...]:
        """The trainers and relays whose parent is ``node_id`` (an aggregator or relay)."""
        return tuple(n for n in self.nodes
                     if n.role in ("trainer", "relay") and n.parent == node_id)

    def trainers_of(self, aggregator_id: str) -> tuple[NodeSpec, ...]:
        if self.node(aggregator_id).role != "aggregator":
            raise ManifestError(self.source, "nodes",
                                f"{aggregator_id!r} is a {self.node(aggregator_id).role}, "
                                "not an aggregator")
        return tuple(n for n in self.nodes if n.role == "trainer" and n.parent == aggregator_id)

    @property
    def num_partitions(self) -> int:
        """How many data partitions the job is split into: one per trainer."""
        return sum(1 for n in self.nodes if n.role == "trainer")

    def group_of(self, node_id: str) -> GroupSpec | None:
        """The ring group ``node_id`` is a member of, if any."""
        return next((g for g in self.groups if node_id in g.members), None)

    def groups_under(self, parent: str) -> tuple[tuple[str, ...], ...]:
        """The members (by rank) of each ring group whose parent is ``parent``."""
        return tuple(g.members for g in self.groups if g.parent == parent)


def with_broker(m: Manifest, broker: BrokerSpec) -> Manifest:
    """The same manifest pointed at ``broker`` (e.g. the embedded broker once it is up)."""
    return dataclasses.replace(m, broker=broker)


def with_node_broker(m: Manifest, node_id: str) -> Manifest:
    """``m`` as ``node_id`` sees it: ``broker`` is the broker it connects to (its own one of
    ``brokers:``). Unchanged for a single-broker manifest or a broker not yet started."""
    name = m.node(node_id).broker
    if name is None or name not in m.brokers or m.brokers[name].spec is None:
        return m
    return dataclasses.replace(m, broker=m.brokers[name].spec)


def thaw(value: Any) -> Any:
    """Plain dicts and lists from frozen params (for msgpack, JSON or a constructor)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


# --------------------------------------------------------------------------- loading


def load_manifest(path: str | os.PathLike[str], *,
                  env: Mapping[str, str] | None = None) -> Manifest:
    """Read, expand and validate a YAML manifest. ``env`` defaults to ``os.environ``."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ManifestError(source, "(file)", f"cannot read: {exc.strerror or exc}") from None
    return parse_manifest(load_yaml(text, source), source, env=env)


def parse_manifest(data: Any, source: str = "<string>", *,
                   env: Mapping[str, str] | None = None) -> Manifest:
    """Validate already-parsed manifest data (a YAML string is parsed first)."""
    if isinstance(data, str):
        data = load_yaml(data, source)
    data = expand(data, "", source, os.environ if env is None else env)
    return _Parser(source).manifest(data)


# --------------------------------------------------------------------------- validation

_REF = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def _join(field: str, key: object) -> str:
    return f"{field}.{key}" if field else str(key)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(str(value) if isinstance(value, str) else value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _preview(ids: Any, limit: int = 12) -> str:
    items = list(ids)
    head = ", ".join(items[:limit])
    return head + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _freeze(value: Any) -> Any:
    """Deep read-only copy of free-form params; expanded strings read as YAML scalars."""
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Expanded):
        try:
            scalar = yaml.safe_load(value) if value.strip() else str(value)
        except yaml.YAMLError:
            return str(value)
        return scalar if isinstance(scalar, (str, int, float, bool)) else str(value)
    return value


class _Parser:
    """Turns checked raw data into the frozen model; every failure is one ManifestError."""

    def __init__(self, source: str) -> None:
        self.src = source

    def fail(self, field: str, problem: str) -> NoReturn:
        raise ManifestError(self.src, field or "(top level)", problem)

    # -- primitives --------------------------------------------------------

    def table(self, value: Any, field: str, allowed: Sequence[str],
              required: Sequence[str] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(field, f"expected a mapping with keys {', '.join(allowed)}; "
                             f"got {_kind(value)}")
        for key in value:
            if not isinstance(key, str):
                self.fail(field, f"keys must be strings, got {_kind(key)}")
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(_join(field, key),
                          f"unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")
        for key in required:
            if key not in value:
                self.fail(_join(field, key), f"required key {key!r} is missing")
        return value

    def integer(self, value: Any, field: str, lo: int | None = None,
                hi: int | None = None) -> int:
        if isinstance(value, Expanded):
            try:
                value = int(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, f"expected an integer{_range(lo, hi)}, got {_kind(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.fail(field, f"must be an integer{_range(lo, hi)}, got {value}")
        return value

    def number(self, value: Any, field: str, check: Callable[[float], bool],
               allowed: str) -> float:
        if isinstance(value, Expanded):
            try:
                value = float(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(field, f"expected a number {allowed}, got {_kind(value)}")
        if not math.isfinite(value) or not check(float(value)):
            self.fail(field, f"must be a number {allowed}, got {value}")
        return float(value)

    def boolean(self, value: Any, field: str) -> bool:
        if isinstance(value, Expanded) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if not isinstance(value, bool):
            self.fail(field, f"expected true or false, got {_kind(value)}")
        return value

    def string(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(field, f"expected a non-empty string, got {_kind(value)}")
        return str(value)

    def opt_string(self, value: Any, field: str) -> str | None:
        # `${VAR:-}` that expands to nothing means "not set", so one file serves both cases.
        if value is None or (isinstance(value, Expanded) and not value.strip()):
            return None
        return self.string(value, field)

    def ident(self, value: Any, field: str) -> str:
        text = self.string(value, field)
        try:
            return topics.validate_id(text, field)
        except BusError as exc:
            self.fail(field, str(exc))

    def choice(self, value: Any, field: str, allowed: Sequence[str], note: str = "") -> str:
        text = self.string(value, field)
        if text not in allowed:
            close = difflib.get_close_matches(text, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.fail(field, f"{text!r} is not allowed{hint}; allowed: {', '.join(allowed)}{note}")
        return text

    def params(self, value: Any, field: str) -> Mapping[str, Any]:
        if value is None:
            return MappingProxyType({})
        if not isinstance(value, dict):
            self.fail(field, f"expected a mapping of parameter names to values, got {_kind(value)}")
        for key in value:
            if not isinstance(key, str):
                self.fail(field, f"parameter names must be strings, got {_kind(key)}")
        return cast(Mapping[str, Any], _freeze(value))

    # -- sections ------------------------------------------------------------

    def manifest(self, data: Any) -> Manifest:
        t = self.table(data, "", (*_TOP_KEYS, "groups"),
                       required=("version", "job", "rounds", "task", "nodes"))
        version = t["version"]
        if isinstance(version, bool) or version != VERSION:
            self.fail("version", f"unsupported manifest version {version!r}; this fedbus reads "
                                 f"version: {VERSION}")
        job = self.ident(t["job"], "job")
        rounds = self.integer(t["rounds"], "rounds", lo=1)
        seed = self.integer(t.get("seed", 0), "seed", lo=0, hi=2**63 - 1)
        population = None
        if t.get("population") is not None:
            population = self.population(t["population"])
            if t.get("trainers") is not None:
                self.fail("trainers", "a manifest with `population:` has virtual clients as its "
                                      "trainers; remove `trainers:`")
        nodes = self.nodes(t["nodes"], t.get("trainers"), population)
        brokers: Mapping[str, BrokerNode] = MappingProxyType({})
        if t.get("brokers") is not None:
            if t.get("broker") is not None:
                self.fail("brokers", "`broker:` and `brokers:` exclude each other: with several "
                                     "brokers, give each one's host/port (and credentials) "
                                     "under `brokers:`")
            if population is not None:
                self.fail("brokers", "a simulation (`population:`) runs on one broker")
            brokers = self.brokers(t["brokers"])
            nodes = self.node_brokers(nodes, brokers)
        else:
            for i, n in enumerate(nodes):
                if n.broker is not None:
                    self.fail(f"nodes[{i}].broker", f"{n.id!r} names broker {n.broker!r} but the "
                              "manifest has no `brokers:` section; add one or remove the key")
        n_trainers = sum(1 for n in nodes if n.role == "trainer")
        rnd = self.round(t.get("round"), n_trainers)
        if population is not None:
            rnd = self._population_round(t.get("round"), rnd, population)
        strategy = self.plugin(t.get("strategy", "fedavg"), "strategy", make_strategy)
        self.relay_strategies(nodes, strategy)
        return Manifest(
            job=job,
            rounds=rounds,
            seed=seed,
            broker=(self.broker(t["broker"]) if t.get("broker") is not None
                    else _root_spec(brokers)),
            codec=self.codec(t.get("codec")),
            strategy=strategy,
            selector=self.plugin(t.get("selector", "all"), "selector", make_selector),
            round=rnd,
            evaluate=self.evaluate(t.get("evaluate")),
            task=self.task(t["task"]),
            nodes=nodes,
            source=self.src,
            population=population,
            groups=parse_groups(self, t.get("groups"), nodes, rnd,
                                self.plugin(t.get("strategy", "fedavg"), "strategy",
                                            make_strategy),
                                self.codec(t.get("codec")), population),
            store=self.store(t.get("store"), nodes, isinstance(
                make_strategy(strategy.name, thaw(strategy.params)), AsyncStrategy)),
            checkpoint=self.checkpoint(t.get("checkpoint")),
            brokers=brokers,
        )

    def checkpoint(self, value: Any) -> CheckpointSpec:
        d = CheckpointSpec()
        t = self.table({} if value is None else value, "checkpoint", _fields(CheckpointSpec))
        positive = "> 0 (seconds)"
        return CheckpointSpec(
            dir=self.string(t.get("dir", d.dir), "checkpoint.dir"),
            keep=self.integer(t.get("keep", d.keep), "checkpoint.keep", lo=1, hi=10_000),
            redis=self.opt_string(t.get("redis"), "checkpoint.redis"),
            every=self.integer(t.get("every", d.every), "checkpoint.every", lo=1),
            wait_s=self.number(t.get("wait_s", d.wait_s), "checkpoint.wait_s",
                               lambda x: x > 0, positive),
            on_unacked=cast(Literal["continue", "wait"], self.choice(
                t.get("on_unacked", d.on_unacked), "checkpoint.on_unacked",
                ("continue", "wait"))),
            restore_timeout_s=self.number(t.get("restore_timeout_s", d.restore_timeout_s),
                                          "checkpoint.restore_timeout_s", lambda x: x > 0,
                                          positive),
        )

    def population(self, value: Any) -> PopulationSpec:
        f = "population"
        t = self.table(value, f, _fields(PopulationSpec), required=("clients", "per_round"))
        d = PopulationSpec(clients=1, per_round=1)
        clients = self.integer(t["clients"], f"{f}.clients", lo=1, hi=1_000_000)
        per_round = self.integer(t["per_round"], f"{f}.per_round", lo=1)
        if per_round > clients:
            self.fail(f"{f}.per_round", f"{per_round} exceeds population.clients={clients}; a "
                                        "round cannot sample more clients than exist")
        prefix = self.string(t.get("prefix", d.prefix), f"{f}.prefix")
        try:
            topics.validate_id(f"{prefix}{clients - 1}", "client id")
        except BusError as exc:
            self.fail(f"{f}.prefix", str(exc))
        partition = self.choice(t.get("partition", d.partition), f"{f}.partition",
                                ("iid", "dirichlet"))
        prob = "in [0, 1] (a probability)"
        return PopulationSpec(
            clients=clients,
            per_round=per_round,
            prefix=prefix,
            partition=cast(Literal["iid", "dirichlet"], partition),
            alpha=self.number(t.get("alpha", d.alpha), f"{f}.alpha", lambda x: x > 0,
                              "> 0 (Dirichlet concentration; smaller is more skewed)"),
            workers=self.integer(t.get("workers", d.workers), f"{f}.workers", lo=0, hi=1024),
            speed_sigma=self.number(t.get("speed_sigma", d.speed_sigma), f"{f}.speed_sigma",
                                    lambda x: x >= 0, ">= 0 (lognormal spread of speeds)"),
            availability=self.number(t.get("availability", d.availability),
                                     f"{f}.availability", lambda x: 0 < x <= 1,
                                     "in (0, 1] (probability a client is available)"),
            dropout=self.number(t.get("dropout", d.dropout), f"{f}.dropout",
                                lambda x: 0 <= x < 1, "in [0, 1) (probability)"),
            stale_prob=self.number(t.get("stale_prob", d.stale_prob), f"{f}.stale_prob",
                                   lambda x: 0 <= x <= 1, prob),
            stale_delay=self.number(t.get("stale_delay", d.stale_delay), f"{f}.stale_delay",
                                    lambda x: x >= 0, ">= 0 (virtual seconds)"),
            state_dir=self.opt_string(t.get("state_dir"), f"{f}.state_dir"),
            keep_best=self.boolean(t.get("keep_best", d.keep_best), f"{f}.keep_best"),
            rehearsal=self.boolean(t.get("rehearsal", d.rehearsal), f"{f}.rehearsal"),
        )

    def _population_round(self, raw: Any, rnd: RoundSpec, p: PopulationSpec) -> RoundSpec:
        """Simulation defaults: wait for the whole population before round 1 (which clients
        are online must not depend on timing) and a generous wall-clock deadline (dropouts are
        announced, not waited out)."""
        given = raw if isinstance(raw, dict) else {}
        changes: dict[str, Any] = {}
        if "min_clients" not in given:
            changes["min_clients"] = p.clients
        if "deadline_s" not in given:
            changes["deadline_s"] = 3600.0
        return dataclasses.replace(rnd, **changes)

    def brokers(self, value: Any) -> Mapping[str, BrokerNode]:
        """``brokers: {NAME: {parent: NAME, host, port, ...broker keys}}``: a tree of brokers,
        each bridged to its parent's; exactly one (the root) has no parent. A broker without
        host and port is started by ``fedbus run``."""
        if not isinstance(value, dict) or not value:
            self.fail("brokers", "expected a mapping of broker names to {parent, host, port, "
                                 f"...}}, got {_kind(value)}")
        out: dict[str, BrokerNode] = {}
        for key, raw in value.items():
            name = self.ident(key, "brokers")
            f = f"brokers.{name}"
            t = self.table({} if raw is None else raw, f, ("parent", *_fields(BrokerSpec)))
            parent = None if t.get("parent") is None else self.ident(t["parent"], f"{f}.parent")
            spec_keys = {k: v for k, v in t.items() if k != "parent"}
            spec = None
            if "host" in spec_keys or "port" in spec_keys:
                spec = self.broker(spec_keys, f)
            elif spec_keys:
                self.fail(f, f"{', '.join(sorted(spec_keys))} set but no host/port: a broker "
                             "that `fedbus run` starts takes no settings; give host and port "
                             "of a running broker or remove them")
            out[name] = BrokerNode(name=name, parent=parent, spec=spec)
        roots = [b.name for b in out.values() if b.parent is None]
        if len(roots) != 1:
            self.fail("brokers", f"exactly one broker (the root) has no parent, found "
                                 f"{len(roots)}: {', '.join(roots) or 'none'}; give every other "
                                 "broker `parent: NAME` (the broker it bridges to)")
        for b in out.values():
            seen = {b.name}
            up = b.parent
            while up is not None:
                if up not in out:
                    self.fail(f"brokers.{b.name}.parent",
                              f"unknown broker {up!r}; known: {', '.join(out)}")
                if up in seen:
                    self.fail(f"brokers.{b.name}.parent",
                              f"brokers bridge in a loop through {up!r}; every chain of parents "
                              f"must end at the root broker {roots[0]!r}")
                seen.add(up)
                up = out[up].parent
        return MappingProxyType(out)

    def node_brokers(self, nodes: tuple[NodeSpec, ...],
                     brokers: Mapping[str, BrokerNode]) -> tuple[NodeSpec, ...]:
        """Give every node its broker: its own ``broker:``, else its parent's, else the root
        broker. Bridges connect every broker of the tree, so a parent on another broker is
        reachable; what crosses is derived from the wiring (``fedbus bridge``)."""
        root = next(b.name for b in brokers.values() if b.parent is None)
        by_id = {n.id: n for n in nodes}
        for i, n in enumerate(nodes):
            if n.broker is not None and n.broker not in brokers:
                self.fail(f"nodes[{i}].broker", f"{n.id!r} uses unknown broker {n.broker!r}; "
                                                f"known: {', '.join(brokers)}")

        def resolve(n: NodeSpec) -> str:
            seen: set[str] = set()
            while n.broker is None and n.parent is not None and n.parent not in seen:
                seen.add(n.id)
                n = by_id[n.parent]
            return n.broker or root

        return tuple(dataclasses.replace(n, broker=resolve(n)) for n in nodes)

    def broker(self, value: Any, field: str = "broker") -> BrokerSpec:
        t = self.table(value, field, _fields(BrokerSpec))
        d = BrokerSpec()
        password_env = self.opt_string(t.get("password_env"), f"{field}.password_env")
        if password_env is not None and not VAR_NAME.match(password_env):
            self.fail(f"{field}.password_env",
                      f"{password_env!r} is not an environment variable name; name the variable "
                      "that holds the password (e.g. FEDBUS_BROKER_PASSWORD), not the password")
        host = self.string(t.get("host", d.host), f"{field}.host")
        if any(c.isspace() or c in "/" for c in host):
            self.fail(f"{field}.host", f"{host!r} is not a host name or address")
        tls_cert = self.opt_string(t.get("tls_cert"), f"{field}.tls_cert")
        tls_key = self.opt_string(t.get("tls_key"), f"{field}.tls_key")
        if (tls_cert is None) != (tls_key is None):
            self.fail(f"{field}.tls_cert" if tls_cert is None else f"{field}.tls_key",
                      "tls_cert and tls_key go together: set both (client certificate and its "
                      "key, e.g. from `fedbus certs`) or neither")
        return BrokerSpec(
            host=host,
            port=self.integer(t.get("port", d.port), f"{field}.port", lo=1, hi=65535),
            username=self.opt_string(t.get("username"), f"{field}.username"),
            password_env=password_env,
            password_file=self.opt_string(t.get("password_file"), f"{field}.password_file"),
            tls_ca=self.opt_string(t.get("tls_ca"), f"{field}.tls_ca"),
            tls_cert=tls_cert,
            tls_key=tls_key,
            chunk_bytes=self.integer(t.get("chunk_bytes", d.chunk_bytes), f"{field}.chunk_bytes",
                                     lo=1024, hi=_MQTT_MAX_PACKET - 65536),
            keepalive_s=self.integer(t.get("keepalive_s", d.keepalive_s), f"{field}.keepalive_s",
                                     lo=1, hi=65535),
            max_queued_messages=self.integer(
                t.get("max_queued_messages", d.max_queued_messages),
                f"{field}.max_queued_messages", lo=1),
        )

    def codec(self, value: Any) -> CodecSpec:
        d = CodecSpec()
        t = self.table({} if value is None else value, "codec", _fields(CodecSpec))
        return CodecSpec(
            level=self.integer(t.get("level", d.level), "codec.level", lo=0, hi=22),
            shuffle=self.boolean(t.get("shuffle", d.shuffle), "codec.shuffle"),
            max_message_mb=self.integer(t.get("max_message_mb", d.max_message_mb),
                                        "codec.max_message_mb", lo=1),
            update=self.tensor_codec(t.get("update"), "codec.update", UPDATE_MODES,
                                     UpdateCodec()),
            model=self.tensor_codec(t.get("model"), "codec.model", MODEL_MODES,
                                    CodecSpec().model),
        )

    def tensor_codec(self, value: Any, field: str, modes: tuple[str, ...],
                     d: UpdateCodec) -> UpdateCodec:
        if value is None:
            return d
        if isinstance(value, str):
            value = {"mode": value}
        t = self.table(value, field, _fields(UpdateCodec), required=("mode",))
        mode = self.string(t["mode"], f"{field}.mode")
        if mode not in modes:
            self.fail(f"{field}.mode", f"{mode!r} is not one of {', '.join(modes)}")
        return UpdateCodec(
            mode=mode,
            block=self.integer(t.get("block", d.block), f"{field}.block", lo=1, hi=1 << 20),
            stochastic=self.boolean(t.get("stochastic", d.stochastic), f"{field}.stochastic"),
            fraction=self.number(t.get("fraction", d.fraction), f"{field}.fraction",
                                 lambda x: 0 < x <= 0.5, "in (0, 0.5]"),
        )

    def plugin(self, value: Any, field: str, make: Callable[..., Any]) -> PluginSpec:
        if isinstance(value, str):
            value = {"name": value}
        t = self.table(value, field, ("name", "params"), required=("name",))
        spec = PluginSpec(name=self.string(t["name"], f"{field}.name"),
                          params=self.params(t.get("params"), f"{field}.params"))
        try:
            make(spec.name, thaw(spec.params))
        except StrategyError as exc:
            self.fail(field, str(exc))
        return spec

    def round(self, value: Any, n_trainers: int) -> RoundSpec:
        d = RoundSpec()
        t = self.table({} if value is None else value, "round", _fields(RoundSpec))
        positive = "> 0 (seconds)"
        spec = RoundSpec(
            deadline_s=self.number(t.get("deadline_s", d.deadline_s), "round.deadline_s",
                                   lambda x: x > 0, positive),
            quorum=self.number(t.get("quorum", d.quorum), "round.quorum",
                               lambda x: 0 < x <= 1, "in (0, 1] (fraction of selected trainers)"),
            min_clients=self.integer(t.get("min_clients", d.min_clients), "round.min_clients",
                                     lo=1),
            start_timeout_s=self.number(t.get("start_timeout_s", d.start_timeout_s),
                                        "round.start_timeout_s", lambda x: x > 0, positive),
            max_uploads=self.integer(t.get("max_uploads", d.max_uploads), "round.max_uploads",
                                     lo=1),
            max_update_norm=None if t.get("max_update_norm") is None else self.number(
                t["max_update_norm"], "round.max_update_norm", lambda x: x > 0,
                "> 0 (L2 norm of an update's delta), or omit it for no bound"),
            max_examples=self.integer(t.get("max_examples", d.max_examples),
                                      "round.max_examples", lo=1),
            loss_grace_s=None if t.get("loss_grace_s") is None else self.number(
                t["loss_grace_s"], "round.loss_grace_s", lambda x: 0 <= x <= 60,
                "in [0, 60] (seconds)"),
        )
        if spec.min_clients > n_trainers:
            self.fail("round.min_clients",
                      f"{spec.min_clients} exceeds the {n_trainers} trainer(s) the manifest "
                      "declares; lower it or add trainers")
        return spec

    def store(self, value: Any, nodes: Sequence[NodeSpec], asynchronous: bool = False,
              ) -> StoreSpec:
        d = StoreSpec()
        if value is None:
            return d
        if not any(n.role == "store" for n in nodes):
            self.fail("store", "there is no node with role: store to configure; add "
                               "`- {id: store, role: store}` to nodes or remove this section")
        t = self.table(value, "store", _fields(StoreSpec))

        def count(key: str, lo: int, hi: int | None = None) -> int:
            return self.integer(t.get(key, getattr(d, key)), f"store.{key}", lo=lo, hi=hi)

        redis_url = self.opt_string(t.get("redis_url"), "store.redis_url")
        if redis_url is not None and not redis_url.startswith(("redis://", "rediss://",
                                                                "unix://")):
            self.fail("store.redis_url", f"{redis_url!r} is not a Redis URL; use "
                                         "redis://host:port/db")
        return StoreSpec(
            dir=self.opt_string(t.get("dir"), "store.dir"),
            cache_mb=count("cache_mb", 1),
            redis_url=redis_url,
            sketch_dim=count("sketch_dim", 16, 1 << 20),
            full_update_rounds=count("full_update_rounds", 0),
            model_rounds=count("model_rounds", 0),
            keep_rounds=count("keep_rounds", 0),
            backlog_mb=count("backlog_mb", 1),
            evaluate=self.boolean(t.get("evaluate", d.evaluate), "store.evaluate"),
            exit_on_done=self.boolean(t.get("exit_on_done", d.exit_on_done),
                                      "store.exit_on_done"),
            work_nice=count("work_nice", 0, 19),
            precompute=self.boolean(t.get("precompute", d.precompute), "store.precompute"),
            precompute_permutations=count("precompute_permutations", 1, 10_000),
            feed=self.store_feed(t, count("full_update_rounds", 0), asynchronous),
        )

    def store_feed(self, t: Mapping[str, Any], full_update_rounds: int,
                   asynchronous: bool) -> str:
        feed = self.choice(t.get("feed", "auto"), "store.feed", ("auto", "updates", "sketches"))
        if feed == "sketches" and full_update_rounds > 0:
            self.fail("store.feed", f"sketches carry no full updates, but store."
                      f"full_update_rounds is {full_update_rounds}; set it to 0 or use "
                      "feed: updates")
        if feed == "sketches" and asynchronous:
            self.fail("store.feed", "an asynchronous aggregator publishes no sketch records "
                                    "yet; use feed: updates (or auto)")
        return feed

    def evaluate(self, value: Any) -> EvalSpec:
        d = EvalSpec()
        t = self.table({} if value is None else value, "evaluate", _fields(EvalSpec))
        where = self.choice(t.get("where", d.where), "evaluate.where", ("server", "none"))
        return EvalSpec(where=cast(Literal["server", "none"], where),
                        every=self.integer(t.get("every", d.every), "evaluate.every", lo=1))

    def task(self, value: Any) -> TaskSpec:
        if isinstance(value, str):
            value = {"ref": value}
        t = self.table(value, "task", ("ref", "params"), required=("ref",))
        ref = self.string(t["ref"], "task.ref")
        if not _REF.match(ref):
            self.fail("task.ref", f"{ref!r} must be 'package.module:factory' "
                                  "(e.g. examples.digits.task:make_task)")
        return TaskSpec(ref=ref, params=self.params(t.get("params"), "task.params"))

    # -- nodes -----------------------------------------------------------------

    def node(self, value: Any, field: str) -> NodeSpec:
        t = self.table(value, field, ("id", "role", "parent", "partition", "broker",
                                      *_NODE_EXTRA_KEYS),
                       required=("id", "role"))
        verb = "is" if len(_PLANNED_ROLES) == 1 else "are"
        note = f" ({', '.join(_PLANNED_ROLES)} {verb} planned)" if _PLANNED_ROLES else ""
        role = self.choice(t["role"], f"{field}.role", ROLES, note)
        parent = t.get("parent")
        partition = t.get("partition")
        return NodeSpec(
            id=self.ident(t["id"], f"{field}.id"),
            role=cast(Role, role),
            parent=None if parent is None else self.ident(parent, f"{field}.parent"),
            partition=None if partition is None else self.integer(partition,
                                                                  f"{field}.partition", lo=0),
            broker=None if t.get("broker") is None else self.ident(t["broker"],
                                                                    f"{field}.broker"),
            strategy=self.group_strategy(t, field, role),
        )

    def group_strategy(self, t: Mapping[str, Any], field: str, role: str) -> PluginSpec | None:
        """A relay's ``strategy``: a synchronous strategy folding its group's updates."""
        if t.get("strategy") is None:
            return None
        if role != "relay":
            self.fail(f"{field}.strategy", "only a relay folds updates with its own strategy; "
                                           "the aggregator's is the top-level `strategy:`")
        spec = self.plugin(t["strategy"], f"{field}.strategy", make_strategy)
        made = make_strategy(spec.name, thaw(spec.params))
        if isinstance(made, AsyncStrategy):
            self.fail(f"{field}.strategy", f"{spec.name!r} is asynchronous; a relay's group "
                                           "strategy folds one synchronous round (fedavg, "
                                           "fedavgm, fedadam, ...)")
        if made.aux_models or made.client_aux_models:
            self.fail(f"{field}.strategy", f"{spec.name!r} exchanges extra tensors with its "
                                           "clients (control variates), which a relay's group "
                                           "does not carry; use it at the root")
        return spec

    def relay_strategies(self, nodes: Sequence[NodeSpec], root: PluginSpec) -> None:
        """Under an asynchronous root a relay forwards each update on its own (exact
        staleness): a group strategy there would have nothing to fold."""
        if not isinstance(make_strategy(root.name, thaw(root.params)), AsyncStrategy):
            return
        for i, n in enumerate(nodes):
            if n.strategy is not None:
                self.fail(f"nodes[{i}].strategy",
                          f"the job's strategy {root.name!r} is asynchronous: relay {n.id!r} "
                          "forwards every update tagged with its model version instead of "
                          "folding a round; remove its `strategy:`")

    def shorthand(self, value: Any) -> list[tuple[NodeSpec, str]]:
        t = self.table(value, "trainers", ("count", "prefix", "parent"), required=("count",))
        count = self.integer(t["count"], "trainers.count", lo=1, hi=100_000)
        prefix = self.string(t.get("prefix", "trainer-"), "trainers.prefix")
        parent = t.get("parent")
        parent_id = None if parent is None else self.ident(parent, "trainers.parent")
        try:
            topics.validate_id(f"{prefix}{count - 1}", "trainer id")
        except BusError as exc:
            self.fail("trainers.prefix", str(exc))
        return [(NodeSpec(id=f"{prefix}{i}", role="trainer", parent=parent_id, partition=i),
                 f"trainers[{i}]") for i in range(count)]

    def nodes(self, value: Any, shorthand: Any,
              population: PopulationSpec | None = None) -> tuple[NodeSpec, ...]:
        if not isinstance(value, list):
            self.fail("nodes", f"expected a list of {{id, role, parent, partition}}, "
                               f"got {_kind(value)}")
        found = [(self.node(v, f"nodes[{i}]"), f"nodes[{i}]") for i, v in enumerate(value)]
        if population is not None:
            for n, f in found:
                if n.role == "trainer":
                    self.fail(f"{f}.role", "a manifest with `population:` has virtual clients "
                                           "as its trainers; remove the trainer nodes")
            # Plain ids, one small record each: the clients' data, models and state live in
            # the simulation's workers and state store, never one object per client.
            found += [(NodeSpec(id=f"{population.prefix}{i}", role="trainer", partition=i),
                       "population") for i in range(population.clients)]
        if shorthand is not None:
            found += self.shorthand(shorthand)

        where: dict[str, str] = {}
        for n, f in found:
            if n.id in where:
                self.fail(f"{f}.id" if f.startswith("nodes") else f.split("[")[0],
                          f"duplicate node id {n.id!r} (already used by {where[n.id]}); "
                          "ids must be unique")
            where[n.id] = f

        roots = [(n, f) for n, f in found if n.role == "aggregator"]
        if not roots:
            self.fail("nodes", "no aggregator; add `- {id: aggregator, role: aggregator}`")
        if len(roots) > 1:
            self.fail(f"{roots[1][1]}.role", f"exactly one aggregator is allowed, "
                      f"{roots[0][1]} ({roots[0][0].id!r}) is already one; hierarchical relays "
                      "are planned")
        root, root_field = roots[0]
        if root.parent is not None:
            self.fail(f"{root_field}.parent", "the aggregator is the root and has no parent; "
                                              "remove it")
        if root.partition is not None:
            self.fail(f"{root_field}.partition", "only trainers have a data partition; remove it")

        roles = {n.id: n.role for n, _ in found}
        # trainers and relays hang under the aggregator or a relay (a hierarchy)
        aggregators = ", ".join(sorted(i for i, r in roles.items()
                                       if r in ("aggregator", "relay")))
        parents = {n.id: (n.parent or root.id) for n, _ in found if n.role == "relay"}
        trainers = [(n, f) for n, f in found if n.role == "trainer"]
        if not trainers:
            self.fail("nodes", "no trainers; add `trainers: {count: N}` or trainer nodes")
        out: list[NodeSpec] = []
        partitions: dict[int, str] = {}
        for n, f in found:
            if n.role == "trainer":
                pfield = f"{f}.parent" if f.startswith("nodes") else "trainers.parent"
                if n.parent is None:
                    n = dataclasses.replace(n, parent=root.id)
                elif n.parent not in roles:
                    self.fail(pfield, f"unknown node {n.parent!r}; a trainer's parent must be "
                                      f"an aggregator or relay: {aggregators}")
                elif roles[n.parent] not in ("aggregator", "relay"):
                    self.fail(pfield, f"{n.parent!r} is a {roles[n.parent]}; a trainer's parent "
                                      f"must be an aggregator or relay: {aggregators}")
                if n.partition is not None:
                    pf = f"{f}.partition" if f.startswith("nodes") else "trainers"
                    if n.partition >= len(trainers):
                        self.fail(pf, f"partition {n.partition} is out of range: with "
                                      f"{len(trainers)} trainers partitions are "
                                      f"0..{len(trainers) - 1}")
                    if n.partition in partitions:
                        self.fail(pf, f"partition {n.partition} is already used by "
                                      f"{partitions[n.partition]}; partitions must be unique")
                    partitions[n.partition] = f
            elif n.role == "relay":
                n = self.relay_node(n, f, root.id, roles, parents, aggregators)
            elif n.role == "store":
                n = self.store_node(n, f, root.id, roles, aggregators)
            elif n.role == "checkpointer":
                if n.parent is not None or n.partition is not None:
                    self.fail(f"{f}.parent" if n.parent is not None else f"{f}.partition",
                              "a checkpointer serves every aggregator and holds no data "
                              "partition; remove it")
                if any(o.role == "checkpointer" for o in out):
                    self.fail(f"{f}.role", "at most one checkpointer per manifest")
            out.append(n)
        return tuple(out)


    def relay_node(self, n: NodeSpec, f: str, root: str, roles: Mapping[str, str],
                   parents: Mapping[str, str], aggregators: str) -> NodeSpec:
        """A relay aggregates its children and is a trainer of its parent (the root by
        default): an aggregator or another relay, never itself through a loop."""
        if n.partition is not None:
            self.fail(f"{f}.partition", "only trainers have a data partition; remove it")
        parent = n.parent or root
        if roles.get(parent) not in ("aggregator", "relay"):
            what = "unknown node" if parent not in roles else f"a {roles[parent]}"
            self.fail(f"{f}.parent", f"{parent!r} is {what}; a relay's parent is an aggregator "
                                     f"or relay: {aggregators}")
        seen = {n.id}
        up = parent
        while up in parents:
            if up in seen:
                self.fail(f"{f}.parent", f"relays form a loop through {up!r}; every chain of "
                                         f"parents must end at the aggregator {root!r}")
            seen.add(up)
            up = parents[up]
        return dataclasses.replace(n, parent=parent)

    def store_node(self, n: NodeSpec, f: str, root: str, roles: Mapping[str, str],
                   aggregators: str) -> NodeSpec:
        """A store watches one aggregator (its parent, the root by default) and has no data."""
        if n.partition is not None:
            self.fail(f"{f}.partition", "only trainers have a data partition; remove it")
        if n.parent is None:
            return dataclasses.replace(n, parent=root)
        if roles.get(n.parent) != "aggregator":
            what = "unknown node" if n.parent not in roles else f"a {roles[n.parent]}"
            self.fail(f"{f}.parent", f"{n.parent!r} is {what}; a store's parent is the "
                                     f"aggregator it records: {aggregators}")
        return n


#: Node keys beyond id, role, parent and partition (a relay's group ``strategy``).
_NODE_EXTRA_KEYS: Final = ("strategy",)

_TOP_KEYS: Final = ("version", "job", "seed", "rounds", "broker", "codec", "strategy",
                    "selector", "round", "evaluate", "task", "nodes", "trainers", "population",
                    "checkpoint", "store", "brokers")


def _root_spec(brokers: Mapping[str, BrokerNode]) -> BrokerSpec | None:
    # With several brokers, ``Manifest.broker`` is the root's (the aggregator's, usually):
    # settings such as chunk_bytes are read from it; None while fedbus run has to start it.
    return next((b.spec for b in brokers.values() if b.parent is None), None)


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _range(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    return f" <= {hi}" if hi is not None else ""


# --------------------------------------------------------------------------- wiring


def compile_wiring(m: Manifest) -> dict[str, Wiring]:
    """Per node id, exactly the filters it subscribes to and the topics it publishes on,
    built only through ``fedbus.topics``. tests/test_hostile.py checks the running services
    against it, so the ACLs and bridges generated from it allow what the protocol needs and
    nothing more."""
    children: dict[str, list[str]] = {}
    for n in m.nodes:
        if n.parent is not None:
            children.setdefault(n.parent, []).append(n.id)
    # The role table is fedbus.wiring's, shared with the ACL generator (fedbus.deploy).
    ckpt = m.checkpointer
    wire = {n.id: role_wiring(m.job, n.id, n.role, parent=n.parent,
                              children=children.get(n.id, ()),
                              checkpointer=ckpt.id if ckpt is not None else None,
                              asks_store=_ranking_store(m) if n.role == "aggregator" else None,
                              sketch_feed=(feeds_sketches(m, n.id) if n.role == "aggregator"
                                           else n.role == "store" and store_feed(m) == "sketches"))
            for n in m.nodes}
    return ring_wiring(m.job, m.groups, wire)


def store_feed(m: Manifest) -> str:
    """How the manifest's stores get each update: ``updates`` or ``sketches`` (``auto``
    resolved: sketches when no full update is kept and the aggregator is synchronous)."""
    feed = m.store.feed
    if feed != "auto":
        return feed
    if m.store.full_update_rounds > 0 or isinstance(
            make_strategy(m.strategy.name, thaw(m.strategy.params)), AsyncStrategy):
        return "updates"
    return "sketches"


def feeds_sketches(m: Manifest, node_id: str) -> bool:
    """Does aggregator ``node_id`` publish sketch records (a store recording it wants them)?"""
    return store_feed(m) == "sketches" and any(
        n.role == "store" and n.parent == node_id for n in m.nodes)


def _ranking_store(m: Manifest) -> str | None:
    """The store a ``ranked`` selector asks before every round (its ``store`` parameter)."""
    store = m.selector.params.get("store") if m.selector.name == "ranked" else None
    return store if isinstance(store, str) else None


def describe(m: Manifest) -> str:
    """A short human summary of a valid manifest (what ``fedbus validate`` prints)."""
    wiring = compile_wiring(m)
    by_role: dict[str, list[str]] = {}
    for n in m.nodes:
        by_role.setdefault(n.role, []).append(n.id)
    if m.brokers:
        used: dict[str, int] = {}
        for n in m.nodes:
            used[n.broker or ""] = used.get(n.broker or "", 0) + 1
        broker = "; ".join(
            f"{b.name}" + (f" ({b.spec.host}:{b.spec.port})" if b.spec else " (embedded)")
            + (f" bridged to {b.parent}" if b.parent else " (root)")
            + f", {used.get(b.name, 0)} nodes" for b in m.brokers.values())
    elif m.broker is None:
        broker = ("in-process memory bus (simulation)" if m.population is not None
                  else "embedded mosquitto")
    else:
        b = m.broker
        # Names where secrets come from, never a secret itself.
        tls = " (mTLS)" if b.tls_cert else " (TLS)" if b.tls_ca else ""
        secured = b.password_env or b.password_file or b.tls_cert
        user = f" as {b.username}" if b.username else " as each node's id" if secured else ""
        source = (f", password from ${b.password_env}" if b.password_env else
                  f", password from {b.password_file}" if b.password_file else "")
        broker = f"{b.host}:{b.port}{tls}{user}{source}"

    def plugin(p: PluginSpec) -> str:
        return p.name + (f" {thaw(p.params)}" if p.params else "")

    def mode(u: UpdateCodec) -> str:
        if u.mode == "int8":
            return (f"int8 (block {u.block}, "
                    f"{'stochastic' if u.stochastic else 'nearest'} rounding)")
        return f"topk {u.fraction:g}" if u.mode == "topk" else u.mode

    r = m.round
    roles = "; ".join(f"{len(ids)} {role}{'s' if len(ids) > 1 else ''} ({_preview(ids, 4)})"
                      for role, ids in by_role.items())
    subs = sum(len(w.subscribe) for w in wiring.values())
    pubs = sum(len(w.publish) for w in wiring.values())
    lines = [
        f"manifest  {m.source}: valid",
        f"job       {m.job}: {m.rounds} rounds, seed {m.seed}",
        f"broker    {broker}",
        f"strategy  {plugin(m.strategy)}; selector {plugin(m.selector)}",
        f"round     deadline {r.deadline_s:g}s, quorum {r.quorum:g}, min_clients "
        f"{r.min_clients}, start_timeout {r.start_timeout_s:g}s",
        f"evaluate  {m.evaluate.where}" + (f" every {m.evaluate.every} round(s)"
                                           if m.evaluate.where != "none" else ""),
        f"task      {m.task.ref}" + (f" {thaw(m.task.params)}" if m.task.params else ""),
        f"codec     zstd level {m.codec.level}; updates {mode(m.codec.update)}; "
        f"model {mode(m.codec.model)}",
        f"nodes     {len(m.nodes)}: {roles}",
        f"wiring    {len(wiring)} nodes, {subs} subscriptions, {pubs} publish topics",
    ]
    for g in m.groups:
        lines.append(f"group     {g.id}: {g.mode} of {len(g.members)} under {g.parent} "
                     f"({_preview(g.members, 4)}), step timeout {g.step_timeout_s:g}s")
    groups = [f"{n.id} {plugin(n.strategy)}" for n in m.nodes if n.strategy is not None]
    if groups:
        lines.append(f"relays    group strategies: {'; '.join(groups)} (others fedavg)")
    if m.population is not None:
        p = m.population
        lines.append(f"population {p.clients} virtual clients ({p.prefix}0..), {p.per_round} a "
                     f"round, partition {p.partition}"
                     + (f" alpha {p.alpha:g}" if p.partition == "dirichlet" else "")
                     + f", workers {p.workers or 'one per core'}")
    return "\n".join(lines)

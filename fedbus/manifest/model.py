"""The manifest model: the frozen dataclasses a validated manifest becomes (built by
``fedbus.manifest.parse``), and the small helpers that read or re-point one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal

from fedbus.compress import UpdateCodec
from fedbus.errors import ManifestError

__all__ = [
    "ROLES",
    "VERSION",
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
    "Role",
    "RoundSpec",
    "StoreSpec",
    "TaskSpec",
    "preview",
    "thaw",
    "with_broker",
    "with_node_broker",
]

Role = Literal["aggregator", "trainer", "checkpointer", "store", "relay"]
ROLES: Final[tuple[str, ...]] = ("aggregator", "trainer", "checkpointer", "store", "relay")
VERSION: Final = 1


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
    #: Payloads above this travel as chunks (each checked by a crc32 and joined); a payload
    #: that fits travels whole. 4 MiB: a 1M-parameter float32 model or update fits, and a
    #: round of 10 x 1M took 0.16 s against 0.25 s with 1 MB chunks (docs/benchmarks.md). On
    #: a very slow link (under ~1 Mbit/s) a smaller chunk keeps each packet well inside
    #: 1.5 x keepalive.
    chunk_bytes: int = 4 << 20
    #: MQTT keepalive. Crashes are seen at once (TCP closes, the will fires); this only
    #: bounds how long a hung or cut-off node goes unnoticed (1.5x), and must outlast the
    #: event-loop stalls of a busy small device, or healthy nodes get dropped.
    keepalive_s: int = 30
    #: The broker's per-client queue limit (mosquitto ``max_queued_messages``; its default is
    #: 1000, the configs in brokers/ set 100000). Checked at start against the chunking: a
    #: queue that cannot hold one model's chunks loses them silently.
    max_queued_messages: int = 1000
    #: One connection attempt's timeout; each retry's doubles, up to ``connect_wait_s``.
    connect_timeout_s: float = 10.0
    #: How long a node waits for its first connection (retrying, backed off and jittered)
    #: before it gives up: long enough for a thousand devices connecting at once, or a
    #: broker that boots after its nodes (systemd starts them in any order).
    connect_wait_s: float = 120.0
    #: The longest pause between reconnect attempts (the first is 0.2 s, then doubling,
    #: each jittered by up to half).
    reconnect_max_s: float = 10.0


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
    #: Megabytes of updates the round's order grants outright: the first trainers named (as
    #: many as the budget holds updates) upload as soon as they are done, with no
    #: ``ready`` -> ``grant`` round trip; the rest ask for one of ``max_uploads`` slots. The
    #: aggregator's memory is bounded by this budget plus ``max_uploads`` models. 0: every
    #: large update asks first.
    upload_burst_mb: float = 64.0
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
    #: An asynchronous relay's updates per forwarded update (fedbus.services.preaggregate):
    #: 1 forwards each child update on its own (exact staleness at the root).
    pre_aggregate: int = 1


@dataclass(frozen=True, slots=True)
class SecuritySpec:
    """Signed messages (docs/security.md): every node signs what it publishes with its own
    key, and receivers check the signature against the sender's public key."""

    #: ``off``; ``optional``: signed messages are checked, unsigned ones accepted (a rollout);
    #: ``required``: unsigned or wrongly signed messages are refused and counted.
    sign: str = "off"
    #: Folder of ``<node>.key`` (private, one per node) and ``<node>.pub`` files made by
    #: ``fedbus keys`` (relative: to the manifest's folder).
    keys: str = "keys"


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
class GroupSpec:
    """A hybrid ring group (``groups:``): trainers under one parent that sum their updates
    among themselves before one of them uploads the group's (fedbus.services.ring)."""

    id: str
    #: Members by rank: the first live one of a round's ring commits the group's update.
    members: tuple[str, ...]
    #: The node the members (and the group's update) report to.
    parent: str
    mode: Literal["ring"] = "ring"
    #: How long a member waits for each reduce step (the first one includes how much slower
    #: the others train) before the group falls back to uploading one by one. Default:
    #: ``min(10, round.deadline_s / 4)``.
    step_timeout_s: float = 10.0


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
    security: SecuritySpec = SecuritySpec()
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
                            f"no node {node_id!r}; known ids: {preview(n.id for n in self.nodes)}")

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


def broker_address(value: str) -> BrokerSpec:
    """``HOST:PORT`` (a command line's ``--broker``) as a broker; ValueError when it is not."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"wants HOST:PORT (port 1-65535), got {value!r}")
    return BrokerSpec(host=host or "127.0.0.1", port=int(port))


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


def preview(ids: Any, limit: int = 12) -> str:
    """The first ``limit`` ids, comma-separated, and how many more (for messages)."""
    items = list(ids)
    head = ", ".join(items[:limit])
    return head + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")

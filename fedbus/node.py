"""Turn a manifest and a node id into a running service on its own bus connection.

The one place where the manifest meets the services: ``fedbus serve`` runs one node,
``fedbus run`` runs them all in one process (each with its own connection, as if apart).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fedbus.bus import Bus
from fedbus.checkpoint import CheckpointStore, DiskStore, RedisStore, TieredStore
from fedbus.codec import Compression, Limits
from fedbus.compress import UpdateCodec
from fedbus.connect import authenticated
from fedbus.errors import BrokerLimitError, ManifestError
from fedbus.manifest import Manifest, NodeSpec, feeds_sketches, thaw
from fedbus.services._gate import pregrant_plan
from fedbus.task import EvalResult, Task, open_task
from strategies import (
    AsyncStrategy,
    FedAvg,
    InFlightSelector,
    RandomSelector,
    Selector,
    Strategy,
    make_selector,
    make_strategy,
)
from strategies.ranked import RankedSelector

if TYPE_CHECKING:  # each factory imports its own service: a node loads only its role's code
    from fedbus.services._durability import DurabilitySettings
    from fedbus.services.relay import AsyncRelay, Relay
    from fedbus.services.trainer import TrainerConfig

__all__ = ["build_node", "codec_compression", "codec_limits"]


#: Updates above this size wait for an upload slot (UploadGate), whatever the chunk size:
#: the gate is what keeps the aggregator's memory flat in N, chunks are only how bytes travel.
UPLOAD_GATE_BYTES = 1_000_000


def upload_gate_bytes(m: Manifest) -> int:
    """The update size above which trainers ask for an upload slot: one chunk, at most
    ``UPLOAD_GATE_BYTES`` (bigger chunks send a gated update whole, in fewer messages)."""
    return min(m.broker.chunk_bytes, UPLOAD_GATE_BYTES) if m.broker else UPLOAD_GATE_BYTES


def check_queue_fit(m: Manifest, node: NodeSpec, model_bytes: int, copies: int,
                    concurrent: int) -> None:
    """Refuse at start a broker queue that cannot hold what this node will be sent at once
    (``concurrent`` messages of ``copies`` models, in chunks): mosquitto drops the excess
    silently, and every round would end with 'expired transfer' and nothing else."""
    if m.broker is None:
        return
    b = m.broker
    chunks = -(-(model_bytes * copies + 65536) // b.chunk_bytes)
    need = chunks * concurrent + 100  # + presence, grants, metrics, readies
    if need > b.max_queued_messages:
        raise BrokerLimitError(
            f"{node.id} may be sent {concurrent} message(s) of {chunks} chunks each "
            f"({model_bytes * copies / 1e6:.1f} MB in chunks of {b.chunk_bytes} bytes) at once, "
            f"but the broker queues at most {b.max_queued_messages} messages per client "
            f"(broker.max_queued_messages) and drops the rest silently",
            f"max_queued_messages in the broker's config (and broker.max_queued_messages in "
            f"{m.source}) to at least {need}, or raise broker.chunk_bytes")


def _uploads_at_once(common: dict[str, Any], weights: dict[str, np.ndarray], aux: int) -> int:
    """A synchronous aggregator's most uploads in flight: those its orders grant (up to
    ``round.upload_burst_mb``) and ``round.max_uploads`` slots."""
    r = common["round"]
    count, _ = pregrant_plan(weights, common["update_codec"], aux, r.upload_burst_mb,
                             gate_bytes=common["gate_bytes"], children=len(common["trainers"]))
    return int(r.max_uploads + count)


def _plugins(m: Manifest, n_trainers: int) -> tuple[Strategy | AsyncStrategy, Selector]:
    strategy = make_strategy(m.strategy.name, thaw(m.strategy.params))
    params = thaw(m.selector.params)
    if m.population is not None:
        # A simulated population trains `per_round` clients a round (or keeps that many in
        # flight), not all of them: the default "all" samples per_round uniformly.
        n_trainers = m.population.per_round
        if m.selector.name == "all" and not params and not isinstance(strategy, AsyncStrategy):
            return strategy, RandomSelector(count=n_trainers, seed=m.seed)
    if isinstance(strategy, AsyncStrategy):
        # Async keeps C trainers busy. The default selector ("all") means every trainer,
        # i.e. C = number of trainers; "inflight" without a concurrency gets the same C.
        if m.selector.name == "all" and not params:
            return strategy, InFlightSelector(concurrency=n_trainers, seed=m.seed)
        if m.selector.name == "inflight":
            params = {"concurrency": n_trainers, "seed": m.seed, **params}
    return strategy, make_selector(m.selector.name, params)


def codec_limits(m: Manifest) -> Limits:
    """The outer decode bounds of every message (``codec.max_message_mb``); each service
    narrows them to its model (``fedbus.door.model_limits``)."""
    cap = m.codec.max_message_mb << 20
    return Limits(max_frame_bytes=cap, max_decompressed_bytes=cap)


def codec_compression(m: Manifest) -> Compression:
    return Compression(level=m.codec.level, shuffle=m.codec.shuffle)


def _aggregating(m: Manifest, node: NodeSpec) -> dict[str, Any]:
    """The settings every aggregating service of ``m`` shares (root, relay groups, async
    relays): built once here, so no value is translated twice and none can drift."""
    return {
        "job": m.job, "node_id": node.id, "rounds": m.rounds, "seed": m.seed,
        # its children: trainers, and relays that stand for their groups
        "trainers": frozenset(t.id for t in m.children_of(node.id)),
        # the manifest's sections as they are; what is derived, derived once here
        "round": m.round, "evaluate": m.evaluate, "model_codec": m.codec.model,
        # a relay child sends its group's update lossless (_relay below)
        "update_codec": UpdateCodec() if any(
            c.role == "relay" for c in m.children_of(node.id)) else m.codec.update,
        "compression": codec_compression(m), "limits": codec_limits(m),
        "gate_bytes": upload_gate_bytes(m),
    }


def _upward(m: Manifest, node: NodeSpec, bus: Bus, *, aux: int = 0,
            codec: UpdateCodec | None = None) -> TrainerConfig:
    """A node's settings toward its parent (a trainer's, or a relay's upward side)."""
    from fedbus.services.trainer import TrainerConfig

    assert node.parent is not None
    return TrainerConfig(job=m.job, node_id=node.id, parent=node.parent, rounds=m.rounds,
                         authenticated=authenticated(m, bus), client_aux_models=aux,
                         compression=codec_compression(m), limits=codec_limits(m),
                         update_codec=m.codec.update if codec is None else codec)


def _trainer(m: Manifest, node: NodeSpec, bus: Bus, task: Task | None) -> Any:
    from fedbus.services.trainer import Trainer

    task = task or open_task(m, node)
    plugin = make_strategy(m.strategy.name, thaw(m.strategy.params))
    aux = plugin.client_aux_models if isinstance(plugin, Strategy) else 0
    check_queue_fit(m, node, _nbytes(task.get_weights()), 1 + aux, concurrent=2)
    trainer = Trainer(_upward(m, node, bus, aux=aux), bus, task)
    group = m.group_of(node.id)
    if group is None:
        return trainer
    from fedbus.services.ring import RingConfig, RingMember

    return RingMember(trainer, RingConfig(group.id, group.members, group.step_timeout_s))


def _aggregator(m: Manifest, node: NodeSpec, bus: Bus, task: Task | None) -> Any:
    from fedbus.services.aggregator import LOSS_GRACE_S, Aggregator, AggregatorConfig

    common = _aggregating(m, node)
    strategy, selector = _plugins(m, len(common["trainers"]))
    server_task = task or open_task(m, None)
    evaluate = None
    if m.evaluate.where == "server":
        def evaluate(weights: dict[str, np.ndarray]) -> EvalResult:
            server_task.set_weights(weights)
            return server_task.evaluate()

    r = m.round
    weights = server_task.get_weights()
    aux = strategy.aux_models if isinstance(strategy, Strategy) else 0
    if isinstance(strategy, AsyncStrategy):
        check_queue_fit(m, node, _nbytes(weights), 1 + aux, concurrent=r.max_uploads)
        from fedbus.services.async_aggregator import AsyncAggregator, AsyncAggregatorConfig

        relays = frozenset(t.id for t in m.children_of(node.id) if t.role == "relay")
        return AsyncAggregator(AsyncAggregatorConfig(relays=relays, durability=_durability(m),
                                                     **common),
                               bus, strategy, selector, weights, evaluate=evaluate)
    check_queue_fit(m, node, _nbytes(weights), 1 + aux,
                    concurrent=_uploads_at_once(common, weights, aux))
    grace = r.loss_grace_s if r.loss_grace_s is not None else (
        0.0 if m.population is not None else LOSS_GRACE_S)
    agg = Aggregator(AggregatorConfig(loss_grace_s=grace,
                                      durability=_durability(m), **common),
                     bus, strategy, selector, weights, evaluate=evaluate,
                     coverage=_coverage(m, node))
    # what rides along the rounds: a store's ranking before each, its sketch record after
    if isinstance(selector, RankedSelector) and selector.store is not None:
        from fedbus.store.live import LiveRanking

        agg.observers.append(LiveRanking(m.job, node.id, selector))
    if feeds_sketches(m, node.id):
        from fedbus.store.feed import FeedSettings, SketchPublisher

        agg.observers.append(SketchPublisher(FeedSettings(m.store.sketch_dim, m.seed), m.job,
                                             node.id, codec_compression(m), agg.epoch))
    return agg


def _store(m: Manifest, node: NodeSpec, bus: Bus, task: Task | None) -> Any:
    from fedbus.services.store import store_from_manifest

    eval_task = task or (open_task(m, None) if m.store.evaluate else None)
    return store_from_manifest(m, node, bus, eval_task, limits=codec_limits(m),
                               compression=codec_compression(m))


def _checkpointer(m: Manifest, node: NodeSpec, bus: Bus, task: Task | None) -> Any:
    from fedbus.services.checkpointer import Checkpointer, CheckpointerConfig

    aggregators = frozenset(n.id for n in m.nodes if n.role == "aggregator")
    return Checkpointer(CheckpointerConfig(job=m.job, node_id=node.id,
                                           aggregators=aggregators, limits=codec_limits(m),
                                           rounds=m.rounds),
                        bus, _checkpoint_store(m))


def _relay(m: Manifest, node: NodeSpec, bus: Bus, task: Task | None) -> Relay | AsyncRelay:
    """A relay: its group's strategy (FedAvg by default) over its children (trainers or
    relays), one update to its parent; under an asynchronous root, every child update
    forwarded on its own with the version it was trained from."""
    from fedbus.services.aggregator import LOSS_GRACE_S, Aggregator, AggregatorConfig
    from fedbus.services.async_aggregator import AsyncAggregatorConfig
    from fedbus.services.relay import AsyncRelay, Relay

    assert node.parent is not None
    common = _aggregating(m, node)
    children = common["trainers"]
    weights = (task or open_task(m, None)).get_weights()
    r = m.round
    root = make_strategy(m.strategy.name, thaw(m.strategy.params))
    if isinstance(root, AsyncStrategy):
        config = AsyncAggregatorConfig(
            **{**common, "round": dataclasses.replace(r, min_clients=1)},
            max_staleness=root.max_staleness,
            relays=frozenset(c.id for c in m.children_of(node.id) if c.role == "relay"))
        # the parent's model versions and the children's orders and updates, all at once
        check_queue_fit(m, node, _nbytes(weights), 1, concurrent=r.max_uploads + 2)
        return AsyncRelay(config, bus, node.parent,
                          InFlightSelector(concurrency=len(children), seed=m.seed), weights,
                          pre_aggregate=node.pre_aggregate, scale=root.staleness_scale)
    group_strategy = (FedAvg() if node.strategy is None
                      else make_strategy(node.strategy.name, thaw(node.strategy.params)))
    assert isinstance(group_strategy, Strategy)  # the manifest refuses asynchronous ones
    group = Aggregator(
        AggregatorConfig(
            # its group must be complete before it says it is ready (min_clients of the
            # whole job is the root's business)
            **{**common, "round": dataclasses.replace(r, min_clients=len(children))},
            loss_grace_s=r.loss_grace_s if r.loss_grace_s is not None else LOSS_GRACE_S,
        ),
        bus, group_strategy, make_selector("all", {}), weights, coverage=_coverage(m, node))
    check_queue_fit(m, node, _nbytes(weights), 1, concurrent=_uploads_at_once(common, weights, 0))
    # A group's update goes up lossless: its children's were quantized once already (the
    # root would otherwise fold a rounding per level).
    return Relay(group, _upward(m, node, bus, codec=UpdateCodec()), bus)


#: Building a node is a lookup: a new role is one service module, one settings type and
#: one line here.
_FACTORIES: dict[str, Callable[[Manifest, NodeSpec, Bus, Task | None], Any]] = {
    "trainer": _trainer,
    "aggregator": _aggregator,
    "relay": _relay,
    "store": _store,
    "checkpointer": _checkpointer,
}


def build_node(m: Manifest, node_id: str, bus: Bus, *, task: Task | None = None) -> Any:
    """The service object (with ``async run()``) for ``node_id``."""
    node = m.node(node_id)
    factory = _FACTORIES.get(node.role)
    if factory is None:
        raise ManifestError(m.source, f"nodes[{node_id}].role",
                            f"role {node.role!r} has no service in this version")
    return factory(m, node, bus, task)


def _coverage(m: Manifest, node: NodeSpec) -> Any:
    """Hybrid ring groups under ``node``: their updates cover several members."""
    groups = m.groups_under(node.id)
    if not groups:
        return None
    from fedbus.services.ring import RingCoverage

    return RingCoverage(groups)


def _durability(m: Manifest) -> DurabilitySettings | None:
    from fedbus.services._durability import DurabilitySettings

    node = m.checkpointer
    if node is None:
        return None
    return DurabilitySettings(checkpointer=node.id, checkpoint=m.checkpoint)


def _checkpoint_store(m: Manifest) -> CheckpointStore:
    """Disk by default; with ``checkpoint.redis``, Redis backed up by the disk."""
    c = m.checkpoint
    disk = DiskStore(c.dir, keep=c.keep)
    if c.redis is None:
        return disk
    return TieredStore(RedisStore(c.redis, keep=c.keep), disk)


def _nbytes(weights: dict[str, np.ndarray]) -> int:
    return sum(int(np.asarray(v).nbytes) for v in weights.values())

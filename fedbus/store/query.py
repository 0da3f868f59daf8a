"""Asking a store for a workload: over the bus (the running store answers on
``reply/<requester>``), or offline from the store's folder once a job has ended."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedbus.codec import Envelope, Limits, encode
from fedbus.errors import ManifestError
from fedbus.manifest import Manifest, NodeSpec
from fedbus.store.cache import StoreError
from fedbus.store.live import ask_store
from fedbus.store.repository import open_round_store, store_dir
from fedbus.store.workloads import TaskUtility, Workloads
from fedbus.task import open_task

__all__ = ["ask", "ask_offline", "run_query", "save_models", "store_node"]

#: Workloads that evaluate models on the server's validation set (they load the task).
_EVALUATING = frozenset({"contribution", "debugging", "personalization"})


def store_node(m: Manifest, node_id: str | None) -> NodeSpec:
    stores = [n for n in m.nodes if n.role == "store"]
    if not stores:
        raise ManifestError(m.source, "nodes", "no node has role: store; add "
                                               "`- {id: store, role: store}` and run the job")
    if node_id is None:
        return stores[0]
    node = m.node(node_id)
    if node.role != "store":
        raise ManifestError(m.source, "nodes", f"{node_id!r} is a {node.role}, not a store; "
                            f"stores: {', '.join(n.id for n in stores)}")
    return node


async def ask(bus: Any, m: Manifest, store: str, workload: str, args: Mapping[str, Any],
              timeout: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Send one query to the running ``store`` and wait for its reply (meta, tensors)."""
    cap = m.codec.max_message_mb << 20  # a reply may carry models (personalization)
    reply = await ask_store(bus, m.job, bus.node_id, store, workload, args, timeout,
                            limits=Limits(max_frame_bytes=cap, max_decompressed_bytes=cap))
    if reply is None:
        raise StoreError(f"no reply from store {store!r} within {timeout:g}s: is it "
                         f"running (fedbus serve MANIFEST --node {store})? After a job, "
                         "use --offline to read its folder")
    return reply


async def ask_offline(m: Manifest, node: NodeSpec, workload: str, args: Mapping[str, Any],
                      ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Run ``workload`` on the store's folder in this process (the job may be over)."""
    root = store_dir(m, node)
    if not (root / "rounds").is_dir():
        raise StoreError(f"no store at {root}: run the job with a store node first, or set "
                         "store.dir to where it wrote")
    # the manifest's retention (full updates kept or not), as the running store has it
    store = open_round_store(m, node)
    utility = None
    if workload in _EVALUATING and m.store.evaluate:
        utility = TaskUtility(open_task(m, None))
    result = await Workloads(store, utility, seed=m.seed).run(workload, args)
    return {"ok": True, "workload": workload, "result": result.data}, result.tensors


async def run_query(m: Manifest, store: str | None, workload: str, args: Mapping[str, Any], *,
                    offline: bool, timeout: float, user: str | None = None,
                    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """What ``fedbus query`` does: over the bus when the manifest names a broker (as
    ``user``, an operator, on a secured broker), else from the store's folder."""
    node = store_node(m, store)
    if offline or m.broker is None:
        return await ask_offline(m, node, workload, args)
    from fedbus.connect import make_bus

    me = NodeSpec(id=user or f"query-{os.getpid()}", role="trainer")
    async with make_bus(m, me, interactive=True) as bus:
        return await ask(bus, m, node.id, workload, args, timeout)


def save_models(tensors: Mapping[str, np.ndarray], folder: str) -> list[str]:
    """Write returned models (``<model>/<layer>`` tensors) as one codec frame a model."""
    models: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in tensors.items():
        model, _, layer = name.partition("/")
        models.setdefault(model, {})[layer] = arr
    os.makedirs(folder, exist_ok=True)
    paths = []
    for model, layers in sorted(models.items()):
        path = os.path.join(folder, f"{model}.fb")
        with open(path, "wb") as f:
            f.write(encode(Envelope(kind="model", job="", sender="store", round=0,
                                    tensors=layers)))
        paths.append(path)
    return paths

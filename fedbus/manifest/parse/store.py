"""The ``store:`` section: where the metadata store keeps rounds, what, how long, and how it is
fed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedbus.manifest.model import NodeSpec, StoreSpec
from fedbus.manifest.parse.reader import Reader, field_names

__all__ = ["parse_store"]


def parse_store(read: Reader, value: Any, nodes: Sequence[NodeSpec],
                asynchronous: bool = False) -> StoreSpec:
    d = StoreSpec()
    if value is None:
        return d
    if not any(n.role == "store" for n in nodes):
        read.fail("store", "there is no node with role: store to configure; add "
                           "`- {id: store, role: store}` to nodes or remove this section")
    t = read.table(value, "store", field_names(StoreSpec))

    def count(key: str, lo: int, hi: int | None = None) -> int:
        return read.integer(t.get(key, getattr(d, key)), f"store.{key}", lo=lo, hi=hi)

    redis_url = read.opt_string(t.get("redis_url"), "store.redis_url")
    if redis_url is not None and not redis_url.startswith(("redis://", "rediss://",
                                                            "unix://")):
        read.fail("store.redis_url", f"{redis_url!r} is not a Redis URL; use "
                                     "redis://host:port/db")
    return StoreSpec(
        dir=read.opt_string(t.get("dir"), "store.dir"),
        cache_mb=count("cache_mb", 1),
        redis_url=redis_url,
        sketch_dim=count("sketch_dim", 16, 1 << 20),
        full_update_rounds=count("full_update_rounds", 0),
        model_rounds=count("model_rounds", 0),
        keep_rounds=count("keep_rounds", 0),
        backlog_mb=count("backlog_mb", 1),
        evaluate=read.boolean(t.get("evaluate", d.evaluate), "store.evaluate"),
        exit_on_done=read.boolean(t.get("exit_on_done", d.exit_on_done),
                                  "store.exit_on_done"),
        work_nice=count("work_nice", 0, 19),
        precompute=read.boolean(t.get("precompute", d.precompute), "store.precompute"),
        precompute_permutations=count("precompute_permutations", 1, 10_000),
        feed=_store_feed(read, t, count("full_update_rounds", 0), asynchronous),
    )


def _store_feed(read: Reader, t: Mapping[str, Any], full_update_rounds: int,
                asynchronous: bool) -> str:
    feed = read.choice(t.get("feed", "auto"), "store.feed", ("auto", "updates", "sketches"))
    if feed == "sketches" and full_update_rounds > 0:
        read.fail("store.feed", f"sketches carry no full updates, but store."
                  f"full_update_rounds is {full_update_rounds}; set it to 0 or use "
                  "feed: updates")
    if feed == "sketches" and asynchronous:
        read.fail("store.feed", "an asynchronous aggregator publishes no sketch records "
                                "yet; use feed: updates (or auto)")
    return feed

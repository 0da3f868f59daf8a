"""The store's disk layout, atomic writes, byte-bounded cache, retention and Redis tier."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from fedbus.broker import free_port
from fedbus.store import ByteLRU, RedisCache, Retention, RoundStore, StoreError


def _update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"0.weight": rng.normal(size=(64, 32)).astype(np.float32),
            "0.bias": rng.normal(size=64).astype(np.float32)}


def _record(r: int, clients: list[str]) -> dict[str, object]:
    return {"round": r, "layers": ["0.bias", "0.weight"],
            "clients": {c: {"num_examples": 10, "full": True} for c in clients}}


def test_layout_is_round_client_layer_and_one_layer_can_be_fetched(tmp_path: Path) -> None:
    # Prepare
    store = RoundStore(tmp_path, "job", cache_bytes=1 << 20)
    upd = _update(0)
    store.write_update(3, "t1", upd)
    store.write_record(3, _record(3, ["t1"]))
    cold = RoundStore(tmp_path, "job", cache_bytes=1 << 20)  # a fresh process: empty cache
    # Execute
    part = asyncio.run(cold.update(3, "t1", layers=["0.bias"]))
    # Assert: one file a layer, under round -> client; only the asked layer was read
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.fb"))
    assert files == ["rounds/00000003/clients/c_t1/update/L_0.bias.fb",
                     "rounds/00000003/clients/c_t1/update/L_0.weight.fb",
                     "rounds/00000003/record.fb"]
    assert part is not None and list(part) == ["0.bias"]
    np.testing.assert_array_equal(part["0.bias"], upd["0.bias"])
    assert cold.cache.stats()["items"] == 1 and cold.cache.bytes == upd["0.bias"].nbytes
    assert cold.records[3]["clients"]["t1"]["num_examples"] == 10


def test_a_crash_mid_write_leaves_no_half_update(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the rename that publishes the update fails, as if the process died there
    store = RoundStore(tmp_path, "job", cache_bytes=1 << 20)
    real_replace = os.replace

    def crash(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if str(dst).endswith("update"):
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    # Execute
    with pytest.raises(OSError, match="killed"):
        store.write_update(1, "t0", _update(1))
    # Assert: neither the update nor its temporary folder is there
    assert not store.disk.has_update(1, "t0")
    assert not any("tmp" in p.name for p in tmp_path.rglob("*"))


def test_lru_stays_within_its_bytes_and_evicts_the_least_recent() -> None:
    # Prepare
    lru = ByteLRU(capacity_bytes=4000)
    arrays = {f"k{i}": np.zeros(250, dtype=np.float32) for i in range(6)}  # 1000 bytes each
    # Execute
    for key in ["k0", "k1", "k2", "k3"]:
        lru.put(key, arrays[key])
    lru.get("k0")  # k1 is now the least recently used
    lru.put("k4", arrays["k4"])
    lru.put("big", np.zeros(2000, dtype=np.float32))  # larger than the whole cache
    # Assert
    assert lru.bytes <= lru.capacity and lru.bytes == 4000
    assert "k1" not in lru and "k0" in lru and "big" not in lru
    assert not lru.get("k0").flags.writeable  # type: ignore[union-attr]


def test_retention_keeps_sketches_drops_old_updates_models_and_rounds(tmp_path: Path) -> None:
    # Prepare
    store = RoundStore(tmp_path, "job", cache_bytes=1 << 20,
                       retention=Retention(full_update_rounds=2, model_rounds=3, keep_rounds=4))
    for r in range(1, 7):
        store.write_model(r, _update(r))
        store.write_update(r, "t0", _update(10 + r))
        store.write_sketch(r, "t0", np.ones(8, np.float32), {"norm": 1.0})
        store.write_record(r, _record(r, ["t0"]))
        # Execute
        store.apply_retention(r)
    # Assert: rounds 1-2 gone; 3-6 kept; updates of 5-6 only; models of 4-6 only
    assert store.disk.rounds() == [3, 4, 5, 6] and store.rounds() == [3, 4, 5, 6]
    assert [r for r in range(3, 7) if store.disk.has_update(r, "t0")] == [5, 6]
    assert [r for r in range(3, 7) if store.disk.layers(r, None)] == [4, 5, 6]
    assert asyncio.run(store.update(3, "t0")) is None
    assert asyncio.run(store.sketch(3, "t0")) is not None
    assert store.records[4]["clients"]["t0"]["full"] is False


def test_a_damaged_file_is_an_error_naming_it(tmp_path: Path) -> None:
    # Prepare
    store = RoundStore(tmp_path, "job", cache_bytes=0)
    store.write_update(1, "t0", _update(0))
    path = tmp_path / "rounds/00000001/clients/c_t0/update/L_0.bias.fb"
    path.write_bytes(b"FB\x01\x00garbage")
    # Execute / Assert
    with pytest.raises(StoreError, match=r"L_0\.bias\.fb"):
        asyncio.run(store.update(1, "t0"))


async def test_redis_is_a_cache_shared_by_two_store_processes(tmp_path: Path,
                                                              redis_url: str) -> None:
    # Prepare: store A writes and shares; store B has its own (empty) folder and LRU
    a = RoundStore(tmp_path / "a", "job", cache_bytes=1 << 20,
                   redis=RedisCache(redis_url, "fedbus:test:"))
    b_redis = RedisCache(redis_url, "fedbus:test:")
    b = RoundStore(tmp_path / "b", "job", cache_bytes=1 << 20, redis=b_redis)
    upd = _update(5)
    try:
        await a.share(a.write_update(2, "t3", upd))
        b.records[2] = _record(2, ["t3"])
        # Execute
        got = await b.update(2, "t3")
        # Assert: served by Redis (B's disk has nothing), decoded through the codec
        assert got is not None
        np.testing.assert_array_equal(got["0.weight"], upd["0.weight"])
        assert b_redis.hits == 2 and b_redis.misses == 0
    finally:
        await a.redis.close()  # type: ignore[union-attr]
        await b_redis.close()


async def test_a_dead_redis_degrades_to_disk(tmp_path: Path) -> None:
    # Prepare: nothing listens on this port
    cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", "fedbus:test:")
    store = RoundStore(tmp_path, "job", cache_bytes=0, redis=cache)
    store.write_update(1, "t0", _update(0))
    store.write_record(1, _record(1, ["t0"]))
    try:
        # Execute
        got = await store.update(1, "t0")
        # Assert
        assert got is not None and cache.errors >= 2
    finally:
        await cache.close()

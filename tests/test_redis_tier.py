"""The Redis tier on a real redis-server: replicas share prefixes, exactly; salts and namespaces keep
them apart; foreign, corrupt and vanished values are misses; a Redis that stops never stops serving."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
import torch

from anchorkv.bench import stages as stages_bench
from anchorkv.cache.prefix_cache import CacheConfig, CacheRequest
from anchorkv.cache.remote_tier import RemoteStats
from anchorkv.config import EngineConfig
from anchorkv.engine.engine import Engine
from conftest import forget_slots, start_redis
from test_prefix_cache import answer, chat


def replica(tmp: Path, url: str, chunk_size: int = 128) -> Engine:
    """A server of its own (its own RAM and disk tiers) on the shared Redis. Redis takes what the disk policy
    writes; "full" writes every prompt."""
    return Engine(
        EngineConfig(threads=2, parallel=2, chunk_size=chunk_size),
        CacheConfig(ram_mb=256, cache_dir=tmp, scope="full", redis=url),
    )


@pytest.fixture(scope="module")
def replica_a(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Engine:
    return replica(tmp_path_factory.mktemp("a"), redis_url)


@pytest.fixture(scope="module")
def replica_b(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Engine:
    return replica(tmp_path_factory.mktemp("b"), redis_url)


def redis_stats(e: Engine) -> RemoteStats:
    assert (stats := e.cache.stats().redis) is not None
    return stats


def test_a_second_replica_restores_what_the_first_computed_and_its_logits_are_exact(
    replica_a: Engine, replica_b: Engine, engine: Engine
) -> None:
    prompt, req = chat(replica_a, "Which code goes with shipment class 11?")
    replica_a.prompt_logits(prompt, req)
    replica_a.cache.flush()  # writes are in the background
    logits, plan = replica_b.prompt_logits(prompt, req)
    assert plan.tier == "redis"
    assert plan.restored_tokens > 0
    cold, _ = engine.prompt_logits(prompt, req)
    assert torch.equal(logits, cold)
    stats = redis_stats(replica_b)
    assert stats.up
    assert stats.hits > 0
    # the restore copied Redis's chunks into the slot only; recording the prompt put them in B's RAM
    forget_slots(replica_b)  # the prompt comes from RAM
    again, plan = replica_b.prompt_logits(prompt, req)
    assert plan.tier == "ram" and plan.restored_tokens > 0
    assert redis_stats(replica_b).hits == stats.hits
    assert torch.equal(again, cold)


def test_a_lookup_asks_redis_in_two_round_trips_however_long_the_chain(replica_a: Engine, replica_b: Engine) -> None:
    system = {"role": "system", "content": " ".join(f"Rule {i}: parcels of class {i} go by road." for i in range(150))}
    r = replica_a.render_chat([system, {"role": "user", "content": "Which class goes by sea?"}])
    req = CacheRequest(r.boundaries, turn_starts=r.turn_starts)
    replica_a.prompt_logits(r.token_ids, req)
    replica_a.cache.flush()
    before = redis_stats(replica_b).lookup_round_trips
    plan = replica_b.cache.plan(r.token_ids, req)
    asked = redis_stats(replica_b).lookup_round_trips - before
    assert plan.restore_to == len(r.token_ids)  # every one of its chunks, from Redis
    assert len(r.token_ids) // 128 >= 12
    assert asked <= 3  # the chain and its tail lists, the tails, the whole prompt's last chunk


def test_salts_are_isolated_in_redis(replica_a: Engine, replica_b: Engine) -> None:
    prompt, req = chat(replica_a, "Which code goes with shipment class 12?")
    replica_a.prompt_logits(prompt, CacheRequest(req.chat_ends, salt="tenant-1"))
    replica_a.cache.flush()
    _, other = replica_b.prompt_logits(prompt, CacheRequest(req.chat_ends, salt="tenant-2"))
    assert other.restored_tokens == 0
    _, same = replica_b.prompt_logits(prompt, CacheRequest(req.chat_ends, salt="tenant-1"))
    assert same.restored_tokens > 0
    assert same.tier == "redis"


def test_the_namespace_keeps_other_configurations_apart(tmp_path: Path, replica_a: Engine, redis_url: str) -> None:
    prompt, req = chat(replica_a, "Which code goes with shipment class 13?")
    replica_a.prompt_logits(prompt, req)
    replica_a.cache.flush()
    other = replica(tmp_path, redis_url, chunk_size=64)  # other prefill cuts: other bits, another namespace
    _, plan = other.prompt_logits(prompt, req)
    assert plan.restored_tokens == 0


@pytest.mark.parametrize("damage", ["garbage", "flipped", "foreign"])
def test_foreign_and_corrupt_values_are_misses(
    tmp_path: Path, replica_a: Engine, redis_url: str, engine: Engine, damage: str
) -> None:
    """Every chunk this prompt added is damaged (or replaced by another chunk's valid value): a replica
    that finds them prefills cold, exactly, and drops them."""
    prompt, req = chat(
        replica_a, f"Which code goes with shipment class {16 + ['garbage', 'flipped', 'foreign'].index(damage)}?"
    )
    r = redis.Redis.from_url(redis_url)

    def chunk_keys() -> set[bytes]:
        return {k for k in r.keys("akv:*") if isinstance(k, bytes) and k.count(b":") == 2}

    before = chunk_keys()
    replica_a.prompt_logits(prompt, req)
    replica_a.cache.flush()
    added = chunk_keys() - before
    assert added
    assert before
    donor = r.get(next(iter(before)))
    for key in added:
        value = r.get(key)
        assert isinstance(value, bytes)
        assert isinstance(donor, bytes)
        bad = {"garbage": b"not a chunk", "flipped": value[:-1] + bytes([value[-1] ^ 0xFF]), "foreign": donor}
        r.set(key, bad[damage])
    fresh = replica(tmp_path, redis_url)
    logits, plan = fresh.prompt_logits(prompt, req)
    cold, _ = engine.prompt_logits(prompt, req)
    assert torch.equal(logits, cold)
    assert plan.restored_tokens == 0  # the restore met a bad value and fell back to a cold prefill
    assert redis_stats(fresh).dropped_bad >= 1


def test_serving_goes_on_when_redis_stops(tmp_path: Path) -> None:
    proc, url = start_redis()
    e = replica(tmp_path, url)
    try:
        prompt, req = chat(e, "Which code goes with shipment class 20?")
        first = answer(e, prompt, req)
        e.cache.flush()
    finally:
        proc.kill()
        proc.wait(timeout=10)
    t = time.monotonic()
    p2, r2 = chat(e, "Which code goes with shipment class 21?")
    done = answer(e, p2, r2)  # the RAM tier still serves; Redis calls fail fast
    assert done.cached_tokens > 0
    assert done.completion_tokens > 0
    assert answer(e, prompt, req).token_ids == first.token_ids
    assert time.monotonic() - t < 60
    e.cache.flush()
    stats = redis_stats(e)
    assert stats.up is False
    assert stats.errors > 0


def test_bench_stages_second_replica_restores_from_redis(redis_url: str) -> None:
    r = stages_bench.redis_replicas(EngineConfig(threads=2), CacheConfig(ram_mb=64), redis_url, 256, repeats=1)
    assert r.tier == "redis"
    assert r.restored_tokens > 0

"""`anchorkv bench cache`: agent workloads through the engine, cold against warm, on the bundled model."""

from __future__ import annotations

from anchorkv.bench import cache_bench
from anchorkv.cache.prefix_cache import CacheConfig
from anchorkv.config import EngineConfig
from tests.conftest import THREADS


def test_bench_cache_reports_each_turn_restored_from_its_slot_and_the_restart() -> None:
    lines: list[str] = []
    reports = cache_bench.run(
        EngineConfig(threads=THREADS), CacheConfig(ram_mb=64), turns=2, max_tokens=4, system_tokens=200,
        out=lines.append,
    )  # fmt: skip
    first, second = reports[0].turns
    assert first.cached_tokens == 0
    assert second.cached_tokens > 0
    assert second.tier == "slot"  # the session's slot held its prefix: nothing copied
    assert "after restart" in "\n".join(lines)

"""`bench compare --sessions`: the table's medians and ratios, from the samples a run collected."""

from __future__ import annotations

from anchorkv.bench.replay import Sample
from anchorkv.bench.sessions import SessionsRun, markdown


def _run(peer: str, k: int, ttfts: dict[str, list[float]]) -> SessionsRun:
    """k sessions, each turn's TTFT in order (the first turn of each session is its cold one)."""
    samples = [
        Sample(index=100 * i + t, session=name, ttft_ms=ms, e2e_ms=ms + 500, prompt_tokens=1500, cached_tokens=0,
               timings=None, completion_tokens=48)
        for i, (name, turns) in enumerate(ttfts.items())
        for t, ms in enumerate(turns)
    ]  # fmt: skip
    return SessionsRun(peer, k, samples, wall_s=10.0)


def test_the_table_gives_warm_turns_against_the_peer_and_against_a_lone_session() -> None:
    lone = _run("anchorkv", 1, {"s0": [900, 100, 120, 110]})
    four = _run("anchorkv", 4, {f"s{i}": [1000 + i, 150 + 10 * i, 160 + 10 * i] for i in range(4)})
    peer_lone = _run("llama-server", 1, {"s0": [5000, 600, 700, 650]})
    peer_four = _run("llama-server", 4, {f"s{i}": [9000, 1000 + 100 * i, 1200] for i in range(4)})
    assert lone.warm_ttft_ms == (110, 120)
    assert four.first_ttft_ms == 1001.5
    assert four.warm_ttft_ms[0] == 170  # the median of 150..190 over the 8 warm turns
    md = markdown([lone, peer_lone, four, peer_four])
    assert "| 1 | llama-server | 5.9x |" in md  # 650 / 110 at p50
    assert "| 4 | anchorkv | 1.55x |" in md  # 170 / 110: the scheduler's cost at 4 sessions
    assert "| 4 | llama-server | 1.85x |" in md  # 1200 / 650
    assert "| 1 | anchorkv | 900 |" in md  # the first-turn column

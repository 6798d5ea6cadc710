"""`anchorkv bench compare --sessions K`: K agent sessions at once, each a live loop.

Every server starts fresh for each K, with K slots (llama-server `-np K`, anchorkv `--parallel K` when K
is past its default). The workload is `gen:sessions`: agent sessions on one 1.5k-token system prompt, each
with its own task and tool results, 7 turns, every request carrying the server's own earlier replies.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from anchorkv.bench import replay
from anchorkv.bench.peers import Peer, ServerProcess
from anchorkv.bench.traces import Request, generate


@dataclass
class SessionsRun:
    peer: str
    k: int
    samples: list[replay.Sample]
    wall_s: float

    def _ttfts(self, first: bool) -> list[float]:
        seen: set[str] = set()
        out = []
        for s in sorted(self.samples, key=lambda s: s.index):
            is_first = s.session not in seen
            seen.add(s.session)
            if is_first == first and s.ttft_ms is not None and s.error is None:
                out.append(s.ttft_ms)
        return sorted(out)

    @property
    def first_ttft_ms(self) -> float | None:
        values = self._ttfts(first=True)
        return statistics.median(values) if values else None

    @property
    def warm_ttft_ms(self) -> tuple[float | None, float | None]:
        """p50 and p95 over the turns after each session's first."""
        values = self._ttfts(first=False)
        if not values:
            return None, None
        return statistics.median(values), values[min(len(values) - 1, int(0.95 * len(values)))]

    @property
    def tokens_per_s(self) -> float:
        return sum(s.completion_tokens or 0 for s in self.samples) / self.wall_s

    @property
    def errors(self) -> int:
        return sum(1 for s in self.samples if s.error)


def workload(k: int) -> list[Request]:
    """The first k sessions of gen:sessions."""
    keep = {f"s{i}" for i in range(k)}
    return [r for r in generate("gen:sessions") if r.session in keep]


def sized(peer: Peer, k: int, default_parallel: int) -> Peer:
    """The peer with k slots."""
    if peer.name == "llama-server":
        return Peer(peer.name, (*peer.argv, "-np", str(k), "-c", str(8192 * k)))
    if peer.name == "vllm":
        return Peer(peer.name, (*peer.argv, "--max-num-seqs", str(k)), peer.env)
    if peer.name == "anchorkv" and k > default_parallel:
        return Peer(peer.name, (*peer.argv, "--parallel", str(k)))
    return peer


def run(
    peers: Sequence[Peer],
    model: Path,
    ks: Sequence[int],
    out: Path,
    threads: int,
    port: int,
    max_tokens: int,
    think: replay.Think,
    default_parallel: int,
) -> str:
    results: list[SessionsRun] = []
    for k in ks:
        requests = workload(k)
        for peer in peers:
            p = sized(peer, k, default_parallel)
            folder = out / "servers" / f"{p.name}-k{k}"
            shutil.rmtree(folder, ignore_errors=True)
            with ServerProcess(p, model, port, threads, folder) as server:
                print(f"  {p.name}: {k} sessions at once ({len(requests)} requests)", flush=True)
                t0 = time.monotonic()
                samples = replay.replay(server.base_url, requests, max_tokens, concurrency=k, live=True, think=think)
                results.append(SessionsRun(p.name, k, samples, time.monotonic() - t0))
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(results)
    (out / "sessions.md").write_text(md + "\n")
    data = [{**{k: v for k, v in asdict(r).items() if k != "samples"}, "samples": [asdict(s) for s in r.samples]}
            for r in results]  # fmt: skip
    (out / "sessions.json").write_text(json.dumps(data, indent=1))
    return md


def markdown(results: Sequence[SessionsRun]) -> str:
    """Per K and server; then, per K, each peer's figure against anchorkv's (above 1: anchorkv is better);
    then each server's warm turn at K sessions against its own lone session's (the scheduler's cost)."""

    def f(v: float | None, digits: int = 0) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    lines = [
        "| sessions | server | first-turn TTFT p50 ms | warm-turn TTFT p50 ms | p95 ms | generated tokens/s | wall s "
        "| errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        p50, p95 = r.warm_ttft_ms
        lines.append(
            f"| {r.k} | {r.peer} | {f(r.first_ttft_ms)} | {f(p50)} | {f(p95)} | {f(r.tokens_per_s, 1)} "
            f"| {f(r.wall_s, 1)} | {r.errors} |"
        )
    ratios = ["", "| sessions | peer / anchorkv | warm TTFT p50 | warm TTFT p95 | tokens/s (anchorkv / peer) |",
              "|---:|---|---:|---:|---:|"]  # fmt: skip
    for k in sorted({r.k for r in results}):
        ours = next((r for r in results if r.k == k and r.peer == "anchorkv"), None)
        if ours is None:
            continue
        for r in results:
            if r.k != k or r is ours:
                continue
            (a50, a95), (b50, b95) = ours.warm_ttft_ms, r.warm_ttft_ms
            cells = [b / a if a and b else None for a, b in ((a50, b50), (a95, b95))]
            tps = ours.tokens_per_s / r.tokens_per_s if r.tokens_per_s else None
            ratios.append(f"| {k} | {r.peer} | {f(cells[0], 1)}x | {f(cells[1], 1)}x | {f(tps, 1)}x |")
    alone = ["", "| sessions | server | warm TTFT p50 against its own at 1 session |", "|---:|---|---:|"]
    for r in results:
        lone = next((x for x in results if x.k == 1 and x.peer == r.peer), None)
        if r.k > 1 and lone is not None:
            a, b = r.warm_ttft_ms[0], lone.warm_ttft_ms[0]
            alone.append(f"| {r.k} | {r.peer} | {f(a / b if a and b else None, 2)}x |")
    return "\n".join(lines + (ratios if len(ratios) > 3 else []) + (alone if len(alone) > 3 else []))

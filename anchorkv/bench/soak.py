"""`anchorkv bench soak`: K clients for M minutes against a fresh anchorkv server, sampling its RSS.

Each client runs agent-like sessions: a fresh session every few turns (a new system prompt and task, so
the cache keeps taking new chunks), each turn streamed with the server's own reply sent back. The server's
resident memory is read from /proc once a second. It writes soak.json, soak.md (RSS at each minute,
errors, TTFT and end-to-end percentiles) and soak.png (RSS and requests over time).
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from anchorkv.bench.peers import Peer, ServerProcess

TURNS_PER_SESSION = 6


@dataclass
class SoakResult:
    clients: int
    seconds: float
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MiB)
    # (seconds since start, RAM tier MiB, chunks queued for the disk writer, KV pool MiB written), from
    # /props every 10 s
    cache: list[tuple[float, float, int, float]] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    errors: int = 0
    requests: int = 0

    def rss_at(self, second: float) -> float | None:
        before = [mb for t, mb in self.rss_mb if t <= second]
        return before[-1] if before else None

    def cache_at(self, second: float, column: int) -> float | None:
        before = [row[column] for row in self.cache if row[0] <= second]
        return before[-1] if before else None


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _client(base: str, seed: int, stop_at: float, out: SoakResult, lock: threading.Lock, max_tokens: int) -> None:
    rng = random.Random(seed)
    words = "order refund shipment account region priority verify customer status error file test value".split()
    with httpx.Client(timeout=600) as http:
        while time.monotonic() < stop_at:
            system = f"You are support agent {rng.randrange(10**6)}. " + " ".join(rng.choices(words, k=400))
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": " ".join(rng.choices(words, k=30))},
            ]
            for _ in range(TURNS_PER_SESSION):
                if time.monotonic() >= stop_at:
                    return
                t0 = time.perf_counter()
                ttft, text, ok = None, [], True
                body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.7, "stream": True}
                try:
                    with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                        ok = r.status_code == 200
                        for line in r.iter_lines():
                            if not line.startswith("data: {"):
                                continue
                            delta = json.loads(line[6:])["choices"]
                            piece = delta[0].get("delta", {}).get("content") if delta else None
                            if piece:
                                ttft = ttft if ttft is not None else (time.perf_counter() - t0) * 1000
                                text.append(piece)
                except httpx.HTTPError:
                    ok = False
                with lock:
                    out.requests += 1
                    if not ok:
                        out.errors += 1
                    elif ttft is not None:
                        out.ttft_ms.append(ttft)
                        out.e2e_ms.append((time.perf_counter() - t0) * 1000)
                messages += [{"role": "assistant", "content": "".join(text)},
                             {"role": "user", "content": " ".join(rng.choices(words, k=60))}]  # fmt: skip


def run(
    peer: Peer, model: Path, clients: int, minutes: float, out: Path, threads: int, port: int, max_tokens: int
) -> str:
    result = SoakResult(clients, minutes * 60)
    with ServerProcess(peer, model, port, threads, out / "server") as server:
        assert server.proc is not None
        start = time.monotonic()
        stop_at = start + minutes * 60
        lock = threading.Lock()
        workers = [
            threading.Thread(target=_client, args=(server.base_url, i, stop_at, result, lock, max_tokens), daemon=True)
            for i in range(clients)
        ]
        for w in workers:
            w.start()
        tick = 0
        while any(w.is_alive() for w in workers):
            if (mb := rss_mb(server.proc.pid)) is not None:
                result.rss_mb.append((time.monotonic() - start, mb))
            if tick % 10 == 0 and (held := _cache_held(server.base_url)) is not None:
                result.cache.append((time.monotonic() - start, *held))
            tick += 1
            time.sleep(1)
        for w in workers:
            w.join()
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(asdict(result), indent=1))
    _plot(result, out / "soak.png")
    md = markdown(result)
    (out / "soak.md").write_text(md + "\n")
    return md


def _cache_held(url: str) -> tuple[float, int, float] | None:
    """The RAM tier's MiB, the disk writer's queue and the KV pool's MiB written, as /props reports them."""
    try:
        props = httpx.get(f"{url}/props", timeout=5).json()
        cache, pool = props["prefix_cache"], props["kv_pool"]
    except (httpx.HTTPError, KeyError, ValueError):
        return None
    disk = cache.get("disk") or {}
    return cache["ram"]["bytes"] / 2**20, int(disk.get("pending_writes", 0)), pool.get("touched_bytes", 0) / 2**20


def _pct(values: list[float], p: float) -> float | None:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))] if s else None


def markdown(r: SoakResult) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    minutes = [m * 60 for m in range(0, int(r.seconds // 60) + 1)]
    rss = " | ".join(f"{f(r.rss_at(max(t, 1)))}" for t in minutes)
    lines = [
        f"{r.clients} clients, {r.seconds / 60:.0f} minutes: {r.requests} requests, {r.errors} errors",
        "",
        "| RSS MiB at minute | " + " | ".join(str(int(t // 60)) for t in minutes) + " |",
        "|---|" + "---:|" * len(minutes),
        f"| server | {rss} |",
        f"| RAM tier | {' | '.join(f(r.cache_at(max(t, 1), 1)) for t in minutes)} |",
        f"| disk writes queued | {' | '.join(f(r.cache_at(max(t, 1), 2)) for t in minutes)} |",
        f"| KV pool written | {' | '.join(f(r.cache_at(max(t, 1), 3)) for t in minutes)} |",
        "",
        "| ms | p50 | p95 | p99 |",
        "|---|---:|---:|---:|",
        f"| TTFT | {f(_pct(r.ttft_ms, 0.5))} | {f(_pct(r.ttft_ms, 0.95))} | {f(_pct(r.ttft_ms, 0.99))} |",
        f"| end to end | {f(_pct(r.e2e_ms, 0.5))} | {f(_pct(r.e2e_ms, 0.95))} | {f(_pct(r.e2e_ms, 0.99))} |",
    ]
    if r.ttft_ms:
        lines.append(f"\nmean TTFT {statistics.mean(r.ttft_ms):.0f} ms")
    return "\n".join(lines)


def _plot(r: SoakResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    if r.rss_mb:
        ax.plot([t / 60 for t, _ in r.rss_mb], [mb for _, mb in r.rss_mb], label="server RSS")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MiB")
    ax.set_title(f"anchorkv soak: {r.clients} clients, {r.requests} requests, {r.errors} errors")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

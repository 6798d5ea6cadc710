"""`anchorkv bench compare`: the same workloads, streamed to anchorkv and its peers, one after another.

Each (server, workload) pair starts a fresh server on an empty working folder, so every run begins cold.
After the restart workload (the agent session by default) the server is asked for its last request again
(warm), then restarted on the same folder and asked once more: the first request after a restart.
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from anchorkv.bench import replay
from anchorkv.bench.peers import Peer, ServerProcess
from anchorkv.bench.traces import Request, read_trace

WORKLOADS = ("gen:agent", "gen:tasks", "gen:interleaved")
RESTART_AFTER = "gen:agent"
PASSES = ("warm", "after restart")


@dataclass
class PeerRun:
    peer: str
    runs: dict[str, list[replay.Sample]]  # workload -> samples, plus "warm" and "after restart"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def run_peer(
    peer: Peer,
    model: Path,
    workloads: dict[str, list[Request]],
    folder: Path,
    threads: int,
    port: int,
    max_tokens: int,
    restart_after: str | None,
    live: bool = False,
    think: replay.Think = replay.Think(),
) -> PeerRun:
    runs: dict[str, list[replay.Sample]] = {}
    for name, requests in workloads.items():
        wdir = folder / _slug(peer.name) / _slug(name)
        shutil.rmtree(wdir, ignore_errors=True)
        with ServerProcess(peer, model, port, threads, wdir) as server:
            print(f"  {peer.name}: {name} ({len(requests)} requests)", flush=True)
            runs[name] = replay.replay(server.base_url, requests, max_tokens, live=live, think=think)
            # the session's last request as this server's client sent it
            last = [
                replay.with_replies(
                    requests[-1], replay.replies(requests, runs[name], requests[-1].session) if live else {}
                )
            ]
            if name == restart_after:
                runs["warm"] = replay.replay(server.base_url, last, max_tokens)
        if name == restart_after:
            with ServerProcess(peer, model, port, threads, wdir) as server:
                runs["after restart"] = replay.replay(server.base_url, last, max_tokens)
    return PeerRun(peer.name, runs)


def _ttft(samples: Sequence[replay.Sample], skip_first: bool) -> float | None:
    values = [s.ttft_ms for s in samples[1 if skip_first else 0 :] if s.ttft_ms is not None and s.error is None]
    return statistics.median(values) if values else None


def rows(results: Sequence[PeerRun], workloads: Sequence[str]) -> list[tuple[str, list[float | None]]]:
    """(row label, TTFT per peer in ms): the cold first request and the median of the later ones for each
    workload, then the restart pass."""
    out: list[tuple[str, list[float | None]]] = []
    for w in workloads:
        out.append((f"{w}: first request (cold)", [_ttft(r.runs[w][:1], False) for r in results]))
        out.append((f"{w}: later requests (median)", [_ttft(r.runs[w], True) for r in results]))
    for tag in PASSES:
        if all(tag in r.runs for r in results):
            out.append((f"last request of the session, {tag}", [_ttft(r.runs[tag], False) for r in results]))
    return out


def markdown(results: Sequence[PeerRun], workloads: Sequence[str]) -> str:
    """TTFT per server, then each peer's TTFT divided by anchorkv's (above 1: anchorkv is faster)."""
    ours, peers = results[0].peer, [r.peer for r in results[1:]]
    head = ["TTFT (ms)", *(r.peer for r in results), *(f"{p} / {ours}" for p in peers)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, values in rows(results, workloads):
        cells = ["-" if v is None else f"{v:.0f}" for v in values]
        base = values[0]
        ratios = ["-" if v is None or not base else f"{v / base:.1f}x" for v in values[1:]]
        lines.append("| " + " | ".join([label, *cells, *ratios]) + " |")
    return "\n".join(lines)


def tails(results: Sequence[PeerRun]) -> str:
    """Per server, how long streams stayed open after their last text (a save before closing shows here)."""
    lines = ["| end of stream after the last text (ms) | median | max |", "|---|---:|---:|"]
    for r in results:
        values = [s.tail_ms for samples in r.runs.values() for s in samples if s.tail_ms is not None and not s.error]
        cells = [f"{statistics.median(values):.1f}", f"{max(values):.1f}"] if values else ["-", "-"]
        lines.append("| " + " | ".join([r.peer, *cells]) + " |")
    return "\n".join(lines)


def _decode_rate(samples: Sequence[replay.Sample]) -> float | None:
    values = [
        s.timings["predicted_per_second"]
        for s in samples
        if s.error is None and s.timings and s.timings.get("predicted_n", 0) > 1 and "predicted_per_second" in s.timings
    ]
    return statistics.median(values) if values else None


def decode(results: Sequence[PeerRun], workloads: Sequence[str]) -> str:
    """Decode speed by the servers' own `timings` (llama.cpp's format; a server without them shows -)."""
    lines = ["| decode tokens/s (median) | " + " | ".join(r.peer for r in results) + " |"]
    lines.append("|---|" + "---:|" * len(results))
    for key, label in [*((w, w) for w in workloads), *((t, f"last request of the session, {t}") for t in PASSES)]:
        if not all(key in r.runs for r in results):
            continue
        cells = ["-" if (v := _decode_rate(r.runs[key])) is None else f"{v:.1f}" for r in results]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def write(out: Path, results: Sequence[PeerRun], workloads: Sequence[str]) -> str:
    """compare.md, compare.json, and per workload a replay.png with one TTFT line per server."""
    out.mkdir(parents=True, exist_ok=True)
    for w in workloads:
        replay.write(out / _slug(w), {r.peer: r.runs[w] for r in results})
    md = "\n\n".join([markdown(results, workloads), decode(results, workloads), tails(results)])
    (out / "compare.md").write_text(md + "\n")
    data = {r.peer: {w: [asdict(s) for s in samples] for w, samples in r.runs.items()} for r in results}
    (out / "compare.json").write_text(json.dumps(data, indent=1))
    return md


def run(
    peers: Sequence[Peer],
    model: Path,
    workloads: Sequence[str],
    out: Path,
    threads: int,
    port: int,
    max_tokens: int,
    restart_after: str | None = RESTART_AFTER,
    live: bool = False,
    think: replay.Think = replay.Think(),
) -> str:
    loaded = {w: read_trace(w) for w in workloads}
    results: list[PeerRun] = []
    for peer in peers:
        print(f"{peer.name}: {' '.join(peer.command(model, port, threads, out / 'servers' / '<run>'))}", flush=True)
        folder = out / "servers"
        results.append(run_peer(peer, model, loaded, folder, threads, port, max_tokens, restart_after, live, think))
    return write(out, results, workloads)

"""`anchorkv bench replay`: replay a workload against any OpenAI-compatible server, streaming.

Per request it records TTFT (to the first streamed text), end-to-end time, prompt and cached tokens
(from `usage`, when the server sends it) and llama.cpp-style `timings` when present. Requests go in the
trace's order, or K sessions at once with --concurrency; --restart-cmd runs a second pass after restarting
the server.
With `live`, a session is a client's loop: each request carries the server's own earlier replies in place of
the recorded assistant messages, after a `Think` of quiet (the client's turn: running a tool, typing).
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import httpx

from anchorkv.bench.traces import Request


@dataclass(frozen=True)
class Think:
    """A session's pause before each request after its first: a tool running, a person typing. `fixed`:
    mean_s every time; `exp`: drawn from an exponential of that mean, as tools' times vary, so sessions
    started together drift apart. A request's draw is seeded by its session and index: every server
    measured gets the same pauses."""

    mean_s: float = 0.0
    spread: Literal["fixed", "exp"] = "fixed"

    def before(self, session: str, index: int) -> float:
        if self.spread == "fixed" or not self.mean_s:
            return self.mean_s
        return random.Random(f"{session}/{index}").expovariate(1 / self.mean_s)


@dataclass
class Sample:
    index: int
    session: str
    ttft_ms: float | None
    e2e_ms: float
    prompt_tokens: int | None
    cached_tokens: int | None
    timings: dict[str, Any] | None
    error: str | None = None
    tail_ms: float | None = None  # from the last event with generated text to the end of the stream
    text: str = ""  # the reply
    started_s: float = 0.0  # when it was sent, in seconds from the replay's start
    completion_tokens: int | None = None


def _text(event: dict[str, Any]) -> str:
    return "".join((c.get("delta") or {}).get("content") or c.get("text") or "" for c in event.get("choices") or [])


def _produced(event: dict[str, Any]) -> bool:
    """Whether a stream event carries generated text or the end (servers open chat streams with an empty
    role-only chunk, which is not a token)."""
    for c in event.get("choices") or []:
        if (c.get("delta") or {}).get("content") or c.get("text") or c.get("finish_reason"):
            return True
    return False


def _send(client: httpx.Client, base: str, req: Request, index: int, max_tokens: int, api_key: str | None) -> Sample:
    """One request, streamed. A kept-alive connection the server closed before answering (llama-server's
    HTTP library closes one after a few requests) is retried once on a new connection."""
    sample = _attempt(client, base, req, index, max_tokens, api_key)
    if sample.error in ("RemoteProtocolError", "ReadError") and sample.ttft_ms is None:
        sample = _attempt(client, base, req, index, max_tokens, api_key)
    return sample


def _attempt(client: httpx.Client, base: str, req: Request, index: int, max_tokens: int, api_key: str | None) -> Sample:
    body: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if req.tokens is not None:
        url, body["prompt"] = f"{base}/v1/completions", req.tokens
    else:
        url, body["messages"] = f"{base}/v1/chat/completions", req.messages
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    t0 = time.perf_counter()
    ttft = last_text = None
    text: list[str] = []
    usage: dict[str, Any] = {}
    timings = None
    try:
        with client.stream("POST", url, json=body, headers=headers, timeout=600) as r:
            if r.status_code != 200:
                return Sample(
                    index,
                    req.session,
                    None,
                    (time.perf_counter() - t0) * 1000,
                    None,
                    None,
                    None,
                    f"HTTP {r.status_code}",
                )
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if ttft is None and _produced(event):
                    ttft = (time.perf_counter() - t0) * 1000
                if piece := _text(event):
                    last_text = time.perf_counter()
                    text.append(piece)
                usage = event.get("usage") or usage
                timings = event.get("timings") or timings
    except httpx.HTTPError as e:
        return Sample(index, req.session, ttft, (time.perf_counter() - t0) * 1000, None, None, None, type(e).__name__)
    end = time.perf_counter()
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    if cached is None and timings:
        cached = timings.get("cache_n")
    tail = (end - last_text) * 1000 if last_text is not None else None
    prompt = usage.get("prompt_tokens")
    generated = usage.get("completion_tokens")
    if generated is None and timings:
        generated = timings.get("predicted_n")
    return Sample(
        index, req.session, ttft, (end - t0) * 1000, prompt, cached, timings, None, tail, "".join(text),
        completion_tokens=generated,
    )  # fmt: skip


def with_replies(req: Request, replies: dict[int, str]) -> Request:
    """The request as a live client sends it: each assistant message the server wrote (by its index) is the
    server's reply, as text."""
    messages = [{"role": "assistant", "content": replies[j]} if j in replies else m for j, m in enumerate(req.messages)]
    return replace(req, messages=messages)


def replies(requests: Sequence[Request], samples: Sequence[Sample], session: str) -> dict[int, str]:
    """The replies a live replay got in one session, by the index of the assistant message each stands for."""
    by_index = {s.index: s for s in samples}
    return {
        r.reply_index: by_index[i].text
        for i, r in enumerate(requests)
        if r.session == session and r.reply_index is not None and i in by_index
    }


def replay(
    base_url: str,
    requests: Sequence[Request],
    max_tokens: int = 16,
    concurrency: int = 1,
    api_key: str | None = None,
    live: bool = False,
    think: Think = Think(),
) -> list[Sample]:
    """With concurrency 1, the requests in the trace's order, so sessions that take turns in the trace take
    turns at the server; with K > 1, K sessions at once (in order of first appearance), each session's
    requests one after another. A session's request waits `think` after its previous one ended."""
    base = base_url.rstrip("/")
    t0 = time.monotonic()
    got: dict[str, dict[int, str]] = defaultdict(dict)  # per session, the replies by assistant message index
    ended: dict[str, float] = {}

    def send(client: httpx.Client, i: int, r: Request) -> Sample:
        if r.session in ended and (pause := think.before(r.session, i)):
            time.sleep(max(0.0, ended[r.session] + pause - time.monotonic()))
        started = time.monotonic() - t0
        s = _send(client, base, with_replies(r, got[r.session]) if live else r, i, max_tokens, api_key)
        ended[r.session] = time.monotonic()
        if r.reply_index is not None and s.error is None:
            got[r.session][r.reply_index] = s.text
        return replace(s, started_s=started)

    if concurrency <= 1:
        with httpx.Client() as client:
            return [send(client, i, r) for i, r in enumerate(requests)]
    sessions: dict[str, list[tuple[int, Request]]] = defaultdict(list)
    for i, r in enumerate(requests):
        sessions[r.session].append((i, r))
    queue = list(sessions.values())
    lock = threading.Lock()
    samples: list[Sample] = []

    def worker() -> None:
        with httpx.Client() as client:
            while True:
                with lock:
                    if not queue:
                        return
                    session = queue.pop(0)
                for i, r in session:
                    s = send(client, i, r)
                    with lock:
                        samples.append(s)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(samples, key=lambda s: s.index)


def restart(cmd: str, base_url: str, timeout_s: float = 300) -> None:
    subprocess.run(cmd, shell=True, check=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url.rstrip('/')}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server at {base_url} did not come back within {timeout_s:.0f} s")


def summary(label: str, samples: Sequence[Sample]) -> dict[str, Any]:
    ttfts = sorted(s.ttft_ms for s in samples if s.ttft_ms is not None and s.error is None)

    def pct(p: float) -> float | None:
        return ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] if ttfts else None

    cached = [s.cached_tokens for s in samples if s.cached_tokens is not None]
    tails = [s.tail_ms for s in samples if s.tail_ms is not None and s.error is None]
    return {
        "label": label,
        "requests": len(samples),
        "errors": sum(1 for s in samples if s.error),
        "ttft_first_ms": samples[0].ttft_ms if samples else None,
        "ttft_p50_ms": statistics.median(ttfts) if ttfts else None,
        "ttft_p95_ms": pct(0.95),
        "cached_tokens_total": sum(cached) if cached else None,
        "prompt_tokens_total": sum(s.prompt_tokens or 0 for s in samples) or None,
        "tail_p50_ms": statistics.median(tails) if tails else None,
        "tail_max_ms": max(tails) if tails else None,
    }


def markdown(summaries: Sequence[dict[str, Any]]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.0f}" if isinstance(v, float) else str(v)

    rows = [
        "| run | requests | errors | first TTFT ms | p50 TTFT ms | p95 TTFT ms | cached / prompt tokens "
        "| stream end after last text ms, p50 / max |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    rows += [
        f"| {s['label']} | {s['requests']} | {s['errors']} | {f(s['ttft_first_ms'])} | {f(s['ttft_p50_ms'])} | {f(s['ttft_p95_ms'])} "
        f"| {f(s['cached_tokens_total'])} / {f(s['prompt_tokens_total'])} | {f(s['tail_p50_ms'])} / {f(s['tail_max_ms'])} |"
        for s in summaries
    ]
    return "\n".join(rows)


def write(out: Path, runs: dict[str, list[Sample]]) -> list[dict[str, Any]]:
    """replay.json (every sample), replay.md (the summary) and replay.png (TTFT per request, a line per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    summaries = [summary(label, s) for label, s in runs.items()]
    (out / "replay.json").write_text(
        json.dumps({"summary": summaries, "samples": {k: [asdict(s) for s in v] for k, v in runs.items()}}, indent=1)
    )
    (out / "replay.md").write_text(markdown(summaries) + "\n")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, samples in runs.items():
        ax.plot([s.index for s in samples], [s.ttft_ms or 0 for s in samples], marker=".", label=label)
    ax.set_xlabel("request")
    ax.set_ylabel("TTFT (ms)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "replay.png", dpi=120)
    plt.close(fig)
    return summaries

"""`anchorkv bench stages`: the same stages in one process and as Ray actors, and two replicas on Redis,
side by side in one run (the two transports take turns, a repeat each).

- Skippy's shape: a shared prefix with a changed suffix, cold then warm TTFT, in-process against Ray.
- Decode tokens/s of one sequence, and the per-hop cost of a decode step on Ray: (Ray - in-process)
  divided by the messages a step sends (head to stage 0, stage to stage, last stage to head). Where the
  Ray stages share this host's cores (fewer threads each than --threads), the same stages in process with
  those threads run too: against them the difference is the transport's, not the split cores'.
- Redis: a second replica's first request on a prefix the first one computed, against a cold prefill.

TTFT is measured in process (plan, restore, prefill: until the first token can be sampled), not over HTTP.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import redis
import torch
from tqdm import tqdm

from anchorkv.bench.cache_bench import system_prompt
from anchorkv.cache.prefix_cache import CacheConfig, CacheRequest, Restore
from anchorkv.config import EngineConfig
from anchorkv.engine.engine import Engine
from anchorkv.engine.ray_pipeline import RayPipeline, shared_host_threads
from anchorkv.engine.sampling import SamplingParams


@dataclass
class StagesResult:
    transport: str
    cold_ttft_ms: float
    warm_ttft_ms: float
    decode_tok_s: float
    decode_step_ms: float
    hop_ms: float | None = None  # a decode step's message through the stages, no compute, per message


@dataclass
class RedisResult:
    prompt_tokens: int
    cold_ms: float
    replica_hit_ms: float
    restored_tokens: int
    tier: str | None


def idle(engine: Engine) -> None:
    """What a server does in its first idle moments (its KV pool made resident), before a client comes."""
    torch.set_num_threads(engine.cfg.threads)
    while engine.idle_work():
        pass


def _ttft(engine: Engine, prompt: list[int], req: CacheRequest) -> tuple[float, Restore]:
    """From submitting to the prompt's logits being ready to sample, as a client's first token waits; the
    prompt's recording into the cache comes after it, as in the server."""
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    with engine.lock:
        seq = engine.submit(prompt, params, lambda _: None, cache_req=req, keep_reply=False)
        while not seq.done:
            engine.step()
    return (seq.prefilled - seq.submitted) * 1000, seq.restored


def _decode_ms(engine: Engine, prompt: list[int], steps: int) -> float:
    """Mean time of a decode step: from the first token to the last."""
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    first: float | None = None
    for _ in engine.generate(prompt, params, background=True):
        first = first or time.perf_counter()
    assert first is not None
    return (time.perf_counter() - first) * 1000 / max(1, steps - 1)


def _once(engine: Engine, salt: str, system: str, decode_steps: int) -> tuple[float, float, float]:
    """Cold TTFT, warm TTFT (the changed suffix) and a decode step's time, under a salt of their own."""
    prompts = []
    for q in ("Which rule covers a refund for a delayed order?", "Which rule covers an urgent invoice?"):
        rp = engine.render_chat([{"role": "system", "content": system}, {"role": "user", "content": q}])
        prompts.append((rp.token_ids, CacheRequest(rp.boundaries, salt=salt, turn_starts=rp.turn_starts)))
    cold, restored = _ttft(engine, *prompts[0])
    assert restored.tokens == 0
    warm, restored = _ttft(engine, *prompts[1])
    assert restored.tokens > 0, "the changed suffix found nothing to restore"
    return cold, warm, _decode_ms(engine, prompts[1][0], decode_steps)


def measure(engines: dict[str, Engine], system: str, repeats: int, decode_steps: int) -> list[StagesResult]:
    """Each engine in turn, a repeat at a time, so that on a shared, noisy host they see the same minutes."""
    runs: dict[str, list[tuple[float, float, float]]] = {label: [] for label in engines}
    for engine in engines.values():
        idle(engine)
    for r in tqdm(range(repeats), desc="repeats", leave=False):
        for label, engine in engines.items():
            torch.set_num_threads(engine.cfg.threads)  # process-wide: each in-process engine computes on its own
            runs[label].append(_once(engine, f"{label}-{r}-{time.time()}", system, decode_steps))  # each starts cold
    for engine in engines.values():
        engine.cache.flush()  # no write left running when the folder goes
    out = []
    for label, rs in runs.items():
        step = statistics.median(s for _, _, s in rs)
        cold, warm = statistics.median(c for c, _, _ in rs), statistics.median(w for _, w, _ in rs)
        out.append(StagesResult(label, cold, warm, 1000 / step, step))
    return out


def hop_ms(pipe: RayPipeline, engine: Engine, n: int = 200) -> float:
    """Median time of a decode step's hidden state sent through every stage and back, per message."""
    x = torch.zeros(1, engine.model_cfg.hidden_size, dtype=engine.dtype)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        pipe.echo_chain(x)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times) / (len(pipe.workers) + 1)


def redis_replicas(ecfg: EngineConfig, ccfg: CacheConfig, url: str, prompt_tokens: int, repeats: int) -> RedisResult:
    with tempfile.TemporaryDirectory() as tmp:
        # "full": Redis takes what the disk policy writes, and auto writes a prefix only once it recurs
        a = Engine(ecfg, replace(ccfg, cache_dir=Path(tmp) / "a", redis=url, scope="full"))
        b = Engine(ecfg, replace(ccfg, cache_dir=Path(tmp) / "b", redis=url, scope="full"))
        idle(a)
        idle(b)
        tokens = a.tokenizer.encode(system_prompt(prompt_tokens + 64, a))[:prompt_tokens]
        colds: list[float] = []
        hits: list[float] = []
        restored = Restore()
        for r in tqdm(range(repeats), desc="redis", leave=False):
            req = CacheRequest(salt=f"redis-{r}-{time.time()}")
            colds.append(_ttft(a, tokens, req)[0])
            a.cache.flush()
            hit, restored = _ttft(b, tokens, req)
            hits.append(hit)
        a.cache.flush()
        b.cache.flush()
        return RedisResult(
            len(tokens), statistics.median(colds), statistics.median(hits), restored.tokens, restored.tier
        )


def start_redis(port: int, maxmemory: str = "1gb") -> subprocess.Popen[bytes]:
    """A real redis-server on a loopback port, memory only, evicting the least recently used keys."""
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)


def run(
    ecfg: EngineConfig,
    ccfg: CacheConfig,
    system_tokens: int,
    repeats: int,
    decode_steps: int,
    redis_url: str | None,
    redis_tokens: int,
    out: Path,
) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        ccfg = replace(ccfg, cache_dir=Path(tmp) / "kv")
        local = Engine(ecfg, ccfg)
        system = system_prompt(system_tokens, local)
        engines = {"in-process": local}
        split = shared_host_threads(ecfg.threads, ecfg.stages)  # what each local Ray stage computes on
        if split != ecfg.threads:
            engines[f"in-process, {split} thread{'s' if split > 1 else ''} a stage"] = Engine(
                replace(ecfg, threads=split), ccfg
            )
        pipe = RayPipeline(ecfg, replace(ccfg, cache_dir=Path(tmp) / "kv-ray"))
        try:
            engines["ray"] = Engine(ecfg, ccfg, pipe)
            results = measure(engines, system, repeats, decode_steps)
            results[-1].hop_ms = hop_ms(pipe, engines["ray"])
        finally:
            pipe.close()
        torch.set_num_threads(ecfg.threads)
    proc = None
    if redis_url is None:
        proc = start_redis(6390)
        redis_url = "redis://127.0.0.1:6390/0"
    try:
        rr = redis_replicas(replace(ecfg, stages=1), ccfg, redis_url, redis_tokens, repeats)
    finally:
        if proc is not None:
            proc.terminate()
    local_r, same_r, ray_r = results[0], results[-2], results[-1]
    hops = ecfg.stages + 1

    def against(r: StagesResult) -> str:
        per_hop = (ray_r.decode_step_ms - r.decode_step_ms) / hops
        return f"warm TTFT {ray_r.warm_ttft_ms / r.warm_ttft_ms:.2f}x, per hop per decode step {per_hop:.2f} ms"

    summary = (
        f"Ray / in-process: {against(local_r)} ({hops} messages a step), cold TTFT "
        f"{ray_r.cold_ttft_ms / local_r.cold_ttft_ms:.2f}x"
    )
    if same_r is not local_r:
        summary += f"; Ray / {same_r.transport}: {against(same_r)}"
    summary += f"; the messages alone (a decode step's hidden state through every stage, no compute): {ray_r.hop_ms:.2f} ms a hop"
    lines = [
        f"stages {ecfg.stages}, threads {ecfg.threads}, system prompt {system_tokens} tokens, medians of {repeats}",
        "",
        "| transport | cold TTFT | warm TTFT (changed suffix) | decode tok/s | decode step |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r.transport} | {r.cold_ttft_ms:.0f} ms | {r.warm_ttft_ms:.0f} ms | {r.decode_tok_s:.1f} | {r.decode_step_ms:.1f} ms |"
            for r in results
        ),
        "",
        summary,
        "",
        f"Redis, one stage: replica B's first request on {rr.prompt_tokens} tokens that replica A computed: "
        f"{rr.replica_hit_ms:.0f} ms (restored {rr.restored_tokens}, tier {rr.tier}) against A's cold "
        f"{rr.cold_ms:.0f} ms: {rr.cold_ms / rr.replica_hit_ms:.1f}x",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages.json").write_text(
        json.dumps({"stages": [asdict(r) for r in results], "redis": asdict(rr)}, indent=1)
    )
    text = "\n".join(lines)
    (out / "stages.md").write_text(text + "\n")
    return text

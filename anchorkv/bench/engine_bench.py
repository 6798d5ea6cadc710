"""`anchorkv bench engine`: prefill and decode speed of the loaded model, medians over repeats."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import torch

from anchorkv.engine.engine import Engine
from anchorkv.engine.plan import RequestPlan

PREFILL_LENGTHS = (512, 2048, 4096)
DECODE_CONTEXTS = (512, 2048, 6144)


@dataclass(frozen=True)
class Measurement:
    what: str
    tokens: int
    tokens_per_s: float


@torch.inference_mode()
def run(engine: Engine, repeats: int = 3, decode_tokens: int = 32) -> list[Measurement]:
    rng = random.Random(0)
    vocab = engine.model_cfg.vocab_size
    ids = [rng.randrange(vocab) for _ in range(max(*PREFILL_LENGTHS, *DECODE_CONTEXTS) + decode_tokens)]
    pipe = engine.pipeline
    plan = RequestPlan("bench", 0)
    out = []
    pipe.truncate(0)
    pipe.prefill(ids[:256], 0, plan)  # warm up allocators and kernels
    chunk = pipe.chunk_size
    for n in PREFILL_LENGTHS:
        if n >= engine.ctx:
            continue
        # the same forward in one chunk (no alignment), timed alternately with ours: the cost of exactness
        times: dict[int, list[float]] = {chunk: [], n: []}
        for _ in range(repeats):
            for c in times:
                pipe.chunk_size = c
                pipe.truncate(0)
                t = time.perf_counter()
                pipe.prefill(ids[:n], 0, plan)
                times[c].append(time.perf_counter() - t)
        pipe.chunk_size = chunk
        out.append(Measurement("prefill", n, n / statistics.median(times[chunk])))
        out.append(Measurement("prefill, one chunk", n, n / statistics.median(times[n])))
    models = [stage.model for stage in pipe.stages]
    sdpa_keys = models[0].decode_sdpa_keys
    for ctx in DECODE_CONTEXTS:
        if ctx + decode_tokens >= engine.ctx:
            continue
        pipe.truncate(0)
        pipe.prefill(ids[:ctx], 0, plan)
        # decode attention through SDPA (the default up to sdpa_keys keys) or the per-head matmuls, alternately
        steps: dict[int, list[float]] = {sdpa_keys: [], 0: []} if ctx <= sdpa_keys else {sdpa_keys: []}
        for _ in range(repeats):
            for keys in steps:
                for m in models:
                    m.decode_sdpa_keys = keys
                t = time.perf_counter()
                for i in range(decode_tokens):
                    pipe.decode(ids[ctx + i], ctx + i, plan)
                steps[keys].append(time.perf_counter() - t)
                pipe.truncate(ctx)
        for m in models:
            m.decode_sdpa_keys = sdpa_keys
        out.append(Measurement("decode", ctx, decode_tokens / statistics.median(steps[sdpa_keys])))
        if 0 in steps:
            out.append(Measurement("decode, matmul attention", ctx, decode_tokens / statistics.median(steps[0])))
    return out


def report(engine: Engine, results: list[Measurement]) -> str:
    c = engine.cfg
    lines = [
        f"model {engine.model_name}  dtype {c.dtype}  threads {c.threads}  stages {c.stages}  chunk {c.chunk_size}",
        "",
        "| phase | tokens (prefill) / context (decode) | tokens/s |",
        "|---|---:|---:|",
    ]
    lines += [f"| {m.what} | {m.tokens} | {m.tokens_per_s:.1f} |" for m in results]
    return "\n".join(lines)

"""`anchorkv bench engine`: prefill and decode speed of the loaded model, medians over repeats."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import torch

from anchorkv.engine.engine import Engine
from anchorkv.engine.pipeline import in_process
from anchorkv.engine.plan import RequestPlan, Span
from anchorkv.model.decode_attention import DecodeAttention
from anchorkv.model.prefill_attention import PrefillAttention
from anchorkv.model.softmax import AttentionSoftmax

PREFILL_LENGTHS = (512, 2048, 4096)
DECODE_CONTEXTS = (512, 2048, 6144)
TURN_TOKENS = 128  # a warm turn's new tokens (a tool result), prefilled after a restored context
TURN_CONTEXTS = (2048, 4096)
BATCH_ROWS = 8  # a decode step of this many sequences at once (each in its own slot), at BATCH_CONTEXT
BATCH_CONTEXT = 2048
BATCH_SHARED = 1536  # ... and again with this prefix (a system prompt) read from the first row's slot


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
    pipe = in_process(engine.pipeline)
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
    out += _turns(engine, ids, plan, repeats)
    sdpa_keys = models[0].decode_sdpa_keys
    kernel = models[0].decode_attention
    for ctx in DECODE_CONTEXTS:
        if ctx + decode_tokens >= engine.ctx:
            continue
        pipe.truncate(0)
        pipe.prefill(ids[:ctx], 0, plan)
        # decode attention through the kernel (where it runs), SDPA (torch's default up to sdpa_keys keys)
        # and the per-head matmuls, alternately: (attention, SDPA's key limit) per row
        variants = {"decode": (kernel, sdpa_keys)}
        if kernel.kind == "kernel":
            variants["decode, torch attention"] = (DecodeAttention(), sdpa_keys)
        if ctx <= sdpa_keys:
            variants["decode, matmul attention"] = (DecodeAttention(), 0)
        steps: dict[str, list[float]] = {what: [] for what in variants}
        for _ in range(repeats):
            for what, (attention, keys) in variants.items():
                for m in models:
                    m.decode_attention, m.decode_sdpa_keys = attention, keys
                t = time.perf_counter()
                for i in range(decode_tokens):
                    pipe.decode(ids[ctx + i], ctx + i, plan)
                steps[what].append(time.perf_counter() - t)
                pipe.truncate(ctx)
        for m in models:
            m.decode_attention, m.decode_sdpa_keys = kernel, sdpa_keys
        out += [Measurement(what, ctx, decode_tokens / statistics.median(ts)) for what, ts in steps.items()]
    out += _batch(engine, ids, plan, repeats, decode_tokens)
    return out


def _batch(engine: Engine, ids: list[int], plan: RequestPlan, repeats: int, steps: int) -> list[Measurement]:
    """Decode steps of BATCH_ROWS sequences together, each with BATCH_CONTEXT tokens of its own KV (one
    prefill, copied into the other slots): tokens/s over all rows; and alternately the same steps with the
    first BATCH_SHARED positions read from the first row's slot, as rows sharing a system prompt do."""
    rows, ctx, pipe = min(BATCH_ROWS, engine.cfg.parallel), BATCH_CONTEXT, in_process(engine.pipeline)
    if rows < 2 or ctx + steps >= engine.ctx:
        return []
    pipe.truncate(0)
    pipe.prefill(ids[:ctx], 0, plan)
    for stage in pipe.stages:
        piece = stage.kvs[0].export(0, ctx)
        for kv in stage.kvs[1:rows]:
            kv.truncate(0)
            kv.restore(piece)
    variants = {f"decode, {rows} rows at once": 0, f"decode, {rows} rows sharing {BATCH_SHARED}": BATCH_SHARED}
    times: dict[str, list[float]] = {what: [] for what in variants}
    for _ in range(repeats):
        for what, shared in variants.items():
            same = [(-1, 0), *[(0, shared) if shared else (-1, 0)] * (rows - 1)]
            t = time.perf_counter()
            for i in range(steps):
                pipe.decode_rows([(ids[ctx + i + r], Span(r, ctx + i, 1, plan, same[r])) for r in range(rows)])
            times[what].append(time.perf_counter() - t)
            for r in range(rows):
                pipe.truncate(ctx, r)
    for r in range(rows):
        pipe.truncate(0, r)
    return [Measurement(what, ctx, rows * steps / statistics.median(ts)) for what, ts in times.items()]


def _turns(engine: Engine, ids: list[int], plan: RequestPlan, repeats: int) -> list[Measurement]:
    """TURN_TOKENS prefilled after each context with the engine's attention and, where its kernels run, with
    the prefill kernel's vector instructions in place of AMX's tiles, with torch's matmuls around the softmax
    kernel and with torch alone, alternately."""
    pipe = in_process(engine.pipeline)
    model = pipe.stages[0].model
    default = (model.prefill_attention, model.softmax)
    variants = {"": default}
    if default[0].kind == "amx":
        variants[", vector attention kernel"] = (PrefillAttention(default[0].kernel, amx=False), default[1])
    if default[0].kind != "torch":
        variants[", matmul attention"] = (PrefillAttention(), default[1])
    if default[1].kind == "kernel":
        variants[", torch attention"] = (PrefillAttention(), AttentionSoftmax())
    out = []
    for ctx in TURN_CONTEXTS:
        if ctx + TURN_TOKENS >= engine.ctx:
            continue
        pipe.truncate(0)
        pipe.prefill(ids[:ctx], 0, plan)
        times: dict[str, list[float]] = {what: [] for what in variants}
        for _ in range(repeats):
            for what, (attention, softmax) in variants.items():
                for stage in pipe.stages:
                    stage.model.prefill_attention, stage.model.softmax = attention, softmax
                t = time.perf_counter()
                pipe.prefill(ids[ctx : ctx + TURN_TOKENS], ctx, plan)
                times[what].append(time.perf_counter() - t)
                pipe.truncate(ctx)
        for stage in pipe.stages:
            stage.model.prefill_attention, stage.model.softmax = default
        for what, ts in times.items():
            out.append(
                Measurement(
                    f"turn: {TURN_TOKENS} tokens after the context{what}", ctx, TURN_TOKENS / statistics.median(ts)
                )
            )
    return out


def report(engine: Engine, results: list[Measurement]) -> str:
    c = engine.cfg
    lines = [
        f"model {engine.model_name}  dtype {c.dtype}  threads {c.threads}  stages {c.stages}  chunk {c.chunk_size}",
        "",
        "| phase | tokens (prefill) / context (turn, decode) | tokens/s |",
        "|---|---:|---:|",
    ]
    lines += [f"| {m.what} | {m.tokens} | {m.tokens_per_s:.1f} |" for m in results]
    return "\n".join(lines)

"""`anchorkv simulate`: replay a workload through the server's own cache code, at the token level.

No model runs. Each policy gets a fresh PrefixCache (the class the server uses) whose KV stand-ins are
zero-stride tensors of the model's true KV shape, so byte counts are real and memory use is nil. The
disk tier is an in-memory MemoryDiskTier with the same budget and eviction policy as the file one.
With the default --ram-mb 0 only the disk tier can restore, which is what lucebox's hit-rate table
measured (a restarted or RAM-starved server); give RAM to see a warm single process.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from anchorkv.bench.traces import Request
from anchorkv.cache.keys import Namespace
from anchorkv.cache.memory_tier import MemoryDiskTier
from anchorkv.cache.policy import parse_scope
from anchorkv.cache.prefix_cache import CacheConfig, CacheRequest, PrefixCache, stage_cache
from anchorkv.cache.stage_cache import LocalStages
from anchorkv.cache.chunk import KVSlice
from anchorkv.model.chat_template import ChatTemplate
from anchorkv.model.config import ModelConfig

DEFAULT_CHUNK = 128


@dataclass(frozen=True)
class Policy:
    name: str
    scope: str
    stride: int | None = None
    chunk: int = DEFAULT_CHUNK
    anchors: bool = False  # anchor every request at its system prompt's end, as cache_control would


def parse_policy(name: str) -> Policy:
    """`default`, `anchors` (auto:30 plus a system-prompt anchor), `stride:S` (auto:30, C = 64), or a scope."""
    if name == "default":
        return Policy(name, CacheConfig().scope)
    if name == "anchors":
        return Policy(name, "auto:30", anchors=True)
    if name.startswith("stride:"):
        stride = int(name.split(":", 1)[1])
        if stride < 64 or stride % 64:
            raise ValueError(f"bad policy {name!r}: the stride must be a multiple of 64")
        return Policy(name, "auto:30", stride=stride, chunk=64)
    parse_scope(name)
    return Policy(name, name)


STANDARD = [
    "off",
    "full",
    "auto:2",
    "auto:8",
    "auto:30",
    "1024",
    "stride:64",
    "stride:128",
    "stride:256",
    "stride:512",
    "anchors",
    "default",
]


class SimKV:
    """Stands in for a stage's KV: exports zero-stride tensors with the real KV shape, restores nothing."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.zero = torch.zeros(1, dtype=torch.bfloat16)
        self.shape = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
        self.logits = self.zero.expand(cfg.vocab_size)  # a prompt's last logits, kept in the KV's dtype

    def export(self, start: int, end: int) -> KVSlice:
        layers, heads, hd = self.shape
        z = self.zero.expand(layers, heads, end - start, hd)
        return KVSlice(start, z, z)

    def restore(self, piece: KVSlice) -> None:
        pass

    def truncate(self, n: int) -> None:
        pass


def sim_cache(cfg: CacheConfig, chunk: int, model: ModelConfig, disk: MemoryDiskTier) -> tuple[PrefixCache, SimKV]:
    """The server's PrefixCache over one simulated stage (one KV slot) with an in-memory disk tier."""
    ns = Namespace.of(simulated=model.kv_params())
    cache = PrefixCache(cfg, [ns], chunk)
    kv = SimKV(model)
    cache.attach(LocalStages([stage_cache(cfg, ns, chunk, 1, disk=disk)], [[kv]]))
    return cache, kv


@dataclass
class Prepared:
    tokens: list[int]
    ends: list[int]
    turns: list[int]  # the chat boundaries where a prompt can end (RenderedPrompt.turn_starts)
    # the conversation up to the reply this request produced, as the session's next prompt has it: tokens
    # and chat boundaries
    reply: tuple[list[int], list[int]] | None


def prepare(requests: Sequence[Request], template: ChatTemplate, progress: bool = True) -> list[Prepared]:
    rendered: list[Prepared] = []
    for r in tqdm(requests, desc="tokenizing", unit="request", leave=False, disable=not progress):
        if r.tokens is not None:
            rendered.append(Prepared(r.tokens, [], [], None))
        else:
            p = template.render(r.messages)
            rendered.append(Prepared(p.token_ids, p.boundaries, p.turn_starts, None))
    # the reply of request i is in the next request of its session, up to that assistant message's end
    for i, r in enumerate(requests):
        if r.reply_index is None:
            continue
        nxt = next((j for j in range(i + 1, len(requests)) if requests[j].session == r.session), None)
        if nxt is None or len(requests[nxt].messages) <= r.reply_index:
            continue
        p = template.render(requests[nxt].messages)
        end = p.message_ends[r.reply_index]
        if end:
            rendered[i].reply = (p.token_ids[:end], [e for e in p.boundaries if e <= end])
    return rendered


@dataclass
class Result:
    policy: str
    requests: int
    hit_rate: float
    mean_restored_tokens: float
    median_restored_tokens: float
    restored_fraction: float
    bytes_written: int
    disk_bytes: int
    by_kind: dict[str, dict[str, float]]


def simulate(prepared: Sequence[Prepared], policy: Policy, model: ModelConfig, ram_mb: int, disk_mb: int) -> Result:
    cfg = CacheConfig(ram_mb=ram_mb, scope=policy.scope, stride=policy.stride)
    disk = MemoryDiskTier(disk_mb * 2**20)
    cache, kv = sim_cache(cfg, policy.chunk, model, disk)
    restored: list[int] = []
    kinds: list[str | None] = []
    for p in prepared:
        req = CacheRequest(p.ends, marked=p.ends[:1] if policy.anchors else ())
        plan = cache.plan(p.tokens, req)
        got = cache.restore(plan, p.tokens, 0)
        restored.append(got.tokens)
        kinds.append(got.kind)
        # what a prefill leaves reusable: up to the last cut (record rounds down to it)
        # as the server: logits before every turn start it prefilled, and at the prompt's end
        kept = {e: kv.logits for e in [*p.turns, len(p.tokens)] if e > got.tokens}
        cache.record_prompt(plan, p.tokens, 0, len(p.tokens), kept)
        if p.reply is not None:
            tokens, ends = p.reply
            cache.record_reply(plan, tokens, ends, 0, len(tokens))
    n = len(prepared)
    prompt_tokens = sum(len(p.tokens) for p in prepared)
    by_kind: dict[str, dict[str, float]] = {}
    for kind, count in Counter(k for k in kinds if k).items():
        sizes = [r for r, k in zip(restored, kinds, strict=True) if k == kind]
        by_kind[kind] = {"hits": count, "hit_rate": count / n, "mean_restored_tokens": statistics.mean(sizes)}
    return Result(
        policy=policy.name,
        requests=n,
        hit_rate=sum(1 for r in restored if r) / n if n else 0.0,
        mean_restored_tokens=statistics.mean(restored) if restored else 0.0,
        median_restored_tokens=statistics.median(restored) if restored else 0.0,
        restored_fraction=sum(restored) / prompt_tokens if prompt_tokens else 0.0,
        bytes_written=disk.written_bytes,
        disk_bytes=disk.nbytes,
        by_kind=by_kind,
    )


def markdown(trace: str, results: Sequence[Result]) -> str:
    rows = [
        f"### {trace}",
        "",
        "| policy | requests | hit rate | mean restored | median restored | restored / prompt | disk written | disk held | hits by kind |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        kinds = ", ".join(f"{k} {v['hits']:.0f}" for k, v in sorted(r.by_kind.items(), key=lambda kv: -kv[1]["hits"]))
        rows.append(
            f"| {r.policy} | {r.requests} | {r.hit_rate:.0%} | {r.mean_restored_tokens:.0f} | {r.median_restored_tokens:.0f} "
            f"| {r.restored_fraction:.0%} | {r.bytes_written / 2**20:.0f} MiB | {r.disk_bytes / 2**20:.0f} MiB | {kinds or '-'} |"
        )
    return "\n".join(rows)


def as_json(trace: str, results: Sequence[Result]) -> str:
    return json.dumps([{"trace": trace, **asdict(r)} for r in results], indent=1)


def chart(per_trace: dict[str, list[Result]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per_trace), figsize=(6 * len(per_trace), 5), squeeze=False)
    for ax, (trace, results) in zip(axes[0], per_trace.items(), strict=True):
        for r in results:
            ax.scatter(r.mean_restored_tokens, r.hit_rate * 100)
            ax.annotate(
                r.policy,
                (r.mean_restored_tokens, r.hit_rate * 100),
                fontsize=8,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_title(trace, fontsize=9)
        ax.set_xlabel("mean restored tokens per request")
        ax.set_ylabel("hit rate (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""The prefix cache as the head sees it: plan a restore, restore, record, across stages.

Each stage keeps its own chunks (`StageCache`). A request's plan is decided here from every stage's
answer to one lookup: the longest boundary that every stage has (a stage that misses vetoes longer ones).
Restore and record orders then go to each stage, which writes and reads its own KV. What is about
prompts rather than KV stays here: the auto window's history and which whole prompts were seen.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor

from anchorkv.cache.disk_tier import DiskWriter
from anchorkv.cache.history import FILE_NAME as HISTORY_FILE
from anchorkv.cache.history import History
from anchorkv.cache.keys import KEY_BYTES, Namespace, chunk_key
from anchorkv.cache.memory_tier import MemoryDiskTier
from anchorkv.cache.policy import (
    TAIL_MERGE,
    KINDS,
    RETENTION,
    AnchorVerdict,
    Boundary,
    RecordPlan,
    Scope,
    cut_floor,
    cuts,
    judge_anchors,
    parse_scope,
    plan_records,
    restorable_limit,
)
from anchorkv.cache.remote_tier import RemoteStats, RemoteTier
from anchorkv.cache.stage_cache import (
    TIER_ORDER,
    CacheMiss,
    CacheStages,
    Chain,
    Fetch,
    Grid,
    Lookup,
    Record,
    StageCache,
)

log = logging.getLogger("anchorkv.cache")

MAX_FULL_PROMPTS = 4096


@dataclass(frozen=True)
class CacheConfig:
    exact: bool = True  # restore only at prefill cuts, reuse only KV computed by prefill
    stride: int | None = None  # grid stride S; None: the prefill chunk C
    ram_mb: int = 2048
    cache_dir: Path | None = None  # None: no disk tier
    disk_budget_mb: int = 4096
    scope: str = "auto+"  # what goes to disk: off | full | auto | auto:N | auto+ | auto+:N | N
    min_tokens: int = 0  # nothing shorter is saved to disk
    redis: str | None = None  # redis://HOST:PORT/DB: a remote tier that replicas share

    def __post_init__(self) -> None:
        parse_scope(self.scope)
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"--cache-stride must be >= 1, got {self.stride}")
        if self.ram_mb < 0:
            raise ValueError(f"--cache-ram-mb must be >= 0, got {self.ram_mb}")
        if self.disk_budget_mb < 0:
            raise ValueError(f"--disk-budget-mb must be >= 0, got {self.disk_budget_mb}")
        if self.min_tokens < 0:
            raise ValueError(f"--cache-min-tokens must be >= 0, got {self.min_tokens}")
        if self.redis is not None and not self.redis.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"--cache-redis must be a redis://HOST:PORT/DB URL, got {self.redis!r}")


@dataclass(frozen=True)
class CacheRequest:
    """The cache-related parts of one request."""

    chat_ends: Sequence[int] = ()  # the rendered prompt's chat boundaries (RenderedPrompt.boundaries)
    anchors: Sequence[int] = ()  # prompt_cache_anchor_tokens: honoured only with prompt_cache_key
    has_key: bool = False
    marked: Sequence[int] = ()  # chat boundaries of messages marked with cache_control: anchors needing no key
    salt: str | None = None
    scope: Scope | None = None  # the request's prefix_cache override
    # the conversation with a reply appended, as the next turn's prompt will begin: (tokens, chat boundaries)
    next_turn: Callable[[str], tuple[list[int], list[int]]] | None = None
    # the chat boundaries past an assistant header, where a prompt can end: prefill keeps the logits there
    turn_starts: Sequence[int] = ()


@dataclass(frozen=True)
class Recorded:
    """A boundary this request records: its kind, where it was asked for, and the chunk end it lands on
    (rounded down to the last prefill cut)."""

    kind: str
    tokens: int
    at: int


@dataclass(frozen=True)
class CacheReport:
    """What a request's prompt got from the cache and leaves in it: a response's `prefix_cache` field."""

    restored_tokens: int = 0
    kind: str | None = None  # exact | full | chat | anchor | generic, when something was restored
    tier: str | None = None  # ram | disk | redis: the slowest tier the restore read
    scope: str | None = None
    recorded: tuple[Recorded, ...] = ()
    anchors: tuple[AnchorVerdict, ...] = ()

    @property
    def anchored(self) -> int:
        """The furthest anchor recorded: where this request wrote at a breakpoint (0 if none)."""
        return max((r.at for r in self.recorded if r.kind == "anchor"), default=0)

    @property
    def written(self) -> int:
        """Prompt tokens past the restore that the cache holds once this request's boundaries are recorded."""
        return max(0, max((r.at for r in self.recorded), default=0) - self.restored_tokens)

    def as_dict(self) -> dict[str, object]:
        return {
            "restored_tokens": self.restored_tokens,
            "kind": self.kind,
            "tier": self.tier,
            "scope": self.scope,
            "recorded": [asdict(r) for r in self.recorded],
            "anchors": [v.as_dict() for v in self.anchors],
        }


@dataclass(frozen=True)
class Restore:
    """What a restore brought back into a slot: [0, tokens) of the prompt, and when that is the whole
    prompt, the logits its last position gives."""

    tokens: int = 0
    kind: str | None = None  # exact | full | chat | anchor | generic
    tier: str | None = None  # the slowest tier read
    logits: Tensor | None = None  # [vocab]


@dataclass(frozen=True)
class CachePlan:
    """What the cache will do for a prompt: restore [0, restore_to), record `recorded`."""

    restore_to: int
    records: RecordPlan
    verdicts: list[AnchorVerdict]
    roots: list[bytes]
    salt: str | None
    scope: Scope
    history_ns: str
    limit: int  # the furthest this prompt could restore
    chat_ends: list[int]  # the prompt's chat boundaries: chain points, and prefill cuts
    recorded: list[Recorded] = field(default_factory=list)
    labels: frozenset[str] | None = None  # the first stage's kinds at restore_to, where its RAM has them

    def report(self, restored: Restore) -> CacheReport:
        return CacheReport(
            restored.tokens, restored.kind, restored.tier, str(self.scope), tuple(self.recorded), tuple(self.verdicts)
        )


@dataclass(frozen=True)
class RamUse:
    budget_bytes: int
    bytes: int
    entries: int
    evicted_bytes: int


@dataclass(frozen=True)
class DiskUse:
    dir: str
    budget_bytes: int
    bytes: int
    entries: int
    written_bytes: int
    evicted_bytes: int
    corrupt_dropped: int  # bad files found and dropped
    full: bool
    pending_writes: int  # chunks queued for the writer


@dataclass(frozen=True)
class CacheUse:
    """The cache's settings and every stage's tiers summed: /props's `prefix_cache`."""

    exact: bool
    stride: int
    align: int
    disk_policy: str
    min_tokens: int
    disk_error: str | None  # why the disk tier is off although a folder was given
    ram: RamUse
    disk: DiskUse | None
    redis: RemoteStats | None


class PrefixCache:
    def __init__(self, cfg: CacheConfig, namespaces: list[Namespace], chunk_size: int, vocab_size: int = 2**31) -> None:
        """`namespaces`: every stage's, as its worker computed it. `attach` gives the stages' caches."""
        self.cfg = cfg
        self.namespaces = namespaces
        self.grid = grid_of(cfg, chunk_size)
        self.stride, self.unit, self.merge = self.grid.stride, self.grid.unit, self.grid.merge
        self.default_scope = parse_scope(cfg.scope)
        self.stages: CacheStages | None = None
        self.history = History(None)
        self.writer: DiskWriter | None = None
        if cfg.cache_dir is not None:
            try:
                cfg.cache_dir.mkdir(parents=True, exist_ok=True)
                self.history = History(cfg.cache_dir / HISTORY_FILE, vocab_size)
                self.writer = DiskWriter()
            except OSError as e:
                log.warning("[cache] the prompt history is not kept: %s cannot be used (%s)", cfg.cache_dir, e)
        self.has_disk = False
        self.lock = threading.Lock()
        # whole prompts recorded (and prompt + reply), to tell exact and full restores apart
        self.full_prompts: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()
        self.full_lengths: dict[bytes, set[int]] = {}
        for ns in self.history.namespaces():
            for p in self.history.recent(ns):
                self._saw(bytes.fromhex(ns), p)

    def attach(self, stages: CacheStages) -> None:
        self.stages = stages
        self.has_disk = any(s.disk for s in stages.cache_stats())

    @property
    def _st(self) -> CacheStages:
        assert self.stages is not None, "PrefixCache.attach was not called"
        return self.stages

    @property
    def enabled(self) -> bool:
        """False when no tier can hold a chunk: then nothing is recorded or reported as recorded."""
        return self.cfg.ram_mb > 0 or self.has_disk or self.cfg.redis is not None

    def plan(self, prompt: Sequence[int], req: CacheRequest) -> CachePlan:
        scope = req.scope or self.default_scope
        roots = [ns.salted(req.salt).root for ns in self.namespaces]
        history_ns = roots[0].hex()
        verdicts = judge_anchors(req.anchors, req.has_key, len(prompt)) + judge_anchors(
            req.marked, True, len(prompt), whole=True
        )
        anchors = [v.tokens for v in verdicts if v.accepted]
        chat = sorted({e for e in req.chat_ends if e and e <= len(prompt)})
        limit = restorable_limit(len(prompt), self.unit, chat, self.merge)
        found = self._st.lookup(Lookup(prompt, chat, limit, req.salt, scope.mode != "off", whole=self.cfg.exact))
        # the longest boundary that every stage has: a stage that misses vetoes longer ones
        restore = max(frozenset.intersection(*(f.ends for f in found)))
        if self.cfg.exact and all(f.whole for f in found) and found[-1].whole_logits:
            restore = len(prompt)  # the same prompt, cut the same way, was prefilled before
        with self.lock:
            records = plan_records(
                prompt, chat, anchors, scope, self.history.recent(history_ns), self.cfg.min_tokens,
                # the whole prompt: an identical prompt can restore only up to n - 1
                full_at=len(prompt) if self.cfg.exact else len(prompt) - 1,
            )  # fmt: skip
        computable = cut_floor(len(prompt), self.unit, chat, self.merge)  # KV a prefill of this prompt leaves reusable
        recorded = [
            Recorded(b.kind, b.pos, min(cut_floor(b.pos, self.unit, chat, self.merge), computable))
            for b in records.boundaries
        ]
        recorded = [r for r in recorded if r.at] if self.enabled else []
        labels = found[0].labels.get(restore)
        return CachePlan(restore, records, verdicts, roots, req.salt, scope, history_ns, limit, chat, recorded, labels)

    def _kind(self, plan: CachePlan, prompt: Sequence[int], labels: frozenset[str]) -> str:
        """exact: this very prompt was seen; full: a whole earlier prompt (or prompt + reply) is a prefix
        of it; otherwise the strongest label recorded at the restored boundary."""
        root = plan.roots[0]
        lengths = sorted(m for m in self.full_lengths.get(root, ()) if plan.restore_to <= m < len(prompt))
        seen = self._seen_prefixes(root, prompt, [*lengths, len(prompt)])
        if seen[-1]:
            return "exact"
        if any(seen[:-1]):
            return "full"
        return next((k for k in KINDS if k in labels - {"full"}), "generic")

    def _seen_prefixes(self, root: bytes, tokens: Sequence[int], lengths: Sequence[int]) -> list[bool]:
        """For each of the ascending lengths m, whether tokens[:m] was recorded whole. One streaming hash
        over the tokens gives every prefix's key (chunk_key(root, tokens[:m]))."""
        data = np.asarray(tokens, dtype="<i4").tobytes()
        h = hashlib.blake2b(root, digest_size=KEY_BYTES)
        out, done = [], 0
        for m in lengths:
            h.update(data[4 * done : 4 * m])
            done = m
            out.append((root, h.copy().digest()) in self.full_prompts)
        return out

    def _saw(self, root: bytes, tokens: Sequence[int]) -> None:
        self.full_prompts[(root, chunk_key(root, tokens))] = None
        self.full_lengths.setdefault(root, set()).add(len(tokens))
        while len(self.full_prompts) > MAX_FULL_PROMPTS:
            self.full_prompts.popitem(last=False)

    # -- restore ---------------------------------------------------------------------------------------
    def restore(self, plan: CachePlan, prompt: Sequence[int], slot: int, skip_upto: int = 0) -> Restore:
        """Have every stage write its chunks of [0, plan.restore_to) into the slot's KV. Chunks ending at or
        before skip_upto are already there (the previous request left them). Raises CacheMiss when a stage
        lost a chunk."""
        if not plan.restore_to:
            return Restore()
        if skip_upto >= plan.restore_to < len(prompt) and plan.labels is not None:
            # the slot holds it all and no logits are wanted: no order to the stages (the prompt's
            # recording counts its chunks as used)
            return Restore(plan.restore_to, self._kind(plan, prompt, plan.labels), TIER_ORDER[0])
        got = self._st.restore(slot, Fetch(prompt, plan.chat_ends, plan.restore_to, plan.salt, skip_upto))
        logits = None
        if plan.restore_to == len(prompt):
            if got[-1].logits is None:
                raise CacheMiss("the last stage lost the prompt's logits")
            logits = got[-1].logits.float()
        tier = max((r.tier for r in got if r.tier), key=TIER_ORDER.index, default=None)
        return Restore(plan.restore_to, self._kind(plan, prompt, got[0].labels), tier, logits)

    def warm_start(self, slot: int, limit: int, interrupt: Callable[[], bool] | None = None) -> Chain:
        """After a restart: load the chain the last run used last (if an unsalted request's) from disk into
        the slot, in every stage, as far as every stage has it and up to `limit` positions, stopping early
        when `interrupt` (asked before each chunk) says a request waits. Returns what was loaded."""
        if not self.has_disk:
            return Chain([], [])
        chain = self._st.latest_chain()
        ends = [e for e in chain.ends if e <= limit]
        if not ends:
            return Chain([], [])
        tokens = chain.tokens[: ends[-1]]
        # chunk ends are cuts the prompt was prefilled at: taken as its chat boundaries they give back its
        # chain (with C >= TAIL_MERGE; a smaller C drops some, so less is shared, never more)
        have = frozenset.intersection(*(f.ends for f in self._st.lookup(Lookup(tokens, ends, ends[-1], None, True))))
        done = 0
        for end in ends:
            if end not in have or (interrupt is not None and interrupt()):
                break
            try:
                self._st.restore(slot, Fetch(tokens, ends, end, None, skip_upto=done))
            except CacheMiss:
                break
            done = end
        return Chain(tokens[:done], [e for e in ends if e <= done])

    # -- record ----------------------------------------------------------------------------------------
    def record(
        self,
        plan: CachePlan,
        tokens: Sequence[int],
        slot: int,
        computed: int,
        extra: Sequence[Boundary] = (),
        only_extra: bool = False,
        chat_ends: Sequence[int] | None = None,
        logits: Mapping[int, Tensor] | None = None,
    ) -> None:
        """Record the plan's boundaries (and `extra` ones) whose KV is in the slot: positions [0, computed)
        hold KV that may be reused (in exact mode: computed by prefill cut at `chat_ends`, by default the
        prompt's). `logits` maps positions to the logits [vocab] that a prompt ending there starts from;
        each is kept with the last stage's chunk ending there."""
        if not self.enabled:
            return
        chat = plan.chat_ends if chat_ends is None else sorted(chat_ends)
        top = cut_floor(computed, self.unit, chat, self.merge)
        bounds = (*(() if only_extra else plan.records.boundaries), *extra)
        labelled: dict[int, set[str]] = {}
        for b in bounds:
            pos = min(cut_floor(b.pos, self.unit, chat, self.merge), top)
            if pos > 0:
                labelled.setdefault(pos, set()).add(b.kind)
        if any(b.kind == "full" for b in bounds):
            with self.lock:
                self._saw(plan.roots[0], tokens)
        if not labelled:
            return
        disk_upto = plan.records.disk_upto
        if plan.records.reply_to_disk:  # full and auto+ also keep the reply on disk, for the next turn
            disk_upto = max(disk_upto, *(b.pos for b in extra), 0)
        disk_upto = min(disk_upto, top)
        ends = sorted(labelled)
        # a chunk is kept at least as long as the strongest boundary at or past its end: suffix maxima
        keep_from = [max(RETENTION.get(k, 0) for k in labelled[p]) if labelled[p] else 0 for p in ends]
        for k in range(len(ends) - 2, -1, -1):
            keep_from[k] = max(keep_from[k], keep_from[k + 1])
        walked = set(cuts(ends[-1], self.stride, chat, self.merge)) | labelled.keys()  # the chunk ends recorded
        kept = {p: x for p, x in (logits or {}).items() if p in walked}
        self._st.record(
            slot,
            Record(
                list(tokens),
                chat,
                plan.salt,
                {p: frozenset(k) for p, k in labelled.items()},
                keep_from,
                disk_upto,
                kept,
            ),
        )

    def record_prompt(
        self, plan: CachePlan, prompt: list[int], slot: int, computed: int, logits: Mapping[int, Tensor]
    ) -> None:
        """What a request leaves once its prompt is prefilled: its boundaries recorded, and the prompt in
        the auto window's history."""
        self.record(plan, prompt, slot, computed, logits=logits)
        self.remember(plan, prompt)

    def record_reply(
        self, plan: CachePlan, tokens: Sequence[int], chat_ends: Sequence[int], slot: int, computed: int
    ) -> None:
        """The conversation with its reply as the next turn will send it (`tokens`, cut at `chat_ends`):
        recorded whole at its end, and at the chat boundaries inside it."""
        full = (Boundary(len(tokens), "full"),)
        self.record(plan, tokens, slot, computed=computed, extra=full, only_extra=True, chat_ends=chat_ends)

    def remember(self, plan: CachePlan, prompt: list[int]) -> None:
        """Add the prompt to the auto window's history (persisted in the background)."""
        with self.lock:
            self.history.add(plan.history_ns, prompt)
        if self.writer is not None:
            snap = self.history.snapshot()
            self.writer.submit(lambda: self.history.save(snap))

    # -- inspection ------------------------------------------------------------------------------------
    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        self._st.flush()

    def stats(self) -> CacheUse:
        per = self._st.cache_stats()
        disks = [s for s in per if s.disk]
        remotes = [s.remote for s in per if s.remote is not None]
        ram = RamUse(
            self.cfg.ram_mb * 2**20, sum(s.ram_bytes for s in per), sum(s.ram_entries for s in per),
            sum(s.ram_evicted_bytes for s in per),
        )  # fmt: skip
        disk = DiskUse(
            str(self.cfg.cache_dir), sum(s.disk_budget_bytes for s in disks), sum(s.disk_bytes for s in disks),
            sum(s.disk_entries for s in disks), sum(s.disk_written_bytes for s in disks),
            sum(s.disk_evicted_bytes for s in disks), sum(s.corrupt_dropped for s in per),
            any(s.disk_full for s in disks), sum(s.disk_pending_writes for s in disks),
        )  # fmt: skip
        return CacheUse(
            self.cfg.exact, self.stride, self.unit, str(self.default_scope), self.cfg.min_tokens,
            next((s.disk_error for s in per if s.disk_error), None), ram, disk if disks else None,
            RemoteStats.total(remotes) if remotes else None,
        )  # fmt: skip


def grid_of(cfg: CacheConfig, chunk_size: int) -> Grid:
    stride = cfg.stride or chunk_size
    if cfg.exact and stride % chunk_size:
        raise ValueError(f"--cache-stride {stride} must be a multiple of --chunk-size {chunk_size} in exact mode")
    return Grid(stride, chunk_size if cfg.exact else 1, TAIL_MERGE if cfg.exact else 0)


def stage_cache(
    cfg: CacheConfig, namespace: Namespace, chunk_size: int, n_stages: int, disk: MemoryDiskTier | None = None
) -> StageCache:
    """One stage's cache with its share of the budgets."""
    remote = RemoteTier(cfg.redis, namespace) if cfg.redis else None
    return StageCache(
        namespace, grid_of(cfg, chunk_size), cfg.ram_mb * 2**20 // n_stages, cfg.cache_dir,
        cfg.disk_budget_mb * 2**20 // n_stages, disk=disk, remote=remote,
    )  # fmt: skip


__all__ = ["CacheMiss", "CacheConfig", "CachePlan", "CacheRequest", "PrefixCache", "stage_cache"]

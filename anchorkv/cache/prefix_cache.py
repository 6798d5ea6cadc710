"""The prefix cache across stages: plan a restore, restore, record.

Each stage has its own namespace, RAM tier and disk tier. A request's plan is decided once from all
stages (the longest boundary that every stage has) and carried to each of them.

Chains: chunks cut at the prompt's chat boundaries and every S tokens (the grid stride) after each (the
chain points), plus at most one tail chunk [g, b) hanging off the last chain point g before a boundary b
that is not one. In exact mode b is a prefill cut (policy.cuts with the prefill chunk C), and S is a
multiple of C, so every chunk end is a prefill cut.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor

from anchorkv.cache.chunk import Chunk
from anchorkv.cache.disk_tier import DiskTier, DiskWriter
from anchorkv.cache.history import FILE_NAME as HISTORY_FILE
from anchorkv.cache.history import History
from anchorkv.cache.keys import KEY_BYTES, Namespace, chain_keys, chunk_key
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
from anchorkv.cache.ram_tier import RamTier
from anchorkv.engine.kv import StageKV

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


@dataclass
class CachePlan:
    restore_to: int
    chains: list[list[bytes]]  # per stage, the keys of the chunks [0, restore_to)
    kind: str | None
    tier: str | None
    records: RecordPlan
    verdicts: list[AnchorVerdict]
    roots: list[bytes]
    scope: Scope
    history_ns: str
    limit: int  # the furthest this prompt could restore
    chat_ends: list[int]  # the prompt's chat boundaries: chain points, and prefill cuts
    recorded: list[dict[str, object]] = field(default_factory=list)
    logits: Tensor | None = None  # set by restore when restore_to is the whole prompt: its last logits

    def report(self) -> dict[str, object]:
        return {
            "restored_tokens": self.restore_to,
            "kind": self.kind,
            "tier": self.tier,
            "scope": str(self.scope),
            "recorded": self.recorded,
            "anchors": [v.as_dict() for v in self.verdicts],
        }


class PrefixCache:
    def __init__(
        self,
        cfg: CacheConfig,
        namespaces: list[Namespace],
        chunk_size: int,
        on_corrupt: Callable[[], None] = lambda: None,
        disk: list[DiskTier | MemoryDiskTier] | None = None,
        vocab_size: int = 2**31,
    ) -> None:
        """`disk` replaces the disk tiers that cfg.cache_dir would give (the simulator's in-memory ones)."""
        self.cfg = cfg
        self.namespaces = namespaces
        self.stride = cfg.stride or chunk_size
        self.unit = chunk_size if cfg.exact else 1  # restores and boundaries align to this
        self.tail = TAIL_MERGE if cfg.exact else 0  # ... except a grid point this close to a chat boundary
        if cfg.exact and self.stride % chunk_size:
            raise ValueError(
                f"--cache-stride {self.stride} must be a multiple of --chunk-size {chunk_size} in exact mode"
            )
        self.default_scope = parse_scope(cfg.scope)
        per_stage = cfg.ram_mb * 2**20 // len(namespaces)
        self.ram = [RamTier(per_stage) for _ in namespaces]
        self.writer: DiskWriter | None = None
        self.disk: list[DiskTier | MemoryDiskTier] = list(disk or [])
        self.corrupt_dropped = 0
        self._on_corrupt = on_corrupt
        self.history = History(None)
        self.disk_error: str | None = None  # why the disk tier is off although a folder was given
        if cfg.cache_dir is not None and disk is None:
            try:
                cfg.cache_dir.mkdir(parents=True, exist_ok=True)
                disk_per_stage = cfg.disk_budget_mb * 2**20 // len(namespaces)
                writer = DiskWriter()
                self.disk = [DiskTier(cfg.cache_dir, ns, disk_per_stage, writer, self._corrupt) for ns in namespaces]
                self.writer = writer
                self.history = History(cfg.cache_dir / HISTORY_FILE, vocab_size)
            except OSError as e:  # a file where the folder should be, a read-only folder, ...
                self.disk, self.writer, self.disk_error = [], None, f"{type(e).__name__}: {e}"
                log.warning("[cache] the disk tier is off: %s cannot be used (%s)", cfg.cache_dir, e)
        self.lock = threading.Lock()
        # whole prompts recorded (and prompt + reply), to tell exact and full restores apart
        self.full_prompts: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()
        self.full_lengths: dict[bytes, set[int]] = {}
        for ns in self.history.namespaces():
            for p in self.history.recent(ns):
                self._saw(bytes.fromhex(ns), p)

    @property
    def enabled(self) -> bool:
        """False when no tier can hold a chunk: then nothing is recorded or reported as recorded."""
        return self.cfg.ram_mb > 0 or bool(self.disk)

    def _corrupt(self) -> None:
        self.corrupt_dropped += 1
        self._on_corrupt()

    # -- lookup ----------------------------------------------------------------------------------------
    def _has(self, s: int, key: bytes, disk_ok: bool) -> bool:
        return key in self.ram[s] or (disk_ok and bool(self.disk) and key in self.disk[s])

    def _tail_ends(self, s: int, parent: bytes, disk_ok: bool) -> set[int]:
        ends = set(self.ram[s].tails.get(parent, ()))
        if disk_ok and self.disk:
            ends |= self.disk[s].tail_ends(parent)
        return ends

    def _chain_to(
        self, s: int, root: bytes, prompt: Sequence[int], pos: int, chat: Sequence[int], disk_ok: bool
    ) -> list[bytes] | None:
        """Keys of stage s's chunks covering exactly [0, pos), if all are cached."""
        points = cuts(pos, self.stride, chat, self.tail)
        keys = chain_keys(root, prompt, points)
        if not all(self._has(s, k, disk_ok) for k in keys):
            return None
        g = points[-1] if points else 0
        if g < pos:
            tail = chunk_key(keys[-1] if keys else root, prompt[g:pos])
            if not self._has(s, tail, disk_ok):
                return None
            keys.append(tail)
        return keys

    def _longest(
        self, s: int, root: bytes, prompt: Sequence[int], limit: int, chat: Sequence[int], disk_ok: bool
    ) -> int:
        points = cuts(limit, self.stride, chat, self.tail)
        keys = chain_keys(root, prompt, points)
        j = 0
        while j < len(keys) and self._has(s, keys[j], disk_ok):
            j += 1
        g, parent = (points[j - 1], keys[j - 1]) if j else (0, root)
        # a tail ends before this prompt's next chain point: one that spans it was cut differently
        stop = points[j] if j < len(points) else limit + 1
        for end in sorted(self._tail_ends(s, parent, disk_ok), reverse=True):
            if (
                g < end < stop
                and cut_floor(end, self.unit, chat, self.tail) == end
                and self._has(s, chunk_key(parent, prompt[g:end]), disk_ok)
            ):
                return end
        return g

    def _whole(
        self, roots: list[bytes], prompt: Sequence[int], chat: Sequence[int], disk_ok: bool
    ) -> list[list[bytes]] | None:
        """Every stage's chain over the whole prompt, when its last chunk keeps logits (a prompt ending there,
        cut the same way, was prefilled before): then nothing needs prefill."""
        n, s = len(prompt), len(roots) - 1
        if not n or cut_floor(n, self.unit, chat, self.tail) != n:
            return None
        # the last stage first: only its chunk keeps logits, and most prompts stop there
        last = self._chain_to(s, roots[s], prompt, n, chat, disk_ok)
        if last is None:
            return None
        key = last[-1]
        c = self.ram[s].chunks.get(key)  # RAM first, as restore fetches it
        has = c.logits is not None if c is not None else disk_ok and bool(self.disk) and self.disk[s].has_logits(key)
        if not has:
            return None
        found = [self._chain_to(t, roots[t], prompt, n, chat, disk_ok) for t in range(s)]
        return None if any(f is None for f in found) else [*(f or [] for f in found), last]

    def plan(self, prompt: Sequence[int], req: CacheRequest) -> CachePlan:
        scope = req.scope or self.default_scope
        disk_ok = scope.mode != "off"
        roots = [ns.salted(req.salt).root for ns in self.namespaces]
        history_ns = roots[0].hex()
        verdicts = judge_anchors(req.anchors, req.has_key, len(prompt)) + judge_anchors(
            req.marked, True, len(prompt), whole=True
        )
        anchors = [v.tokens for v in verdicts if v.accepted]
        chat = sorted({e for e in req.chat_ends if e and e <= len(prompt)})
        limit = restorable_limit(len(prompt), self.unit, chat, self.tail)
        with self.lock:
            ends = [self._longest(s, roots[s], prompt, limit, chat, disk_ok) for s in range(len(roots))]
            # the longest boundary that every stage has: a stage that misses vetoes longer ones
            shortest = min(ends)
            candidates = sorted({0, *(e for e in ends if e <= shortest), *cuts(shortest, self.stride, chat, self.tail)})
            chains: list[list[bytes]] = [[] for _ in roots]
            restore = 0
            if self.cfg.exact and (whole := self._whole(roots, prompt, chat, disk_ok)) is not None:
                candidates, restore, chains = [], len(prompt), whole
            for c in reversed(candidates):
                found = [self._chain_to(s, roots[s], prompt, c, chat, disk_ok) for s in range(len(roots))]
                if all(f is not None for f in found):
                    restore, chains = c, [f or [] for f in found]
                    break
            records = plan_records(
                prompt, chat, anchors, scope, self.history.recent(history_ns), self.cfg.min_tokens,
                # the whole prompt: an identical prompt can restore only up to n - 1
                full_at=len(prompt) if self.cfg.exact else len(prompt) - 1,
            )  # fmt: skip
        computable = cut_floor(len(prompt), self.unit, chat, self.tail)  # KV a prefill of this prompt leaves reusable
        recorded: list[dict[str, object]] = [
            {"kind": b.kind, "tokens": b.pos, "at": min(cut_floor(b.pos, self.unit, chat, self.tail), computable)}
            for b in records.boundaries
        ]
        recorded = [d for d in recorded if d["at"]] if self.enabled else []
        return CachePlan(
            restore, chains, None, None, records, verdicts, roots, scope, history_ns, limit, chat, recorded
        )

    def _kind(self, plan: CachePlan, prompt: Sequence[int], labels: set[str]) -> str | None:
        """exact: this very prompt was seen; full: a whole earlier prompt (or prompt + reply) is a prefix
        of it; otherwise the strongest label recorded at the restored boundary."""
        if not plan.restore_to:
            return None
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
    def restore(self, plan: CachePlan, prompt: Sequence[int], kvs: list[StageKV], skip_upto: int = 0) -> None:
        """Write the plan's chunks into each stage's KV. Chunks ending at or before skip_upto are already
        there (the previous request left them). Sets plan.tier."""
        from_disk = False
        labels: set[str] = set()  # those of stage 0's last restored chunk
        for s, chain in enumerate(plan.chains):
            for key in chain:
                from_disk |= key not in self.ram[s]
                c = self._fetch(s, key)
                if c is None:  # vanished or corrupt since planning: stop here
                    raise CacheMiss(f"stage {s} lost chunk {key.hex()}")
                if not np.array_equal(c.tokens, prompt[c.start : c.end]):  # a key collision, however unlikely
                    raise CacheMiss(f"stage {s} chunk {key.hex()} holds other tokens")
                if s == 0:
                    labels = c.labels
                if c.end == len(prompt) and s == len(plan.chains) - 1:
                    if c.logits is None:
                        raise CacheMiss(f"stage {s} chunk {key.hex()} lost its logits")
                    plan.logits = c.logits.float()
                if c.end <= skip_upto:
                    continue
                kvs[s].restore(c.kv)
        plan.tier = ("disk" if from_disk else "ram") if plan.restore_to else None
        plan.kind = self._kind(plan, prompt, labels)

    def warm_start(self, kvs: list[StageKV], limit: int, interrupt: Callable[[], bool] | None = None) -> list[Chunk]:
        """After a restart: load the chain the last run used last (if an unsalted request's) from disk into
        RAM and into kvs, in every stage, as far as every stage has it and up to `limit` positions, stopping
        early when `interrupt` (asked before each chunk) says a request waits. Returns stage 0's chunks."""
        if not self.disk:
            return []
        root, keys = self.disk[0].latest_chain()
        parents = [ns.root for ns in self.namespaces]
        if root != parents[0]:
            return []
        out: list[Chunk] = []
        with self.lock:
            for key in keys:
                if interrupt is not None and interrupt():
                    break
                first = self._fetch(0, key)
                if first is None or first.end > limit:
                    break
                row = [first] + [self._fetch(s, chunk_key(parents[s], first.tokens)) for s in range(1, len(kvs))]
                if any(c is None for c in row):
                    break
                for s, c in enumerate(row):
                    assert c is not None
                    kvs[s].restore(c.kv)
                    parents[s] = c.key
                out.append(first)
        return out

    def _fetch(self, s: int, key: bytes) -> Chunk | None:
        """The chunk from RAM, or loaded from disk into RAM."""
        c = self.ram[s].get(key)
        if c is None and self.disk and (c := self.disk[s].load(key)) is not None:
            self.ram[s].put(c)
        return c

    # -- record ----------------------------------------------------------------------------------------
    def record(
        self,
        plan: CachePlan,
        tokens: Sequence[int],
        kvs: list[StageKV],
        computed: int,
        extra: Sequence[Boundary] = (),
        only_extra: bool = False,
        chat_ends: Sequence[int] | None = None,
        logits: Mapping[int, Tensor] | None = None,
    ) -> None:
        """Record the plan's boundaries (and `extra` ones) whose KV is in kvs: positions [0, computed) hold
        KV that may be reused (in exact mode: computed by prefill cut at `chat_ends`, by default the
        prompt's). `logits` maps positions to the logits [vocab] that a prompt ending there starts from;
        each is kept with the last stage's chunk ending there."""
        if not self.enabled:
            return
        chat = plan.chat_ends if chat_ends is None else sorted(chat_ends)
        top = cut_floor(computed, self.unit, chat, self.tail)
        bounds = (*(() if only_extra else plan.records.boundaries), *extra)
        labelled: dict[int, set[str]] = {}
        for b in bounds:
            pos = min(cut_floor(b.pos, self.unit, chat, self.tail), top)
            if pos > 0:
                labelled.setdefault(pos, set()).add(b.kind)
        if any(b.kind == "full" for b in bounds):
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

        def keep(end: int) -> int:
            return keep_from[bisect.bisect_left(ends, end)]

        points = cuts(ends[-1], self.stride, chat, self.tail)
        last = len(plan.roots) - 1
        with self.lock:
            for s, root in enumerate(plan.roots):
                kept = (logits or {}) if s == last else {}
                # one walk of the chain up to the furthest boundary, then a tail for each boundary off it
                at = {0: root}  # chain point -> key of the chunk ending there
                a = 0
                for b in points:
                    at[b] = self._put(s, at[a], tokens, a, b, labelled.get(b, set()), keep(b), disk_upto, kvs[s],
                                      kept.get(b))  # fmt: skip
                    a = b
                for pos in ends:
                    if pos not in at:
                        g = points[bisect.bisect_left(points, pos) - 1] if points and points[0] < pos else 0
                        self._put(s, at[g], tokens, g, pos, labelled[pos], keep(pos), disk_upto, kvs[s],
                                  kept.get(pos))  # fmt: skip

    def _put(
        self, s: int, parent: bytes, tokens: Sequence[int], a: int, b: int, labels: set[str], keep: int,
        disk_upto: int, kv: StageKV, logits: Tensor | None = None,
    ) -> bytes:  # fmt: skip
        """Record chunk [a, b) of stage s under parent (RAM, and disk up to disk_upto); returns its key."""
        key = chunk_key(parent, tokens[a:b])
        chunk = self.ram[s].get(key)
        if chunk is not None and logits is not None:
            self.ram[s].attach_logits(key, logits)  # passed through before, now a prompt ends here
        if chunk is None:
            tokens_ab = np.asarray(tokens[a:b], dtype=np.int32)
            chunk = Chunk(key, parent, tokens_ab, kv.export(a, b), keep, set(labels), logits=logits)
            self.ram[s].put(chunk)
        else:
            self.ram[s].promote(key, keep)
            chunk.labels |= labels
        if self.disk and b <= disk_upto:
            self.disk[s].save(chunk)
        return key

    def remember(self, plan: CachePlan, prompt: list[int]) -> None:
        """Add the prompt to the auto window's history (persisted in the background)."""
        self.history.add(plan.history_ns, prompt)
        if self.writer is not None:
            snap = self.history.snapshot()
            self.writer.submit(lambda: self.history.save(snap))

    # -- inspection ------------------------------------------------------------------------------------
    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def stats(self) -> dict[str, object]:
        return {
            "exact": self.cfg.exact,
            "stride": self.stride,
            "align": self.unit,
            "disk_policy": str(self.default_scope),
            "min_tokens": self.cfg.min_tokens,
            "disk_error": self.disk_error,
            "ram": {
                "budget_bytes": self.cfg.ram_mb * 2**20,
                "bytes": sum(r.nbytes for r in self.ram),
                "entries": sum(len(r.chunks) for r in self.ram),
                "evicted_bytes": sum(r.evicted_bytes for r in self.ram),
            },
            "disk": None
            if not self.disk
            else {
                "dir": str(self.cfg.cache_dir),
                "budget_bytes": sum(d.budget for d in self.disk),
                "bytes": sum(d.nbytes for d in self.disk),
                "entries": sum(len(d) for d in self.disk),
                "written_bytes": sum(d.written_bytes for d in self.disk),
                "evicted_bytes": sum(d.evicted_bytes for d in self.disk),
                "corrupt_dropped": self.corrupt_dropped,
                "full": any(getattr(d, "full_since", None) is not None for d in self.disk),
            },
        }

    def wipe_stage(self, s: int) -> None:
        """Forget every chunk of stage s in RAM and on disk (for tests of the stage veto)."""
        with self.lock:
            for key in list(self.ram[s].chunks):
                self.ram[s].drop(key)
            if self.disk:
                self.disk[s].clear()


class CacheMiss(RuntimeError):
    pass

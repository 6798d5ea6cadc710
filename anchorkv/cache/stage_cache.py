"""One stage's prefix cache: its namespace and its tiers (RAM, disk on its own host, an optional remote
tier), and the messages the head sends it. A stage answers for its own chunks only and never sees
another stage's; the head (`PrefixCache`) combines the answers.

Chains: chunks cut at the prompt's chat boundaries and every S tokens (the grid stride) after each (the
chain points), plus at most one tail chunk [g, b) hanging off a chain point g before a boundary b that is
not one. In exact mode b is a prefill cut (policy.cuts with the prefill chunk C), and S is a multiple of
C, so every chunk end is a prefill cut.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
from torch import Tensor

from anchorkv.cache.chunk import Chunk, KVStore
from anchorkv.cache.disk_tier import DiskTier, DiskWriter
from anchorkv.cache.keys import Namespace, chain_keys, chunk_key
from anchorkv.cache.memory_tier import MemoryDiskTier
from anchorkv.cache.ram_tier import RamTier
from anchorkv.cache.remote_tier import RemoteStats, RemoteTier
from anchorkv.cache.policy import cut_floor, cuts

log = logging.getLogger("anchorkv.cache")

# a restore reports the slowest tier any chunk came from; "slot": none, the sequence's KV slot held them all
TIER_ORDER = ("slot", "ram", "disk", "redis")


class CacheMiss(RuntimeError):
    pass


@dataclass(frozen=True)
class Grid:
    """How chains are cut, the same on every stage."""

    stride: int  # S
    unit: int  # restores and boundaries align to this (C in exact mode, else 1)
    merge: int  # ... except a grid point this close to a chat boundary (TAIL_MERGE)


@dataclass(frozen=True)
class Lookup:
    """The head's question: how far can you restore this prompt?"""

    prompt: Sequence[int]
    chat: Sequence[int]  # its chat boundaries
    limit: int  # the furthest a restore may reach
    salt: str | None
    disk_ok: bool  # slower tiers may be used (the request's prefix_cache is not "off")
    whole: bool = False  # also say whether the whole prompt, with its logits, is there (exact mode)


@dataclass(frozen=True)
class Coverage:
    ends: frozenset[int]  # every position p <= limit (0 included) that a chain [0, p) reaches
    whole: bool  # a chain reaches the whole prompt
    whole_logits: bool  # ... and its last chunk keeps the prompt's logits
    # the boundary kinds recorded at each end whose last chunk is in RAM: what a restore would report,
    # so one that the slot holds whole needs no restore order
    labels: Mapping[int, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Fetch:
    """Restore [0, upto) of the prompt into a slot's KV; chunks ending at or before skip_upto are there."""

    prompt: Sequence[int]
    chat: Sequence[int]
    upto: int
    salt: str | None
    skip_upto: int = 0


@dataclass(frozen=True)
class Restored:
    tier: str | None  # the slowest tier a chunk came from
    labels: frozenset[str]  # the boundary kinds recorded at the last chunk's end
    logits: Tensor | None  # the last chunk's logits, when it ends the prompt and keeps them


@dataclass(frozen=True)
class Record:
    """Record these boundaries of tokens from a slot's KV. `keep_from[i]` is the retention of chunks
    ending at or before ends[i] (and after ends[i - 1])."""

    tokens: Sequence[int]
    chat: Sequence[int]
    salt: str | None
    labelled: Mapping[int, frozenset[str]]  # boundary -> kinds
    keep_from: Sequence[int]  # by sorted(labelled)
    disk_upto: int  # chunks ending past this stay in RAM
    logits: Mapping[int, Tensor] = field(default_factory=dict)  # the last stage's: position -> logits [vocab]


@dataclass(frozen=True)
class Chain:
    """A chain one stage holds: its tokens and chunk ends."""

    tokens: list[int]
    ends: list[int]


@dataclass(frozen=True)
class CacheStats:
    ram_bytes: int = 0
    ram_entries: int = 0
    ram_evicted_bytes: int = 0
    disk: bool = False
    disk_budget_bytes: int = 0
    disk_bytes: int = 0
    disk_entries: int = 0
    disk_written_bytes: int = 0
    disk_evicted_bytes: int = 0
    disk_full: bool = False
    disk_pending_writes: int = 0  # chunks queued for the disk writer
    disk_error: str | None = None
    corrupt_dropped: int = 0
    remote: RemoteStats | None = None


class _RemoteView:
    """The remote tier's answers during one lookup: asked in batches, one round trip each, not key by key."""

    def __init__(self, tier: RemoteTier) -> None:
        self.tier = tier
        self.asked: set[bytes] = set()
        self.held: set[bytes] = set()
        self.tails: dict[bytes, set[int]] = {}

    def ask(self, keys: Iterable[bytes], parents: Iterable[bytes] = ()) -> None:
        new = [k for k in dict.fromkeys(keys) if k not in self.asked]
        todo = [p for p in dict.fromkeys(parents) if p not in self.tails]
        held, tails = self.tier.probe(new, todo)
        self.asked.update(new)
        self.held |= held
        self.tails |= {p: tails.get(p, set()) for p in todo}

    def has(self, key: bytes) -> bool:
        if key not in self.asked:
            self.ask([key])
        return key in self.held

    def tail_ends(self, parent: bytes) -> set[int]:
        if parent not in self.tails:
            self.ask([], [parent])
        return self.tails[parent]


class StageCache:
    def __init__(
        self,
        namespace: Namespace,
        grid: Grid,
        ram_bytes: int,
        cache_dir: Path | None = None,
        disk_bytes: int = 0,
        disk: DiskTier | MemoryDiskTier | None = None,
        remote: RemoteTier | None = None,
    ) -> None:
        """`disk` replaces the disk tier that cache_dir would give (the simulator's in-memory one)."""
        self.namespace = namespace
        self.grid = grid
        self.ram = RamTier(ram_bytes)
        self.disk = disk
        self.remote = remote
        self.writer: DiskWriter | None = None
        self.disk_error: str | None = None  # why the disk tier is off although a folder was given
        self.corrupt_dropped = 0
        self.lock = threading.Lock()
        if remote is not None:
            remote.on_corrupt = self._corrupt
        if cache_dir is not None and disk is None:
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
                writer = DiskWriter()
                self.disk = DiskTier(cache_dir, namespace, disk_bytes, writer, self._corrupt)
                self.writer = writer
            except OSError as e:  # a file where the folder should be, a read-only folder, ...
                self.disk_error = f"{type(e).__name__}: {e}"
                log.warning("[cache] the disk tier is off: %s cannot be used (%s)", cache_dir, e)

    def _corrupt(self) -> None:
        self.corrupt_dropped += 1

    # -- lookup ----------------------------------------------------------------------------------------
    def _local(self, key: bytes, slow_ok: bool) -> bool:
        return key in self.ram or (slow_ok and self.disk is not None and key in self.disk)

    def _has(self, key: bytes, slow_ok: bool, remote: _RemoteView | None = None) -> bool:
        if self._local(key, slow_ok):
            return True
        if not slow_ok or self.remote is None:
            return False
        return remote.has(key) if remote is not None else key in self.remote

    def _tail_ends(self, parent: bytes, slow_ok: bool, remote: _RemoteView | None) -> set[int]:
        ends = self.ram.tail_ends(parent)
        if slow_ok and self.disk is not None:
            ends |= self.disk.tail_ends(parent)
        if slow_ok and remote is not None:
            ends |= remote.tail_ends(parent)
        return ends

    def chain_to(
        self,
        root: bytes,
        prompt: Sequence[int],
        pos: int,
        chat: Sequence[int],
        slow_ok: bool,
        remote: _RemoteView | None = None,
    ) -> list[tuple[bytes, int]] | None:
        """The chunks covering exactly [0, pos), each as (key, end), if all are cached."""
        g_ = self.grid
        points = cuts(pos, g_.stride, chat, g_.merge)
        keys = chain_keys(root, prompt, points)
        if remote is not None:
            remote.ask([k for k in keys if not self._local(k, slow_ok)])
        if not all(self._has(k, slow_ok, remote) for k in keys):
            return None
        chain = list(zip(keys, points, strict=True))
        g = points[-1] if points else 0
        if g < pos:
            tail = chunk_key(keys[-1] if keys else root, prompt[g:pos])
            if not self._has(tail, slow_ok, remote):
                return None
            chain.append((tail, pos))
        return chain

    def lookup(self, q: Lookup) -> Coverage:
        g_ = self.grid
        root = self.namespace.salted(q.salt).root
        prompt, chat = q.prompt, q.chat
        with self.lock:
            points = cuts(q.limit, g_.stride, chat, g_.merge)
            keys = chain_keys(root, prompt, points)
            remote = _RemoteView(self.remote) if q.disk_ok and self.remote is not None else None
            if remote is not None:  # the chain and every tail list in one round trip
                remote.ask([k for k in keys if not self._local(k, True)], [root, *keys])
            ends = {0}
            labels: dict[int, frozenset[str]] = {}
            j = 0
            while j < len(keys) and self._has(keys[j], q.disk_ok, remote):
                ends.add(points[j])
                self._label(labels, points[j], keys[j])
                j += 1
            # tails off each chain point reached, ending before the prompt's next one (one that spans it was
            # cut differently) at a position a prefill of this prompt also cuts at
            tails: list[tuple[int, bytes]] = []
            for i in range(j + 1):
                g, parent = (points[i - 1], keys[i - 1]) if i else (0, root)
                stop = points[i] if i < len(points) else q.limit + 1
                for end in self._tail_ends(parent, q.disk_ok, remote):
                    if g < end < stop and cut_floor(end, g_.unit, chat, g_.merge) == end:
                        tails.append((end, chunk_key(parent, prompt[g:end])))
            if remote is not None:  # the tails in a second round trip
                remote.ask([k for _, k in tails if not self._local(k, True)])
            for end, key in tails:
                if self._has(key, q.disk_ok, remote):
                    ends.add(end)
                    self._label(labels, end, key)
            n = len(prompt)
            whole = whole_logits = False
            if q.whole and n and cut_floor(n, g_.unit, chat, g_.merge) == n:
                chain = self.chain_to(root, prompt, n, chat, q.disk_ok, remote)
                whole = chain is not None
                if chain is not None:
                    whole_logits = self._has_logits(chain[-1][0], q.disk_ok)
        return Coverage(frozenset(ends), whole, whole_logits, labels)

    def _label(self, labels: dict[int, frozenset[str]], end: int, key: bytes) -> None:
        if (c := self.ram.peek(key)) is not None:
            labels[end] = frozenset(c.labels)

    def _has_logits(self, key: bytes, slow_ok: bool) -> bool:
        c = self.ram.peek(key)  # RAM first, as restore fetches it
        if c is not None:
            return c.logits is not None
        if not slow_ok:
            return False
        if self.disk is not None and key in self.disk:
            return self.disk.has_logits(key)
        return self.remote is not None and self.remote.has_logits(key)

    # -- restore ---------------------------------------------------------------------------------------
    def restore(self, f: Fetch, kv: KVStore) -> Restored:
        """Write the chain [0, f.upto) into kv, keeping the [0, f.skip_upto) it holds (one order, one round
        trip to a remote stage); the chunks it holds count as used but are not read from disk or Redis.
        Raises CacheMiss when a chunk vanished since the lookup."""
        root = self.namespace.salted(f.salt).root
        with self.lock:
            remote = _RemoteView(self.remote) if self.remote is not None else None
            chain = self.chain_to(root, f.prompt, f.upto, f.chat, True, remote) if f.upto else []
            if chain is None:
                raise CacheMiss(f"{self.namespace.id[:8]}: no chain to {f.upto} any more")
            tier, labels, logits = 0, frozenset[str](), None
            kv.truncate(f.skip_upto)
            for i, (key, end) in enumerate(chain):
                held = end <= f.skip_upto
                if held and (c := self.ram.get(key)) is not None:
                    t = 0  # nothing to read
                elif held and i < len(chain) - 1:
                    if self.disk is not None:
                        self.disk.touch(key)
                    continue
                else:  # the last chunk is read even when held: its labels, and the prompt's logits
                    c, t = self._fetch(key)
                if c is None:  # vanished or corrupt since the lookup: stop here
                    raise CacheMiss(f"lost chunk {key.hex()}")
                if not np.array_equal(c.tokens, f.prompt[c.start : c.end]):  # a key collision, however unlikely
                    raise CacheMiss(f"chunk {key.hex()} holds other tokens")
                tier, labels = max(tier, t), frozenset(c.labels)
                if c.end == len(f.prompt):
                    logits = c.logits
                if c.end > f.skip_upto:
                    kv.restore(c.kv)
        return Restored(TIER_ORDER[tier] if chain else None, labels, logits)

    def _fetch(self, key: bytes) -> tuple[Chunk | None, int]:
        """The chunk from RAM, else loaded into RAM from disk, else from the remote tier; and which tier it
        came from. A remote chunk is fetched one at a time and not kept: copied into the slot, its value's
        memory serves the next one's, so a restore faults in no fresh pages for it and never holds a long
        chain's values at once; the prompt's recording, after its first token, puts the slot's copy in RAM."""
        if (c := self.ram.get(key)) is not None:
            return c, 1
        if self.disk is not None and (c := self.disk.load(key)) is not None:
            self.ram.put(c)
            return c, 2
        if self.remote is not None and (c := self.remote.load(key)) is not None:
            return c, 3
        return None, 0

    def latest_chain(self, salt: str | None = None) -> Chain:
        """The chain on disk that ends in the chunk used last, if it is under this namespace (with `salt`)."""
        if self.disk is None:
            return Chain([], [])
        root, keys = self.disk.latest_chain()
        if root != self.namespace.salted(salt).root:
            return Chain([], [])
        tokens: list[int] = []
        ends: list[int] = []
        with self.lock:
            for key in keys:
                c = self.ram.peek(key)
                part = c.tokens.tolist() if c is not None else self.disk.tokens(key)
                if part is None:
                    break
                tokens += part
                ends.append(len(tokens))
        return Chain(tokens, ends)

    # -- record ----------------------------------------------------------------------------------------
    def record(self, r: Record, kv: KVStore) -> None:
        """One walk of the chain up to the furthest boundary, then a tail for each boundary off it."""
        if not r.labelled:
            return
        g_ = self.grid
        root = self.namespace.salted(r.salt).root
        ends = sorted(r.labelled)

        def keep(end: int) -> int:
            return r.keep_from[bisect.bisect_left(ends, end)]

        points = cuts(ends[-1], g_.stride, r.chat, g_.merge)
        with self.lock:
            at = {0: root}  # chain point -> key of the chunk ending there
            a = 0
            for b in points:
                at[b] = self._put(at[a], r, a, b, keep(b), kv)
                a = b
            for pos in ends:
                if pos not in at:
                    g = points[bisect.bisect_left(points, pos) - 1] if points and points[0] < pos else 0
                    self._put(at[g], r, g, pos, keep(pos), kv)

    def _put(self, parent: bytes, r: Record, a: int, b: int, keep: int, kv: KVStore) -> bytes:
        """Record chunk [a, b) under parent (RAM, and the slower tiers up to disk_upto); returns its key."""
        key = chunk_key(parent, r.tokens[a:b])
        labels = r.labelled.get(b, frozenset())
        logits = r.logits.get(b)
        chunk = self.ram.get(key)
        if chunk is not None and logits is not None:
            self.ram.attach_logits(key, logits)  # passed through before, now a prompt ends here
        if chunk is None:
            tokens_ab = np.asarray(r.tokens[a:b], dtype=np.int32)
            chunk = Chunk(key, parent, tokens_ab, kv.export(a, b), keep, set(labels), logits=logits)
            self.ram.put(chunk)
        else:
            self.ram.promote(key, keep)
            chunk.labels |= labels
        if b <= r.disk_upto:
            if self.disk is not None:
                self.disk.save(chunk)
            if self.remote is not None:
                self.remote.save(chunk)
        return key

    # -- inspection ------------------------------------------------------------------------------------
    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        if self.remote is not None:
            self.remote.flush()

    def stats(self) -> CacheStats:
        d = self.disk
        return CacheStats(
            ram_bytes=self.ram.nbytes,
            ram_entries=len(self.ram),
            ram_evicted_bytes=self.ram.evicted_bytes,
            disk=d is not None,
            disk_budget_bytes=d.index.budget if d is not None else 0,
            disk_bytes=d.nbytes if d is not None else 0,
            disk_entries=len(d) if d is not None else 0,
            disk_written_bytes=d.written_bytes if d is not None else 0,
            disk_evicted_bytes=d.evicted_bytes if d is not None else 0,
            disk_full=getattr(d, "full_since", None) is not None,
            disk_pending_writes=self.writer.pending if self.writer is not None else 0,
            disk_error=self.disk_error,
            corrupt_dropped=self.corrupt_dropped,
            remote=self.remote.stats() if self.remote is not None else None,
        )

    def clear(self) -> None:
        """Forget every chunk in RAM and on disk."""
        with self.lock:
            for key in self.ram.keys():
                self.ram.drop(key)
            if self.disk is not None:
                self.disk.clear()


class CacheStages(Protocol):
    """Every stage's cache, as the head reaches it: in this process, or in stage workers elsewhere."""

    def lookup(self, q: Lookup) -> list[Coverage]: ...

    def restore(self, slot: int, f: Fetch) -> list[Restored]: ...

    def record(self, slot: int, r: Record) -> None: ...

    def latest_chain(self) -> Chain: ...

    def cache_stats(self) -> list[CacheStats]: ...

    def flush(self) -> None: ...


class LocalStages:
    """Stage caches in this process, each with its KV pool (pools[s][slot])."""

    def __init__(self, caches: Sequence[StageCache], pools: Sequence[Sequence[KVStore]]) -> None:
        self.caches, self.pools = caches, pools

    def lookup(self, q: Lookup) -> list[Coverage]:
        return [c.lookup(q) for c in self.caches]

    def restore(self, slot: int, f: Fetch) -> list[Restored]:
        return [c.restore(f, pool[slot]) for c, pool in zip(self.caches, self.pools, strict=True)]

    def record(self, slot: int, r: Record) -> None:
        last = len(self.caches) - 1
        for s, (c, pool) in enumerate(zip(self.caches, self.pools, strict=True)):
            c.record(r if s == last else replace(r, logits={}), pool[slot])

    def latest_chain(self) -> Chain:
        return self.caches[0].latest_chain()

    def cache_stats(self) -> list[CacheStats]:
        return [c.stats() for c in self.caches]

    def flush(self) -> None:
        for c in self.caches:
            c.flush()

"""An in-memory stand-in for the disk tier, for the simulator: the same index, budget and eviction
policy as DiskTier, with no files. Chunks it holds may carry stand-in KV (see bench/simulate.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from anchorkv.cache.chunk import Chunk
from anchorkv.cache.leaves import Leaves
from anchorkv.cache.policy import EvictionCandidate, eviction_order


@dataclass
class _Entry:
    chunk: Chunk
    last_used: float


class MemoryDiskTier:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.entries: dict[bytes, _Entry] = {}
        self.tails: dict[bytes, set[int]] = {}
        self.nbytes = 0
        self.leaves = Leaves()
        self.written_bytes = 0
        self.evicted_bytes = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def has_logits(self, key: bytes) -> bool:
        e = self.entries.get(key)
        return e is not None and e.chunk.logits is not None

    def tail_ends(self, parent: bytes) -> set[int]:
        return set(self.tails.get(parent, ()))

    def load(self, key: bytes) -> Chunk | None:
        e = self.entries.get(key)
        if e is None:
            return None
        e.last_used = time.monotonic()
        return e.chunk

    def save(self, chunk: Chunk) -> None:
        if chunk.key in self.entries or (chunk.start > 0 and chunk.parent not in self.entries):
            return
        self.entries[chunk.key] = _Entry(chunk, time.monotonic())
        self.leaves.add(chunk.key, chunk.parent)
        self.tails.setdefault(chunk.parent, set()).add(chunk.end)
        self.written_bytes += chunk.nbytes
        self.nbytes += chunk.nbytes
        while self.nbytes > self.budget:
            leaves = [
                EvictionCandidate(k, self.entries[k].chunk.retention, self.entries[k].last_used)
                for k in self.leaves.keys
            ]
            order = eviction_order(leaves)
            if not order:
                return
            victim = self.entries.pop(order[0]).chunk
            self.leaves.remove(victim.key, victim.parent, self.entries)
            self.tails[victim.parent].discard(victim.end)
            self.nbytes -= victim.nbytes
            self.evicted_bytes += victim.nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.tails.clear()
        self.leaves.clear()
        self.nbytes = 0

"""The RAM tier: chunks under a byte budget. Evicts leaves first (a chunk is useless without its parent),
the lowest retention class first, and least recently used among equals."""

from __future__ import annotations

import time
from collections import defaultdict

from torch import Tensor

from anchorkv.cache.chunk import Chunk
from anchorkv.cache.leaves import Leaves
from anchorkv.cache.policy import EvictionCandidate, eviction_order


class RamTier:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.chunks: dict[bytes, Chunk] = {}
        self.leaves = Leaves()
        self.tails: defaultdict[bytes, set[int]] = defaultdict(set)  # parent key -> ends of chunks under it
        self.nbytes = 0
        self.evicted_bytes = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self.chunks

    def get(self, key: bytes) -> Chunk | None:
        c = self.chunks.get(key)
        if c is not None:
            c.last_used = time.monotonic()
        return c

    def put(self, chunk: Chunk) -> list[bytes]:
        """Insert (or refresh) chunk; returns the keys evicted to stay under budget."""
        old = self.chunks.get(chunk.key)
        if old is not None:
            old.retention = max(old.retention, chunk.retention)
            old.labels |= chunk.labels
            old.last_used = time.monotonic()
            return []
        if chunk.nbytes > self.budget or (chunk.start > 0 and chunk.parent not in self.chunks):
            return []  # does not fit, or unreachable without its parent
        self.chunks[chunk.key] = chunk
        self.leaves.add(chunk.key, chunk.parent)
        self.tails[chunk.parent].add(chunk.end)
        self.nbytes += chunk.nbytes
        return self._evict()

    def promote(self, key: bytes, retention: int, label: str | None = None) -> None:
        c = self.chunks.get(key)
        if c is not None:
            c.retention = max(c.retention, retention)
            if label:
                c.labels.add(label)

    def attach_logits(self, key: bytes, logits: Tensor) -> None:
        c = self.chunks.get(key)
        if c is not None and c.logits is None:
            c.logits = logits
            self.nbytes += logits.nbytes
            self._evict()

    def drop(self, key: bytes) -> None:
        c = self.chunks.pop(key, None)
        if c is None:
            return
        self.leaves.remove(key, c.parent, self.chunks)
        self.tails[c.parent].discard(c.end)
        if not self.tails[c.parent]:
            del self.tails[c.parent]
        self.nbytes -= c.nbytes

    def eviction_order(self) -> list[bytes]:
        leaves = [EvictionCandidate(k, self.chunks[k].retention, self.chunks[k].last_used) for k in self.leaves.keys]
        return eviction_order(leaves)

    def _evict(self) -> list[bytes]:
        """Evict leaves until under budget; the newest chunk goes too when nothing else can."""
        evicted: list[bytes] = []
        while self.nbytes > self.budget:
            order = self.eviction_order()
            if not order:
                break
            victim = order[0]
            self.evicted_bytes += self.chunks[victim].nbytes
            self.drop(victim)
            evicted.append(victim)
        return evicted

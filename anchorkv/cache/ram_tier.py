"""The RAM tier: chunks under a byte budget, evicted as every tier evicts (chunk_index.py)."""

from __future__ import annotations

import time

from torch import Tensor

from anchorkv.cache.chunk import Chunk
from anchorkv.cache.chunk_index import IndexedTier


class RamTier(IndexedTier[Chunk]):
    def get(self, key: bytes) -> Chunk | None:
        c = self.index.get(key)
        if c is not None:
            c.last_used = time.monotonic()
        return c

    def peek(self, key: bytes) -> Chunk | None:
        """The chunk, without counting as a use."""
        return self.index.get(key)

    def keys(self) -> list[bytes]:
        return list(self.index)

    def put(self, chunk: Chunk) -> list[bytes]:
        """Insert (or refresh) chunk; returns the keys evicted to stay under budget."""
        old = self.index.get(chunk.key)
        if old is not None:
            old.retention = max(old.retention, chunk.retention)
            old.labels |= chunk.labels
            old.last_used = time.monotonic()
            return []
        if chunk.nbytes > self.index.budget or (chunk.start > 0 and chunk.parent not in self.index):
            return []  # does not fit, or unreachable without its parent
        self.index.add(chunk.key, chunk)
        return [k for k, _ in self.index.evict()]

    def promote(self, key: bytes, retention: int, label: str | None = None) -> None:
        c = self.index.get(key)
        if c is not None:
            c.retention = max(c.retention, retention)
            if label:
                c.labels.add(label)

    def attach_logits(self, key: bytes, logits: Tensor) -> None:
        c = self.index.get(key)
        if c is not None and c.logits is None:
            c.logits = logits
            self.index.grew(logits.nbytes)
            self.index.evict()

    def drop(self, key: bytes) -> None:
        self.index.remove(key)

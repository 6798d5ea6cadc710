"""An in-memory stand-in for the disk tier, for the simulator: the same index, budget and eviction as
DiskTier (chunk_index.py), with no files. Chunks it holds may carry stand-in KV (see bench/simulate.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from anchorkv.cache.chunk import Chunk
from anchorkv.cache.chunk_index import IndexedTier


@dataclass
class _Entry:
    """As DiskEntry: the size and last use are the tier's own (the chunk may also be in RAM)."""

    chunk: Chunk
    nbytes: int
    last_used: float

    @property
    def parent(self) -> bytes:
        return self.chunk.parent

    @property
    def start(self) -> int:
        return self.chunk.start

    @property
    def end(self) -> int:
        return self.chunk.end

    @property
    def retention(self) -> int:
        return self.chunk.retention


class MemoryDiskTier(IndexedTier[_Entry]):
    def __init__(self, budget_bytes: int) -> None:
        super().__init__(budget_bytes)
        self.written_bytes = 0

    def has_logits(self, key: bytes) -> bool:
        e = self.index.get(key)
        return e is not None and e.chunk.logits is not None

    def load(self, key: bytes) -> Chunk | None:
        e = self.index.get(key)
        if e is None:
            return None
        e.last_used = time.monotonic()
        return e.chunk

    def touch(self, key: bytes) -> None:
        if (e := self.index.get(key)) is not None:
            e.last_used = time.monotonic()

    def tokens(self, key: bytes) -> list[int] | None:
        e = self.index.get(key)
        return None if e is None else e.chunk.tokens.tolist()

    def save(self, chunk: Chunk) -> None:
        if chunk.key in self.index or (chunk.start > 0 and chunk.parent not in self.index):
            return
        self.index.add(chunk.key, _Entry(chunk, chunk.nbytes, time.monotonic()))
        self.written_bytes += chunk.nbytes
        self.index.evict()

    def clear(self) -> None:
        self.index.clear()

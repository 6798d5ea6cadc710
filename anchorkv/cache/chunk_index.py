"""What every tier keeps about its chunks, and how it evicts: one index under a byte budget.

The chunks form a forest: each has a parent (the chunk before it in its chain). Only leaves are evicted
(a chunk is useless without its parent), the lowest retention class first and the least recently used
among equals (policy.eviction_order). Per parent the index knows the ends of the chunks under it, which
is how a lookup finds where a chain goes on. A tier keeps what an entry points at: the chunk itself in
RAM, a file on disk.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from anchorkv.cache.leaves import Leaves
from anchorkv.cache.policy import EvictionCandidate, eviction_order


class Entry(Protocol):
    @property
    def parent(self) -> bytes: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def retention(self) -> int: ...
    @property
    def last_used(self) -> float: ...


E = TypeVar("E", bound=Entry)


class ChunkIndex(Generic[E]):
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.entries: dict[bytes, E] = {}
        self.leaves = Leaves()
        # parent key -> end -> how many chunks under it end there (continuations of one length differ in tokens)
        self.tails: dict[bytes, Counter[int]] = {}
        self.nbytes = 0
        self.evicted_bytes = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[bytes]:
        return iter(list(self.entries))

    def get(self, key: bytes) -> E | None:
        return self.entries.get(key)

    def tail_ends(self, parent: bytes) -> set[int]:
        return set(self.tails.get(parent, ()))

    def add(self, key: bytes, e: E) -> None:
        """Index e under key, or replace the entry there."""
        old = self.entries.get(key)
        self.entries[key] = e
        self.nbytes += e.nbytes - (old.nbytes if old is not None else 0)
        if old is None:
            self.leaves.add(key, e.parent)
            self.tails.setdefault(e.parent, Counter())[e.end] += 1

    def grew(self, nbytes: int) -> None:
        """An indexed entry got nbytes larger (RAM: logits attached to a chunk)."""
        self.nbytes += nbytes

    def remove(self, key: bytes) -> E | None:
        e = self.entries.pop(key, None)
        if e is None:
            return None
        self.nbytes -= e.nbytes
        self.leaves.remove(key, e.parent, self.entries)
        ends = self.tails[e.parent]
        ends[e.end] -= 1
        if not ends[e.end]:
            del ends[e.end]
            if not ends:
                del self.tails[e.parent]
        return e

    def eviction_order(self) -> list[bytes]:
        leaves = [EvictionCandidate(k, self.entries[k].retention, self.entries[k].last_used) for k in self.leaves.keys]
        return eviction_order(leaves)

    def evict(self, below: int = 0) -> list[tuple[bytes, E]]:
        """Remove leaves until `below` bytes under the budget; the newest chunk goes too when nothing else
        can. Returns what was removed, in order."""
        out: list[tuple[bytes, E]] = []
        while self.nbytes > max(0, self.budget - below) and self.entries:
            order = self.eviction_order()
            if not order:
                break
            e = self.remove(order[0])
            assert e is not None
            self.evicted_bytes += e.nbytes
            out.append((order[0], e))
        return out

    def clear(self) -> None:
        self.entries.clear()
        self.leaves.clear()
        self.tails.clear()
        self.nbytes = 0


class IndexedTier(Generic[E]):
    """A tier's bookkeeping: its ChunkIndex, read under `lock` (a disk tier's writer thread writes it).
    Subclasses store the chunks and keep the index in step."""

    def __init__(self, budget_bytes: int) -> None:
        self.index: ChunkIndex[E] = ChunkIndex(budget_bytes)
        self.lock = threading.Lock()

    def __contains__(self, key: bytes) -> bool:
        with self.lock:
            return key in self.index

    def __len__(self) -> int:
        with self.lock:
            return len(self.index)

    @property
    def nbytes(self) -> int:
        return self.index.nbytes

    @property
    def evicted_bytes(self) -> int:
        return self.index.evicted_bytes

    def tail_ends(self, parent: bytes) -> set[int]:
        with self.lock:
            return self.index.tail_ends(parent)

    def eviction_order(self) -> list[bytes]:
        with self.lock:
            return self.index.eviction_order()

    def latest_chain(self) -> tuple[bytes, list[bytes]]:
        """The chain that ends in the chunk used last: its root, and its keys from position 0 ([] when the
        chain is broken)."""
        with self.lock:
            entries = self.index.entries
            if not entries:
                return b"", []
            key = max(entries, key=lambda k: (entries[k].last_used, entries[k].end))
            chain = []
            while key in entries:
                chain.append(key)
                key = entries[key].parent
            whole = entries[chain[-1]].start == 0
        return key, chain[::-1] if whole else []

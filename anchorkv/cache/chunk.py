"""A cached chunk: the KV of positions [start, end) of one stage, named by its chain key."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from torch import Tensor


@dataclass(frozen=True)
class KVSlice:
    """KV of positions [start, end) for one stage's layers. k, v: [n_layers, Hkv, end - start, hd]."""

    start: int
    k: Tensor
    v: Tensor

    @property
    def end(self) -> int:
        return self.start + self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class KVStore(Protocol):
    """A sequence's KV in one stage, as the cache reads and writes it."""

    def export(self, start: int, end: int) -> KVSlice: ...

    def restore(self, piece: KVSlice) -> None: ...

    def truncate(self, n: int) -> None: ...


@dataclass
class Chunk:
    key: bytes
    parent: bytes  # the previous chunk's key, or the namespace root for a chunk starting at 0
    tokens: np.ndarray  # int32 token ids of [start, end); checked again on every restore
    kv: KVSlice
    retention: int = 0  # eviction class (policy.RETENTION); higher is kept longer
    labels: set[str] = field(default_factory=set)  # boundary kinds recorded at this chunk's end
    last_used: float = field(default_factory=time.monotonic)
    # On the last stage, when a prompt ended at this chunk's end: that prompt's last-position logits
    # [vocab], so that the same prompt again restores every token and prefills none.
    logits: Tensor | None = None

    @property
    def start(self) -> int:
        return self.kv.start

    @property
    def end(self) -> int:
        return self.kv.end

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + (self.logits.nbytes if self.logits is not None else 0)

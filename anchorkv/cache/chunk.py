"""A cached chunk: the KV of positions [start, end) of one stage, named by its chain key."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from anchorkv.engine.kv import KVSlice


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

"""A pipeline stage: a contiguous layer range and its KV pool, one StageKV per sequence slot."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from anchorkv.engine.kv import StageKV
from anchorkv.engine.plan import StageInput
from anchorkv.model.transformer import Rows, StageModel


class Stage:
    def __init__(self, index: int, model: StageModel, kvs: list[StageKV]) -> None:
        self.index = index
        self.model = model
        self.kvs = kvs

    @property
    def kv(self) -> StageKV:
        """Slot 0's KV: what a lone sequence uses."""
        return self.kvs[0]

    @property
    def layer_range(self) -> range:
        return self.model.layer_range

    @property
    def kv_bytes(self) -> int:
        return sum(kv.k.nbytes + kv.v.nbytes for kv in self.kvs)

    def forward(self, inp: StageInput, interrupt: Callable[[], bool] | None = None) -> Tensor:
        """Hidden states [T, D] out, or logits on the last stage. Each span's KV is written (and counted
        as filled only when the forward completes)."""
        rows = []
        for sp in inp.spans:
            kv = self.kvs[sp.slot]
            if sp.start + sp.length > kv.ctx:
                raise ValueError(f"position {sp.start + sp.length} is past the context size {kv.ctx}")
            if sp.start > kv.filled:
                raise ValueError(f"stage {self.index}: forward at {sp.start} but KV is filled only to {kv.filled}")
            rows.append(Rows(sp.start, sp.length, kv.k, kv.v))
        out = self.model.forward(inp.x, rows, inp.logits, inp.decode, interrupt)
        for sp in inp.spans:
            self.kvs[sp.slot].filled = sp.start + sp.length
        return out

"""A pipeline stage: a contiguous layer range and its own KV."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from anchorkv.engine.kv import StageKV
from anchorkv.engine.plan import StageInput
from anchorkv.model.transformer import StageModel


class Stage:
    def __init__(self, index: int, model: StageModel, kv: StageKV) -> None:
        self.index = index
        self.model = model
        self.kv = kv

    @property
    def layer_range(self) -> range:
        return self.model.layer_range

    def forward(self, inp: StageInput, interrupt: Callable[[], bool] | None = None) -> Tensor:
        """Hidden states [T, D] out, or logits on the last stage. KV for [start, start + T) is written (and
        counted as filled only when the forward completes)."""
        end = inp.start + inp.x.shape[0]
        if end > self.kv.ctx:
            raise ValueError(f"position {end} is past the context size {self.kv.ctx}")
        if inp.start > self.kv.filled:
            raise ValueError(f"stage {self.index}: forward at {inp.start} but KV is filled only to {self.kv.filled}")
        out = self.model.forward(inp.x, inp.start, self.kv.k, self.kv.v, inp.logits, inp.decode, interrupt)
        self.kv.filled = end
        return out

"""Stages chained in one process, and prefill in chunks aligned to absolute positions.

Exactness rests on the chunking: prefill of [start, n) is cut at multiples of C counted from position 0,

    |<- C ->|<- C ->|<- C ->|<-- n % C -->|
    0       C       2C      3C            n

so a position p < C * floor(n / C) is always computed inside the full chunk [C*floor(p/C), C*floor(p/C) + C),
with the same tensor shapes, whichever request computes it. KV restored at a multiple of C and followed by
aligned prefill is therefore bit-identical to a cold run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anchorkv.engine.plan import RequestPlan, StageInput
from anchorkv.engine.stage import Stage
from anchorkv.model.transformer import Logits


def aligned_chunks(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """[a, b) pieces of [start, end) whose inner boundaries are the multiples of chunk."""
    out = []
    a = start
    while a < end:
        b = min((a // chunk + 1) * chunk, end)
        out.append((a, b))
        a = b
    return out


class Pipeline:
    def __init__(self, stages: list[Stage], chunk_size: int, device: torch.device) -> None:
        self.stages = stages
        self.chunk_size = chunk_size
        self.device = device

    def forward(
        self, tokens: list[int], start: int, plan: RequestPlan, logits: Logits = "last", decode: bool = False
    ) -> Tensor:
        x: Tensor = torch.tensor(tokens, dtype=torch.long, device=self.device)
        for stage in self.stages:
            x = stage.forward(StageInput(x, start, plan, decode, logits))
        return x

    def decode(self, token: int, pos: int, plan: RequestPlan) -> Tensor:
        """One decode step at position pos. Returns logits [vocab]."""
        return self.forward([token], pos, plan, decode=True)

    def prefill(self, tokens: list[int], start: int, plan: RequestPlan, all_logits: bool = False) -> Tensor:
        """Prefill tokens at positions [start, start + len(tokens)). Returns the last position's logits
        [vocab], or with all_logits the logits of every position [len(tokens), vocab]."""
        chunks = aligned_chunks(start, start + len(tokens), self.chunk_size)
        outs = []
        for i, (a, b) in enumerate(chunks):
            mode: Logits = "all" if all_logits else "last" if i == len(chunks) - 1 else "none"
            outs.append(self.forward(tokens[a - start : b - start], a, plan, mode))
        return torch.cat(outs) if all_logits else outs[-1]

    def truncate(self, n: int) -> None:
        for stage in self.stages:
            stage.kv.truncate(n)

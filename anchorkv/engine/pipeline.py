"""Stages chained in one process, and prefill in chunks aligned to the prompt's structure.

Exactness rests on the chunking: prefill of [start, n) is cut at the prompt's chat boundaries e1, e2, ...
(`chat_ends`) and every C tokens between them, counted from the last boundary (from 0 before the first),
except a grid point less than TAIL_MERGE tokens before the next boundary (policy.cuts):

    |<- C ->|<- C ->|<- e1 ->|<- C ->|<-  C + r  ->|<- e2 ->|<- C ->|<- n ->|
    0       C       2C       e1      e1+C          e2       e2+C     n        (r < TAIL_MERGE)

Which piece a position falls in depends only on the positions, the boundaries before it and the end of its
own message, so a position before the last cut is computed with the same tensor shapes by every request
that shares the tokens and those boundaries. KV restored at a cut and followed by prefill cut the same way is
therefore bit-identical to a cold run. (The cache's chain keys fix the boundaries they were cut at.)
Restarting the grid at each boundary means a message shorter than C is one piece, however it falls, and the
merge means no piece of a message is shorter than TAIL_MERGE unless the message is.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from collections.abc import Callable, Collection, Sequence

import torch
from torch import Tensor

from anchorkv.cache.policy import cuts
from anchorkv.cache.stage_cache import CacheStages, LocalStages
from anchorkv.engine.plan import RequestPlan, Span, StageInput
from anchorkv.engine.kv import StageKV
from anchorkv.engine.stage import Stage, StageInfo
from anchorkv.model.transformer import Logits


def aligned_chunks(start: int, end: int, chunk: int, chat_ends: Sequence[int] = ()) -> list[tuple[int, int]]:
    """[a, b) pieces of [start, end) whose inner boundaries are the cuts (see above) after start."""
    edges = [start, *(p for p in cuts(end - 1, chunk, chat_ends) if p > start), end] if start < end else []
    return list(itertools.pairwise(edges))


class Pipeline:
    """The stages as the head drives them. Subclasses are transports: stages in this process, or stage
    workers elsewhere; the messages are the same."""

    kind = "none"  # how the stages are reached: none (this process) | ray
    chunk_size: int
    device: torch.device
    cache_stages: CacheStages

    def _run(self, inp: StageInput, interrupt: Callable[[], bool] | None = None) -> Tensor:
        raise NotImplementedError

    def truncate(self, n: int, slot: int = 0) -> None:
        raise NotImplementedError

    def infos(self) -> list[StageInfo]:
        raise NotImplementedError

    def health(self) -> list[StageHealth]:
        return [StageHealth(i.index, i.node, list(i.layers), "alive") for i in self.infos()]

    def kv_touched(self) -> list[int]:
        """Each stage's KV pool bytes written so far (resident memory; the rest of the pool is not)."""
        raise NotImplementedError

    def prefault(self, slot: int) -> bool:
        """About PREFAULT_BYTES more of the slot's KV made resident in every stage; whether any is left."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def forward(
        self,
        tokens: list[int],
        start: int,
        plan: RequestPlan,
        logits: Logits = "last",
        decode: bool = False,
        interrupt: Callable[[], bool] | None = None,
        slot: int = 0,
    ) -> Tensor:
        """One sequence's positions [start, start + len(tokens)) in `slot`. With `interrupt` the forward may
        raise Interrupted; stages that finished have then filled their KV up to start + len(tokens), so the
        caller truncates back to start."""
        x: Tensor = torch.tensor(tokens, dtype=torch.long, device=self.device)
        return self._run(StageInput(x, (Span(slot, start, len(tokens), plan),), decode, logits), interrupt)

    def decode(self, token: int, pos: int, plan: RequestPlan, slot: int = 0) -> Tensor:
        """One decode step of one sequence at position pos. Returns logits [vocab]."""
        return self.decode_rows([(token, Span(slot, pos, 1, plan))])[0]

    def decode_rows(self, rows: Sequence[tuple[int, Span]]) -> Tensor:
        """One decode step of several sequences: (token, span of length 1) each. Returns logits [B, vocab]."""
        x = torch.tensor([t for t, _ in rows], dtype=torch.long, device=self.device)
        return self._run(StageInput(x, tuple(sp for _, sp in rows), decode=True))

    def prefill(
        self,
        tokens: list[int],
        start: int,
        plan: RequestPlan,
        chat_ends: Sequence[int] = (),
        all_logits: bool = False,
        logits_at: Collection[int] = (),
        kept: dict[int, Tensor] | None = None,
        slot: int = 0,
    ) -> Tensor:
        """Prefill tokens at positions [start, start + len(tokens)), cut at the chat boundaries and every C tokens after each.
        Returns the last position's logits [vocab], or with all_logits those of every position [T, vocab].
        Given `kept`, also fills it with the logits [vocab] before each of the boundaries in logits_at that it
        reaches (keyed by the boundary): what a prompt ending there would start from."""
        chunks = aligned_chunks(start, start + len(tokens), self.chunk_size, chat_ends)
        stops = set(logits_at) if kept is not None else set()
        outs = []
        for i, (a, b) in enumerate(chunks):
            last = i == len(chunks) - 1
            mode: Logits = "all" if all_logits else "last" if last or b in stops else "none"
            out = self.forward(tokens[a - start : b - start], a, plan, mode, slot=slot)
            if kept is not None and b in stops:
                kept[b] = out[-1] if all_logits else out
            if last or all_logits:
                outs.append(out)
        return torch.cat(outs) if all_logits else outs[-1]


class StageFailed(RuntimeError):
    """A stage worker died or cannot be reached: the requests in flight fail with 503."""

    def __init__(self, stages: Sequence[int], cause: BaseException) -> None:
        self.stages = list(stages)
        names = ", ".join(str(s) for s in self.stages) or "?"
        super().__init__(
            f"pipeline stage {names} failed ({type(cause).__name__}); it is being restarted, retry shortly"
        )


@dataclass(frozen=True)
class StageHealth:
    index: int
    node: str
    layers: list[int]
    state: str  # alive | restarting | dead


class LocalPipeline(Pipeline):
    """Every stage in this process, called in turn."""

    def __init__(self, stages: list[Stage], chunk_size: int, device: torch.device) -> None:
        self.stages = stages
        self.chunk_size = chunk_size
        self.device = device
        self.cache_stages = LocalStages([s.cache for s in stages], [s.kvs for s in stages])

    def _run(self, inp: StageInput, interrupt: Callable[[], bool] | None = None) -> Tensor:
        x = inp.x
        for stage in self.stages:
            x = stage.forward(StageInput(x, inp.spans, inp.decode, inp.logits), interrupt)
        return x

    def truncate(self, n: int, slot: int = 0) -> None:
        for stage in self.stages:
            stage.truncate(n, slot)

    def infos(self) -> list[StageInfo]:
        return [s.info() for s in self.stages]

    def kv_touched(self) -> list[int]:
        return [s.kv_touched_bytes for s in self.stages]

    def prefault(self, slot: int) -> bool:
        return any([s.prefault(slot) for s in self.stages])

    def kvs(self, slot: int) -> list[StageKV]:
        """Every stage's KV of one slot."""
        return [stage.kvs[slot] for stage in self.stages]


def in_process(pipeline: Pipeline) -> LocalPipeline:
    """The pipeline as stages in this process, for code that drives them directly (benches, tests)."""
    assert isinstance(pipeline, LocalPipeline), "the stages run in other processes"
    return pipeline

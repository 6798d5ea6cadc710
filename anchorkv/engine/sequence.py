"""A sequence: one request's journey through the scheduler, and the events it streams back."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from torch import Tensor

from anchorkv.cache.prefix_cache import CachePlan, CacheReport, CacheRequest, Restore
from anchorkv.engine.plan import RequestPlan
from anchorkv.engine.sampling import Sampler, SamplingParams, TokenLogprob
from anchorkv.engine.text_stream import TextStream


@dataclass(frozen=True)
class Delta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens sampled since the last Delta, when asked for


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    prompt_ms: float
    predicted_ms: float
    token_ids: list[int] = field(default_factory=list)
    cache: CacheReport = field(default_factory=CacheReport)
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when asked for

    def timings(self) -> dict[str, Any]:
        """llama.cpp's `timings` object."""
        prompt_n = self.prompt_tokens - self.cached_tokens
        return {
            "cache_n": self.cached_tokens,
            "prompt_n": prompt_n,
            "prompt_ms": round(self.prompt_ms, 3),
            "prompt_per_second": prompt_n / self.prompt_ms * 1000 if self.prompt_ms else 0.0,
            "predicted_n": self.completion_tokens,
            "predicted_ms": round(self.predicted_ms, 3),
            "predicted_per_second": self.completion_tokens / self.predicted_ms * 1000 if self.predicted_ms else 0.0,
        }


@dataclass(frozen=True)
class Failed:
    """The sequence was given up: the engine raised this while running it."""

    error: Exception


Event = Delta | Finished | Failed


class Status(Enum):
    WAITING = "waiting"  # submitted, not yet given a slot
    PREFILLING = "prefilling"  # restored from the cache; prefill pieces left
    DECODING = "decoding"  # a sampled token to run at `pos`
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Written by the scheduler only. Its events go out through `emit`, called on the engine's thread."""

    id: str
    prompt: list[int]
    params: SamplingParams
    cache_req: CacheRequest
    emit: Callable[[Event], None]
    cancel: threading.Event
    submitted: float
    keep_reply: bool = True  # record the reply for the next turn
    status: Status = Status.WAITING
    slot: int | None = None
    cplan: CachePlan | None = None
    restored: Restore = field(default_factory=Restore)
    plan: RequestPlan | None = None
    pieces: deque[tuple[int, int]] = field(default_factory=deque)  # prefill pieces [a, b) still to run
    kept_logits: dict[int, Tensor] = field(default_factory=dict)  # before each turn start prefilled, for the cache
    logits: Tensor | None = None  # [vocab] to sample the next token from
    sampler: Sampler | None = None
    stream: TextStream | None = None
    out: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    sent: int = 0  # logprobs already carried by a Delta
    token: int = -1  # the sampled token that the next decode step runs, at position pos
    pos: int = 0
    admitted: float = 0.0  # when it got its slot
    prefilled: float = 0.0  # when the prompt's logits were ready
    first_logits: Tensor | None = None  # the prompt's last position's
    recorded: bool = False  # the prompt's KV is in the cache

    @property
    def done(self) -> bool:
        return self.status is Status.FINISHED

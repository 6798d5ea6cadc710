"""The per-request plan, and the message that carries tensors and plans from one stage to the next."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from anchorkv.model.transformer import Logits


@dataclass(frozen=True)
class RequestPlan:
    request_id: str
    prompt_len: int
    restore_to: int = 0  # positions [0, restore_to) come from the prefix cache, not from prefill
    record_at: tuple[int, ...] = ()  # prompt boundaries whose KV the cache keeps after prefill


@dataclass(frozen=True)
class Span:
    """One sequence's rows in a stage message: positions [start, start + length) of the KV in `slot`.
    same = (slot, n): in a decode step, that slot's KV holds this one's first n positions bit for bit, so the
    attention may read them there, once for both ((-1, 0): none)."""

    slot: int
    start: int
    length: int
    plan: RequestPlan  # the sideband
    same: tuple[int, int] = (-1, 0)


@dataclass(frozen=True)
class StageInput:
    """What crosses from one stage to the next: tensors in, tensors out, each sequence's span and plan
    alongside. A prefill piece is one span; a decode step is one span of length 1 per sequence."""

    x: Tensor  # token ids [T] into stage 0, hidden states [T, D] into later stages
    spans: tuple[Span, ...]
    decode: bool = False  # a decode step (one sampled token per sequence), not prefill
    logits: Logits = "last"

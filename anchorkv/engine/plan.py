"""The per-request plan: decided once, then carried with the tensors to every stage (the sideband)."""

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
class StageInput:
    """What crosses from one stage to the next: tensors in, tensors out, plan alongside."""

    x: Tensor  # token ids [T] into stage 0, hidden states [T, D] into later stages
    start: int  # absolute position of x[0]
    plan: RequestPlan
    decode: bool = False  # a decode step (one sampled token), not prefill
    logits: Logits = "last"

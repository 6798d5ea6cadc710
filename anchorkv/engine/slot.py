"""A KV slot: one place in every stage's KV pool, and what it holds between the sequences that use it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from anchorkv.cache.prefix_cache import CachePlan
from anchorkv.engine.sequence import Sequence

log = logging.getLogger("anchorkv.engine")


@dataclass
class PendingReply:
    """A finished reply to record for the next turn: how to render that turn's beginning, then its tokens
    and chat boundaries, and where their prefill began (None until rendered)."""

    plan: CachePlan
    render: Callable[[], tuple[list[int], list[int]]]
    tokens: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    began: int | None = None

    def prepare(self) -> bool:
        try:
            self.tokens, self.ends = self.render()
        except ValueError as e:  # the template refused the reply: there is no next turn to prepare
            log.warning("not keeping the reply: %s", e)
            return False
        return True


@dataclass(eq=False)
class Slot:
    """[0, valid) of the slot's KV is reusable KV of `tokens`, prefilled with cuts at `ends`, under `salt`.
    `seq` is the sequence running in it; `reply` the background work left for it after its last one."""

    index: int
    tokens: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    valid: int = 0
    salt: str | None = None
    seq: Sequence | None = None
    reply: PendingReply | None = None
    used: float = 0.0  # when a sequence last left it

    def hold(self, tokens: list[int], ends: list[int], valid: int, salt: str | None) -> None:
        self.tokens, self.ends, self.valid, self.salt = tokens, ends, valid, salt

    def clear(self) -> None:
        self.hold([], [], 0, None)

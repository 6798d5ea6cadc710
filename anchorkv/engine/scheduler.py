"""What runs in a scheduler step, and where a sequence goes: pure policy, no tensors and no I/O.

A step runs every decoding sequence's next token together (one row each), plus prefill pieces of the
prefilling sequences, oldest first, up to a token budget (the engine's: one piece's worth): at least one
piece, so a long prompt advances, and never more than the budget otherwise, so the decoding streams wait
at most about one piece a step."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from anchorkv.cache.policy import common_prefix
from anchorkv.engine.sequence import Sequence, Status
from anchorkv.engine.slot import Slot


@dataclass
class StepPlan:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, tuple[int, int]]] = field(default_factory=list)  # in order, [a, b) each
    ready: list[Sequence] = field(default_factory=list)  # restored whole, with logits: nothing to run

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill or self.ready)


def schedule(running: Iterable[Sequence], budget: int) -> StepPlan:
    """running: in admission order."""
    plan = StepPlan()
    used, full = 0, False
    for seq in running:
        if seq.status is Status.DECODING:
            plan.decode.append(seq)
        elif seq.status is Status.PREFILLING and not seq.pieces:
            plan.ready.append(seq)
        elif seq.status is Status.PREFILLING and not full:
            for a, b in seq.pieces:
                if used and used + (b - a) > budget:
                    full = True  # later sequences' pieces wait too: the oldest prompt finishes first
                    break
                plan.prefill.append((seq, (a, b)))
                used += b - a
    return plan


def pick_slot(prompt: list[int], salt: str | None, slots: Iterable[Slot]) -> Slot | None:
    """A free slot for the prompt: the one whose KV shares the longest prefix with it, else the least
    recently used. None when every slot runs a sequence."""
    free = [s for s in slots if s.seq is None]
    if not free:
        return None

    def shared(s: Slot) -> int:
        if s.salt != salt or not s.valid:
            return 0
        return common_prefix(prompt, s.tokens[: s.valid])

    return max(free, key=lambda s: (shared(s), -s.used))


def should_wait(prompt: list[int], restorable: int, prefilling: Iterable[Sequence], chunk: int) -> bool:
    """Cache-aware admission: hold a prompt back while a sequence still prefills at least `chunk` more of
    their shared prefix than the cache could restore now; once recorded, the prompt restores it instead
    of computing it a second time."""
    return any(common_prefix(prompt, other.prompt) >= restorable + chunk for other in prefilling)


def same_prefixes(rows: int, shared: Callable[[int, int], int]) -> list[tuple[int, int]]:
    """For each of a decode step's rows, (a, n): an earlier row a whose KV holds this row's first n positions
    bit for bit (`shared(a, b)`: how far), or (-1, 0). Each points at the earliest row holding those bits, so
    all the rows that share a prefix read one copy of it."""
    out: list[tuple[int, int]] = []
    for b in range(rows):
        a, n = max(((a, shared(a, b)) for a in range(b)), key=lambda p: (p[1], -p[0]), default=(-1, 0))
        while n and out[a][0] >= 0 and out[a][1] >= n:
            a = out[a][0]
        out.append((a, n) if n else (-1, 0))
    return out


def forwards(prefill: list[tuple[Sequence, tuple[int, int]]], rows: int) -> list[tuple[Sequence, tuple[int, int], int]]:
    """A step's prefill pieces as forwards: (sequence, [a, b), pieces). A sequence's consecutive pieces go in
    one forward of at most `rows` rows (0: each alone) unless a piece ends where a turn starts, whose logits
    are kept. Exact only where each row's bits do not depend on the rows beside it (StageInfo.prefill_rows)."""
    out: list[tuple[Sequence, tuple[int, int], int]] = []
    for seq, (a, b) in prefill:
        if out:
            last, (a0, b0), n = out[-1]
            if last is seq and b0 == a and b - a0 <= rows and b0 not in seq.cache_req.turn_starts:
                out[-1] = (seq, (a0, b), n + 1)
                continue
        out.append((seq, (a, b), 1))
    return out

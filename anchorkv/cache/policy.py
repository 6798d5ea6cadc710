"""Pure cache policy: which prompt boundaries to record and to what tier. No I/O, no tensors.

The server and the simulator call these same functions on plain token lists.

Positions, the words used for them everywhere:
- a position p is a token count: "KV at p" is the KV of tokens [0, p);
- chat boundaries (`chat_ends`): where a rendered message ends, or past the assistant's header where that
  turn follows; turn starts (`turn_starts`) are those past an assistant header, where a prompt can end;
- cuts (`cuts`): where prefill cuts a prompt: its chat boundaries, and every C tokens after each (counted
  from 0 before the first), except a grid point less than TAIL_MERGE tokens before the next boundary, so
  a message's short remainder joins the piece before it;
- a chunk covers [start, end) between two cuts; chain points (every S tokens after each chat boundary, S a
  multiple of C) chain chunks by key, and a chunk ending anywhere else is a tail hanging off the last
  chain point before it;
- boundaries (`Boundary`): positions a request asks to record (chat boundaries, anchors, the scope's
  boundary, the whole prompt), each rounded down to the last cut (`cut_floor`) when recorded.

Which cuts lie at or before a position depends only on the chat boundaries at or before it and the one
after it, the end of the message it falls in. In exact mode every restorable boundary is a cut, so
rounding a boundary down to a cut lands on a chunk end of the chain. (A forward reads every weight,
however few its rows: that is why short remainders merge.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_AUTO_WINDOW = 30
TAIL_MERGE = 64  # a grid point this close to the next chat boundary is no cut
MAX_ANCHORS = 4

# Restore kinds, strongest first. "exact": the same prompt again; "full": an earlier whole prompt (or
# prompt plus reply) that this one extends; "generic": grid points only.
KINDS = ("exact", "full", "anchor", "chat", "auto", "fixed", "generic")
# Eviction classes: a chunk on the way to an anchor outlives one on the way to a chat boundary or a prefix
# shared with recent prompts (auto), which outlives a volatile tail.
RETENTION = {"anchor": 2, "chat": 1, "auto": 1}


class PolicyError(ValueError):
    """A bad scope or window; the message lists the accepted forms."""


@dataclass(frozen=True)
class Scope:
    """What is written to disk: off, full, auto (window = recent prompts), or the first `tokens` tokens.
    With `sessions` (auto+), auto also writes whole a prompt that continues one of its window's prompts."""

    mode: str  # "off" | "full" | "auto" | "fixed"
    window: int = DEFAULT_AUTO_WINDOW
    tokens: int = 0
    sessions: bool = False

    def __str__(self) -> str:
        if self.mode == "auto":
            return f"auto{'+' if self.sessions else ''}:{self.window}"
        if self.mode == "fixed":
            return str(self.tokens)
        return self.mode


SCOPE_FORMS = "off, full, auto, auto:N (N >= 1 recent prompts), auto+, auto+:N or N (a token count >= 1)"


def parse_scope(text: str, window: int | None = None) -> Scope:
    """Parse `off|full|auto|auto:N|auto+|auto+:N|N`; `window` overrides auto's window (lucebox's
    prefix_cache.window)."""
    s = text.strip().lower()
    if window is not None and window < 1:
        raise PolicyError(f"window must be >= 1, got {window}")
    if s in ("off", "full"):
        return Scope(s)
    if m := re.fullmatch(r"auto(\+?)(?::(\d+))?", s):
        n = int(m.group(2)) if m.group(2) else DEFAULT_AUTO_WINDOW
        if n < 1:
            raise PolicyError(f"bad scope {text!r}: the auto window must be >= 1; accepted: {SCOPE_FORMS}")
        return Scope("auto", window if window is not None else n, sessions=bool(m.group(1)))
    if s.isdigit() and int(s) >= 1:
        return Scope("fixed", tokens=int(s))
    raise PolicyError(f"bad scope {text!r}; accepted: {SCOPE_FORMS}")


def align_down(pos: int, unit: int) -> int:
    return pos - pos % unit


def step_budget(unit: int) -> int:
    """Prefill tokens a scheduler step may run: the longest piece the cuts make (a unit plus a message's
    remainder shorter than TAIL_MERGE)."""
    return unit + TAIL_MERGE - 1


def cut_floor(pos: int, unit: int, chat_ends: Sequence[int] = (), merge: int = TAIL_MERGE) -> int:
    """The last cut at or before pos: the last chat boundary, plus whole units that keep `merge` tokens
    before the next one."""
    last = chat_floor(pos, chat_ends)
    end = min((e for e in chat_ends if e > last), default=None)
    limit = pos if end is None else min(pos, end - merge)
    return last + align_down(max(limit - last, 0), unit)


def cuts(upto: int, unit: int, chat_ends: Sequence[int] = (), merge: int = TAIL_MERGE) -> list[int]:
    """Every cut in (0, upto], in order: each chat boundary, and every `unit` tokens after the last one
    up to `merge` tokens before the next one (all of them after the last)."""
    out: list[int] = []
    a = 0
    for e in sorted({e for e in chat_ends if e > 0}):
        out += range(a + unit, min(e - merge, upto) + 1, unit)
        if e > upto:
            return out
        out.append(e)
        a = e
    return out + list(range(a + unit, upto + 1, unit))


def restorable_limit(n_prompt: int, unit: int, chat_ends: Sequence[int] = (), merge: int = TAIL_MERGE) -> int:
    """The furthest restore for an n-token prompt: n - 1 (the last token is always prefilled for its
    logits), rounded down to a cut."""
    return cut_floor(max(n_prompt - 1, 0), unit, chat_ends, merge)


def common_prefix(a: Sequence[int], b: Sequence[int], block: int = 256) -> int:
    """Length of the longest common prefix. Equal blocks are compared as slices (at C speed), so the
    per-token loop runs only inside the first block that differs."""
    n = min(len(a), len(b))
    i = 0
    while i + block <= n and a[i : i + block] == b[i : i + block]:
        i += block
    while i < n and a[i] == b[i]:
        i += 1
    return i


def chat_floor(pos: int, chat_ends: Sequence[int]) -> int:
    """The last chat boundary at or before pos (0 when none)."""
    return max((e for e in chat_ends if e <= pos), default=0)


def shared_cut(a: Sequence[int], a_ends: Sequence[int], b: Sequence[int], b_ends: Sequence[int], unit: int) -> int:
    """How far KV prefilled for `a` serves `b` bit for bit: the last cut within their common prefix up to
    which both were cut alike."""
    x = common_prefix(a, b)
    shared = 0
    for p, q in zip(cuts(x, unit, a_ends), cuts(x, unit, b_ends), strict=False):
        if p != q:
            break
        shared = p
    return shared


def auto_boundary(
    prompt: Sequence[int], history: Sequence[Sequence[int]], window: int, chat_ends: Sequence[int]
) -> int:
    """lucebox auto:N: the longest common token prefix with any of the last `window` prompts, aligned
    down to a chat boundary. 0 when nothing is shared. A prompt without chat boundaries (a completions
    prompt, a block trace) keeps the common prefix itself; the cache aligns it to its grid like any boundary."""
    recent = history[-window:] if window else []
    lcp = max((common_prefix(prompt, h) for h in recent), default=0)
    return chat_floor(lcp, chat_ends) if chat_ends else lcp


def continues(prompt: Sequence[int], recent: Sequence[Sequence[int]]) -> bool:
    """Whether one of the recent prompts is a prefix of this one."""
    return any(len(h) <= len(prompt) and common_prefix(prompt, h) == len(h) for h in recent)


@dataclass(frozen=True)
class AnchorVerdict:
    tokens: int
    accepted: bool
    reason: str | None = None  # why it was ignored

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"tokens": self.tokens, "accepted": self.accepted}
        if self.reason:
            d["reason"] = self.reason
        return d


def judge_anchors(anchors: Sequence[int], has_key: bool, n_prompt: int, whole: bool = False) -> list[AnchorVerdict]:
    """Skippy's conservative rules: ignored without prompt_cache_key, when zero, or when not a strict
    prefix of the prompt (with `whole`, the whole prompt counts too: a cache_control mark on the last
    message). Negative values are refused earlier, as bad input."""
    out = []
    for a in anchors:
        if not has_key:
            out.append(AnchorVerdict(a, False, "prompt_cache_key is required for anchors"))
        elif a == 0:
            out.append(AnchorVerdict(a, False, "zero-length anchor"))
        elif a > n_prompt or (a == n_prompt and not whole):
            out.append(AnchorVerdict(a, False, f"not a strict prefix of the {n_prompt}-token prompt"))
        else:
            out.append(AnchorVerdict(a, True))
    return out


@dataclass(frozen=True)
class Boundary:
    pos: int  # exact token count as asked (anchor count, message end, ...)
    kind: str  # one of KINDS, or "grid"


@dataclass(frozen=True)
class RecordPlan:
    """What one request records: labelled boundaries (RAM) and how far its chain goes to disk."""

    boundaries: tuple[Boundary, ...]
    disk_upto: int  # chunks ending at or before this go to disk too (0: none)
    scope_boundary: int  # the auto / fixed boundary before alignment (0 when the scope has none)
    reply_to_disk: bool = False  # the reply, recorded for the next turn, goes to disk too (full, auto+)


def plan_records(
    prompt: Sequence[int],
    chat_ends: Sequence[int],
    anchors: Sequence[int],
    scope: Scope,
    history: Sequence[Sequence[int]],
    min_tokens: int,
    full_at: int | None = None,
) -> RecordPlan:
    """Boundaries a request records, before alignment: chat ends, accepted anchors, the scope boundary
    and the full prompt. Grid points come with the chain itself."""
    n = len(prompt)
    bounds = [Boundary(e, "chat") for e in chat_ends if 0 < e < n]
    bounds += [Boundary(a, "anchor") for a in anchors]
    scope_b, session = 0, False
    if scope.mode == "auto":
        scope_b = auto_boundary(prompt, history, scope.window, chat_ends)
        # auto+: a prompt that holds a recent prompt whole is the next turn of a session, written whole
        session = scope.sessions and continues(prompt, history[-scope.window :])
    elif scope.mode == "fixed":
        scope_b = min(scope.tokens, n)  # a shorter prompt is written whole: it may be sent again
    if scope_b:
        bounds.append(Boundary(scope_b, scope.mode))
    bounds.append(Boundary(n if full_at is None else full_at, "full"))
    disk = {"off": 0, "full": n, "auto": n if session else scope_b, "fixed": scope_b}[scope.mode]
    # anchors are kept on disk unless the scope is off
    if scope.mode != "off" and anchors:
        disk = max(disk, *anchors)
    if disk < min_tokens:
        disk = 0
    return RecordPlan(tuple(bounds), disk, scope_b, reply_to_disk=scope.mode == "full" or session)


@dataclass(frozen=True)
class EvictionCandidate:
    key: bytes
    retention: int  # RETENTION class; higher is kept longer
    last_used: float


def eviction_order(leaves: Sequence[EvictionCandidate]) -> list[bytes]:
    """Leaves in the order they are evicted: lowest retention class first, then least recently used."""
    return [leaf.key for leaf in sorted(leaves, key=lambda leaf: (leaf.retention, leaf.last_used))]

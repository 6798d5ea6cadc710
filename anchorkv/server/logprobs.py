"""OpenAI's `logprobs` objects, built from the engine's per-token log-probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from anchorkv.engine.sampling import TokenLogprob
from anchorkv.model.tokenizer import TextTokenizer


def chat_logprobs(entries: Sequence[TokenLogprob], tok: TextTokenizer) -> dict[str, Any]:
    """The chat form: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        raw = tok.token_bytes(token)
        return {"token": raw.decode(errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [one(e.token, e.logprob) | {"top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]}


def completion_logprobs(entries: Sequence[TokenLogprob], tok: TextTokenizer, offset: int) -> dict[str, Any]:
    """The legacy completions form: parallel lists, with each token's character offset in the text, counted
    from offset (the length of the text before these tokens)."""
    texts = [tok.token_bytes(e.token).decode(errors="replace") for e in entries]
    starts = [offset]
    for text in texts[:-1]:
        starts.append(starts[-1] + len(text))
    return {
        "tokens": texts,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{tok.token_bytes(t).decode(errors="replace"): lp for t, lp in e.top} for e in entries],
        "text_offset": starts,
    }

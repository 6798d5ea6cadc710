"""Constrained decoding: only tokens that keep the output inside a grammar can be sampled (llguidance).

A grammar is llguidance's own form (`llguidance.LLMatcher.grammar_from_json_schema`, `grammar_from_lark`,
`llguidance.grammar_from`), built and checked by the server; the engine only runs it token by token.
"""

from __future__ import annotations

import torch
from llguidance import LLMatcher, LLTokenizer
from torch import Tensor

from anchorkv.model.tokenizer import TextTokenizer

_BITS = torch.arange(8, dtype=torch.uint8)


class GrammarError(ValueError):
    """A grammar llguidance cannot run: its message says why."""


def grammar_tokenizer(tokenizer: TextTokenizer, vocab_size: int) -> LLTokenizer:
    """llguidance's view of our vocabulary (about 0.25 s for 49k tokens; build once per engine)."""
    return LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=list(tokenizer.eos_token_ids))


def check_grammar(grammar: str) -> str | None:
    """Why the grammar cannot run, or None when it can."""
    return LLMatcher.validate_grammar(grammar) or None


class Constraint:
    """One generation's place in its grammar. End-of-sequence is allowed exactly where the grammar may end."""

    def __init__(self, tokenizer: LLTokenizer, grammar: str) -> None:
        self._matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())

    def first_mask_error(self) -> str | None:
        """Why the grammar fails on its first token (a grammar can validate yet be too big to run), or None."""
        self._matcher.compute_bitmask()
        return self._matcher.get_error() if self._matcher.is_error() else None

    def allow(self, logits: Tensor) -> Tensor:
        """logits: [vocab]. Returns them with every token the grammar forbids next at -inf."""
        # bit j of byte i of the mask allows token 8 i + j
        mask = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.uint8)
        allowed = (mask[:, None] >> _BITS).bitwise_and_(1).view(-1)[: logits.shape[-1]]
        return logits.masked_fill(allowed.to(logits.device) == 0, float("-inf"))

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise GrammarError(self._matcher.get_error() or f"token {token} is outside the grammar")

    @property
    def done(self) -> bool:
        """The grammar admits no further token: the output is complete."""
        return self._matcher.is_stopped()

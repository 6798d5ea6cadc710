"""Incremental detokenization with stop strings.

Text is released only when it can no longer change: not while it ends in an incomplete UTF-8 sequence,
and not while its tail could still grow into a stop string.
"""

from __future__ import annotations

from anchorkv.model.tokenizer import TextTokenizer


class TextStream:
    def __init__(self, tokenizer: TextTokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far, cut at a stop string once one is found
        self.emitted = 0  # len of text already released
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the newly released text."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        search_from = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := text.find(s, search_from)) >= 0]
        if hits:
            self.text, self.stopped = text[: min(hits)], True
            return self._release(len(self.text))
        self.text = text
        return self._release(len(text) - self._held_back(text))

    def flush(self) -> str:
        return self._release(len(self.text))

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self, upto: int) -> str:
        out = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return out

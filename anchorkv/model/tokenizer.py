"""Text <-> token ids, from an HF-style folder's tokenizer.json and tokenizer_config.json."""

from __future__ import annotations

import functools

import json
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders

# texts between special tokens whose encoding is kept (a chat's messages, its tools), up to this many tokens
# in all: 12 bytes a token as an int32 array (as Python lists of ints and offset tuples, ~150)
SEGMENT_MEMO_TOKENS = 1 << 21
Encoding = tuple[list[int], list[tuple[int, int]]]


MARK_BASE = 0xF0000  # Supplementary Private Use Area-A: the marks of added tokens met in content


class TextTokenizer:
    def __init__(self, folder: Path, eos_token_ids: tuple[int, ...] = ()) -> None:
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.chat_template: str | None = cfg.get("chat_template")
        self.bos_token: str | None = _token_text(cfg.get("bos_token"))
        self.eos_token: str | None = _token_text(cfg.get("eos_token"))
        self.add_bos: bool = bool(cfg.get("add_bos_token", False)) and self.bos_token is not None
        eos = set(eos_token_ids)
        if self.eos_token is not None and (i := self._tok.token_to_id(self.eos_token)) is not None:
            eos.add(i)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self._byte_level = isinstance(self._tok.decoder, decoders.ByteLevel)
        self._split = _added_token_split(self._tok)
        self._added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        # an added token's text inside message content stands in as one private-use character (its mark)
        # through rendering, and is encoded as plain text: content can never forge a control token
        self._marks = {t: chr(MARK_BASE + i) for i, t in enumerate(sorted(self._added))} if self._split else {}
        self._unmarks = {m: t for t, m in self._marks.items()}
        self._mark_split = re.compile("([" + "".join(self._unmarks) + "])") if self._marks else None
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()  # piece -> [n, 3] int32: id, start, end
        self._memo_tokens = 0
        self._memo_lock = threading.Lock()
        # the most characters one token stands for (a piece's length bounds it: one character per byte in a
        # byte-level vocabulary, more for a <0xNN> byte), so a text longer than ctx times this cannot fit;
        # found here, not on the first request, which it delayed by some 150 ms
        self.longest_token_chars = max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def to_json(self) -> str:
        """The tokenizers library's own serialization (what tokenizer.json holds)."""
        return self._tok.to_str()

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> Encoding:
        """Token ids and each token's [start, end) character span in text. Special tokens are parsed."""
        if self._split is None:
            enc = self._tok.encode(text, add_special_tokens=False)
            ids, offsets = list(enc.ids), list(enc.offsets)
        else:
            ids, offsets = self._encode_segments(self._split, text)
        bos = self._tok.token_to_id(self.bos_token) if self.add_bos and self.bos_token else None
        if bos is not None and not text.startswith(self.bos_token or ""):
            ids, offsets = [bos, *ids], [(0, 0), *offsets]
        return ids, offsets

    def _encode_segments(self, split: re.Pattern[str], text: str) -> Encoding:
        """The library cuts text at added tokens and encodes each piece between them on its own, so the
        pieces can be encoded apart and remembered: a chat that grows by a turn encodes only the new turn."""
        parts = split.split(text)  # odd indices: added tokens
        pieces = {p for p in parts[::2] if p}
        with self._memo_lock:
            known = {p: self._memo[p] for p in pieces if p in self._memo}
        new = [p for p in pieces if p not in known]
        marked = [p for p in new if self._mark_split is not None and self._mark_split.search(p)]
        plain = [p for p in new if p not in set(marked)]
        for p, e in zip(plain, self._tok.encode_batch(plain, add_special_tokens=False), strict=True):
            known[p] = _packed(e.ids, e.offsets)
        for p in marked:
            known[p] = _packed(*self._encode_piece(p))
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        at = 0
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self._added[part])
                offsets.append((at, at + len(part)))
            elif part:
                piece = known[part]
                ids += piece[:, 0].tolist()
                offsets += zip((piece[:, 1] + at).tolist(), (piece[:, 2] + at).tolist(), strict=True)
            at += len(part)
        with self._memo_lock:
            for p in pieces:
                if p not in self._memo:
                    self._memo_tokens += len(known[p])
                self._memo[p] = known[p]
                self._memo.move_to_end(p)
            while self._memo_tokens > SEGMENT_MEMO_TOKENS:
                self._memo_tokens -= len(self._memo.popitem(last=False)[1])
        return ids, offsets

    def mark_specials(self, text: str) -> str:
        """text with each added token's text replaced by its mark (unchanged where pieces cannot be encoded
        apart: then the library parses them, as before)."""
        if self._split is None or not self._split.search(text):
            return text
        return self._split.sub(lambda m: self._marks[m.group(0)], text)

    def unmark(self, text: str) -> str:
        """text with every mark back as the added token's text."""
        if self._mark_split is None or not self._mark_split.search(text):
            return text
        return self._mark_split.sub(lambda m: self._unmarks[m.group(0)], text)

    @functools.cached_property
    def _plain(self) -> Tokenizer:
        """The same tokenizer, reading added tokens' text as plain text."""
        tok = Tokenizer.from_str(self._tok.to_str())
        tok.encode_special_tokens = True
        return tok

    def _encode_piece(self, piece: str) -> Encoding:
        """A piece between added tokens; marks in it are encoded as their token's text, as plain text."""
        if self._mark_split is None or not self._mark_split.search(piece):
            e = self._tok.encode(piece, add_special_tokens=False)
            return list(e.ids), list(e.offsets)
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        at = 0
        for i, part in enumerate(self._mark_split.split(piece)):
            if i % 2:  # a mark: one character of the piece, the tokens of its token's text
                plain = self._plain.encode(self._unmarks[part], add_special_tokens=False).ids
                ids += plain
                offsets += [(at, at + 1)] * len(plain)
            elif part:
                e = self._tok.encode(part, add_special_tokens=False)
                ids += e.ids
                offsets += [(at + a, at + b) for a, b in e.offsets]
            at += len(part)
        return ids, offsets

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for; a byte-level token can hold part of a UTF-8 character."""
        piece = self._tok.id_to_token(token_id) or ""
        if self._byte_level and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        if m := _BYTE_FALLBACK.fullmatch(piece):  # sentencepiece's <0xNN>
            return bytes([int(m[1], 16)])
        return piece.replace("\u2581", " ").encode()


def _added_token_split(tok: Tokenizer) -> re.Pattern[str] | None:
    """A pattern that cuts text where the library does, at added tokens (longest first, as its leftmost-
    longest match), or None where pieces would not encode apart exactly: a normalizer, or an added token that
    strips the whitespace beside it or matches only whole words."""
    added = list(tok.get_added_tokens_decoder().values())
    if not added or tok.normalizer is not None or any(t.lstrip or t.rstrip or t.single_word for t in added):
        return None
    contents = sorted({t.content for t in added}, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, contents)) + ")")


def _token_text(tok: Any) -> str | None:
    if isinstance(tok, dict):  # {"content": "<s>", ...} in older tokenizer_config.json files
        return tok.get("content")
    return tok


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: each byte is spelled as one printable character (printable
    Latin-1 bytes as themselves, the other 68 as the code points from 256 on, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


_BYTE_OF_CHAR = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _packed(ids: list[int], offsets: list[tuple[int, int]]) -> np.ndarray:
    """A piece's encoding as one [n, 3] int32 array: id, start, end."""
    out = np.empty((len(ids), 3), dtype=np.int32)
    if ids:
        out[:, 0] = ids
        out[:, 1:] = offsets
    return out

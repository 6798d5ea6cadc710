"""Text <-> token ids, from an HF-style folder's tokenizer.json and tokenizer_config.json."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders


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

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def to_json(self) -> str:
        """The tokenizers library's own serialization (what tokenizer.json holds)."""
        return self._tok.to_str()

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's [start, end) character span in text. Special tokens are parsed."""
        enc = self._tok.encode(text, add_special_tokens=False)
        ids, offsets = list(enc.ids), list(enc.offsets)
        if self.add_bos and not text.startswith(self.bos_token or ""):
            bos = self._tok.token_to_id(self.bos_token or "")
            ids, offsets = [bos, *ids], [(0, 0), *offsets]
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

"""Content-addressed chunk keys.

The KV of positions [a, b) depends only on tokens [0, b), so a chunk is named by its parent's key and its
own token ids: key = blake2b(parent || tokens[a:b]), rooted in a namespace that covers everything else that
changes the KV values (weights, dtype, layer range, rope and context parameters, cache_salt, and in exact
mode the prefill chunk, thread count, device and torch version).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

KEY_BYTES = 16


@dataclass(frozen=True)
class Namespace:
    """One stage's cache namespace. `root` seeds that stage's key chains."""

    fields: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, **fields: Any) -> Namespace:
        return cls(tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in fields.items())))

    @property
    def root(self) -> bytes:
        return hashlib.blake2b(json.dumps(self.fields).encode(), digest_size=KEY_BYTES).digest()

    @property
    def id(self) -> str:
        return self.root.hex()

    def salted(self, salt: str | None) -> Namespace:
        return self if not salt else Namespace((*self.fields, ("cache_salt", json.dumps(salt))))


def chunk_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(parent + np.asarray(tokens, dtype="<i4").tobytes(), digest_size=KEY_BYTES).digest()


def chain_keys(root: bytes, tokens: Sequence[int], points: Sequence[int]) -> list[bytes]:
    """Keys of the chain chunks [0, p0), [p0, p1), ... A key fixes every chunk end before it, so two
    prompts share a key only if their chains were cut alike up to there."""
    keys, parent, a = [], root, 0
    arr = np.asarray(tokens[: points[-1]] if points else (), dtype="<i4")
    for b in points:
        parent = hashlib.blake2b(parent + arr[a:b].tobytes(), digest_size=KEY_BYTES).digest()
        keys.append(parent)
        a = b
    return keys

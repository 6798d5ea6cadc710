"""Recent prompts per namespace, for the auto scope. Kept on disk so auto survives a restart.

The file is rewritten after every prompt, so it is binary and each prompt is packed once, when added:
a snapshot is then a join of bytes, not a serialization of every token of the window (a window of long
prompts as JSON took 25-75 ms of the engine thread per request).

Layout: MAGIC, then per namespace: u16 name length, name (ascii), u32 prompt count, and per prompt:
u32 token count, that many little-endian u32 token ids.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from pathlib import Path

import numpy as np

MAX_WINDOW = 64
MAX_TOKENS = 8192  # a stored prompt is cut here; auto only needs its beginning
MAGIC = b"anchorkv-history-2\n"
FILE_NAME = "history.bin"


class History:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        # per namespace, the recent prompts, each with its packed form (what the file holds)
        self._prompts: dict[str, deque[tuple[list[int], bytes]]] = {}
        if path is not None and path.exists():
            try:
                for ns, packed in _parse(path.read_bytes()).items():
                    for p in packed:
                        self._append(ns, np.frombuffer(p, "<u4").tolist(), p)
            except (ValueError, struct.error, UnicodeDecodeError):
                self._prompts = {}

    def namespaces(self) -> list[str]:
        return list(self._prompts)

    def recent(self, namespace: str) -> list[list[int]]:
        return [p for p, _ in self._prompts.get(namespace, ())]

    def add(self, namespace: str, prompt: list[int]) -> None:
        kept = prompt[:MAX_TOKENS]
        self._append(namespace, kept, np.asarray(kept, "<u4").tobytes())

    def _append(self, namespace: str, prompt: list[int], packed: bytes) -> None:
        self._prompts.setdefault(namespace, deque(maxlen=MAX_WINDOW)).append((prompt, packed))

    def snapshot(self) -> bytes:
        parts = [MAGIC]
        for ns, entries in self._prompts.items():
            name = ns.encode("ascii")
            parts.append(struct.pack("<H", len(name)) + name + struct.pack("<I", len(entries)))
            for _, p in entries:
                parts += [struct.pack("<I", len(p) // 4), p]
        return b"".join(parts)

    def save(self, snapshot: bytes) -> None:
        """Write atomically (called on the disk writer thread)."""
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(snapshot)
        os.replace(tmp, self.path)


def _parse(data: bytes) -> dict[str, list[bytes]]:
    if not data.startswith(MAGIC):
        raise ValueError("not a history file")
    out: dict[str, list[bytes]] = {}
    at = len(MAGIC)
    while at < len(data):
        (name_len,) = struct.unpack_from("<H", data, at)
        ns = data[at + 2 : at + 2 + name_len].decode("ascii")
        at += 2 + name_len
        (count,) = struct.unpack_from("<I", data, at)
        at += 4
        for _ in range(count):
            (n,) = struct.unpack_from("<I", data, at)
            if at + 4 + 4 * n > len(data):
                raise ValueError("truncated history file")
            out.setdefault(ns, []).append(data[at + 4 : at + 4 + 4 * n])
            at += 4 + 4 * n
    return out

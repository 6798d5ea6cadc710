"""Recent prompts per namespace, for the auto scope. Kept on disk so auto survives a restart.

The file is rewritten after every prompt, so it is binary and each prompt is packed once, when added:
a snapshot is then a join of bytes, not a serialization of every token of the window on the engine's
thread.

Layout: MAGIC, a 16-byte blake2b checksum of the rest, then per namespace: u16 name length, name (a
namespace id, hex), u32 prompt count, and per prompt: u32 token count, that many little-endian u32 token ids.
A file that fails any check (magic, checksum, names, token ids) is set aside as `history.bin.bad` and the
window starts empty: a bad file is a miss, never a failed start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections import deque
from pathlib import Path

import numpy as np

MAX_WINDOW = 64
MAX_TOKENS = 8192  # a stored prompt is cut here; auto only needs its beginning
MAGIC = b"anchorkv-history-3\n"
FILE_NAME = "history.bin"
SUM_BYTES = 16
NAME_CHARS = 32  # a namespace id: 16 bytes in hex

log = logging.getLogger("anchorkv.cache")


class History:
    def __init__(self, path: Path | None, vocab_size: int = 2**31) -> None:
        self.path = path
        # per namespace, the recent prompts, each with its packed form (what the file holds)
        self._prompts: dict[str, deque[tuple[list[int], bytes]]] = {}
        if path is None or not os.path.lexists(path):
            return
        try:
            for ns, packed in parse_file(path, vocab_size).items():
                for p in packed:
                    self._append(ns, np.frombuffer(p, "<u4").tolist(), p)
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
            self._prompts = {}
            log.warning("[cache] %s is unusable (%s): set aside, the auto window starts empty", path, e)
            try:
                os.replace(path, path.with_name(path.name + ".bad"))
            except OSError:
                pass

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
        parts = []
        for ns, entries in self._prompts.items():
            name = ns.encode("ascii")
            parts.append(struct.pack("<H", len(name)) + name + struct.pack("<I", len(entries)))
            for _, p in entries:
                parts += [struct.pack("<I", len(p) // 4), p]
        body = b"".join(parts)
        return MAGIC + hashlib.blake2b(body, digest_size=SUM_BYTES).digest() + body

    def save(self, snapshot: bytes) -> None:
        """Write atomically (called on the disk writer thread)."""
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # the folder may have been removed meanwhile
            tmp.write_bytes(snapshot)
            os.replace(tmp, self.path)
        except OSError as e:  # a full or read-only disk: the window lives on in memory
            tmp.unlink(missing_ok=True)
            log.warning("[cache] cannot write %s: %s", self.path, e)


def parse_file(path: Path, vocab_size: int = 2**31) -> dict[str, list[bytes]]:
    """The file's prompts per namespace; raises (OSError, ValueError, ...) when it does not check out."""
    return _parse(_read(path), vocab_size)


def _read(path: Path) -> bytes:
    """The file's bytes, never through a symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _parse(data: bytes, vocab_size: int) -> dict[str, list[bytes]]:
    if not data.startswith(MAGIC):
        raise ValueError("not a history file of this version")
    checksum, body = data[len(MAGIC) : len(MAGIC) + SUM_BYTES], data[len(MAGIC) + SUM_BYTES :]
    if hashlib.blake2b(body, digest_size=SUM_BYTES).digest() != checksum:
        raise ValueError("checksum mismatch")
    out: dict[str, list[bytes]] = {}
    at = 0
    while at < len(body):
        (name_len,) = struct.unpack_from("<H", body, at)
        ns = body[at + 2 : at + 2 + name_len].decode("ascii")
        if len(ns) != NAME_CHARS or any(c not in "0123456789abcdef" for c in ns):
            raise ValueError(f"bad namespace name {ns!r}")
        at += 2 + name_len
        (count,) = struct.unpack_from("<I", body, at)
        at += 4
        for _ in range(count):
            (n,) = struct.unpack_from("<I", body, at)
            if at + 4 + 4 * n > len(body):
                raise ValueError("truncated history file")
            packed = body[at + 4 : at + 4 + 4 * n]
            if n and int(np.frombuffer(packed, "<u4").max()) >= vocab_size:
                raise ValueError("a token id outside the vocabulary")
            out.setdefault(ns, []).append(packed)
            at += 4 + 4 * n
    return out

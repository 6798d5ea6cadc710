"""The disk tier: one safetensors file per chunk under `cache-dir/<namespace id>/`.

A file holds the tensors k, v and tokens, and a header (metadata) with magic, version, namespace, key,
parent, positions and a checksum over all three tensors. Every read checks all of it, and the key against
the tokens; a file that fails is deleted and counts as a miss. Writes go through one background thread:
temp file, fsync, rename, so a reader never sees half a file and a completed save survives a restart.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import shutil
import struct
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save

from anchorkv.cache.chunk import Chunk
from anchorkv.cache.chunk_index import IndexedTier
from anchorkv.cache.keys import Namespace, chunk_key
from anchorkv.cache.chunk import KVSlice

log = logging.getLogger("anchorkv.cache")

MAGIC = "anchorkv-kv"
VERSION = "2"  # 2: a chunk may carry its prompt's last logits
SUFFIX = ".kv"


@dataclass
class DiskEntry:
    path: Path
    parent: bytes
    start: int
    end: int
    nbytes: int
    retention: int
    last_used: float
    logits: bool = False  # the chunk carries its prompt's last logits


def checksum(k: torch.Tensor, v: torch.Tensor, tokens: np.ndarray, logits: torch.Tensor | None = None) -> str:
    """xxh3-128 over k, v, tokens and logits: it guards against damage, not forgery (chain keys are
    blake2b), and runs an order of magnitude faster than blake2b, which was most of a restore from disk."""
    h = xxhash.xxh3_128()
    for t in (k, v) if logits is None else (k, v, logits):
        h.update(t.contiguous().view(torch.uint8).numpy().data)  # hashed through the buffer, not copied
    h.update(np.ascontiguousarray(tokens, dtype="<i4").data)
    return h.hexdigest()


def encode(c: Chunk, namespace_id: str) -> bytes:
    """A chunk as a safetensors file: k, v, tokens (and logits), and the header that `decode` checks."""
    meta = {
        "magic": MAGIC,
        "version": VERSION,
        "namespace": namespace_id,
        "key": c.key.hex(),
        "parent": c.parent.hex(),
        "start": str(c.start),
        "end": str(c.end),
        "retention": str(c.retention),
        "labels": ",".join(sorted(c.labels)),
        "checksum": checksum(c.kv.k, c.kv.v, c.tokens, c.logits),
        "logits": "1" if c.logits is not None else "0",
    }
    tensors = {
        "k": c.kv.k.contiguous(),
        "v": c.kv.v.contiguous(),
        "tokens": torch.from_numpy(c.tokens.astype(np.int32)),
    }
    if c.logits is not None:
        tensors["logits"] = c.logits.contiguous()
    return save(tensors, metadata=meta)


DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I32": torch.int32}


def _header(data: bytes) -> tuple[int, dict[str, dict[str, object]]]:
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("truncated header")
    return 8 + n, json.loads(data[8 : 8 + n])


def header(data: bytes) -> dict[str, str]:
    """The metadata of a safetensors file's bytes."""
    meta = _header(data)[1].get("__metadata__")
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def views(data: bytes) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as views of its bytes: a restore then copies each byte once, into the
    KV slot, instead of first into fresh tensors (whose pages fault in at 1-17 us each on this machine).
    The views are never written to."""
    body, head = _header(data)
    out = {}
    for name, info in head.items():
        if name == "__metadata__":
            continue
        dtype, shape = DTYPES[str(info["dtype"])], [int(d) for d in info["shape"]]  # type: ignore[attr-defined]
        a, b = (body + int(o) for o in info["data_offsets"])  # type: ignore[attr-defined]
        n = int(np.prod(shape))
        if not body <= a <= b <= len(data) or b - a != n * dtype.itemsize:
            raise ValueError(f"tensor {name} does not fit the file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only bytes: the views are only read
            t = torch.frombuffer(data, dtype=dtype, count=n, offset=a) if n else torch.empty(0, dtype=dtype)
        out[name] = t.view(shape)
    return out


def decode(data: bytes, namespace_id: str, key: bytes, retention: int | None = None) -> Chunk:
    """The chunk in a file's bytes, or ValueError (or the reader's own error) when anything does not check
    out: header, key, tokens against the key, checksum, positions."""
    meta = header(data)
    if meta.get("magic") != MAGIC or meta.get("namespace") != namespace_id or meta.get("key") != key.hex():
        raise ValueError("header mismatch")
    t = views(data)
    k, v, tokens = t["k"], t["v"], t["tokens"].numpy().astype(np.int32)
    logits = t["logits"] if meta.get("logits") == "1" else None
    parent = bytes.fromhex(meta["parent"])
    if chunk_key(parent, tokens.tolist()) != key:
        raise ValueError("tokens do not hash to the key")
    if checksum(k, v, tokens, logits) != meta["checksum"]:
        raise ValueError("checksum mismatch")
    if k.shape[2] != int(meta["end"]) - int(meta["start"]) or len(tokens) != k.shape[2]:
        raise ValueError("positions do not match the tensors")
    labels = set(filter(None, meta.get("labels", "").split(",")))
    kv = KVSlice(int(meta["start"]), k, v)
    keep = int(meta["retention"]) if retention is None else retention
    return Chunk(key, parent, tokens, kv, keep, labels, logits=logits)


def read_verified(path: Path, namespace_id: str, key: bytes, retention: int | None = None) -> Chunk:
    """A chunk file, verified (see decode); never through a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return decode(f.read(), namespace_id, key, retention)


class DiskWriter:
    """One background thread that runs writes (files, Redis) in order; `flush()` waits for those queued so far."""

    def __init__(self) -> None:
        self._q: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="anchorkv-disk-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._q.put(job)

    @property
    def pending(self) -> int:
        return self._q.qsize()

    def flush(self) -> None:
        done = threading.Event()
        self._q.put(done.set)
        done.wait()

    def close(self) -> None:
        self.flush()
        self._q.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            try:
                job()
            except Exception:
                log.exception("cache write failed")


def _used(e: DiskEntry) -> None:
    """A use of the entry's chunk: for the index's LRU, and in the file's time for the next start's."""
    e.last_used = time.time()
    with contextlib.suppress(OSError):  # the file went meanwhile: its next read finds out
        os.utime(e.path)


class DiskTier(IndexedTier[DiskEntry]):
    def __init__(
        self, root: Path, namespace: Namespace, budget_bytes: int, writer: DiskWriter, on_corrupt: Callable[[], None]
    ) -> None:
        self.namespace = namespace
        self.dir = root / namespace.id
        self.writer = writer
        self.on_corrupt = on_corrupt
        super().__init__(budget_bytes)  # the index's nbytes: of the indexed files
        self.written_bytes = 0
        self.full_since: float | None = None  # when a write last found the disk full (writes wait for room)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_namespace()
        self._rebuild()
        self._evict()  # the budget may have shrunk since the last run

    # -- index ---------------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """Scan the folder at start: drop leftover temp files, index the headers of the rest."""
        for p in self.dir.iterdir():
            if p.is_dir() and not p.is_symlink():
                if p.suffix == SUFFIX:
                    log.warning("[cache] %s is a folder where a chunk file belongs: left alone, never read", p)
                continue
            if ".tmp" in p.name:
                self._discard(p, corrupt=False)
            elif p.suffix == SUFFIX:
                meta = self._header(p)
                if meta is None:
                    continue
                st = p.stat()
                self._index(
                    bytes.fromhex(meta["key"]),
                    DiskEntry(p, bytes.fromhex(meta["parent"]), int(meta["start"]), int(meta["end"]), st.st_size, int(meta["retention"]), st.st_mtime, meta.get("logits") == "1"),
                )  # fmt: skip

    def _header(self, path: Path) -> dict[str, str] | None:
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if (
                meta.get("magic") != MAGIC
                or meta.get("version") != VERSION
                or meta.get("namespace") != self.namespace.id
            ):
                raise ValueError("foreign header")
            if path.stem != meta["key"]:
                raise ValueError("file name does not match its key")
            return meta
        except Exception as e:
            log.warning("dropping cache file %s: %s", path.name, e)
            self._discard(path)
            return None

    def _index(self, key: bytes, e: DiskEntry) -> None:
        with self.lock:
            self.index.add(key, e)

    def _unindex(self, key: bytes) -> DiskEntry | None:
        with self.lock:
            return self.index.remove(key)

    def drop(self, key: bytes) -> None:
        """Forget the chunk and delete its file."""
        if (e := self._unindex(key)) is not None:
            e.path.unlink(missing_ok=True)

    def _discard(self, path: Path, corrupt: bool = True) -> None:
        if corrupt:
            self.on_corrupt()
        try:
            path.unlink(missing_ok=True)
        except OSError as e:  # e.g. a read-only folder: the file stays, unindexed, and is never read
            log.warning("[cache] cannot remove %s: %s", path, e)

    def has_logits(self, key: bytes) -> bool:
        with self.lock:
            e = self.index.get(key)
        return e is not None and e.logits

    # -- read ----------------------------------------------------------------------------------------
    def load(self, key: bytes) -> Chunk | None:
        """The chunk, verified; None (and the file deleted) when anything does not check out."""
        with self.lock:
            e = self.index.get(key)
        if e is None:
            return None
        try:
            chunk = read_verified(e.path, self.namespace.id, key, e.retention)
        except Exception as err:
            log.warning("dropping corrupt cache file %s: %s", e.path.name, err)
            self._unindex(key)
            self._discard(e.path)
            return None
        _used(e)
        return chunk

    def touch(self, key: bytes) -> None:
        """Count a use of the chunk without reading it (a KV slot held it)."""
        with self.lock:
            e = self.index.get(key)
        if e is not None:
            _used(e)

    def tokens(self, key: bytes) -> list[int] | None:
        """The chunk's token ids, read alone and checked against its key; the restore that reads the KV
        checks the rest. None when the file is gone or its tokens do not hash to the key."""
        with self.lock:
            e = self.index.get(key)
        if e is None:
            return None
        try:
            with safe_open(str(e.path), "np") as f:
                tokens = f.get_tensor("tokens").astype(np.int64).tolist()
        except Exception:
            return None
        return tokens if chunk_key(e.parent, tokens) == key else None

    # -- write ---------------------------------------------------------------------------------------
    def save(self, chunk: Chunk) -> None:
        """Queue a write; the file appears atomically, in the background."""
        if chunk.key in self:
            return
        self.writer.submit(lambda: self._write(chunk))

    def _write(self, c: Chunk) -> None:
        """Write one chunk. A full disk evicts the chunk's size below the budget and tries once more; failing
        that, writes stop (said once) until the disk has room again. A folder deleted meanwhile is made anew."""
        if c.key in self or (c.start > 0 and c.parent not in self):
            return  # already there, or unreachable: its parent was evicted or never fit
        need = c.nbytes + 2**16
        if self.full_since is not None:
            try:
                if shutil.disk_usage(self.dir).free < 2 * need:
                    return
            except OSError:
                return
            log.info("[cache] %s has room again: chunk writes resume", self.dir)
            self.full_since = None
        for _ in range(2):
            try:
                self._store(c)
                return
            except FileNotFoundError:
                self._recreate()
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    log.warning("[cache] writing a chunk to %s failed: %s", self.dir, e)
                    return
                self._evict(below=need)
        self.full_since = time.time()
        log.warning("[cache] %s is full: chunk writes stop until it has room", self.dir)

    def _recreate(self) -> None:
        """The folder was deleted while running: make it again, with an empty index."""
        log.warning("[cache] %s was removed: made anew, empty", self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_namespace()
        with self.lock:
            self.index.clear()

    def _write_namespace(self) -> None:
        # written beside, then renamed over: a link in its place is replaced, its target never written
        tmp = self.dir / f"namespace.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(dict(self.namespace.fields), indent=1))
        os.replace(tmp, self.dir / "namespace.json")

    def _store(self, c: Chunk) -> None:
        path = self.dir / f"{c.key.hex()}{SUFFIX}"
        tmp = self.dir / f"{c.key.hex()}.tmp{os.getpid()}"
        data = encode(c, self.namespace.id)  # in memory: the file write below fails with the OS's own error
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        size = path.stat().st_size
        self.written_bytes += size
        self._index(
            c.key, DiskEntry(path, c.parent, c.start, c.end, size, c.retention, time.time(), c.logits is not None)
        )
        self._evict()

    def _evict(self, below: int = 0) -> None:
        """Evict until `below` bytes under budget, as every tier does (chunk_index.py)."""
        with self.lock:
            evicted = self.index.evict(below)
        for _, e in evicted:
            e.path.unlink(missing_ok=True)

    def clear(self) -> None:
        self.writer.flush()
        with self.lock:
            keys = list(self.index)
        for key in keys:
            self.drop(key)

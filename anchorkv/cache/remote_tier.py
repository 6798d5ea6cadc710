"""The remote tier: chunks in a Redis server that several replicas share.

A value is a chunk file's bytes, as on disk (header, checksum, tokens), under `akv:<namespace>:<key>`;
`akv:<namespace>:t:<parent>` is the set of chunk ends under a parent, for tails. Every read checks the
value in full, so a foreign, corrupt or vanished value is a miss (and a corrupt one is deleted). Writes
go through a background thread and never delay a response. Eviction is Redis's own (`maxmemory` with an
LRU policy). A server that is down or full turns the tier off for RETRY_S seconds at a time, with one
warning, while serving goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis

from anchorkv.cache.chunk import Chunk
from anchorkv.cache.disk_tier import DiskWriter, decode, encode
from anchorkv.cache.keys import Namespace

log = logging.getLogger("anchorkv.cache")

RETRY_S = 5.0
TIMEOUT_S = 0.5
MAX_QUEUED = 64  # writes waiting; more are dropped (the chunk stays in RAM and on disk)

T = TypeVar("T")


@dataclass(frozen=True)
class RemoteStats:
    url: str  # without the password
    up: bool
    errors: int
    hits: int
    lookup_round_trips: int
    written_bytes: int
    dropped_writes: int
    dropped_bad: int

    @staticmethod
    def total(parts: Sequence[RemoteStats]) -> RemoteStats:
        """Every stage's client summed: up while all are."""
        return RemoteStats(
            parts[0].url, all(p.up for p in parts), sum(p.errors for p in parts), sum(p.hits for p in parts),
            sum(p.lookup_round_trips for p in parts), sum(p.written_bytes for p in parts),
            sum(p.dropped_writes for p in parts), sum(p.dropped_bad for p in parts),
        )  # fmt: skip


class RemoteTier:
    def __init__(self, url: str, namespace: Namespace, on_corrupt: Callable[[], None] = lambda: None) -> None:
        self.url = url
        self.namespace = namespace
        self.prefix = f"akv:{namespace.id}:"
        self.client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        self.on_corrupt = on_corrupt
        self.down_since: float | None = None
        self.errors = 0  # failed calls since start
        self.hits = 0
        self.written_bytes = 0
        self.dropped_writes = 0
        self.dropped_bad = 0  # foreign or damaged values found and deleted
        self.round_trips = 0  # lookups' calls to the server
        self.writer = DiskWriter()

    def _key(self, key: bytes) -> str:
        return self.prefix + key.hex()

    def _call(self, op: Callable[[], T], default: T) -> T:
        """Run one Redis call; a failure marks the tier down (said once) and gives `default`."""
        if self.down_since is not None:
            if time.monotonic() - self.down_since < RETRY_S:
                return default
        try:
            out = op()
        except redis.RedisError as e:
            self.errors += 1
            if self.down_since is None:
                log.warning("[cache] redis failed (%s): the remote tier is off, retried every %gs", e, RETRY_S)
            self.down_since = time.monotonic()
            return default
        if self.down_since is not None:
            log.info("[cache] redis answers again: the remote tier is back")
            self.down_since = None
        return out

    @property
    def up(self) -> bool:
        return self.down_since is None

    # -- read ----------------------------------------------------------------------------------------
    def __contains__(self, key: bytes) -> bool:
        return key in self.probe([key], [])[0]

    def tail_ends(self, parent: bytes) -> set[int]:
        return self.probe([], [parent])[1].get(parent, set())

    def probe(self, keys: Sequence[bytes], parents: Sequence[bytes]) -> tuple[set[bytes], dict[bytes, set[int]]]:
        """Which of `keys` the server holds, and the chunk ends under each of `parents`, in one round trip
        (none when there is nothing to ask)."""
        if not keys and not parents:
            return set(), {}

        def ask() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self._key(k))
            for p in parents:
                pipe.smembers(self.prefix + "t:" + p.hex())
            self.round_trips += 1
            return list(pipe.execute())

        out: list[Any] = self._call(ask, [])
        if not out:
            return set(), {}
        held = {k for k, n in zip(keys, out, strict=False) if n}
        tails = {p: {int(m) for m in ms if m.isdigit()} for p, ms in zip(parents, out[len(keys) :], strict=True)}
        return held, tails

    def has_logits(self, key: bytes) -> bool:
        return bool(self._call(lambda: self.client.exists(self._key(key) + ":L"), 0))

    def load(self, key: bytes) -> Chunk | None:
        """The chunk, if the server holds it and it checks out."""
        data: Any = self._call(lambda: self.client.get(self._key(key)), None)
        if data is None:
            return None
        try:
            chunk = decode(data, self.namespace.id, key)
        except Exception as e:  # noqa: BLE001 - foreign or damaged: a miss
            log.warning("[cache] dropping a bad redis value %s: %s", self._key(key), e)
            self.dropped_bad += 1
            self.on_corrupt()
            self._call(lambda: self.client.delete(self._key(key)), 0)
            return None
        self.hits += 1
        return chunk

    # -- write ---------------------------------------------------------------------------------------
    def save(self, chunk: Chunk) -> None:
        """Queue a write; dropped when the queue is long or the server is down."""
        if not self.up and time.monotonic() - (self.down_since or 0) < RETRY_S:
            return
        if self.writer.pending >= MAX_QUEUED:
            self.dropped_writes += 1
            return
        self.writer.submit(lambda: self._write(chunk))

    def _write(self, c: Chunk) -> None:
        data = encode(c, self.namespace.id)

        def put() -> bool:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self._key(c.key), data)
            pipe.sadd(self.prefix + "t:" + c.parent.hex(), str(c.end))
            if c.logits is not None:
                pipe.set(self._key(c.key) + ":L", b"1")
            pipe.execute()
            return True

        if self._call(put, False):
            self.written_bytes += len(data)

    def flush(self) -> None:
        self.writer.flush()

    def stats(self) -> RemoteStats:
        parts = urlsplit(self.url)
        shown = parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]) if "@" in parts.netloc else parts
        return RemoteStats(
            urlunsplit(shown), self.up, self.errors, self.hits, self.round_trips, self.written_bytes,
            self.dropped_writes, self.dropped_bad,
        )  # fmt: skip

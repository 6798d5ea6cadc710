"""Cache policy on plain token lists: no model, no tensors beyond tiny stand-ins."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest
import torch

from anchorkv.cache.chunk import Chunk
from anchorkv.cache.chunk_index import ChunkIndex
from anchorkv.cache.disk_tier import DiskTier, DiskWriter
from anchorkv.cache.memory_tier import MemoryDiskTier
from anchorkv.cache.keys import Namespace, chain_keys, chunk_key
from anchorkv.cache.policy import (
    TAIL_MERGE,
    PolicyError,
    Scope,
    align_down,
    auto_boundary,
    chat_floor,
    cut_floor,
    cuts,
    judge_anchors,
    parse_scope,
    plan_records,
    restorable_limit,
    shared_cut,
)
from anchorkv.cache.ram_tier import RamTier
from anchorkv.engine.kv import KVSlice


def test_scope_forms() -> None:
    assert parse_scope("off") == Scope("off")
    assert parse_scope("full") == Scope("full")
    assert parse_scope("auto") == Scope("auto", 30)
    assert parse_scope("auto:8") == Scope("auto", 8)
    assert parse_scope("auto:8", window=2) == Scope("auto", 2)
    assert parse_scope("1000") == Scope("fixed", tokens=1000)
    assert str(parse_scope("auto")) == "auto:30"
    assert str(parse_scope("1000")) == "1000"


@pytest.mark.parametrize("bad", ["", "on", "auto:", "auto:0", "auto:-1", "auto+:0", "auto++", "0", "-5", "full:3"])
def test_bad_scope_lists_the_accepted_forms(bad: str) -> None:
    with pytest.raises(PolicyError, match=r"off, full, auto, auto:N"):
        parse_scope(bad)


def test_restore_never_reaches_the_last_token_and_stays_aligned() -> None:
    assert restorable_limit(847, 128) == 768
    assert restorable_limit(769, 128) == 768
    assert restorable_limit(768, 128) == 640  # an exact hit restores n - 1, rounded down
    assert restorable_limit(100, 1) == 99
    # a chat boundary is a prefill cut too: a chat prompt restores up to its last message's end
    assert restorable_limit(847, 128, [300, 843]) == 843
    assert restorable_limit(847, 128, [300, 846]) == 846
    # the grid restarts at every chat boundary: 300 + 4 * 128
    assert restorable_limit(900, 128, [300, 900]) == 812
    # ... but a grid point within TAIL_MERGE tokens of the message's end is none: 847 - 812 < 64
    assert restorable_limit(847, 128, [300, 847]) == 684


def test_cuts_are_the_chat_boundaries_and_every_c_tokens_after_each() -> None:
    assert cuts(300, 128) == [128, 256]
    assert cuts(600, 128, [100, 200, 520]) == [100, 200, 328, 456, 520]
    assert cuts(600, 128, [100, 900]) == [100, 228, 356, 484]
    assert all(cut_floor(p, 128, [100, 200, 520]) == max(c for c in [0, 100, 200, 328, 456, 520] if c <= p)
               for p in range(600))  # fmt: skip


def test_a_short_message_tail_joins_the_piece_before_it() -> None:
    # 456 lies 56 < TAIL_MERGE tokens before the message's end at 512: [328, 512) is one piece
    assert TAIL_MERGE == 64
    assert cuts(600, 128, [100, 200, 512]) == [100, 200, 328, 512]
    assert cuts(500, 128, [100, 200, 512]) == [100, 200, 328]  # the end after `upto` still counts
    assert all(cut_floor(p, 128, [100, 200, 512]) == max(c for c in [0, 100, 200, 328, 512] if c <= p)
               for p in range(600))  # fmt: skip
    # after the last chat boundary nothing is known of the end: the grid runs on (a completion's prompt)
    assert cuts(600, 128, [100]) == [100, 228, 356, 484]
    assert cuts(510, 128) == [128, 256, 384]


def test_kv_prefilled_for_one_prompt_serves_another_up_to_the_last_cut_cut_alike() -> None:
    a = list(range(1000))
    b = a[:900] + [7] * 100
    assert shared_cut(a, [300, 950], b, [300, 990], 128) == 812  # common prefix 900: cut at 300 + 4 * 128
    assert shared_cut(a, [300, 899], b, [300, 899], 128) == 899
    # the same tokens cut at different chat boundaries agree only below the first difference
    assert shared_cut(a, [300, 500], b, [300, 600], 128) == 428
    assert shared_cut(a, [300], b, [], 128) == 128  # 256 is a cut of b's only: 300 - 256 < TAIL_MERGE
    assert shared_cut(a, [128, 300], b, [300], 128) == 812  # a chat end on a cut cuts nothing new
    assert shared_cut(a, [100, 256], b, [100], 128) == 100  # one off the grid restarts it (and drops 228)
    assert shared_cut(a, [256, 300], b, [300], 128) == 128  # one on a grid point keeps what b dropped


def test_grid_chain_keys_chain_parent_and_tokens() -> None:
    root = Namespace.of(model="m").root
    toks = list(range(1000))
    points = cuts(900, 128, [])
    keys = chain_keys(root, toks, points)
    assert points == [128 * i for i in range(1, 8)]  # chunks ending at 128, ..., 896
    assert keys[0] == chunk_key(root, toks[:128])
    assert keys[1] == chunk_key(keys[0], toks[128:256])
    other = chain_keys(root, toks[:200] + [5] + toks[201:], points)
    assert other[0] == keys[0]
    assert other[1] != keys[1]
    assert other[6] != keys[6]


def test_chat_boundaries_cut_the_chain_and_change_every_key_after_them() -> None:
    root = Namespace.of(model="m").root
    toks = list(range(1000))
    assert cuts(600, 256, [100, 512, 700]) == [100, 356, 512]
    plain = chain_keys(root, toks, cuts(600, 256, []))
    chat = chain_keys(root, toks, cuts(600, 256, [100]))
    # same tokens, cut differently, hence computed differently: no key in common past the cut
    assert not set(plain) & set(chat)


def test_namespace_and_salt_change_every_key() -> None:
    ns = Namespace.of(model="m", layers=[0, 10])
    assert ns.root != Namespace.of(model="m", layers=[10, 20]).root
    assert ns.salted("a").root != ns.salted("b").root != ns.root
    assert ns.salted(None).root == ns.root


def test_chat_boundaries_align_down() -> None:
    ends = [40, 300, 700]
    assert chat_floor(699, ends) == 300
    assert chat_floor(700, ends) == 700
    assert chat_floor(10, ends) == 0
    assert align_down(700, 128) == 640


def test_auto_takes_the_longest_common_prefix_over_the_window_aligned_to_chat() -> None:
    base = list(range(100))
    history = [base[:30] + [999] * 70, base[:80] + [7] * 20, [5] * 100]
    ends = [10, 25, 50, 75, 90]
    # best match is history[1] (LCP 80), aligned down to the chat boundary 75
    assert auto_boundary(base, history, window=30, chat_ends=ends) == 75
    # a window of 1 sees only the last prompt, which shares nothing
    assert auto_boundary(base, history, window=1, chat_ends=ends) == 0
    # a window of 2 sees history[1:]: still 75
    assert auto_boundary(base, history, window=2, chat_ends=ends) == 75
    # a prompt without chat boundaries (completions, block traces) keeps the common token prefix
    assert auto_boundary(base, history, window=30, chat_ends=[]) == 80


def test_anchor_validation() -> None:
    v = judge_anchors([0, 50, 100, 150], has_key=True, n_prompt=100)
    assert [(x.accepted, x.reason is None) for x in v] == [(False, False), (True, True), (False, False), (False, False)]
    assert "zero" in (v[0].reason or "")
    assert "strict prefix" in (v[2].reason or "")
    assert all(not x.accepted and "prompt_cache_key" in (x.reason or "") for x in judge_anchors([50], False, 100))
    # a cache_control mark on the last message anchors the whole prompt, never more
    assert [x.accepted for x in judge_anchors([100, 101], True, 100, whole=True)] == [True, False]


def test_record_plan_per_scope() -> None:
    prompt = list(range(1000))
    ends = [300, 600]
    history = [prompt[:650] + [1] * 10]
    full = plan_records(prompt, ends, [], parse_scope("full"), history, 0)
    assert full.disk_upto == 1000
    assert ("full", 1000) in {(b.kind, b.pos) for b in full.boundaries}
    auto = plan_records(prompt, ends, [], parse_scope("auto"), history, 0)
    assert auto.scope_boundary == 600
    assert auto.disk_upto == 600
    fixed = plan_records(prompt, ends, [], parse_scope("400"), history, 0)
    assert fixed.disk_upto == 400
    assert plan_records(prompt, ends, [], parse_scope("4000"), history, 0).disk_upto == 1000
    off = plan_records(prompt, ends, [700], parse_scope("off"), history, 0)
    assert off.disk_upto == 0
    assert ("anchor", 700) in {(b.kind, b.pos) for b in off.boundaries}
    anchored = plan_records(prompt, ends, [700], parse_scope("400"), history, 0)
    assert anchored.disk_upto == 700  # an anchor goes to disk unless the scope is off
    assert plan_records(prompt, ends, [], parse_scope("400"), history, min_tokens=500).disk_upto == 0


def test_auto_plus_writes_a_continuing_session_whole() -> None:
    """auto+ is auto, except that a prompt holding a recent prompt whole (a session's next turn) goes to
    disk whole, with its reply, as full would write it."""
    prompt = list(range(1000))
    ends = [300, 600, 900]
    unrelated = [prompt[:650] + [1] * 10]
    plus = parse_scope("auto+")
    assert plus == Scope("auto", 30, sessions=True)
    assert str(plus) == "auto+:30"
    assert parse_scope("auto+:4") == Scope("auto", 4, sessions=True) == parse_scope("auto+", window=4)
    like_auto = plan_records(prompt, ends, [], plus, unrelated, 0)
    assert (like_auto.disk_upto, like_auto.reply_to_disk) == (600, False)
    session = plan_records(prompt, ends, [], plus, [*unrelated, prompt[:700]], 0)
    assert (session.disk_upto, session.scope_boundary, session.reply_to_disk) == (1000, 600, True)
    # only within the window
    outside = plan_records(prompt, ends, [], parse_scope("auto+:1"), [prompt[:700], *unrelated], 0)
    assert outside.disk_upto == 600
    auto = plan_records(prompt, ends, [], parse_scope("auto"), [*unrelated, prompt[:700]], 0)
    assert (auto.disk_upto, auto.reply_to_disk) == (600, False)  # plain auto: the common prefix, to a chat end


class _Tier(Protocol):
    index: ChunkIndex[Any]

    def put(self, chunk: Chunk) -> None: ...

    def use(self, key: bytes) -> None: ...


class _Ram:
    def __init__(self, tmp: Path) -> None:
        self.tier = RamTier(2**20)
        self.index = self.tier.index

    def put(self, chunk: Chunk) -> None:
        self.tier.put(chunk)

    def use(self, key: bytes) -> None:
        self.tier.get(key)


class _Memory:
    def __init__(self, tmp: Path) -> None:
        self.tier = MemoryDiskTier(2**20)
        self.index = self.tier.index

    def put(self, chunk: Chunk) -> None:
        self.tier.save(chunk)

    def use(self, key: bytes) -> None:
        self.tier.load(key)


class _Disk:
    def __init__(self, tmp: Path) -> None:
        self.writer = DiskWriter()
        self.tier = DiskTier(tmp, Namespace.of(test=1), 2**20, self.writer, on_corrupt=lambda: None)
        self.index = self.tier.index

    def put(self, chunk: Chunk) -> None:
        self.tier.save(chunk)
        self.writer.flush()

    def use(self, key: bytes) -> None:
        self.tier.load(key)


@pytest.mark.parametrize("make", [_Ram, _Memory, _Disk], ids=["ram", "simulator-disk", "disk"])
def test_every_tier_evicts_leaves_first_then_retention_then_lru(make: Callable[[Path], _Tier], tmp_path: Path) -> None:
    tier = make(tmp_path)
    root = b"r" * 16
    keys: dict[str, bytes] = {}

    def put(name: str, parent: str | None, retention: int = 0) -> None:
        tokens = [ord(c) for c in name] + [0, 0]  # real keys: the disk tier checks them on every load
        up = keys[parent] if parent else root
        keys[name] = chunk_key(up, tokens)
        start = 4 if parent else 0
        kv = KVSlice(start, torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))  # 64 bytes
        tier.put(Chunk(keys[name], up, np.asarray(tokens, dtype=np.int32), kv, retention))

    # chain a1 <- a2 (volatile tail), chain c1 (chat-protected leaf), anchored leaf n1, volatile leaf v1
    put("a1", None)
    put("a2", "a1")
    put("c1", None, retention=1)
    put("n1", None, retention=2)
    put("v1", None)
    tier.use(keys["v1"])  # v1 used after a2
    index = tier.index
    names = {k: n for n, k in keys.items()}

    def keep(*kept: str) -> None:
        index.budget = sum(index.entries[keys[n]].nbytes for n in kept)

    def evict() -> list[str]:
        return [names[k] for k, _ in index.evict()]

    assert [names[k] for k in index.eviction_order()] == ["a2", "v1", "c1", "n1"]  # a1 is no leaf while a2 lives
    keep("v1", "c1", "n1")
    assert evict() == ["a2", "a1"]  # once a2 is gone its parent a1 is a leaf, and older than v1
    assert [names[k] for k in index.eviction_order()] == ["v1", "c1", "n1"]
    keep("n1")
    assert evict() == ["v1", "c1"]
    assert list(index) == [keys["n1"]]
    assert index.nbytes == index.entries[keys["n1"]].nbytes
    # three chunks under the root ended at 4: the one left still counts
    assert index.tail_ends(root) == {4}
    assert not index.tail_ends(keys["a1"])


def test_leaves_follow_the_index_in_any_order() -> None:
    from anchorkv.cache.leaves import Leaves

    index: dict[bytes, bytes] = {}  # key -> parent
    leaves = Leaves()

    def add(key: bytes, parent: bytes) -> None:
        index[key] = parent
        leaves.add(key, parent)

    def remove(key: bytes) -> None:
        leaves.remove(key, index.pop(key), index)

    add(b"c", b"b")  # a disk rebuild may index a child before its parent
    add(b"b", b"a")
    add(b"a", b"root")
    add(b"d", b"b")  # b has two children now
    assert leaves.keys == {b"c", b"d"}
    remove(b"c")
    assert leaves.keys == {b"d"}
    remove(b"d")
    assert leaves.keys == {b"b"}  # its last child went
    remove(b"b")
    assert leaves.keys == {b"a"}
    assert b"root" not in leaves.keys  # the namespace root is never a chunk

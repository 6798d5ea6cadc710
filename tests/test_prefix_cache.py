"""The prefix cache on the bundled model: hits, anchors, restarts, corruption, salts, stages, exactness."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import replace
from typing import Any
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from anchorkv.cache.history import MAX_TOKENS, MAX_WINDOW, History
from anchorkv.cache.policy import TAIL_MERGE, common_prefix, cut_floor
from anchorkv.engine.pipeline import aligned_chunks
from anchorkv.cache.prefix_cache import CacheConfig, CacheRequest, Recorded
from anchorkv.config import EngineConfig
from anchorkv.cache.disk_tier import DiskTier
from anchorkv.engine import stage
from anchorkv.engine.engine import Engine, Finished
from anchorkv.engine.sampling import SamplingParams
from conftest import Arrivals, forget_slots, stages_of

C = 128
SYSTEM = "You are a meticulous assistant for a logistics company. " + " ".join(
    f"Rule {i}: when asked about shipment class {i}, answer with the exact code SC-{i} and nothing vague."
    for i in range(28)
)
SYSTEM_SHORT_TAIL = SYSTEM[: SYSTEM.index(" Rule 26:")]  # ends 47 tokens past the grid point at 640


def make(tmp: Path, dtype: str = "bfloat16", stages: int = 1, scope: str = "full", **cache: Any) -> Engine:
    return Engine(
        EngineConfig(threads=2, dtype=dtype, stages=stages, kv_prefault=False),  # idle work: the cache's alone
        CacheConfig(ram_mb=512, cache_dir=tmp, scope=scope, **cache),
    )


def chat(engine: Engine, question: str, system: str = SYSTEM) -> tuple[list[int], CacheRequest]:
    r = engine.render_chat([{"role": "system", "content": system}, {"role": "user", "content": question}])
    return r.token_ids, CacheRequest(r.boundaries, turn_starts=r.turn_starts)


def engine_tokens(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


def answer(engine: Engine, prompt: list[int], req: CacheRequest, max_tokens: int = 12) -> Finished:
    done = list(engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), cache_req=req))[-1]
    assert isinstance(done, Finished)
    return done


def story(engine: Engine) -> tuple[list[dict[str, str]], list[int], CacheRequest]:
    """A chat asking for a long reply, and its request told how the next turn renders that reply."""
    q = "Write a detailed, long story about a lighthouse keeper and a storm."
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
    prompt, req = chat(engine, q)

    def next_turn(reply: str) -> tuple[list[int], list[int]]:
        r = engine.render_chat([*history, {"role": "assistant", "content": reply}], add_generation_prompt=False)
        return r.token_ids, r.boundaries

    return history, prompt, replace(req, next_turn=next_turn)


def next_messages(history: list[dict[str, str]], reply: str) -> list[dict[str, str]]:
    return [*history, {"role": "assistant", "content": reply}, {"role": "user", "content": "Now give it a title."}]


@pytest.fixture(scope="module")
def cold(engine: Engine) -> Engine:
    return engine  # the session engine has no cache


def test_changed_tail_hits_at_the_last_cut_of_the_shared_prefix(tmp_path: Path, cold: Engine) -> None:
    """The shared system message ends on a chat boundary, where prefill is cut: it is restored whole."""
    e = make(tmp_path)
    p1, r1 = chat(e, "Which code goes with shipment class 3?")
    p2, r2 = chat(e, "Summarise rule 17 for me, please.")
    assert answer(e, p1, r1).cached_tokens == 0
    done = answer(e, p2, r2)
    shared = common_prefix(p1, p2)
    system_end = r2.chat_ends[0]
    assert done.cached_tokens == cut_floor(shared, C, r2.chat_ends) == system_end
    assert system_end % C != 0
    assert done.cache.kind in ("chat", "generic")
    assert done.cache.tier == "slot"  # the first request's slot still held it: nothing was copied
    assert done.timings()["cache_n"] == done.cached_tokens
    assert done.token_ids == answer(cold, p2, r2).token_ids


def test_a_prompt_sharing_part_of_a_merged_piece_restores_before_it(tmp_path: Path, cold: Engine) -> None:
    """The short-tail system message is prefilled as [512, 687) in one piece. A system message that shares
    its tokens past 640 but ends far later was cut at 640 in a cold run: the first one's KV at 640 would be
    other bits, so the restore stops at 512."""
    e = make(tmp_path)
    p1, r1 = chat(e, "Which code goes with shipment class 3?", SYSTEM_SHORT_TAIL)
    p2, r2 = chat(e, "Which code goes with shipment class 3?", SYSTEM_SHORT_TAIL[:-1] + ", and " + SYSTEM[-600:])
    shared, system_end = common_prefix(p1, p2), r2.chat_ends[0]
    assert 640 < shared < r1.chat_ends[0] < system_end - TAIL_MERGE  # 640 is a cut of p2, not of p1
    answer(e, p1, r1)
    reference = cold.prompt_logits(p2, r2)[0]
    warm, plan = e.prompt_logits(p2, r2)
    assert plan.restored_tokens == 512
    assert torch.equal(warm, reference)


def test_same_prompt_again_is_an_exact_hit(tmp_path: Path) -> None:
    e = make(tmp_path)
    p, r = chat(e, "Which code goes with shipment class 3?")
    first = answer(e, p, r)
    again = answer(e, p, r)
    # every token, the assistant header included: the first token comes from the logits kept with the KV
    assert again.cached_tokens == len(p)
    assert again.cache.kind == "exact"
    assert again.token_ids == first.token_ids
    # a longer prompt through the same chunk does not take the logits: it prefills its own tail
    longer = p + engine_tokens(e, "Thanks")
    _, plan = e.prompt_logits(longer, CacheRequest([*r.chat_ends, len(longer)]))
    assert plan.restored_tokens == len(p)
    assert plan.kind == "full"  # not "exact": the whole earlier prompt is only a prefix of this one


def test_a_prompt_met_inside_a_longer_one_is_a_whole_hit_after_a_restart(tmp_path: Path, cold: Engine) -> None:
    """Prefill keeps the logits before every chat boundary it passes, so the turn a longer prompt went
    through is restored whole, from disk, the first time it is sent on its own."""
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which code goes with class 3?"}]
    e = make(tmp_path)
    later = e.render_chat([*history, {"role": "assistant", "content": "SC-3."}, {"role": "user", "content": "And 4?"}])
    answer(e, later.token_ids, CacheRequest(later.boundaries, turn_starts=later.turn_starts))
    e.cache.flush()
    restarted = make(tmp_path)
    first = restarted.render_chat(history)
    n = len(first.token_ids)
    assert first.token_ids == later.token_ids[:n]
    assert n in later.boundaries
    logits, plan = restarted.prompt_logits(first.token_ids, CacheRequest(first.boundaries))
    assert plan.restored_tokens == n
    assert plan.tier == "disk"
    assert torch.equal(logits, cold.prompt_logits(first.token_ids, CacheRequest(first.boundaries))[0])


def test_anchor_is_restored_where_the_grid_alone_stops(tmp_path: Path, engine: Engine) -> None:
    """Stride 512: without the anchor a prompt that diverges at 860 restores only the grid point 512."""
    base = engine.tokenizer.encode(SYSTEM * 2)[:1000]
    other = engine.tokenizer.encode("Completely different words about mountains and rivers. " * 20)
    p1, p2 = base, base[:860] + other[:140]
    e = make(tmp_path, stride=512)
    plain = CacheRequest(salt="plain")
    e.prompt_logits(p1, plain)
    forget_slots(e)  # p1's slot would serve 768 itself: this is the cache's grid
    assert e.prompt_logits(p2, plain)[1].restored_tokens == 512
    anchored = CacheRequest(anchors=[850], has_key=True, salt="anchored")
    _, plan = e.prompt_logits(p1, anchored)
    assert plan.anchors[0].accepted
    assert Recorded("anchor", 850, 768) in plan.recorded
    forget_slots(e)
    _, plan2 = e.prompt_logits(p2, anchored)
    assert plan2.restored_tokens == 768
    assert plan2.kind == "anchor"


def test_ignored_anchors_say_why(tmp_path: Path, engine: Engine) -> None:
    e = make(tmp_path)
    p, _ = chat(e, "hello")
    _, plan = e.prompt_logits(p, CacheRequest(anchors=[0, 10, len(p)], has_key=True))
    assert [v.accepted for v in plan.anchors] == [False, True, False]
    _, plan = e.prompt_logits(p, CacheRequest(anchors=[10], has_key=False))
    assert "prompt_cache_key" in (plan.anchors[0].reason or "")


def test_restart_hits_from_disk_on_the_first_request(tmp_path: Path) -> None:
    e = make(tmp_path, scope="auto")
    p1, r1 = chat(e, "Which code goes with shipment class 3?")
    p2, r2 = chat(e, "Which code goes with shipment class 9?")
    answer(e, p1, r1)
    done2 = answer(e, p2, r2)  # auto: shares the system prompt with the last prompt, so it goes to disk
    assert done2.cached_tokens > 0
    e.cache.flush()
    assert (disk := e.cache.stats().disk) is not None and disk.entries > 0
    del e
    restarted = make(tmp_path, scope="auto")
    p3, r3 = chat(restarted, "Which code goes with shipment class 12?")
    done3 = answer(restarted, p3, r3)
    # auto kept the prefix shared with the previous prompt, down to its chat boundary: the system message
    assert done3.cached_tokens == r3.chat_ends[0] > 0
    assert done3.cache.tier == "disk"


def test_kv_written_on_another_kind_of_cpu_never_serves_here(
    tmp_path: Path, cold: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same linears give other bits on another CPU (an AMX Xeon's oneDNN against a Zen 5's), so a disk
    tier or Redis filled there is a miss here, in exact mode."""
    e = make(tmp_path)
    p, r = chat(e, "Which code goes with shipment class 3?")
    answer(e, p, r)
    e.cache.flush()
    assert make(tmp_path).prompt_logits(p, r)[1].tier == "disk"  # this CPU hits
    monkeypatch.setattr(stage, "cpu_kind", lambda: "AuthenticAMD 26 2 AMD EPYC 9B45|avx512_bf16 avx512f")
    logits, plan = make(tmp_path).prompt_logits(p, r)
    assert plan.restored_tokens == 0
    assert torch.equal(logits, cold.prompt_logits(p, r)[0])


def _first_chunk_file(cache_dir: Path) -> Path:
    for f in cache_dir.glob("*/*.kv"):
        if load_file(f)["k"].shape[2] and _start(f) == 0:
            return f
    raise AssertionError("no chunk at position 0")


def _start(f: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        return int((h.metadata() or {})["start"])


def _flip_a_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _foreign_version(f: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        meta = dict(h.metadata() or {})
    save_file(load_file(f), f, metadata={**meta, "version": "999"})


def _other_model(f: Path) -> None:
    """A valid file of another namespace, dropped into this one's folder."""
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        meta = dict(h.metadata() or {})
    save_file(load_file(f), f, metadata={**meta, "namespace": "0" * 32})


def _tensor_past_the_end(f: Path) -> None:
    """The header points k's bytes past the end of the file (the header keeps its length)."""
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    head = json.loads(data[8 : 8 + n])
    a, b = head["k"]["data_offsets"]
    head["k"]["data_offsets"] = [a + len(data), b + len(data)]
    text = json.dumps(head, separators=(",", ":")).encode()
    assert len(text) <= n
    f.write_bytes(data[:8] + text.ljust(n) + data[8 + n :])


@pytest.mark.parametrize("stages", [1, 3])
def test_a_restarted_engine_brings_back_the_last_chain_while_idle(tmp_path: Path, stages: int) -> None:
    """The first idle moment after a restart loads the last run's latest chain into the KV, so the first
    request that continues it copies nothing more, and its logits still equal a cold run's."""
    e = make(tmp_path, stages=stages)
    p1, r1 = chat(e, "Which code goes with shipment class 3?")
    answer(e, p1, r1)
    e.cache.flush()
    del e
    restarted = make(tmp_path, stages=stages)
    assert restarted.has_idle_work
    while restarted.idle_work():
        pass
    system_end = r1.chat_ends[0]
    assert restarted.slots[0].valid >= len(p1)
    assert restarted.slots[0].tokens[:system_end] == p1[:system_end]
    p2, r2 = chat(restarted, "Which code goes with shipment class 9?")
    warm, plan = restarted.prompt_logits(p2, r2)
    assert plan.restored_tokens == system_end
    assert plan.tier == "slot"  # not "disk": the warm start loaded it, and nothing more is copied
    cold = Engine(EngineConfig(threads=2, stages=stages))
    assert torch.equal(warm, cold.prompt_logits(p2, r2)[0])


def test_a_warm_start_stops_between_chunks_when_a_request_arrives(tmp_path: Path, cold: Engine) -> None:
    """Interrupted, the warm start keeps what it loaded as the slot; the request restores the rest itself."""
    e = make(tmp_path)
    p1, r1 = chat(e, "Which code goes with shipment class 3?")
    answer(e, p1, r1)
    e.cache.flush()
    restarted = make(tmp_path)
    arrivals = Arrivals(after=2)
    assert not restarted.idle_work(interrupt=arrivals)
    assert arrivals.asked == 3
    assert 0 < restarted.slots[0].valid < len(p1)  # two chunks loaded, the rest left
    assert restarted.slots[0].tokens[: restarted.slots[0].valid] == p1[: restarted.slots[0].valid]
    p2, r2 = chat(restarted, "Which code goes with shipment class 9?")
    warm, plan = restarted.prompt_logits(p2, r2)
    assert plan.restored_tokens == r1.chat_ends[0]
    assert plan.tier == "disk"  # the rest of the way came from disk
    assert torch.equal(warm, cold.prompt_logits(p2, r2)[0])


@pytest.mark.parametrize("damage", [_flip_a_byte, _truncate, _foreign_version, _other_model, _tensor_past_the_end])
def test_corrupt_files_are_never_restored(tmp_path: Path, cold: Engine, damage: object) -> None:
    e = make(tmp_path)
    p, r = chat(e, "Which code goes with shipment class 3?")
    answer(e, p, r)
    e.cache.flush()
    victim = _first_chunk_file(tmp_path)
    damage(victim)  # type: ignore[operator]
    damaged = victim.read_bytes()
    restarted = make(tmp_path)
    logits, plan = restarted.prompt_logits(p, r)
    assert plan.restored_tokens == 0
    restarted.cache.flush()  # the request recorded the chunk again: a fresh, valid file
    assert not victim.exists() or victim.read_bytes() != damaged
    assert (disk := restarted.cache.stats().disk) is not None and disk.corrupt_dropped >= 1
    assert torch.equal(logits, cold.prompt_logits(p, r)[0])


def test_salts_never_share_a_chunk(tmp_path: Path) -> None:
    e = make(tmp_path)
    p, r = chat(e, "Which code goes with shipment class 3?")
    a = CacheRequest(r.chat_ends, salt="tenant-a")
    b = CacheRequest(r.chat_ends, salt="tenant-b")
    assert e.prompt_logits(p, a)[1].restored_tokens == 0
    keys_a = set(stages_of(e)[0].cache.ram.keys())
    assert e.prompt_logits(p, b)[1].restored_tokens == 0
    assert not keys_a & (set(stages_of(e)[0].cache.ram.keys()) - keys_a)
    assert len(stages_of(e)[0].cache.ram.keys()) == 2 * len(keys_a)
    assert e.prompt_logits(p, a)[1].restored_tokens > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("system", [SYSTEM, SYSTEM_SHORT_TAIL], ids=["system", "short-tail"])
def test_logits_after_a_restore_are_bit_identical_to_a_cold_run(
    tmp_path: Path, dtype: str, stages: int, system: str
) -> None:
    """KV from another request (RAM), and from disk after a restart, changes not one bit of the logits."""
    cold = Engine(EngineConfig(threads=2, dtype=dtype, stages=stages))
    e = make(tmp_path, dtype=dtype, stages=stages)
    p1, r1 = chat(e, "Which code goes with shipment class 3?", system)
    p2, r2 = chat(e, "Summarise rule 17 for me, please.", system)
    # the short-tail system message ends less than TAIL_MERGE tokens past a grid point: its last piece is longer
    longest = max(b - a for a, b in aligned_chunks(0, len(p2), C, r2.chat_ends))
    assert longest > C if system == SYSTEM_SHORT_TAIL else longest == C
    reference = cold.prompt_logits(p2, r2)[0]  # cold: no cache, the same cuts
    e.prompt_logits(p1, r1)
    forget_slots(e)  # the prefix comes from the RAM tier
    warm, plan = e.prompt_logits(p2, r2)
    assert 0 < plan.restored_tokens < len(p2)
    assert plan.tier == "ram"
    assert torch.equal(warm, reference)
    again, plan = e.prompt_logits(p2, r2)  # the same prompt: nothing prefilled, the logits kept
    assert plan.restored_tokens == len(p2)
    assert torch.equal(again, reference)
    e.cache.flush()
    restarted = make(tmp_path, dtype=dtype, stages=stages)
    from_disk, plan = restarted.prompt_logits(p2, r2)
    assert plan.restored_tokens == len(p2)
    assert plan.tier == "disk"
    assert torch.equal(from_disk, reference)


def test_a_stage_missing_chunks_vetoes_longer_restores(tmp_path: Path, cold: Engine) -> None:
    e = make(tmp_path, stages=3)
    p1, r1 = chat(e, "Which code goes with shipment class 3?")
    answer(e, p1, r1)
    e.cache.flush()
    # stage 1 loses every chunk past position 384, in RAM and on disk
    cache = stages_of(e)[1].cache
    for key in cache.ram.keys():
        if (chunk := cache.ram.peek(key)) is not None and chunk.end > 384:
            cache.ram.drop(key)
    assert isinstance(cache.disk, DiskTier)
    for key in [k for k, d in cache.disk.index.entries.items() if d.end > 384]:
        cache.disk.drop(key)
    forget_slots(e)  # the slots would serve it all themselves: this is the caches' veto
    done = answer(e, p1, r1)
    assert done.cached_tokens == 384
    assert done.token_ids == answer(cold, p1, r1).token_ids
    stages_of(e)[2].cache.clear()
    forget_slots(e)
    done = answer(e, p1, CacheRequest(r1.chat_ends, salt=None))
    assert done.token_ids == answer(cold, p1, r1).token_ids


@pytest.mark.parametrize("rendered_reply", [True, False])
def test_the_next_turn_hits_on_the_previous_reply(tmp_path: Path, cold: Engine, rendered_reply: bool) -> None:
    """Told how the next turn renders the reply (as the server is), the cache prefills it that way, so the
    next turn restores up to the reply's end and prefills only its new message. Without that, the reply's
    tokens still hit up to their last cut."""
    e = make(tmp_path, scope="auto")
    history, p1, r1 = story(e)
    if not rendered_reply:
        r1 = replace(r1, next_turn=None)
    first = answer(e, p1, r1, max_tokens=200)
    assert first.completion_tokens >= C
    rendered = e.render_chat(next_messages(history, first.text))
    req = CacheRequest(rendered.boundaries)
    warm, plan = e.prompt_logits(rendered.token_ids, req)
    reply_end = rendered.boundaries[-2]
    if rendered_reply:
        assert plan.restored_tokens == reply_end
        assert plan.kind == "full"
    else:
        # the grid restarted at the previous prompt's end: the reply's tokens hit every C tokens after it
        assert cut_floor(reply_end - 1, C, rendered.boundaries) <= plan.restored_tokens < reply_end
    assert torch.equal(warm, cold.prompt_logits(rendered.token_ids, req)[0])


@pytest.mark.parametrize("stages", [1, 3])
def test_an_interrupted_background_piece_is_given_up_and_done_again_exactly(
    tmp_path: Path, cold: Engine, stages: int
) -> None:
    """The reply's prefill runs while idle and gives a piece up between layers when a request arrives; the
    KV it half wrote is not counted (with 3 stages the first has finished the piece: it is cut back), and
    the piece done again later still gives cold-run logits."""
    e = make(tmp_path, scope="off", stages=stages)
    history, p1, r1 = story(e)
    first = list(e.generate(p1, SamplingParams(max_tokens=60, temperature=0), cache_req=r1, background=True))[-1]
    assert isinstance(first, Finished)
    assert e.has_idle_work
    assert e.idle_work()  # renders the next turn: no forward yet
    valid, filled = e.slots[0].valid, [s.kvs[0].filled for s in stages_of(e)]
    arrivals = Arrivals(after=12)
    assert e.idle_work(interrupt=arrivals)  # gives up at layer 12
    assert arrivals.asked == 13
    assert e.slots[0].valid == valid
    assert [s.kvs[0].filled for s in stages_of(e)] == filled
    while e.idle_work():
        pass
    rendered = e.render_chat(next_messages(history, first.text))
    req = CacheRequest(rendered.boundaries)
    warm, plan = e.prompt_logits(rendered.token_ids, req)
    assert plan.restored_tokens == rendered.boundaries[-2]
    assert plan.kind == "full"
    assert torch.equal(warm, cold.prompt_logits(rendered.token_ids, req)[0])


def test_cache_cli_lists_and_clears(tmp_path: Path) -> None:
    import subprocess
    import sys

    e = make(tmp_path)
    p, r = chat(e, "hello")
    answer(e, p, r)
    e.cache.flush()

    def run(*a: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "anchorkv", "cache", *a, "--cache-dir", str(tmp_path)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    ls = run("ls")
    assert ls.returncode == 0
    assert "[0, 128)" in ls.stdout
    assert "chunks" in run("stats").stdout
    assert (tmp_path / "history.bin").exists()
    assert "removed" in run("clear").stdout
    assert not list(tmp_path.glob("*/*.kv"))
    assert not (tmp_path / "history.bin").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_exact_off_reuses_unaligned_boundaries_and_decoded_kv_with_the_same_float32_tokens(tmp_path: Path) -> None:
    cold = Engine(EngineConfig(threads=2, dtype="float32"))
    e = make(tmp_path, dtype="float32", exact=False)
    assert e.cache.unit == 1
    p1, r1 = chat(e, "Which code goes with shipment class 3?")
    p2, r2 = chat(e, "Summarise rule 17 for me, please.")
    first = answer(e, p1, r1, max_tokens=20)
    done = answer(e, p2, r2)
    system_end = r2.chat_ends[0]
    assert done.cached_tokens >= system_end
    assert done.cached_tokens % C != 0  # not rounded down to C
    assert done.token_ids == answer(cold, p2, r2).token_ids
    # the next turn of p1 restores past the prompt, into the KV that decode wrote
    turn2 = e.render_chat([
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Which code goes with shipment class 3?"},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "Thanks. And class 4?"},
    ])  # fmt: skip
    t2 = answer(e, turn2.token_ids, CacheRequest(turn2.boundaries))
    assert t2.cached_tokens > len(p1)
    assert t2.token_ids == answer(cold, turn2.token_ids, CacheRequest(turn2.boundaries)).token_ids


def test_auto_plus_keeps_a_session_on_disk_up_to_its_last_reply(tmp_path: Path) -> None:
    """auto+ writes a turn that continues the previous one whole, with its reply: after a restart the next
    turn restores up to that reply's end. Plain auto would keep only what two prompts share."""

    def turn(e: Engine, history: list[dict[str, str]]) -> Finished:
        r = e.render_chat(history)

        def next_turn(reply: str) -> tuple[list[int], list[int]]:
            rr = e.render_chat([*history, {"role": "assistant", "content": reply}], add_generation_prompt=False)
            return rr.token_ids, rr.boundaries

        done = answer(e, r.token_ids, CacheRequest(r.boundaries, next_turn=next_turn), max_tokens=8)
        history.append({"role": "assistant", "content": done.text})
        return done

    e = make(tmp_path, scope="auto+")
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which code goes with class 3?"}]
    turn(e, history)
    history.append({"role": "user", "content": "And class 4?"})
    turn(e, history)
    e.cache.flush()
    del e
    restarted = make(tmp_path, scope="auto+")
    history.append({"role": "user", "content": "And class 5?"})
    reply_end = restarted.render_chat(history).boundaries[-2]
    done = turn(restarted, history)
    assert done.cached_tokens == reply_end
    assert done.cache.tier == "disk"


def test_history_for_auto_survives_a_restart(tmp_path: Path) -> None:
    e = make(tmp_path, scope="auto")
    p1, r1 = chat(e, "Which code goes with shipment class 3?")
    assert e.cache.plan(p1, r1).records.disk_upto == 0  # auto has no history yet: nothing goes to disk
    e.prompt_logits(p1, r1)
    e.cache.flush()
    restarted = make(tmp_path, scope="auto")
    p2, r2 = chat(restarted, "Which code goes with shipment class 9?")
    # the LCP with p1, aligned down to the system prompt's end
    assert restarted.cache.plan(p2, r2).records.scope_boundary == r2.chat_ends[0]


def test_history_file_round_trips_and_a_damaged_one_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "history.bin"
    aa, bb = "a" * 32, "0123456789abcdef" * 2
    h = History(path, vocab_size=50_000)
    for i in range(MAX_WINDOW + 3):
        h.add(aa, [i, 40_000 + i, *range(i)])
    h.add(bb, list(range(MAX_TOKENS + 5)))
    h.save(h.snapshot())
    good = path.read_bytes()
    back = History(path, vocab_size=50_000)
    assert back.namespaces() == [aa, bb]
    assert back.recent(aa) == h.recent(aa)
    assert len(back.recent(aa)) == MAX_WINDOW
    assert back.recent(aa)[0][:2] == [3, 40_003]
    assert back.recent(bb) == [list(range(MAX_TOKENS))]
    assert History(path, vocab_size=40_000).namespaces() == []  # ids past this vocabulary: set aside
    assert (tmp_path / "history.bin.bad").exists()
    assert not path.exists()
    for damaged in (
        good[:-1],  # truncated
        good[: len(good) // 2] + b"\xff" * 8 + good[len(good) // 2 + 8 :],  # overwritten in the middle
        b'{"aa": [[1, 2]]}',  # an earlier form, or anything else
    ):
        path.write_bytes(damaged)
        assert History(path, vocab_size=50_000).namespaces() == []
        assert not path.exists()


def test_a_corrupt_or_odd_history_file_never_stops_the_start(tmp_path: Path) -> None:
    e = make(tmp_path, scope="auto")
    p1, r1 = chat(e, "Which code goes with shipment class 3?")
    answer(e, p1, r1)
    e.cache.flush()
    path = tmp_path / "history.bin"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + b"\xff" * 16 + data[len(data) // 2 + 16 :])
    assert make(tmp_path, scope="auto").cache.history.namespaces() == []
    path.unlink(missing_ok=True)
    path.mkdir()  # a directory where the file should be
    assert make(tmp_path, scope="auto").cache.history.namespaces() == []
    path.rmdir()
    target = tmp_path / "elsewhere.bin"
    target.write_bytes(data)
    path.symlink_to(target)  # never read through a link
    assert make(tmp_path, scope="auto").cache.history.namespaces() == []
    assert target.read_bytes() == data


def test_leftover_temp_files_are_cleaned_and_the_disk_budget_holds(tmp_path: Path) -> None:
    e = make(tmp_path)
    p, r = chat(e, "Which code goes with shipment class 3?")
    answer(e, p, r)
    e.cache.flush()
    folder = next(tmp_path.glob("*/namespace.json")).parent
    (folder / "deadbeef.tmp123").write_bytes(b"half a write")
    one_chunk = next(folder.glob("*.kv")).stat().st_size
    small = Engine(EngineConfig(threads=2), CacheConfig(ram_mb=512, cache_dir=tmp_path, scope="full", disk_budget_mb=1))
    assert not (folder / "deadbeef.tmp123").exists()
    p2, r2 = chat(small, "Something else entirely about rule 9.")
    answer(small, p2, r2)
    small.cache.flush()
    assert (disk := stages_of(small)[0].cache.disk) is not None
    assert disk.nbytes <= 2**20
    assert disk.evicted_bytes >= one_chunk

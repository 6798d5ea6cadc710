"""Many sequences at once on the bundled model: continuous batching that never changes a sequence's logits."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI
from openai.types.chat import ChatCompletionUserMessageParam

from anchorkv.cache.chunk import KVSlice
from anchorkv.cache.prefix_cache import CacheConfig, CacheRequest
from anchorkv.config import EngineConfig, ServerConfig
from anchorkv.engine.engine import Engine, Finished
from anchorkv.engine.kv import PREFAULT_BYTES, StageKV
from anchorkv.engine.pipeline import aligned_chunks
from anchorkv.engine.plan import Span
from anchorkv.engine.sampling import SamplingParams
from anchorkv.engine.scheduler import forwards, pick_slot, same_prefixes, schedule, should_wait
from anchorkv.engine.sequence import Sequence, Status
from anchorkv.engine.slot import Slot
from anchorkv.model.chat_template import RenderedPrompt
from anchorkv.server.app import create_app
from anchorkv.server.service import next_turn_renderer
from conftest import Arrivals, LiveServer, forget_slots, serve_in_thread, stages_of

TOPICS = ["cats", "the sea", "a robot", "bread", "a king", "rain", "maps", "bees"]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
RULES = {"role": "system", "content": " ".join(f"Rule {i}: be brief about item {i}." for i in range(30))}


@pytest.fixture(scope="module")
def engine8() -> Engine:
    return Engine(EngineConfig(threads=2, parallel=8))


@pytest.fixture(scope="module")
def engine8x3() -> Engine:
    return Engine(EngineConfig(threads=2, parallel=8, stages=3))


def prompt(engine: Engine, topic: str, words: int = 0) -> list[int]:
    padding = " ".join(f"Fact {i} about {topic} is worth knowing." for i in range(words))
    return engine.render_chat([{"role": "user", "content": f"{padding} Tell me a story about {topic}."}]).token_ids


class Run:
    """Sequences stepped by hand; every logits tensor each one sampled from, in order."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seqs: list[Sequence] = []
        self.logits: dict[str, list[torch.Tensor]] = {}

    def submit(self, tokens: list[int], params: SamplingParams = GREEDY, **kw: Any) -> Sequence:
        seq = self.engine.submit(tokens, params, lambda _: None, **kw)
        self.seqs.append(seq)
        self.logits[seq.id] = []
        return seq

    def step(self) -> None:
        assert self.engine.step()
        for seq in self.seqs:
            seen = self.logits[seq.id]
            if seq.logits is not None and (not seen or seen[-1] is not seq.logits):
                seen.append(seq.logits)

    def finish(self) -> None:
        while not all(s.done for s in self.seqs):
            self.step()


def alone(
    engine: Engine, tokens: list[int], params: SamplingParams = GREEDY, boundaries: list[int] | None = None
) -> tuple[list[int], list[torch.Tensor]]:
    """The prompt run alone, cut at `boundaries` as a request that gives them is (where the linears' rows
    depend on how many there are, a cold run cut elsewhere gives other bits)."""
    run = Run(engine)
    seq = run.submit(tokens, params, cache_req=CacheRequest(boundaries or []))
    run.finish()
    return seq.out, run.logits[seq.id]


def assert_same(expected: tuple[list[int], list[torch.Tensor]], seq: Sequence, run: Run) -> None:
    tokens, logits = expected
    assert seq.out == tokens
    assert len(run.logits[seq.id]) == len(logits)
    for a, b in zip(run.logits[seq.id], logits, strict=True):
        assert torch.equal(a, b)


def questions(engine: Engine, *qs: str) -> list[RenderedPrompt]:
    """Chat prompts sharing the RULES system message, one per question."""
    return [engine.render_chat([RULES, {"role": "user", "content": q}]) for q in qs]


def turn(engine: Engine, rendered: RenderedPrompt) -> tuple[Sequence, Run]:
    """The prompt run to its end alone, its boundaries given to the cache, its reply not kept."""
    run = Run(engine)
    seq = run.submit(rendered.token_ids, cache_req=CacheRequest(rendered.boundaries), keep_reply=False)
    run.finish()
    return seq, run


@pytest.mark.parametrize("k", [2, 4, 8])
def test_a_batch_gives_every_sequence_the_logits_it_gets_alone(engine8: Engine, k: int) -> None:
    prompts = [prompt(engine8, t) for t in TOPICS[:k]]
    expected = [alone(engine8, p) for p in prompts]
    run = Run(engine8)
    seqs = [run.submit(p) for p in prompts]
    run.finish()
    for e, s in zip(expected, seqs, strict=True):
        assert_same(e, s, run)


@pytest.mark.parametrize("fixture", ["engine8", "engine8x3"])
def test_sequences_joining_mid_way_and_prefill_between_decode_steps_stay_exact(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    """Two sequences decode; two more join, one with a prompt of several prefill pieces run between their
    decode steps; a seeded sampled one among them. Each equals its lone run, logit for logit."""
    engine: Engine = request.getfixturevalue(fixture)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    first = [prompt(engine, "cats"), prompt(engine, "rain")]
    later = [prompt(engine, "bees", words=40), prompt(engine, "maps")]
    params = [GREEDY, seeded, GREEDY, seeded]
    expected = [alone(engine, p, q) for p, q in zip([*first, *later], params, strict=True)]
    run = Run(engine)
    seqs = [run.submit(p, q) for p, q in zip(first, params[:2], strict=True)]
    for _ in range(4):
        run.step()
    seqs += [run.submit(p, q) for p, q in zip(later, params[2:], strict=True)]
    run.finish()
    for e, s in zip(expected, seqs, strict=True):
        assert_same(e, s, run)


@pytest.mark.parametrize("fixture", ["engine8", "engine8x3"])
def test_rows_sharing_a_system_prompt_read_it_once_and_keep_their_lone_logits(
    fixture: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four sessions on one 900-token system prompt decode together: each row reads the prompt's KV from the
    first row's slot (the decode steps' spans say so), and each still equals its lone run, logit for logit."""
    engine: Engine = request.getfixturevalue(fixture)
    system = " ".join(f"Rule {i}: answer in the voice of a ship's clerk, citing form {i}." for i in range(50))
    prompts = [
        engine.render_chat([{"role": "system", "content": system}, {"role": "user", "content": f"Tell me about {t}."}]).token_ids
        for t in TOPICS[:4]
    ]  # fmt: skip
    assert len(prompts[0]) > 900
    expected = [alone(engine, p) for p in prompts]
    steps: list[list[Span]] = []
    decode_rows = engine.pipeline.decode_rows

    def spy(rows: list) -> torch.Tensor:
        steps.append([sp for _, sp in rows])
        return decode_rows(rows)

    monkeypatch.setattr(engine.pipeline, "decode_rows", spy)
    run = Run(engine)
    seqs = [run.submit(p) for p in prompts]
    run.finish()
    for e, s in zip(expected, seqs, strict=True):
        assert_same(e, s, run)
    together = [spans for spans in steps if len(spans) > 1]
    assert together
    for first, *others in together:
        assert first.same == (-1, 0)
        assert all(sp.same[0] == first.slot and sp.same[1] >= 768 for sp in others)


@pytest.mark.parametrize("fixture", ["engine8", "engine8x3"])
def test_a_sequences_pieces_in_one_step_run_as_one_forward_with_their_bits(
    fixture: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt cut at its messages' ends into pieces that fit one step's budget runs them as one forward,
    and every logit equals the piece-by-piece run's."""
    engine: Engine = request.getfixturevalue(fixture)
    if not engine.prefill_rows:
        pytest.skip("this CPU's prefill linears depend on the rows beside them: pieces run one by one")
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "A pear."},
        {"role": "user", "content": "Now name a vegetable and say why it is good for soup."},
    ]
    rp = engine.render_chat(messages)
    req = CacheRequest(rp.boundaries)
    assert len(rp.token_ids) <= engine.prefill_rows and len([e for e in rp.boundaries if e < len(rp.token_ids)]) >= 3
    calls: list[int] = []
    forward = engine.pipeline.forward

    def spy(tokens: list[int], *args: Any, **kw: Any) -> torch.Tensor:
        calls.append(len(tokens))
        return forward(tokens, *args, **kw)

    monkeypatch.setattr(engine.pipeline, "forward", spy)

    def run() -> tuple[list[int], list[torch.Tensor]]:
        r = Run(engine)
        seq = r.submit(rp.token_ids, cache_req=req)
        r.finish()
        return seq.out, r.logits[seq.id]

    merged = run()
    assert calls == [len(rp.token_ids)]
    calls.clear()
    monkeypatch.setattr(engine, "prefill_rows", 0)
    apart = run()
    assert len(calls) >= 4
    assert merged[0] == apart[0]
    for a, b in zip(merged[1], apart[1], strict=True):
        assert torch.equal(a, b)


def test_where_pieces_merge_a_prompts_logits_do_not_depend_on_where_it_is_cut(engine8: Engine) -> None:
    """What the start-up check promises when it lets pieces merge (padding short inputs to the linears' row
    floor where the CPU needs one): every row's bits are its own, so a long prompt cut at its messages' ends
    and the same prompt cut on the grid alone (pieces of other lengths, short ones among them) agree."""
    if not engine8.prefill_rows:
        pytest.skip("this CPU's prefill linears depend on the rows beside them: pieces run one by one")
    rules = {"role": "system", "content": " ".join(f"Rule {i}: be brief about topic {i}." for i in range(60))}
    rp = engine8.render_chat([rules, {"role": "user", "content": "Which rule is about topic 7?"}])
    n, c = len(rp.token_ids), engine8.cfg.chunk_size
    by_message, by_grid = aligned_chunks(0, n, c, rp.boundaries), aligned_chunks(0, n, c)
    assert by_message != by_grid and min(b - a for a, b in by_message) < 32  # the user's message: one short piece
    cut, _ = engine8.prompt_logits(rp.token_ids, CacheRequest(rp.boundaries))
    grid, _ = engine8.prompt_logits(rp.token_ids)
    assert torch.equal(cut, grid)


def test_forwards_merge_a_sequences_pieces_up_to_the_rows_and_never_past_a_turn_start() -> None:
    a = Sequence("a", list(range(300)), GREEDY, CacheRequest(turn_starts=(90,)), lambda _: None, threading.Event(), 0.0)
    b = Sequence("b", list(range(300)), GREEDY, CacheRequest(), lambda _: None, threading.Event(), 0.0)
    pieces = [(a, (0, 40)), (a, (40, 90)), (a, (90, 150)), (b, (0, 100)), (b, (100, 190)), (b, (190, 250))]
    assert forwards(pieces, 191) == [(a, (0, 90), 2), (a, (90, 150), 1), (b, (0, 190), 2), (b, (190, 250), 1)]
    assert forwards(pieces, 0) == [(s, ab, 1) for s, ab in pieces]


def test_a_long_cold_prompt_pauses_decoding_streams_for_one_piece_a_step(engine8: Engine) -> None:
    run = Run(engine8)
    decoders = [run.submit(prompt(engine8, t), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
                for t in TOPICS[:3]]  # fmt: skip
    while not all(s.status is Status.DECODING for s in decoders):
        run.step()
    long = run.submit(prompt(engine8, "history", words=80))
    steps_prefilling = 0
    while long.status is not Status.DECODING:
        before = [len(s.out) for s in decoders]
        pieces = list(long.pieces)
        run.step()
        steps_prefilling += 1
        assert [len(s.out) for s in decoders] == [n + 1 for n in before]  # every stream advanced this step
        ran = pieces[: len(pieces) - len(long.pieces)]
        assert len(ran) <= 1 or sum(b - a for a, b in ran) <= engine8.prefill_budget  # one piece's worth
    assert steps_prefilling >= 5  # the prompt took several pieces, each between decode steps
    run.finish()


def test_a_prompt_done_in_a_step_samples_its_first_token_before_the_decode_rows_run(
    engine8: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = Run(engine8)
    decoders = [run.submit(prompt(engine8, t)) for t in TOPICS[:2]]
    while not all(s.status is Status.DECODING for s in decoders):
        run.step()
    late = run.submit(prompt(engine8, "maps"))
    sampled_before: list[int] = []  # how many tokens the new prompt had when the decode rows ran
    forward = engine8.pipeline.decode_rows

    def decode_rows(rows: list[tuple[int, Span]]) -> torch.Tensor:
        sampled_before.append(len(late.out))
        return forward(rows)

    monkeypatch.setattr(engine8.pipeline, "decode_rows", decode_rows)
    before = [len(s.out) for s in decoders]
    run.step()  # the new prompt's one piece, then the decoders' next tokens
    assert sampled_before == [1]
    assert [len(s.out) for s in decoders] == [n + 1 for n in before]
    run.finish()


def test_a_cancelled_sequence_leaves_the_others_untouched(engine8: Engine) -> None:
    prompts = [prompt(engine8, t) for t in TOPICS[:3]]
    expected = [alone(engine8, p) for p in prompts]
    run = Run(engine8)
    cancel = threading.Event()
    seqs = [run.submit(prompts[0]), run.submit(prompts[1], cancel=cancel), run.submit(prompts[2])]
    for _ in range(5):
        run.step()
    cancel.set()
    run.finish()
    assert 0 < len(seqs[1].out) < GREEDY.max_tokens
    assert_same(expected[0], seqs[0], run)
    assert_same(expected[2], seqs[2], run)
    assert engine8.slots[seqs[1].slot or 0].seq is None  # its slot is free again


def test_a_sessions_next_turn_restores_while_others_decode(tmp_path: Path) -> None:
    engine = Engine(EngineConfig(threads=2, parallel=4), CacheConfig(ram_mb=256, cache_dir=tmp_path, scope="full"))
    system = {"role": "system", "content": " ".join(f"Rule {i}: be brief about topic {i}." for i in range(60))}
    turn1 = engine.render_chat([system, {"role": "user", "content": "Hello there."}])
    run = Run(engine)
    first = run.submit(turn1.token_ids, cache_req=CacheRequest(turn1.boundaries))
    run.finish()
    others = [run.submit(prompt(engine, t), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
              for t in TOPICS[:2]]  # fmt: skip
    while not all(s.status is Status.DECODING for s in others):
        run.step()
    reply = engine.tokenizer.decode(first.out)
    turn2 = engine.render_chat(
        [system, {"role": "user", "content": "Hello there."}, {"role": "assistant", "content": reply},
         {"role": "user", "content": "And now?"}]
    )  # fmt: skip
    second = run.submit(turn2.token_ids, cache_req=CacheRequest(turn2.boundaries))
    run.step()
    assert second.restored.tokens >= turn1.boundaries[0]
    assert all(s.status is Status.DECODING for s in others)  # they kept decoding meanwhile
    run.finish()
    cold = Engine(EngineConfig(threads=2, parallel=1))
    assert_same(alone(cold, turn2.token_ids, boundaries=turn2.boundaries), second, run)


def test_background_work_beside_decoding_gives_way_to_an_arriving_request(tmp_path: Path) -> None:
    """A finished turn's reply is prefilled again beside the others' decode steps; a request arriving
    meanwhile stops that piece between two layers instead of waiting for it, and the piece runs later."""
    engine = Engine(EngineConfig(threads=2, parallel=4), CacheConfig(ram_mb=256, cache_dir=tmp_path, scope="full"))
    run = Run(engine)
    messages = [{"role": "user", "content": "Tell me a story about cats."}]
    rendered = engine.render_chat(messages)
    req = CacheRequest(rendered.boundaries, next_turn=next_turn_renderer(engine, messages, None, 0))
    short = run.submit(rendered.token_ids, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), cache_req=req)
    other = run.submit(prompt(engine, "bees"), SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    while not short.done:
        run.step()
    assert short.slot is not None
    slot = engine.slots[short.slot]
    assert slot.reply is not None
    while slot.reply.began is None:  # the next turn rendered: its prefill comes next
        run.step()
    valid, decoded = slot.valid, len(other.out)
    arrivals = Arrivals(after=5)
    assert engine.step(interrupt=arrivals)
    assert arrivals.asked == 6  # given up at the sixth layer
    assert slot.valid == valid
    assert slot.reply is not None
    assert len(other.out) == decoded + 1  # the decode step itself ran
    run.step()
    assert slot.valid > valid
    run.finish()


def test_a_prompt_sharing_a_prefix_with_one_being_prefilled_waits_and_restores_it(tmp_path: Path) -> None:
    engine = Engine(EngineConfig(threads=2, parallel=4), CacheConfig(ram_mb=256, scope="off"))
    system = {"role": "system", "content": " ".join(f"Rule {i}: be brief about topic {i}." for i in range(60))}
    a = engine.render_chat([system, {"role": "user", "content": "Hello there."}])
    b = engine.render_chat([system, {"role": "user", "content": "Good morning."}])
    run = Run(engine)
    first = run.submit(a.token_ids, cache_req=CacheRequest(a.boundaries))
    second = run.submit(b.token_ids, cache_req=CacheRequest(b.boundaries))
    run.step()
    assert first.status is Status.PREFILLING
    assert second.status is Status.WAITING
    run.finish()
    assert second.restored.tokens == b.boundaries[0]  # the system prompt
    assert_same(alone(Engine(EngineConfig(threads=2, parallel=1)), b.token_ids, boundaries=b.boundaries), second, run)
    c = engine.render_chat([system, {"role": "user", "content": "Good evening."}])
    run = Run(engine)
    third = run.submit(a.token_ids, cache_req=CacheRequest(a.boundaries, salt="tenant-a"))
    fourth = run.submit(c.token_ids, cache_req=CacheRequest(c.boundaries, salt="tenant-b"))
    run.step()
    assert third.status is Status.PREFILLING
    assert fourth.status is not Status.WAITING  # another tenant's recording could never serve it


# -- the policy alone ----------------------------------------------------------------------------------
def seq(tokens: list[int], status: Status, pieces: list[tuple[int, int]] = ()) -> Sequence:  # type: ignore[assignment]
    s = Sequence("x", tokens, GREEDY, CacheRequest(), lambda _: None, threading.Event(), 0.0, status=status)
    s.pieces.extend(pieces)
    return s


def test_schedule_takes_every_decode_row_and_prefill_pieces_oldest_first_up_to_the_budget() -> None:
    d1, d2 = seq([1], Status.DECODING), seq([2], Status.DECODING)
    p1 = seq([3] * 300, Status.PREFILLING, [(0, 128), (128, 256), (256, 300)])
    p2 = seq([4] * 50, Status.PREFILLING, [(0, 50)])
    plan = schedule([p1, d1, p2, d2], budget=128)
    assert plan.decode == [d1, d2]
    assert plan.prefill == [(p1, (0, 128))]  # the budget is full: p2 waits, although it would fit alone
    small = schedule([p2, d1], budget=128)
    assert small.prefill == [(p2, (0, 50))]
    big = schedule([seq([5] * 400, Status.PREFILLING, [(0, 190)])], budget=128)
    assert big.prefill
    assert big.prefill[0][1] == (0, 190)  # one piece always runs, even past the budget


def test_pick_slot_prefers_the_slot_holding_the_prompts_prefix_then_the_least_recently_used() -> None:
    slots = [Slot(0, used=3.0), Slot(1, used=1.0), Slot(2, used=2.0)]
    slots[2].hold([1, 2, 3, 4], [], 4, None)
    assert pick_slot([1, 2, 3, 9], None, slots) is slots[2]
    assert pick_slot([1, 2, 3, 9], "tenant", slots) is slots[1]  # another salt shares nothing
    assert pick_slot([7], None, slots) is slots[1]
    for s in slots:
        s.seq = seq([1], Status.DECODING)
    assert pick_slot([1], None, slots) is None


def test_same_prefixes_point_each_row_at_the_earliest_row_holding_its_prefix() -> None:
    shared = {(0, 1): 512, (0, 2): 512, (1, 2): 1024, (0, 3): 0, (1, 3): 0, (2, 3): 0}
    same = same_prefixes(4, lambda a, b: shared[a, b])
    # row 2 shares more with row 1 than with row 0, so it reads row 1; row 3 shares nothing
    assert same == [(-1, 0), (0, 512), (1, 1024), (-1, 0)]
    chain = {(0, 1): 1024, (0, 2): 512, (1, 2): 768}
    assert same_prefixes(3, lambda a, b: chain[a, b]) == [(-1, 0), (0, 1024), (0, 768)]  # row 1 holds it from row 0


def test_should_wait_only_for_a_prefix_worth_a_piece_more_than_the_cache_has() -> None:
    other = seq(list(range(600)), Status.PREFILLING)
    assert should_wait([*range(400), 9999], 0, [other], 128)
    assert not should_wait([*range(400), 9999], 300, [other], 128)
    assert not should_wait([*range(100), 9999], 0, [other], 128)


# -- over HTTP -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live8(engine8: Engine) -> Iterator[LiveServer]:
    yield from serve_in_thread(create_app(engine8, ServerConfig(max_queue=2)))


@pytest.mark.parametrize("k", [4, 8])
def test_concurrent_streaming_chats_equal_the_same_requests_one_at_a_time(live8: LiveServer, k: int) -> None:
    client = OpenAI(base_url=f"{live8.url}/v1", api_key="unused")
    bodies: list[ChatCompletionUserMessageParam] = [
        {"role": "user", "content": f"Tell me a story about {t}."} for t in TOPICS[:k]
    ]

    def ask(message: ChatCompletionUserMessageParam) -> str:
        stream = client.chat.completions.create(
            model="any", messages=[message], max_tokens=20, temperature=0, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    one_by_one = [ask(m) for m in bodies]
    out: list[str] = [""] * k

    def worker(i: int) -> None:
        out[i] = ask(bodies[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert out == one_by_one
    assert all(out)


@pytest.mark.parametrize("grace_s", [2.0, 0.0])
def test_after_a_reply_ends_the_next_step_waits_for_that_clients_next_turn(
    live8: LiveServer, engine8: Engine, grace_s: float
) -> None:
    """An agent sends its next turn as soon as its reply ends; the scheduler holds the others' next decode
    step up to --turn-grace-ms for it (0: never), so the turn's prefill need not wait a decode step."""
    worker = live8.app.state.worker
    worker.turn_grace_s = grace_s
    url = f"{live8.url}/v1/chat/completions"
    long = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 60, "ignore_eos": True}
    turn = {"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2, "ignore_eos": True}
    try:
        with httpx.Client(timeout=120) as http:
            other = threading.Thread(target=lambda: http.post(url, json=long))
            other.start()
            deadline = time.monotonic() + 60
            while not any(s.status is Status.DECODING for s in engine8.running) and time.monotonic() < deadline:
                time.sleep(0.01)
            (decoding,) = engine8.running
            assert http.post(url, json=turn).status_code == 200
            tokens = len(decoding.out)
            time.sleep(0.3)  # the client is slow to send its next turn
            held = len(decoding.out) == tokens
            worker.turn_grace_s = 0.0  # no wait after the next turn's reply
            assert http.post(url, json=turn).status_code == 200
            other.join(timeout=120)
        assert held == (grace_s > 0.3)
        assert len(decoding.out) == 60
    finally:
        worker.turn_grace_s = ServerConfig().turn_grace_ms / 1000


def test_503_when_every_slot_runs_and_the_queue_is_full(live8: LiveServer, engine8: Engine) -> None:
    worker = live8.app.state.worker
    body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 400, "ignore_eos": True}
    streams = []
    with httpx.Client(timeout=60) as http:
        deadline = time.monotonic() + 60
        for i in range(8):  # one at a time: the queue holds only two
            streams.append(http.stream("POST", f"{live8.url}/v1/chat/completions", json={**body, "stream": True}))
            assert streams[-1].__enter__().status_code == 200
            while worker.running < i + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert worker.running == 8  # every slot runs a sequence
        batch = {"prompt": ["One,", "Two,", "Three,"], "max_tokens": 2}
        assert httpx.post(f"{live8.url}/v1/completions", json=batch, timeout=10).status_code == 503
        while worker.waiting and time.monotonic() < deadline:
            time.sleep(0.01)  # a batch the queue cannot hold fails whole: its queued prompts are dropped
        assert worker.waiting == 0
        results: list[int] = []
        posts = [threading.Thread(target=lambda: results.append(
            httpx.post(f"{live8.url}/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=120).status_code
        )) for _ in range(2)]  # fmt: skip
        for t in posts:
            t.start()
        while worker.waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = httpx.post(f"{live8.url}/v1/chat/completions", json=body, timeout=10)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "server_busy"
        for s in streams:
            s.__exit__(None, None, None)  # the clients go away: their slots free at the next step
        for t in posts:
            t.join(timeout=120)
    assert results == [200, 200]


def test_a_reply_whose_next_turn_cannot_fit_is_not_prefilled_and_serving_goes_on(tmp_path: Path) -> None:
    """Found by Claude Code: a turn that filled the context left a reply whose re-prefill, ending past the
    context with the reply's end-of-turn tokens, ran past it."""
    engine = Engine(EngineConfig(threads=2, parallel=2, ctx=160), CacheConfig(ram_mb=64, cache_dir=tmp_path))
    messages = [{"role": "user", "content": " ".join(f"Fact {i} about rain." for i in range(12))}]
    rendered = engine.render_chat(messages)
    req = CacheRequest(rendered.boundaries, next_turn=next_turn_renderer(engine, messages, None, False))
    params = SamplingParams(max_tokens=engine.ctx - len(rendered.token_ids), temperature=0, ignore_eos=True)
    done = list(engine.generate(rendered.token_ids, params, cache_req=req, background=True))[-1]
    assert isinstance(done, Finished) and done.finish_reason == "length"
    while engine.has_idle_work:
        engine.idle_work()
    again = list(engine.generate(prompt(engine, "maps"), GREEDY))[-1]
    assert isinstance(again, Finished) and again.completion_tokens == GREEDY.max_tokens


@pytest.mark.parametrize("stages", [1, 3])
def test_an_idle_engine_makes_its_kv_pool_resident_and_what_a_slot_holds_still_serves(stages: int) -> None:
    """While idle, every slot's KV becomes resident, a MiB a stage at a time until a request arrives,
    writing nothing a slot holds: the next turn still continues from the slot itself, with its lone cold
    run's logits."""
    cfg = EngineConfig(threads=2, parallel=2, stages=stages, ctx=1024)
    engine = Engine(cfg, CacheConfig(ram_mb=64))
    first, second = questions(engine, "A fish?", "A bird?")
    cold = Engine(replace(cfg, parallel=1, kv_prefault=False))
    assert not cold.has_idle_work
    expected = alone(cold, second.token_ids, boundaries=second.boundaries)
    turn(engine, first)
    pool = [i.kv_bytes for i in engine.stage_infos]
    assert all(t < b for t, b in zip(engine.pipeline.kv_touched(), pool, strict=True))
    before = engine.pipeline.kv_touched()
    assert engine.idle_work(interrupt=lambda: True)  # a request came: one MiB a stage, then it gives way
    grown = [a - b for a, b in zip(engine.pipeline.kv_touched(), before, strict=True)]
    assert all(0 < g <= PREFAULT_BYTES for g in grown)
    while engine.idle_work():
        pass
    assert engine.pipeline.kv_touched() == pool
    seq, run = turn(engine, second)
    assert seq.restored.tokens == first.boundaries[0] and seq.restored.tier == "slot"  # nothing copied
    assert_same(expected, seq, run)


@pytest.mark.parametrize("stages", [1, 3])
def test_a_slot_serves_a_prefix_the_cache_has_since_dropped_and_records_it_again(stages: int) -> None:
    """Every stage's cache forgets the first turn (as under RAM pressure without a disk tier), its slot
    still holds it: the next turn continues from the slot, with its lone cold run's logits, and records
    the prefix again for whoever comes next."""
    cfg = EngineConfig(threads=2, parallel=2, stages=stages, ctx=1024, kv_prefault=False)
    engine = Engine(cfg, CacheConfig(ram_mb=64))
    first, second, third = questions(engine, "A fish?", "A bird?", "A cat?")
    expected = alone(Engine(replace(cfg, parallel=1)), second.token_ids, boundaries=second.boundaries)
    turn(engine, first)
    for cache in (s.cache for s in stages_of(engine)):
        cache.clear()
    assert engine.cache.plan(second.token_ids, CacheRequest(second.boundaries)).restore_to == 0
    seq, run = turn(engine, second)
    assert seq.restored.tokens == first.boundaries[0] and seq.restored.tier == "slot"
    assert_same(expected, seq, run)
    forget_slots(engine)
    seq, _ = turn(engine, third)
    assert seq.restored.tokens == first.boundaries[0] and seq.restored.tier == "ram"


def test_a_prompt_whose_slot_holds_its_prefix_does_not_wait_for_another_prefilling_it() -> None:
    """The tiers have dropped a finished turn while another sequence, in the other slot, prefills the same
    system prompt: the turn's continuation takes its slot's copy at once instead of waiting for that one."""
    engine = Engine(EngineConfig(threads=2, parallel=2, ctx=1024, kv_prefault=False), CacheConfig(ram_mb=64))
    first, other = questions(engine, "A fish?", "A bird? " + "Say more. " * 60)
    two = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    run = Run(engine)
    a = run.submit(first.token_ids, two, cache_req=CacheRequest(first.boundaries), keep_reply=False)
    while a.status is not Status.DECODING:
        run.step()
    for cache in (s.cache for s in stages_of(engine)):
        cache.clear()
    b = run.submit(other.token_ids, cache_req=CacheRequest(other.boundaries), keep_reply=False)
    run.step()  # a's last token; b takes the other slot and prefills its first piece
    assert a.done and b.status is Status.PREFILLING and len(b.pieces) > 1
    more = engine.render_chat([RULES, {"role": "user", "content": "A fish?"}, {"role": "assistant", "content": "Yes."}])
    c = run.submit(more.token_ids, cache_req=CacheRequest(more.boundaries), keep_reply=False)
    run.step()
    assert c.slot == a.slot and c.status is not Status.WAITING
    assert c.restored.tokens >= first.boundaries[0] and c.restored.tier == "slot"
    run.finish()
    cold = Engine(EngineConfig(threads=2, parallel=1, ctx=1024))
    assert_same(alone(cold, more.token_ids, boundaries=more.boundaries), c, run)


def test_kv_pools_larger_than_half_the_free_memory_are_not_made_resident(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As on a host with little memory free: the pools here are 2 slots of 1024 positions, 45 MiB in all,
    checked in each stage as if every stage shared its host."""
    for stages in (1, 3):
        monkeypatch.setattr("anchorkv.engine.stage.available_memory", lambda: 80 << 20)
        engine = Engine(EngineConfig(threads=2, parallel=2, ctx=1024, stages=stages))
        while engine.idle_work():
            pass
        assert engine.pipeline.kv_touched() == [0] * stages
        assert "more than half the memory available" in caplog.text
        caplog.clear()
        monkeypatch.setattr("anchorkv.engine.stage.available_memory", lambda: 100 << 20)
        engine = Engine(EngineConfig(threads=2, parallel=2, ctx=1024, stages=stages))
        while engine.idle_work():
            pass
        assert engine.pipeline.kv_touched() == [i.kv_bytes for i in engine.stage_infos]
        assert not caplog.text


def test_prefault_makes_a_pool_resident_a_mib_at_a_time_past_what_it_holds() -> None:
    kv = StageKV(2, 3, 8192, 64, torch.bfloat16)  # 768 bytes a position in a layer: 1365 a MiB
    held = KVSlice(0, torch.randn(2, 3, 100, 64).to(torch.bfloat16), torch.randn(2, 3, 100, 64).to(torch.bfloat16))
    kv.restore(held)
    per_layer = -(-(8192 - 100) // 1365)  # steps: 1365 positions each, the last fewer
    steps = 1
    while kv.prefault():
        done, part = divmod(steps, per_layer)
        assert kv.touched_bytes == 768 * (2 * 100 + done * (8192 - 100) + part * 1365)
        steps += 1
    assert steps == 2 * per_layer
    assert kv.touched_bytes == kv.k.nbytes + kv.v.nbytes
    assert torch.equal(kv.k[:, :, :100], held.k) and torch.equal(kv.v[:, :, :100], held.v)
    assert not kv.prefault()

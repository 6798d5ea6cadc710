"""Generation on the bundled model: sensible, deterministic, stage-independent, stoppable."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from anchorkv.config import EngineConfig
from anchorkv.engine.engine import Delta, Engine, Finished, PromptTooLong
from anchorkv.engine.pipeline import aligned_chunks
from anchorkv.engine.plan import RequestPlan
from anchorkv.engine.sampling import Sampler, SamplingParams
from anchorkv.engine.text_stream import TextStream
from conftest import stages_of

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]


def generate(engine: Engine, prompt: list[int], **kw: Any) -> tuple[str, list[int], str]:
    params = SamplingParams(**{"max_tokens": 24, "temperature": 0.0, **kw})
    events = list(engine.generate(prompt, params))
    done = events[-1]
    assert isinstance(done, Finished)
    streamed = "".join(e.text for e in events if isinstance(e, Delta))
    assert streamed == done.text
    return done.text, done.token_ids, done.finish_reason


def test_names_paris(engine: Engine) -> None:
    text, _, finish = generate(engine, engine.render_chat(PROMPTS[0]).token_ids)
    assert "Paris" in text
    assert finish == "stop"


def test_greedy_is_deterministic(engine: Engine) -> None:
    prompt = engine.render_chat(PROMPTS[1]).token_ids
    assert generate(engine, prompt)[1] == generate(engine, prompt)[1]


def test_three_stages_give_the_same_tokens_and_logits(engine: Engine, engine3: Engine) -> None:
    assert [len(s.layer_range) for s in stages_of(engine3)] == [10, 10, 10]
    for messages in PROMPTS:
        prompt = engine.render_chat(messages).token_ids
        assert generate(engine, prompt)[1] == generate(engine3, prompt)[1]
        with torch.inference_mode():
            a = engine.pipeline.prefill(prompt, 0, RequestPlan("a", len(prompt)))
            b = engine3.pipeline.prefill(prompt, 0, RequestPlan("b", len(prompt)))
        assert torch.equal(a, b)


def test_seed_makes_sampling_reproducible(engine: Engine) -> None:
    prompt = engine.render_chat(PROMPTS[1]).token_ids
    a = generate(engine, prompt, temperature=1.0, seed=7)[1]
    b = generate(engine, prompt, temperature=1.0, seed=7)[1]
    c = generate(engine, prompt, temperature=1.0, seed=8)[1]
    assert a == b
    assert a != c


def test_stop_string_cuts_the_text(engine: Engine) -> None:
    prompt = engine.render_chat(PROMPTS[0]).token_ids
    full, _, _ = generate(engine, prompt)
    text, _, finish = generate(engine, prompt, stop=("Paris",))
    assert finish == "stop"
    assert text == full[: full.index("Paris")]


def test_max_tokens_gives_length(engine: Engine) -> None:
    prompt = engine.render_chat(PROMPTS[1]).token_ids
    _, ids, finish = generate(engine, prompt, max_tokens=3)
    assert len(ids) == 3
    assert finish == "length"


def test_text_stream_holds_back_a_possible_stop_string(engine: Engine) -> None:
    tok = engine.tokenizer
    stream = TextStream(tok, stop=("END!",))
    out = "".join(stream.push(t) for t in tok.encode("hello EN"))
    assert out == "hello "
    assert not stream.stopped
    out += "".join(stream.push(t) for t in tok.encode("D! more"))
    assert stream.stopped
    assert out + stream.flush() == "hello "


def test_prefill_is_cut_every_c_tokens_restarting_at_each_chat_boundary() -> None:
    assert aligned_chunks(0, 300, 128) == [(0, 128), (128, 256), (256, 300)]
    assert aligned_chunks(256, 300, 128) == [(256, 300)]
    assert aligned_chunks(100, 300, 128) == [(100, 128), (128, 256), (256, 300)]
    # a message shorter than C is one piece wherever it falls
    assert aligned_chunks(100, 300, 128, [50, 140, 256, 300]) == [(100, 140), (140, 256), (256, 300)]
    assert aligned_chunks(140, 500, 128, [50, 140]) == [(140, 268), (268, 396), (396, 500)]


def test_quantized_decode_weights_leave_prefill_untouched(engine: Engine) -> None:
    """Prefill, whose KV the cache reuses, reads the dense weights whatever --decode-weights says. Decode
    reads the Q4_1 layers as int4 and the Q8_0 embedding, which is also the head, as two int4 parts."""
    assert engine.decode_weights == {"int4": 120, "int4x2": 1}
    dense = Engine(EngineConfig(threads=engine.cfg.threads, decode_weights="dense"))
    prompt = engine.render_chat(PROMPTS[0]).token_ids
    with torch.inference_mode():
        a = engine.pipeline.prefill(prompt, 0, RequestPlan("a", len(prompt)), all_logits=True)
        b = dense.pipeline.prefill(prompt, 0, RequestPlan("b", len(prompt)), all_logits=True)
    assert torch.equal(a, b)
    assert "Paris" in generate(dense, prompt)[0]


def test_logits_do_not_depend_on_the_thread_count(engine: Engine) -> None:
    """Stages sharing a host on a local Ray instance split its cores (one thread each here), and must
    still give the logits of one stage in one process on every core: prefill and decode."""
    prompt = engine.render_chat(PROMPTS[0]).token_ids
    runs = []
    one = Engine(EngineConfig(threads=1, parallel=1))  # torch's thread count is the process's
    try:
        for e, threads in ((one, 1), (engine, engine.cfg.threads)):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                plan = RequestPlan("t", len(prompt) + 4)
                logits = [e.pipeline.prefill(prompt, 0, plan, all_logits=True)]
                logits += [e.pipeline.decode(t, len(prompt) + i, plan) for i, t in enumerate(prompt[:4])]
            runs.append(logits)
    finally:
        torch.set_num_threads(engine.cfg.threads)
    assert engine.cfg.threads > 1
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_an_empty_prompt_is_refused_not_run(engine: Engine) -> None:
    with pytest.raises(PromptTooLong, match="empty"):
        engine.prompt_logits([])
    assert not engine.has_work


def test_token_bytes_spell_the_text_even_inside_a_character(engine: Engine) -> None:
    """What `logprobs` reports as each token's bytes: exact, also for a token holding part of a character."""
    tok, text = engine.tokenizer, "naïve café — 日本語 🙂"
    pieces = [tok.token_bytes(t) for t in tok.encode(text)]
    assert b"".join(pieces) == text.encode()
    with pytest.raises(UnicodeDecodeError):
        [p.decode() for p in pieces]


def test_penalties_steer_greedy_choices_as_openai_and_vllm_define_them() -> None:
    logits = torch.tensor([3.0, 2.5, 2.0, -1.0])
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    plain = Sampler(greedy)
    assert [plain(logits) for _ in range(2)] == [0, 0]
    presence = Sampler(replace(greedy, presence_penalty=0.75))  # once per token: 2.25 > 1.75 > 1.25
    assert [presence(logits) for _ in range(4)] == [0, 1, 0, 0]
    frequency = Sampler(replace(greedy, frequency_penalty=0.75))  # per time: 0 drops to 1.5, 2 takes over
    assert [frequency(logits) for _ in range(4)] == [0, 1, 0, 2]
    repetition = Sampler(replace(greedy, repetition_penalty=1.5), prompt=[0])  # 3 / 1.5 < 2.5
    assert repetition(logits) == 1
    negative = Sampler(replace(greedy, repetition_penalty=1.5), prompt=[3])
    assert negative(torch.tensor([-0.9, -1.0, -2.0, -0.8])) == 0  # -0.8 * 1.5 falls below -0.9


def test_logit_bias_is_added_to_the_logits_before_choosing() -> None:
    logits = torch.tensor([3.0, 2.5, 2.0, -1.0])
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    assert Sampler(replace(greedy, logit_bias=((0, -0.75),)))(logits) == 1  # 2.25 < 2.5
    assert Sampler(replace(greedy, logit_bias=((0, -0.25),)))(logits) == 0
    assert Sampler(replace(greedy, logit_bias=((3, 4.5), (0, -100.0))))(logits) == 3
    banned = _frequencies(SamplingParams(max_tokens=8, logit_bias=((0, -100.0),)), logits, draws=2000)
    assert banned[0] == 0 and banned[1:3].min() > 0
    with pytest.raises(ValueError, match="logit_bias"):
        replace(greedy, logit_bias=((0, 101.0),))


def _frequencies(params: SamplingParams, logits: torch.Tensor, draws: int = 20000) -> torch.Tensor:
    sampler = Sampler(params)
    tokens = torch.tensor([sampler(logits) for _ in range(draws)])
    return torch.bincount(tokens, minlength=logits.shape[0]).double() / draws


@pytest.mark.parametrize(
    ("extra", "kept"),
    [
        ({}, [0, 1, 2, 3, 4, 5]),
        ({"top_p": 0.8}, [0, 1, 2]),  # 0.56 + 0.21 < 0.8: the third is needed, the fourth is not
        ({"top_k": 4}, [0, 1, 2, 3]),
        ({"top_k": 4, "top_p": 0.7}, [0, 1]),  # within the top 4, renormalized: 0.58 + 0.21 reaches 0.7
    ],
)
def test_sampling_draws_tokens_in_proportion_to_their_probability(extra: dict[str, Any], kept: list[int]) -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    expected = torch.zeros(6, dtype=torch.float64)
    expected[kept] = torch.softmax(logits.double()[kept], 0)
    seen = _frequencies(SamplingParams(max_tokens=1, seed=3, **extra), logits)
    assert (seen - expected).abs().max() < 0.015
    assert seen[[i for i in range(6) if i not in kept]].sum() == 0


def test_top_p_over_a_flat_distribution_keeps_hundreds_of_tokens() -> None:
    """The nucleus is looked for among the most likely 64 tokens first, then four times as many: a flat
    distribution's nucleus reaches past them, and never past the mass asked for."""
    logits = -torch.arange(1000, dtype=torch.float32) / 1000  # nearly flat, most likely first
    seen = _frequencies(SamplingParams(max_tokens=1, seed=5, top_p=0.5), logits, draws=5000)
    drawn = seen.nonzero().flatten()
    probs = torch.softmax(logits.double(), 0)
    nucleus = int((probs.cumsum(0) - probs < 0.5).sum())
    assert 64 < nucleus < 1000
    assert int(drawn.max()) < nucleus
    assert len(drawn) > 300


def test_frequency_penalty_breaks_a_repetition_loop(engine: Engine) -> None:
    prompt = engine.render_chat([{"role": "user", "content": "Capital of France?"}]).token_ids
    _, looping, _ = generate(engine, prompt, max_tokens=16, ignore_eos=True)
    _, penalized, _ = generate(engine, prompt, max_tokens=16, ignore_eos=True, frequency_penalty=2.0)
    assert len(set(looping)) < len(looping)  # the plain greedy reply repeats itself
    assert len(set(penalized)) > len(set(looping))

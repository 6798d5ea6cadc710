"""Trace readers, the policy simulator, and its agreement with the live server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from anchorkv.bench import replay, simulate, traces
from anchorkv.cli import main
from anchorkv.cache.prefix_cache import CacheConfig
from anchorkv.config import EngineConfig, ServerConfig
from anchorkv.engine.engine import Engine
from anchorkv.server.app import create_app

SESSION = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "u1"},
    {"role": "assistant", "content": "a1"},
    {"role": "tool", "content": "t1"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    },
]


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.mark.parametrize(
    "name, content, sessions",
    [
        ("tau.json", [{"task_id": 0, "traj": SESSION}, {"task_id": 1, "traj": SESSION}], 2),
        ("mini.traj.json", SESSION, 1),
        ("deepseek.traj.json", {"messages": SESSION, "info": {}}, 1),
        ("swe.traj", {"history": SESSION, "trajectory": []}, 1),
        (
            "fastchat.json",
            [{"id": "x", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}],
            1,
        ),
    ],
)
def test_transcript_readers_make_one_request_per_assistant_message(
    tmp_path: Path, name: str, content: object, sessions: int
) -> None:
    reqs = traces.read_trace(str(_write(tmp_path / name, content)))
    per_session = 1 if name == "fastchat.json" else 2
    assert len(reqs) == sessions * per_session
    for r in reqs:
        assert r.messages
        assert r.messages[-1]["role"] != "assistant"
        assert r.reply_index == len(r.messages)


def test_jsonl_sessions_oasst_trees_and_mooncake(tmp_path: Path) -> None:
    jl = tmp_path / "s.jsonl"
    jl.write_text("\n".join(json.dumps(x) for x in [SESSION, {"messages": SESSION}]))
    assert len(traces.read_trace(str(jl))) == 4
    assert len(traces.read_trace(str(jl), limit=3)) == 3
    assert len(traces.read_trace(str(tmp_path), limit=1)) == 1
    tree = {"message_tree_id": "t", "prompt": {"role": "prompter", "text": "q", "replies": [
        {"role": "assistant", "text": "a", "replies": []}, {"role": "assistant", "text": "b", "replies": [
            {"role": "prompter", "text": "q2", "replies": [{"role": "assistant", "text": "c", "replies": []}]}]}]}}  # fmt: skip
    ot = tmp_path / "o.jsonl"
    ot.write_text(json.dumps(tree))
    assert len(traces.read_trace(str(ot))) == 3  # leaf paths [q a], [q b q2 c]: 1 + 2 assistant turns
    mc = tmp_path / "m.jsonl"
    mc.write_text("\n".join(json.dumps(x) for x in [
        {"timestamp": 0, "input_length": 1000, "hash_ids": [0, 1]},
        {"timestamp": 1, "input_length": 1500, "hash_ids": [0, 1, 2]},
        {"timestamp": 2, "input_length": 600, "hash_ids": [0, 3]},
    ]))  # fmt: skip
    a, b, c = (r.tokens for r in traces.read_trace(str(mc)))
    assert a is not None
    assert b is not None
    assert c is not None
    assert (len(a), len(b), len(c)) == (1000, 1500, 600)
    assert b[:1000] == a  # equal id prefixes give equal token prefixes
    assert c[:512] == a[:512]
    assert c[512:600] != a[512:600]


def test_generators() -> None:
    for name in traces.GENERATORS:
        assert len(traces.read_trace(name)) >= 30
    with pytest.raises(ValueError, match="known"):
        traces.read_trace("gen:nope")


def test_simulate_cli_json_has_every_policy_and_field(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "anchorkv", "simulate", "gen:rolling", "--json", "--limit", "12", "--chart", str(tmp_path / "c.png")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["policy"] for x in rows] == simulate.STANDARD
    for x in rows:
        assert x["requests"] == 12
        assert 0 <= x["hit_rate"] <= 1
        assert {"mean_restored_tokens", "restored_fraction", "bytes_written", "by_kind"} <= x.keys()
    off = next(x for x in rows if x["policy"] == "off")
    assert off["hit_rate"] == 0
    assert off["bytes_written"] == 0
    full = next(x for x in rows if x["policy"] == "full")
    auto2 = next(x for x in rows if x["policy"] == "auto:2")
    assert full["bytes_written"] >= auto2["bytes_written"] > 0
    assert (tmp_path / "c.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("name", "text", "said"),
    [
        ("cut.json", '{"messages": [', "cut.json: not valid JSON"),
        ("cut.jsonl", '{"messages": []}\n{"messages": [\n', "cut.jsonl, line 2: not valid JSON"),
        ("other.json", "[1, 2, 3]", "other.json: not a format the simulator reads"),
    ],
)
def test_a_trace_it_cannot_read_exits_2_naming_the_file(
    tmp_path: Path, name: str, text: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as exit:
        main(["simulate", str(tmp_path / name)])
    assert exit.value.code == 2
    assert said in capsys.readouterr().err


def test_the_simulator_predicts_the_servers_cached_tokens(engine: Engine) -> None:
    """Same requests, same cache code: the live server restores exactly what the simulator predicts."""
    requests = traces.generate("gen:tasks")[:3] + traces.generate("gen:rolling")[:3]
    prepared = simulate.prepare(requests, engine.template, progress=False)
    policy = simulate.Policy("off", "off")
    predicted: list[int] = []
    # the simulator's per-request restores, recorded through the same PrefixCache the server uses
    from anchorkv.cache.memory_tier import MemoryDiskTier
    from anchorkv.cache.prefix_cache import CacheRequest

    cache, _ = simulate.sim_cache(CacheConfig(ram_mb=512, scope="off"), 128, engine.model_cfg, MemoryDiskTier(0))
    for p in prepared:
        plan = cache.plan(p.tokens, CacheRequest(p.ends))
        cache.restore(plan, p.tokens, 0)
        predicted.append(plan.restore_to)
        cache.record(plan, p.tokens, 0, computed=len(p.tokens))
    assert simulate.simulate(prepared, policy, engine.model_cfg, 512, 0).mean_restored_tokens == sum(predicted) / len(
        predicted
    )
    live = Engine(EngineConfig(threads=2), CacheConfig(ram_mb=512, scope="off"))
    with TestClient(create_app(live, ServerConfig())) as client:
        served = [
            client.post("/v1/chat/completions", json={"messages": r.messages, "max_tokens": 2, "temperature": 0}).json()
            ["usage"]["prompt_tokens_details"]["cached_tokens"]
            for r in requests
        ]  # fmt: skip
    assert served == predicted
    assert sum(served) > 0


def test_replay_against_a_live_server_records_ttft_and_cached_tokens(tmp_path: Path) -> None:
    from tests.conftest import serve_in_thread

    engine = Engine(EngineConfig(threads=2), CacheConfig(ram_mb=512, scope="off"))
    server = serve_in_thread(create_app(engine, ServerConfig()))
    live = next(server)
    try:
        requests = traces.generate("gen:interleaved")[:4]
        samples = replay.replay(live.url, requests, max_tokens=2, concurrency=2)
        assert [s.index for s in samples] == [0, 1, 2, 3]
        assert not any(s.error for s in samples)
        assert all(s.ttft_ms is not None and s.e2e_ms >= s.ttft_ms for s in samples)
        assert all(s.prompt_tokens and s.timings for s in samples)
        assert sum(s.cached_tokens or 0 for s in samples) > 0  # four sessions share one system prompt
        summaries = replay.write(tmp_path, {"anchorkv": samples})
        assert summaries[0]["requests"] == 4
        assert summaries[0]["errors"] == 0
        assert (tmp_path / "replay.png").stat().st_size > 1000
        assert "p50" in (tmp_path / "replay.md").read_text()
        # the CLI's second pass after --restart-cmd ("true": the server stays up, so the pass is all warm)
        out = tmp_path / "cli"
        argv = ["bench", "replay", "gen:interleaved", "--base-url", live.url, "--limit", "2", "--max-tokens", "1"]
        assert main([*argv, "--restart-cmd", "true", "--label", "ours", "--out", str(out)]) == 0
        runs = json.loads((out / "replay.json").read_text())["samples"]
        assert list(runs) == ["ours", "ours after restart"]
        assert all(s["cached_tokens"] for s in runs["ours after restart"])
        with pytest.raises(subprocess.CalledProcessError):
            replay.restart("false", live.url)
    finally:
        next(server, None)


def test_a_live_replay_sends_the_servers_replies_back_and_the_next_turn_restores_them() -> None:
    from tests.conftest import serve_in_thread

    engine = Engine(EngineConfig(threads=2), CacheConfig(ram_mb=512, scope="off"))
    server = serve_in_thread(create_app(engine, ServerConfig()))
    live = next(server)
    try:
        requests = traces.generate("gen:agent")[:3]
        scripted = replay.replay(live.url, requests[:2], max_tokens=4)
        # the recorded assistant message is not what the server said: the turn restores at most the last prompt
        assert scripted[1].cached_tokens is not None
        assert scripted[0].prompt_tokens is not None
        assert scripted[1].cached_tokens <= scripted[0].prompt_tokens
        # a client loop with a second between turns: the reply, prefilled again while the server was idle, hits
        samples = replay.replay(live.url, requests, max_tokens=4, live=True, think=replay.Think(1.0))
        assert not any(s.error for s in samples)
        assert all(s.text for s in samples)
        sent = replay.with_replies(requests[2], replay.replies(requests, samples, "agent"))
        assert [m["content"] for m in sent.messages if m["role"] == "assistant"] == [s.text for s in samples[:2]]
        for before, after in zip(samples, samples[1:]):
            assert before.prompt_tokens is not None
            assert after.cached_tokens is not None
            assert after.cached_tokens > before.prompt_tokens
        # sessions that take turns in the trace take turns at the server, each sending back its own replies
        requests = traces.generate("gen:interleaved")[:8]
        samples = replay.replay(live.url, requests, max_tokens=4, live=True)
        assert [s.index for s in sorted(samples, key=lambda s: s.started_s)] == list(range(8))
        for first, second in zip(samples[:4], samples[4:]):
            assert first.session == second.session
            assert first.text
            sent = replay.with_replies(requests[second.index], replay.replies(requests, samples, first.session))
            assert [m["content"] for m in sent.messages if m["role"] == "assistant"] == [first.text]
    finally:
        next(server, None)


def test_spread_think_times_vary_like_tools_and_are_the_same_for_every_server() -> None:
    think = replay.Think(0.5, "exp")
    pauses = [think.before(f"s{i % 4}", i) for i in range(400)]
    assert pauses == [think.before(f"s{i % 4}", i) for i in range(400)]  # another server, the same pauses
    assert len(set(pauses)) == len(pauses)
    assert 0.4 < sum(pauses) / len(pauses) < 0.6
    assert min(pauses) < 0.05 and max(pauses) > 1.5  # so sessions started together drift apart
    assert {replay.Think(0.5).before("s0", i) for i in range(10)} == {0.5}

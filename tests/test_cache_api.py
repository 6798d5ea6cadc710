"""The cache as a client sees it: request fields, the prefix_cache report, usage, /props and /metrics."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from anchorkv.cache.prefix_cache import CacheConfig
from anchorkv.config import EngineConfig, ServerConfig
from anchorkv.engine.engine import Engine
from anchorkv.server.app import create_app
from tests.test_prefix_cache import SYSTEM


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    folder: Path = tmp_path_factory.mktemp("kv")
    engine = Engine(EngineConfig(threads=2), CacheConfig(ram_mb=512, cache_dir=folder, scope="auto"))
    with TestClient(create_app(engine, ServerConfig())) as c:
        yield c


def ask(question: str, **extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 8,
        **extra,
    }


def test_second_request_reports_what_it_reused(cached: TestClient) -> None:
    first = cached.post("/v1/chat/completions", json=ask("Which code goes with class 3?")).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert first["prefix_cache"]["restored_tokens"] == 0
    assert first["prefix_cache"]["recorded"]
    written = first["usage"]["prompt_tokens_details"]["cache_write_tokens"]
    assert written == max(r["at"] for r in first["prefix_cache"]["recorded"]) > 0
    second = cached.post("/v1/chat/completions", json=ask("Which code goes with class 4?")).json()
    cached_tokens = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    # the shared system message, whole: it ends on a chat boundary, which the first request recorded
    system_end = next(r["at"] for r in first["prefix_cache"]["recorded"] if r["kind"] == "chat")
    assert cached_tokens == system_end > 0
    assert system_end % 128 != 0
    holds = max(r["at"] for r in second["prefix_cache"]["recorded"])  # once recorded: restored or written
    assert cached_tokens + second["usage"]["prompt_tokens_details"]["cache_write_tokens"] == holds
    assert second["timings"]["cache_n"] == cached_tokens
    assert second["timings"]["prompt_n"] == second["usage"]["prompt_tokens"] - cached_tokens
    report = second["prefix_cache"]
    assert report["restored_tokens"] == cached_tokens
    assert report["tier"] == "slot"  # the first request's slot still held it
    assert report["kind"] == "chat"
    assert report["scope"] == "auto:30"


def test_anchor_verdicts_come_back(cached: TestClient) -> None:
    body = cached.post(
        "/v1/chat/completions", json=ask("hi", prompt_cache_key="agent-1", prompt_cache_anchor_tokens=[300, 0, 100000])
    ).json()
    verdicts = body["prefix_cache"]["anchors"]
    assert [v["accepted"] for v in verdicts] == [True, False, False]
    assert "zero" in verdicts[1]["reason"]
    assert "strict prefix" in verdicts[2]["reason"]
    assert {"kind": "anchor", "tokens": 300, "at": 256} in body["prefix_cache"]["recorded"]
    no_key = cached.post("/v1/chat/completions", json=ask("hi", prompt_cache_anchor_tokens=300)).json()
    assert no_key["prefix_cache"]["anchors"] == [
        {"tokens": 300, "accepted": False, "reason": "prompt_cache_key is required for anchors"}
    ]


def test_cache_control_anchors_a_message_end(cached: TestClient) -> None:
    body = ask("hi")
    body["messages"][0]["cache_control"] = {"type": "ephemeral"}
    out = cached.post("/v1/chat/completions", json=body).json()
    (verdict,) = out["prefix_cache"]["anchors"]
    assert verdict["accepted"]
    assert any(r["kind"] == "anchor" and r["tokens"] == verdict["tokens"] for r in out["prefix_cache"]["recorded"])


def test_cache_control_on_a_message_the_assistant_answers_anchors_past_its_header(cached: TestClient) -> None:
    # the prompt is cut past the assistant's header, not at the message's end: the anchor is restorable
    # exactly there, not rounded down; on the last message it anchors the whole prompt
    body = ask("Which code goes with class 11?")
    body["messages"] += [
        {"role": "assistant", "content": "SC-11"},
        {"role": "user", "content": "And class 12?", "cache_control": {"type": "ephemeral"}},
    ]
    body["messages"][1]["cache_control"] = {"type": "ephemeral"}
    out = cached.post("/v1/chat/completions", json=body).json()
    first, last = out["prefix_cache"]["anchors"]
    assert first["accepted"]
    assert last["accepted"]
    assert last["tokens"] == out["usage"]["prompt_tokens"]
    anchored = [r for r in out["prefix_cache"]["recorded"] if r["kind"] == "anchor"]
    assert [(r["tokens"], r["at"]) for r in anchored] == [(first["tokens"], first["tokens"]), (last["tokens"],) * 2]
    # the next turn restores the whole marked conversation
    body["messages"] += [{"role": "assistant", "content": "SC-12"}, {"role": "user", "content": "Thanks."}]
    again = cached.post("/v1/chat/completions", json=body).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= last["tokens"]


def test_scope_override_and_salt_isolation(cached: TestClient) -> None:
    q = ask("Which code goes with class 5?", cache_salt="tenant-x", prefix_cache={"scope": "off"})
    out = cached.post("/v1/chat/completions", json=q).json()
    assert out["prefix_cache"]["scope"] == "off"
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    again = cached.post("/v1/chat/completions", json={**q, "prefix_cache": {"scope": "auto", "window": 4}}).json()
    assert again["prefix_cache"]["scope"] == "auto:4"
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"prompt_cache_anchor_tokens": -1}, "prompt_cache_anchor_tokens"),
        ({"prompt_cache_anchor_tokens": 1.5}, "prompt_cache_anchor_tokens"),
        ({"prompt_cache_anchor_tokens": "12"}, "prompt_cache_anchor_tokens"),
        ({"prompt_cache_anchor_tokens": [1, 2, 3, 4, 5]}, "prompt_cache_anchor_tokens"),
        ({"prefix_cache": {"scope": "sometimes"}}, "prefix_cache.scope"),
        ({"prefix_cache": {"scope": "auto", "window": 0}}, "prefix_cache.window"),
        ({"cache_salt": 5}, "cache_salt"),
    ],
)
def test_bad_cache_fields_are_400s_naming_the_field(cached: TestClient, extra: dict[str, Any], param: str) -> None:
    r = cached.post("/v1/chat/completions", json=ask("hi", **extra))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_stream_carries_the_report(cached: TestClient) -> None:
    with cached.stream("POST", "/v1/chat/completions", json=ask("Which code goes with class 3?", stream=True)) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    final = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]][0]
    assert final["prefix_cache"]["restored_tokens"] > 0
    assert final["timings"]["cache_n"] > 0


def test_props_and_metrics_show_the_cache(cached: TestClient) -> None:
    cached.post("/v1/chat/completions", json=ask("Which code goes with class 3?"))
    full = cached.get("/props").json()["full_cache"]
    assert full["disk_policy"] == "auto:30"
    assert full["stride"] == 128
    assert full["exact"] is True
    assert full["ram"]["entries"] > 0
    assert full["ram"]["bytes"] > 0
    assert full["disk"]["budget_bytes"] > 0
    metrics = cached.get("/metrics").text
    assert "anchorkv_cache_hits_total{" in metrics
    assert 'anchorkv_cache_bytes{tier="ram"}' in metrics


def _prefilled(client: TestClient) -> float:
    line = next(x for x in client.get("/metrics").text.splitlines() if x.startswith("anchorkv_prefilled_tokens_total"))
    return float(line.split()[-1])


def test_n_choices_cost_one_prefill_and_each_is_its_own_seeded_sample(cached: TestClient) -> None:
    """n choices come back indexed, choice i sampled as a single request with seed + i would be; every
    choice after the first restores the whole prompt, so the request prefills it once."""
    body = ask("Name a color and a fruit.", temperature=1.0, seed=7, max_tokens=6, n=3)
    before = _prefilled(cached)
    many = cached.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    usage = many["usage"]
    assert _prefilled(cached) - before == usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    texts = [c["message"]["content"] for c in many["choices"]]
    assert len(set(texts)) > 1  # three samples, not one repeated
    alone = cached.post("/v1/chat/completions", json={**body, "n": 1, "seed": 8}).json()
    assert alone["choices"][0]["message"]["content"] == texts[1]
    assert usage["completion_tokens"] <= 3 * 6
    assert usage["completion_tokens"] > alone["usage"]["completion_tokens"]
    with cached.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        lines = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    streamed = [
        "".join(e["choices"][0]["delta"].get("content") or "" for e in lines if e["choices"][0]["index"] == i)
        for i in range(3)
    ]
    assert streamed == texts
    assert [e["choices"][0]["index"] for e in lines if e["choices"][0]["finish_reason"]] == [0, 1, 2]


def test_n_choices_decode_side_by_side_once_the_prompt_is_prefilled(cached: TestClient) -> None:
    worker = cached.app.state.worker  # type: ignore[attr-defined]
    body = ask("Count to a hundred.", temperature=1.0, seed=3, max_tokens=96, ignore_eos=True, n=3)
    statuses: list[int] = []
    request = threading.Thread(
        target=lambda: statuses.append(cached.post("/v1/chat/completions", json=body).status_code)
    )
    request.start()
    most = 0
    while request.is_alive():
        most = max(most, worker.running)
        time.sleep(0.002)
    assert statuses == [200]
    assert most == 3  # the three choices ran at once, not one after another


def test_server_prefills_the_reply_while_idle_so_the_next_turn_hits_on_it(tmp_path: Path) -> None:
    # idle work: the reply alone, in several pieces of C = 32
    engine = Engine(EngineConfig(threads=2, kv_prefault=False, chunk_size=32), CacheConfig(ram_mb=512, scope="off"))
    with TestClient(create_app(engine, ServerConfig())) as c:
        q = "Write a detailed, long story about a lighthouse keeper and a storm."
        first = c.post("/v1/chat/completions", json=ask(q, max_tokens=100)).json()
        assert first["usage"]["completion_tokens"] >= 96
        reply = first["choices"][0]["message"]["content"]
        prompt_tokens = first["usage"]["prompt_tokens"]
        with engine.lock:  # the response is out before the engine has recorded it and queued the reply
            pass
        deadline = time.monotonic() + 60
        while engine.has_idle_work and time.monotonic() < deadline:  # a client's pause, e.g. a tool running
            time.sleep(0.05)
        assert not engine.has_idle_work
        body = ask(q)
        body["messages"] += [{"role": "assistant", "content": reply}, {"role": "user", "content": "A title?"}]
        second = c.post("/v1/chat/completions", json=body).json()
        # the reply was prefilled again as this turn renders it, so only the new user message is prefilled
        reply_end = engine.render_chat(body["messages"]).boundaries[-2]
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == reply_end > prompt_tokens + 96
        assert second["prefix_cache"]["kind"] == "full"


def test_cache_control_on_a_content_part_anchors_its_message(tmp_path: Path) -> None:
    engine = Engine(EngineConfig(threads=2), CacheConfig(ram_mb=64, cache_dir=tmp_path))
    with TestClient(create_app(engine, ServerConfig())) as c:
        system = {"role": "system", "content": [
            {"type": "text", "text": "You are brief. " * 40, "cache_control": {"type": "ephemeral"}}
        ]}  # fmt: skip
        r = c.post(
            "/v1/chat/completions", json={"messages": [system, {"role": "user", "content": "Hi"}], "max_tokens": 2}
        )
        assert r.status_code == 200
        anchors = r.json()["prefix_cache"]["anchors"]
        assert anchors
        assert anchors[0]["accepted"]

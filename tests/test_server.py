"""The HTTP API, through FastAPI's test client and a live uvicorn server."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from anchorkv.cache.prefix_cache import CacheRequest
from anchorkv.config import ServerConfig
from anchorkv.engine.engine import Engine
from anchorkv.engine.stage import ROW_FLOORS
from anchorkv.server.app import create_app
from tests.conftest import LiveServer, serve_in_thread

CHAT: dict[str, Any] = {
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0,
    "max_tokens": 24,
}


def sse_events(lines: list[str]) -> list[dict[str, Any]]:
    data = [line[6:] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_chat_answers_paris_with_usage_and_timings(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
    usage, timings = body["usage"], body["timings"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert timings["prompt_n"] == usage["prompt_tokens"]
    assert timings["cache_n"] == 0
    assert timings["predicted_n"] == usage["completion_tokens"]
    assert timings["prompt_ms"] > 0


def test_streamed_equals_non_streamed(client: TestClient) -> None:
    whole = client.post("/v1/chat/completions", json=CHAT).json()
    with client.stream(
        "POST", "/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(list(r.iter_lines()))
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert [f["choices"][0]["finish_reason"] for f in finals] == ["stop"]
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == whole["usage"]


def test_completions_streamed_and_not(client: TestClient) -> None:
    req = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    whole = client.post("/v1/completions", json=req).json()
    assert whole["object"] == "text_completion"
    assert "Paris" in whole["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
        events = sse_events(list(r.iter_lines()))
    assert "".join(e["choices"][0]["text"] for e in events) == whole["choices"][0]["text"]


def test_chat_logprobs_are_the_models_own_distribution(client: TestClient, engine: Engine) -> None:
    req = {**CHAT, "logprobs": True, "top_logprobs": 3}
    whole = client.post("/v1/chat/completions", json=req).json()
    choice = whole["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == whole["usage"]["completion_tokens"]
    assert bytes(b for e in content for b in e["bytes"]).decode() == choice["message"]["content"]
    for e in content:  # greedy: each token is its own best alternative
        top = [t["logprob"] for t in e["top_logprobs"]]
        assert len(top) == 3
        assert top == sorted(top, reverse=True)
        assert math.fsum(math.exp(t) for t in top) <= 1
        assert e["top_logprobs"][0]["token"] == e["token"]
        assert top[0] == e["logprob"]
    rendered = engine.render_chat(CHAT["messages"])  # cut where the server cuts it
    with torch.inference_mode():
        first = torch.log_softmax(
            engine.prompt_logits(rendered.token_ids, CacheRequest(rendered.boundaries))[0].float(), -1
        )
    assert content[0]["logprob"] == pytest.approx(float(first.max()), abs=1e-6)
    with client.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as r:
        events = sse_events(list(r.iter_lines()))
    streamed = [e for ev in events if (lp := ev["choices"][0]["logprobs"]) for e in lp["content"]]
    assert streamed == content
    plain = client.post("/v1/chat/completions", json=CHAT).json()
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"] == choice["message"]


def test_completion_logprobs_streamed_and_not(client: TestClient) -> None:
    req = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]
    lp = whole["logprobs"]
    assert "".join(lp["tokens"]) == whole["text"]
    assert len(lp["token_logprobs"]) == 6
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(6)]
    assert all(len(top) <= 2 and max(top.values()) == t for top, t in zip(lp["top_logprobs"], lp["token_logprobs"]))
    with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
        events = sse_events(list(r.iter_lines()))
    parts = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
    assert {k: [x for p in parts for x in p[k]] for k in lp} == lp


def test_tools_reach_the_template_as_openais_clients_send_them(client: TestClient, engine: Engine) -> None:
    tool = {
        "type": "function",
        "function": {"name": "find", "description": "Find a book", "parameters": {"type": "object"}},
    }
    messages = [CHAT["messages"][0]]
    text = client.post("/apply-template", json={"messages": messages, "tools": [tool]}).json()["prompt"]
    assert text == engine.render_chat(messages, [tool]).text
    without_type = {"function": tool["function"]}  # the same tool
    assert client.post("/apply-template", json={"messages": messages, "tools": [without_type]}).json()["prompt"] == text


def test_tokenize_gives_the_token_counts_anchors_take(client: TestClient, engine: Engine) -> None:
    system = {"role": "system", "content": "You answer questions about European geography. " * 8}
    messages = [system, CHAT["messages"][0]]
    tok = client.post("/tokenize", json={"messages": messages}).json()
    chat = {**CHAT, "messages": messages, "max_tokens": 2, "prompt_cache_key": "geo"}
    first = client.post("/v1/chat/completions", json=chat).json()
    assert len(tok["tokens"]) == first["usage"]["prompt_tokens"]
    through_system = tok["message_ends"][0]
    assert 0 < through_system < tok["message_ends"][1] < len(tok["tokens"])
    again = client.post("/v1/chat/completions", json={**chat, "prompt_cache_anchor_tokens": through_system}).json()
    assert again["prefix_cache"]["anchors"] == [{"tokens": through_system, "accepted": True}]
    text = client.post("/apply-template", json={"messages": messages}).json()["prompt"]
    assert client.post("/tokenize", json={"content": text}).json()["tokens"] == tok["tokens"]
    assert client.post("/detokenize", json={"tokens": engine.tokenizer.encode("café 🙂")}).json() == {
        "content": "café 🙂"
    }
    pieces = client.post("/tokenize", json={"content": "🙂", "with_pieces": True}).json()["tokens"]
    assert (
        b"".join(bytes(p["piece"]) if isinstance(p["piece"], list) else p["piece"].encode() for p in pieces)
        == "🙂".encode()
    )
    for path, body, param in [
        ("/tokenize", {}, None),
        ("/tokenize", {"content": "x", "messages": messages}, None),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ]:
        r = client.post(path, json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text


def test_models_health_props(client: TestClient, engine: Engine) -> None:
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1"
    assert client.get("/health").json()["status"] == "ok"
    props = client.get("/props").json()
    assert props["architecture"] == "llama"
    assert props["n_layers"] == 30
    assert props["n_ctx"] == engine.ctx
    assert props["dtype"] == "bfloat16"
    assert [(s["index"], s["layers"], s["threads"]) for s in props["stages"]] == [(0, [0, 30], engine.cfg.threads)]
    # 8 slots of K and V: 30 layers x 3 KV heads x ctx x 64 dims in bfloat16
    assert props["parallel"] == 8
    assert props["decode_rows"] == "batched"
    assert props["stages"][0]["prefill_rows"] == engine.prefill_rows
    assert props["stages"][0]["row_floor"] in ROW_FLOORS
    assert props["kv_pool"]["bytes"] == props["stages"][0]["kv_bytes"] == 8 * 2 * 30 * 3 * engine.ctx * 64 * 2


def test_metrics_count_tokens(client: TestClient) -> None:
    client.post("/v1/chat/completions", json=CHAT)
    text = client.get("/metrics").text
    assert 'anchorkv_requests_total{endpoint="chat",status="200"}' in text
    assert "anchorkv_generated_tokens_total" in text


LONG = "word " * 9000
BAD = [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({**CHAT, "temperature": -0.5}, "temperature"),
    ({**CHAT, "temperature": "hot"}, "temperature"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "max_tokens": 10**6}, "max_tokens"),
    ({**CHAT, "top_p": 0}, "top_p"),
    ({**CHAT, "n": 9}, "n"),
    ({**CHAT, "n": 0}, "n"),
    ({**CHAT, "stop": [1, 2]}, "stop[0]"),
    ({**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({**CHAT, "presence_penalty": 2.5}, "presence_penalty"),
    ({**CHAT, "frequency_penalty": -3}, "frequency_penalty"),
    ({**CHAT, "repetition_penalty": 0}, "repetition_penalty"),
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({**CHAT, "logit_bias": {"49152": 5}}, "logit_bias"),  # one past the bundled model's vocabulary
    ({**CHAT, "logit_bias": {"-1": 5}}, "logit_bias"),
    ({**CHAT, "logit_bias": {"5": 101}}, "logit_bias.5"),
    ({**CHAT, "logit_bias": [5]}, "logit_bias"),
    ({"messages": [{"role": "user", "content": LONG}]}, "messages"),
]


@pytest.mark.parametrize("body, param", BAD, ids=[p for _, p in BAD])
def test_bad_chat_input_is_a_400_naming_the_field(client: TestClient, body: dict[str, Any], param: str) -> None:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert param.split("[")[0] in err["message"] or "context" in err["message"]


def test_a_union_fields_error_speaks_of_the_shape_sent(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "prompt_cache_anchor_tokens": [1, 2, 3, 4, 5]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt_cache_anchor_tokens"
    assert "at most 4" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
        ({"prompt": ["x"] * 17}, "prompt"),
        ({"prompt": ["x", ""]}, "prompt[1]"),
        ({"prompt": [[1], [10**9]]}, "prompt[1]"),
        ({"prompt": [[1], []]}, "prompt[1]"),
    ],
)
def test_bad_completion_input_is_a_400(client: TestClient, body: dict[str, Any], param: str) -> None:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


def test_malformed_json_is_a_400(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "JSON" in r.json()["error"]["message"]
    r = client.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "the request body must be a JSON object"


def test_api_key_is_required_when_set(engine: Engine) -> None:
    with TestClient(create_app(engine, ServerConfig(api_key="sekret"))) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert c.get("/health").status_code == 200


def test_client_disconnect_stops_generation(live: LiveServer) -> None:
    before = live.app.state.metrics.cancelled._value.get()
    body = {**CHAT, "stream": True, "max_tokens": 4000, "ignore_eos": True}
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
    _freed_within(live, before, seconds=20)  # 4000 tokens would take minutes


def test_client_disconnect_stops_a_non_streamed_generation(live: LiveServer) -> None:
    """A client that gives up on a non-streamed request frees its sequence while it decodes."""
    before = live.app.state.metrics.cancelled._value.get()
    body = {**CHAT, "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=2)
    _freed_within(live, before, seconds=20)  # 4000 tokens would take minutes


def _freed_within(live: LiveServer, cancelled_before: float, seconds: float) -> None:
    """One more request counted as cancelled and the worker idle, within `seconds`."""
    metrics, worker = live.app.state.metrics, live.app.state.worker
    t0 = time.monotonic()
    while (worker.busy or metrics.cancelled._value.get() == cancelled_before) and time.monotonic() - t0 < seconds:
        time.sleep(0.05)
    assert metrics.cancelled._value.get() == cancelled_before + 1
    assert not worker.busy
    assert time.monotonic() - t0 < seconds


def test_streamed_live_equals_non_streamed(live: LiveServer) -> None:
    whole = httpx.post(f"{live.url}/v1/chat/completions", json=CHAT, timeout=60).json()
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=60) as r:
        events = sse_events(list(r.iter_lines()))
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        == whole["choices"][0]["message"]["content"]
    )


@pytest.fixture(scope="module")
def keyed(engine: Engine) -> Any:
    yield from serve_in_thread(create_app(engine, ServerConfig(api_key="k1")))


def test_openai_client_chat_and_completions(keyed: LiveServer) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="k1")
    r = client.chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=24,
        logprobs=True,
        top_logprobs=2,
    )
    assert "Paris" in (r.choices[0].message.content or "")
    assert r.choices[0].logprobs is not None
    assert r.choices[0].logprobs.content is not None
    assert "".join(t.token for t in r.choices[0].logprobs.content) == r.choices[0].message.content
    assert r.usage is not None
    assert r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    stream = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0,
        max_tokens=24, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    comp = client.completions.create(model="any", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert "Paris" in comp.choices[0].text
    assert r.choices[0].logprobs.content[0].token == "The"
    (the,) = httpx.post(
        f"{keyed.url}/tokenize", json={"content": "The"}, headers={"Authorization": "Bearer k1"}
    ).json()["tokens"]
    banned = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0,
        max_tokens=4, logprobs=True, logit_bias={str(the): -100},
    )  # fmt: skip
    assert banned.choices[0].logprobs is not None and banned.choices[0].logprobs.content is not None
    first = banned.choices[0].logprobs.content[0]
    assert first.token != "The"
    assert first.logprob < r.choices[0].logprobs.content[0].logprob  # the model's own, not the biased, distribution
    forced = client.completions.create(
        model="any", prompt="The capital of France is", max_tokens=3, temperature=0, logit_bias={str(the): 100}
    )
    assert forced.choices[0].text == "The" * 3
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="any", messages=[], temperature=0)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="nope").models.list()


def test_browser_pages_may_call_the_api_unless_told_otherwise(engine: Engine) -> None:
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    with TestClient(create_app(engine, ServerConfig(api_key="sekret"))) as c:
        r = c.options("/v1/chat/completions", headers=preflight)
        assert r.status_code == 200  # a preflight carries no key
        assert r.headers["access-control-allow-origin"] == "*"
        r = c.get("/v1/models", headers={"Origin": "http://localhost:3000"})
        assert r.status_code == 401  # the call itself still needs the key
        assert r.headers["access-control-allow-origin"] == "*"
        assert c.head("/health").status_code == 200
    only = ServerConfig(allowed_origins=("http://ui.example",))
    with TestClient(create_app(engine, only)) as c:
        assert c.options("/v1/chat/completions", headers=preflight).status_code == 400
        r = c.options("/v1/chat/completions", headers={**preflight, "Origin": "http://ui.example"})
        assert r.headers["access-control-allow-origin"] == "http://ui.example"
    with TestClient(create_app(engine, ServerConfig(allowed_origins=()))) as c:
        assert "access-control-allow-origin" not in c.get("/health", headers={"Origin": "http://x"}).headers


def test_a_batch_of_prompts_completes_each_as_alone(keyed: LiveServer) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="k1")
    prompts = ["The capital of France is", "One, two, three,", "def add(a, b):"]
    kw: dict[str, Any] = {"model": "any", "max_tokens": 6, "temperature": 0, "logprobs": 1}
    alone = [client.completions.create(prompt=p, **kw) for p in prompts]
    batch = client.completions.create(prompt=prompts, n=2, **kw)
    assert [c.index for c in batch.choices] == list(range(6))  # prompt p's choice i at p * n + i
    for p, single in enumerate(alone):
        for c in batch.choices[2 * p : 2 * p + 2]:
            assert c.text == single.choices[0].text
            assert c.logprobs is not None and single.choices[0].logprobs is not None
            assert c.logprobs.token_logprobs == single.choices[0].logprobs.token_logprobs
    assert batch.usage is not None
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in alone if s.usage)
    assert batch.usage.completion_tokens == 2 * sum(s.usage.completion_tokens for s in alone if s.usage)
    ids = [keyed_tokens(keyed, p) for p in prompts[:2]]  # a batch of token-id prompts, streamed
    stream = client.completions.create(prompt=ids, stream=True, stream_options={"include_usage": True}, **kw)
    texts: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {0: alone[0].choices[0].text, 1: alone[1].choices[0].text}
    assert chunk.usage is not None and chunk.usage.prompt_tokens == len(ids[0]) + len(ids[1])


def keyed_tokens(server: LiveServer, text: str) -> list[int]:
    r = httpx.post(f"{server.url}/tokenize", json={"content": text}, headers={"Authorization": "Bearer k1"})
    tokens: list[int] = r.json()["tokens"]
    return tokens


def test_without_a_cache_nothing_is_reported_as_recorded(client: TestClient) -> None:
    body = client.post("/v1/chat/completions", json=CHAT).json()
    assert body["prefix_cache"]["recorded"] == []
    assert body["prefix_cache"]["restored_tokens"] == 0


def test_tools_without_a_system_message_and_tool_calls_come_back(client: TestClient) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    body = {
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": tools,
        "temperature": 0,
        "max_tokens": 40,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    # the tiny model may or may not call the tool; either way the answer is well formed
    if choice["finish_reason"] == "tool_calls":
        assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    else:
        assert isinstance(choice["message"]["content"], str)

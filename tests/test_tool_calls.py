"""Generated <tool_call> blocks come back as OpenAI tool_calls, streamed or not."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from anchorkv.server.tool_calls import ToolCallStream, assistant_message, parse_tool_calls

TEXT = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_parse_splits_content_and_calls() -> None:
    parsed = parse_tool_calls(TEXT)
    assert parsed is not None
    content, calls = parsed
    assert content == "Let me check."
    assert calls[0]["type"] == "function"
    assert calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}


def test_text_without_a_valid_call_stays_text() -> None:
    assert parse_tool_calls("plain answer") is None
    assert parse_tool_calls("<tool_call>not json</tool_call>") is None
    assert parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>') is None


def test_stream_holds_back_the_call_and_returns_it_at_the_end() -> None:
    s = ToolCallStream()
    sent = "".join(s.push(TEXT[i : i + 3]) for i in range(0, len(TEXT), 3))
    assert sent == "Let me check.\n"
    rest, calls = s.finish()
    assert rest == ""
    assert calls is not None
    assert calls[0]["function"]["name"] == "get_weather"


def test_stream_of_plain_text_loses_nothing() -> None:
    s = ToolCallStream()
    text = "a < b and <tool is not a call"
    sent = "".join(s.push(ch) for ch in text)
    rest, calls = s.finish()
    assert calls is None
    assert sent + rest == text


def test_a_call_cut_by_max_tokens_leaks_no_markup() -> None:
    cut = TEXT + '\n<tool_call>\n{"name": "get_weather", "argu'
    message = assistant_message(cut, 2**31)
    assert message["content"] == "Let me check."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    s = ToolCallStream()
    sent = "".join(s.push(cut[i : i + 5]) for i in range(0, len(cut), 5))
    rest, calls = s.finish()
    assert "<tool_call>" not in sent + rest
    assert calls is not None
    assert len(calls) == 1
    alone = assistant_message('Sure.\n<tool_call>\n{"name": "get_w', 2**31)
    assert alone == {"role": "assistant", "content": "Sure."}


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    two = TEXT + '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert len(assistant_message(two, 2**31)["tool_calls"]) == 2
    assert [c["function"]["name"] for c in assistant_message(two, 1)["tool_calls"]] == ["get_weather"]
    s = ToolCallStream(1)
    for ch in two:
        s.push(ch)
    assert [c["function"]["name"] for c in s.finish()[1] or []] == ["get_weather"]


def test_a_reply_cut_mid_call_finishes_with_length(client: TestClient) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
              "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools,
            "tool_choice": "required", "max_tokens": 6, "temperature": 0}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "length"
    assert "<tool_call" not in (choice["message"]["content"] or "")


def test_arguments_stream_piece_by_piece_and_add_up_to_the_call() -> None:
    text = (
        TEXT
        + '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "a \\"}\\" b", "n": [1, {"x": 2}]}}\n</tool_call>'
    )
    s = ToolCallStream()
    pieces = []
    for i in range(0, len(text), 4):
        s.push(text[i : i + 4])
        pieces += s.pieces()
    _, calls = s.finish()
    assert calls is not None
    assert len(calls) == 2
    for i, call in enumerate(calls):
        mine = [p for p in pieces if p.index == i]
        assert len(mine) > 1
        assert mine[0].name == call["function"]["name"]
        assert all(p.name is None for p in mine[1:])
        assert {p.id for p in mine} == {call["id"]}
        assert s.streamed(i)
        assert "".join(p.arguments for p in mine) == call["function"]["arguments"]
        json.loads(call["function"]["arguments"])


def test_a_call_whose_json_does_not_start_with_its_name_comes_whole() -> None:
    s = ToolCallStream()
    s.push('<tool_call>{"arguments": {"city": "Paris"}, "name": "get_weather"}</tool_call>')
    assert s.pieces() == []
    _, calls = s.finish()
    assert calls is not None
    assert not s.streamed(0)
    assert calls[0]["function"]["name"] == "get_weather"


def test_streamed_tool_call_deltas_add_up_to_the_non_streamed_call(client: TestClient) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
              "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools,
            "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 64, "temperature": 0}  # fmt: skip
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"].get("tool_calls") for c in chunks if c["choices"]]
    deltas = [d[0] for d in deltas if d]
    assert len(deltas) > 1  # piece by piece
    assert deltas[0]["function"]["name"] == "get_weather"
    assert deltas[0]["id"]
    arguments = "".join(d["function"]["arguments"] for d in deltas)
    assert arguments == whole["message"]["tool_calls"][0]["function"]["arguments"]  # the very text
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["tool_calls"]

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
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
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
    assert rest == "" and calls is not None and calls[0]["function"]["name"] == "get_weather"


def test_stream_of_plain_text_loses_nothing() -> None:
    s = ToolCallStream()
    text = "a < b and <tool is not a call"
    sent = "".join(s.push(ch) for ch in text)
    rest, calls = s.finish()
    assert calls is None and sent + rest == text


def test_a_call_cut_by_max_tokens_leaks_no_markup() -> None:
    cut = TEXT + '\n<tool_call>\n{"name": "get_weather", "argu'
    message = assistant_message(cut, 2**31)
    assert message["content"] == "Let me check."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    s = ToolCallStream()
    sent = "".join(s.push(cut[i : i + 5]) for i in range(0, len(cut), 5))
    rest, calls = s.finish()
    assert "<tool_call>" not in sent + rest
    assert calls is not None and len(calls) == 1
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

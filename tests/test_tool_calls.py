"""Generated <tool_call> blocks come back as OpenAI tool_calls, streamed or not."""

from __future__ import annotations

import json

from anchorkv.server.tool_calls import ToolCallStream, parse_tool_calls

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

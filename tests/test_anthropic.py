"""The Anthropic Messages API through the official `anthropic` SDK, on the bundled model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from anchorkv.config import ServerConfig
from anchorkv.server.anthropic_messages import MessagesRequest, to_chat, usage
from conftest import LiveServer, cached_server

SYSTEM = "You are a terse assistant for a weather service. " + " ".join(
    f"Rule {i}: answer questions about region {i} with its forecast code W-{i}." for i in range(40)
)
FLIGHTS = "You answer questions about flights. " + " ".join(
    f"Gate {i} serves flights to city {i} and boards {i % 7} minutes early." for i in range(40)
)
WEATHER: anthropic.types.ToolParam = {
    "name": "get_weather",
    "description": "The forecast for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from cached_server(tmp_path_factory, ServerConfig(api_key="sekret"))


@pytest.fixture(scope="module")
def client(server: LiveServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="sekret")


def test_create_answers_with_text_blocks_and_usage(client: anthropic.Anthropic) -> None:
    m = client.messages.create(
        model="any",
        max_tokens=12,
        extra_body={"temperature": 0},
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert m.role == "assistant"
    assert m.type == "message"
    assert m.content[0].type == "text"
    assert "Paris" in m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.output_tokens > 0
    assert m.usage.input_tokens > 0


def test_streamed_equals_not_streamed(client: anthropic.Anthropic) -> None:
    kw: dict[str, Any] = {"model": "any", "max_tokens": 16, "extra_body": {"temperature": 0},
                          "messages": [{"role": "user", "content": "Name three colors."}]}  # fmt: skip
    whole = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.content[0].text == whole.content[0].text  # type: ignore[union-attr]
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds
    assert "message_delta" in kinds
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_count_tokens_matches_the_prompt_the_model_reads(client: anthropic.Anthropic) -> None:
    kw: dict[str, Any] = {"model": "any", "messages": [{"role": "user", "content": "Hello there."}], "system": SYSTEM}
    counted = client.messages.count_tokens(**kw).input_tokens
    m = client.messages.create(max_tokens=1, **kw)
    assert counted == m.usage.input_tokens + m.usage.cache_read_input_tokens + m.usage.cache_creation_input_tokens


def test_cache_control_on_the_system_prompt_is_read_back_and_changes_nothing(client: anthropic.Anthropic) -> None:
    system: Any = [{"type": "text", "text": FLIGHTS, "cache_control": {"type": "ephemeral"}}]
    kw: dict[str, Any] = {"model": "any", "max_tokens": 12, "extra_body": {"temperature": 0}, "system": system}
    first = client.messages.create(messages=[{"role": "user", "content": "Which gate serves city 7?"}], **kw)
    assert first.usage.cache_creation_input_tokens
    assert first.usage.cache_creation_input_tokens > 0
    second = client.messages.create(messages=[{"role": "user", "content": "Which gate serves city 7?"}], **kw)
    assert second.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens > 0
    assert second.content == first.content


def test_tool_use_and_tool_result_round_trip(client: anthropic.Anthropic) -> None:
    asked: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = client.messages.create(
        model="any", max_tokens=48, extra_body={"temperature": 0}, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"},
        messages=asked,
    )  # fmt: skip
    assert m.stop_reason == "tool_use"
    (call,) = [b for b in m.content if b.type == "tool_use"]
    assert call.name == "get_weather"
    assert isinstance(call.input, dict)
    follow = client.messages.create(
        model="any", max_tokens=64, extra_body={"temperature": 0}, tools=[WEATHER],
        messages=[*asked, {"role": "assistant", "content": m.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}]}],
    )  # fmt: skip
    assert follow.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert all("<tool_call" not in getattr(b, "text", "") for b in follow.content)  # a cut call leaks no markup
    assert follow.usage.cache_read_input_tokens
    assert follow.usage.cache_read_input_tokens > 0  # the turn before


def test_streamed_tool_input_arrives_in_pieces_and_equals_the_whole(client: anthropic.Anthropic) -> None:
    kw: Any = {"model": "any", "max_tokens": 48, "extra_body": {"temperature": 0}, "tools": [WEATHER],
               "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "Weather in Rome?"}]}  # fmt: skip
    whole = client.messages.create(**kw)
    events = list(client.messages.create(**kw, stream=True))
    pieces = [
        e.delta.partial_json for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    assert len(pieces) > 1  # as generated, not in one piece at the end
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop")
    call = next(b for b in whole.content if b.type == "tool_use")
    assert json.loads("".join(pieces)) == call.input
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "input", None)) for b in final.content] == [
        (b.type, getattr(b, "input", None)) for b in whole.content
    ]


def test_thinking_and_metadata_are_ignored(client: anthropic.Anthropic) -> None:
    m = client.messages.create(
        model="any", max_tokens=4, messages=[{"role": "user", "content": "Hi"}],
        metadata={"user_id": "u1"}, thinking={"type": "enabled", "budget_tokens": 1024},
    )  # fmt: skip
    assert m.content


def test_an_earlier_turns_thinking_is_left_out_of_the_prompt(client: anthropic.Anthropic) -> None:
    """Claude Code sends an earlier turn's thinking back (from a session begun against Anthropic's API,
    which drops it from the context as well): the reply is the one without it."""
    thinking: list[Any] = [{"type": "thinking", "thinking": "France: Paris.", "signature": "sig"}]

    def reply(before: list[Any]) -> anthropic.types.Message:
        said = [*before, {"type": "text", "text": "Paris is the capital of France."}]
        messages: list[Any] = [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": said},
            {"role": "user", "content": "And of Italy?"},
        ]
        return client.messages.create(model="any", max_tokens=8, extra_body={"temperature": 0}, messages=messages)

    def read(m: anthropic.types.Message) -> int:
        return m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)

    without, with_thinking = reply([]), reply(thinking)
    assert read(with_thinking) == read(without)
    assert with_thinking.content == without.content


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"max_tokens": 4, "messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        (
            {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages[0].content[0].type: this model reads text only, not 'image'",
        ),
        (
            {
                "max_tokens": 4,
                "messages": [
                    {"role": "user", "content": "Take a screenshot"},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]},
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "image", "source": {}}]}
                        ],
                    },
                ],
            },
            "messages[2].content[0].content[0].type: this model reads text only",
        ),  # fmt: skip
        ({"max_tokens": 4, "temperature": 3, "messages": [{"role": "user", "content": "x"}]}, "temperature"),
        (
            {
                "max_tokens": 4,
                "tools": [WEATHER],
                "tool_choice": {"type": "tool", "name": "get_time"},
                "messages": [{"role": "user", "content": "x"}],
            },
            "tool_choice: 'get_time' is not among",
        ),  # fmt: skip
        (
            {
                "max_tokens": 4,
                "tools": [
                    {"type": "web_search_20250305", "name": "web_search"},
                    {**WEATHER, "input_schema": {"type": 5}},
                ],
                "tool_choice": {"type": "any"},
                "messages": [{"role": "user", "content": "x"}],
            },
            "tools[1].input_schema: type must be",
        ),  # a schema that cannot constrain the call, named as the client sent it
    ],
)
def test_bad_input_is_anthropics_400_naming_the_field(server: LiveServer, body: dict[str, Any], named: str) -> None:
    r = httpx.post(
        f"{server.url}/v1/messages", json=body, headers={"x-api-key": "sekret", "anthropic-version": "2023-06-01"}
    )
    assert r.status_code == 400
    error = r.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert named in error["error"]["message"]


def test_a_wrong_key_is_anthropics_401(server: LiveServer) -> None:
    r = httpx.post(f"{server.url}/v1/messages", json={}, headers={"x-api-key": "nope"})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


def test_anthropics_own_tools_are_left_out_and_custom_ones_kept() -> None:
    tools = [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},  # runs on Anthropic's servers
        {"type": "bash_20250124", "name": "bash"},  # its schema lives on Anthropic's side
        {"type": "custom", "name": "lookup", "input_schema": {"type": "object"}},
        {"name": "fetch", "input_schema": {"type": "object"}},
    ]
    req = MessagesRequest.model_validate(
        {"max_tokens": 8, "tools": tools, "messages": [{"role": "user", "content": "hi"}]}
    )
    chat, _ = to_chat(req)
    assert [t.function.name for t in chat.tools or []] == ["lookup", "fetch"]


def test_translation_marks_the_message_holding_a_breakpoint() -> None:
    req = MessagesRequest.model_validate({
        "max_tokens": 8,
        "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]},
        ],
    })  # fmt: skip
    chat, marks = to_chat(req)
    roles = [m.role for m in chat.messages]
    assert roles == ["system", "user", "assistant", "tool"]
    assert [m.cache_control is not None for m in chat.messages] == [True, True, False, False]
    assert marks == 2
    assert chat.messages[2].tool_calls
    assert chat.messages[2].tool_calls[0].function.arguments == '{"x": 1}'
    assert usage(100, 40, 5, 70).to_dict() == {"input_tokens": 30, "cache_read_input_tokens": 40,
                                    "cache_creation_input_tokens": 30, "output_tokens": 5}  # fmt: skip


def test_claude_codes_empty_system_message_in_the_list_is_accepted(server: LiveServer) -> None:
    """Claude Code 2.1 sends `{"role": "system", "content": [], "output_config": ...}` among the messages."""
    body = {
        "max_tokens": 4,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
            {"role": "system", "content": [], "output_config": {"effort": "medium"}},
        ],
    }
    r = httpx.post(f"{server.url}/v1/messages", json=body, headers={"x-api-key": "sekret"}, timeout=60)
    assert r.status_code == 200
    assert r.json()["content"]


def test_a_breakpoint_on_an_earlier_system_block_anchors_at_that_block(client: anthropic.Anthropic) -> None:
    """The block's end, rounded down to the prefill cut before it: the next request with another block
    after it restores exactly there, short of the system message's end."""

    def ask(extra: str) -> anthropic.types.Usage:
        return client.messages.create(
            model="any", max_tokens=4, extra_body={"temperature": 0},
            system=[{"type": "text", "text": "Block test. " + FLIGHTS, "cache_control": {"type": "ephemeral"}},
                    {"type": "text", "text": f" Today: {extra}."}],
            messages=[{"role": "user", "content": "Which gate serves city 3?"}],
        ).usage  # fmt: skip

    first = ask("rain expected in the north, delays likely at the eastern gates")
    anchored = first.cache_creation_input_tokens or 0
    assert anchored > 0
    assert anchored % 128 == 0  # a prefill cut inside the system message
    second = ask("clear skies")
    assert second.cache_read_input_tokens == anchored
    whole_message = client.messages.count_tokens(
        model="any",
        system="Block test. " + FLIGHTS,
        messages=[{"role": "user", "content": "Which gate serves city 3?"}],
    ).input_tokens
    assert anchored < whole_message


def test_a_breakpoint_before_the_last_block_stays_on_its_part() -> None:
    req = MessagesRequest.model_validate(
        {"model": "m", "max_tokens": 4,
         "system": [{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "B"}],
         "messages": [{"role": "user", "content": [{"type": "text", "text": "C"},
                                                   {"type": "text", "text": "D", "cache_control": {"type": "ephemeral"}}]}]}
    )  # fmt: skip
    chat, marks = to_chat(req)
    system, user = chat.messages
    assert marks == 2
    assert system.cache_control is None
    assert isinstance(system.content, list)
    assert system.content[0].cache_control is not None
    assert system.marked_parts == [0]
    assert user.content == "CD"
    assert user.cache_control is not None  # the last block: the message's end

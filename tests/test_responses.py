"""The OpenAI Responses API through the official `openai` SDK, on the bundled model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI
from openai.types.responses import (
    EasyInputMessageParam,
    FunctionToolParam,
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)
from pydantic import Field, TypeAdapter

from anchorkv.config import ServerConfig
from anchorkv.engine.engine import Engine
from anchorkv.server.app import create_app
from anchorkv.server.openai_responses import ResponsesRequest, input_messages, to_chat
from conftest import LiveServer, cached_server, serve_in_thread

INSTRUCTIONS = "You are a terse assistant for a library. " + " ".join(
    f"Shelf {i} holds books on subject {i}; answer with its code L-{i}." for i in range(40)
)
LOOKUP: FunctionToolParam = {
    "type": "function",
    "name": "find_book",
    "description": "Find a book by title",
    "parameters": {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]},
    "strict": False,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from cached_server(tmp_path_factory, ServerConfig())


@pytest.fixture(scope="module")
def client(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def test_create_answers_with_an_output_message_and_usage(client: OpenAI) -> None:
    r = client.responses.create(
        model="any", input="What is the capital of France?", temperature=0, max_output_tokens=12
    )
    assert r.status in ("completed", "incomplete")
    assert "Paris" in r.output_text
    assert r.output[0].type == "message"
    assert r.usage is not None
    assert r.usage.input_tokens > 0
    assert r.usage.output_tokens > 0


def test_streamed_events_end_in_the_same_response(client: OpenAI) -> None:
    kw: dict[str, Any] = {"model": "any", "input": "Name three colors.", "temperature": 0, "max_output_tokens": 16}
    whole = client.responses.create(**kw)
    kinds, text = [], ""
    for event in client.responses.create(stream=True, **kw):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert text == whole.output_text == final.output_text


def test_previous_response_id_continues_and_restores_the_conversation(client: OpenAI) -> None:
    first = client.responses.create(
        model="any",
        instructions=INSTRUCTIONS,
        input="Which shelf holds subject 5?",
        temperature=0,
        max_output_tokens=12,
    )
    second = client.responses.create(
        model="any", instructions=INSTRUCTIONS, input="And subject 6?", previous_response_id=first.id,
        temperature=0, max_output_tokens=12,
    )  # fmt: skip
    assert second.usage is not None
    assert first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens  # the first turn is in the prompt
    assert second.usage.input_tokens_details.cached_tokens > first.usage.input_tokens // 2


def test_prompt_cache_key_is_accepted_and_cached_tokens_reported(client: OpenAI) -> None:
    kw: dict[str, Any] = {"model": "any", "instructions": INSTRUCTIONS, "temperature": 0, "max_output_tokens": 8,
                          "prompt_cache_key": "library"}  # fmt: skip
    a = client.responses.create(input="Subject 11?", **kw)
    b = client.responses.create(input="Subject 11?", **kw)
    assert b.usage is not None
    assert b.usage.input_tokens_details.cached_tokens > 0
    assert a.output_text == b.output_text


def test_usage_says_what_the_cache_wrote_and_the_next_request_reads_it(client: OpenAI) -> None:
    kw: dict[str, Any] = {"model": "any", "instructions": INSTRUCTIONS, "input": "Which shelf holds subject 29?",
                          "temperature": 0, "max_output_tokens": 4}  # fmt: skip
    a, b = client.responses.create(**kw), client.responses.create(**kw)
    assert a.usage is not None and b.usage is not None
    wrote, read = a.usage.input_tokens_details, b.usage.input_tokens_details
    assert wrote.cache_write_tokens > 0
    assert read.cached_tokens >= wrote.cached_tokens + wrote.cache_write_tokens


# the events this server sends; the SDK's own union of them all has no discriminator
Event = Annotated[
    ResponseCreatedEvent | ResponseInProgressEvent | ResponseOutputItemAddedEvent | ResponseContentPartAddedEvent
    | ResponseTextDeltaEvent | ResponseTextDoneEvent | ResponseContentPartDoneEvent | ResponseOutputItemDoneEvent
    | ResponseFunctionCallArgumentsDeltaEvent | ResponseFunctionCallArgumentsDoneEvent | ResponseCompletedEvent
    | ResponseIncompleteEvent | ResponseErrorEvent,
    Field(discriminator="type"),
]  # fmt: skip


@pytest.mark.parametrize("tools", [False, True])
def test_every_response_and_event_sent_validates_as_the_sdks_models(server: LiveServer, tools: bool) -> None:
    """The SDK reads replies without validating them, so a field it requires that is missing shows only
    when a client reads it."""
    body: dict[str, Any] = {"model": "any", "input": "Find the book Dune.", "temperature": 0, "max_output_tokens": 48}
    if tools:
        body |= {"tools": [LOOKUP], "tool_choice": "required"}
    r = httpx.post(f"{server.url}/v1/responses", json=body, timeout=120)
    assert Response.model_validate(r.json()).output
    events = TypeAdapter(Event)
    with httpx.stream("POST", f"{server.url}/v1/responses", json={**body, "stream": True}, timeout=120) as s:
        sent = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    kinds = [events.validate_python(e).type for e in sent]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert ("response.function_call_arguments.done" in kinds) == tools
    # as OpenAI sends them: whole seconds (the SDK's model has a float), and the tools as offered
    for whole in [r.json(), *(e["response"] for e in sent if "response" in e)]:
        assert type(whole["created_at"]) is int
        assert [t["name"] for t in whole["tools"]] == (["find_book"] if tools else [])


def test_function_tools_round_trip(client: OpenAI) -> None:
    r = client.responses.create(
        model="any", input="Find the book Dune.", tools=[LOOKUP], tool_choice="required", temperature=0,
        max_output_tokens=48,
    )  # fmt: skip
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls
    assert calls[0].name == "find_book"
    follow = client.responses.create(
        model="any", previous_response_id=r.id, tools=[LOOKUP], temperature=0, max_output_tokens=12,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "Shelf 3"}],
    )  # fmt: skip
    assert follow.status in ("completed", "incomplete")
    assert follow.usage is not None
    assert follow.usage.input_tokens_details.cached_tokens > 0


def test_streamed_function_call_arguments_arrive_in_pieces_and_end_in_the_same_calls(client: OpenAI) -> None:
    kw: Any = {"model": "any", "input": "Find the book Emma.", "tools": [LOOKUP], "tool_choice": "required",
               "temperature": 0, "max_output_tokens": 128}  # fmt: skip
    whole = client.responses.create(**kw)
    events = list(client.responses.create(**kw, stream=True))
    pieces: dict[str, list[str]] = {}
    for e in events:
        if e.type == "response.function_call_arguments.delta":
            pieces.setdefault(e.item_id, []).append(e.delta)
    assert max(len(p) for p in pieces.values()) > 1  # as generated, not in one piece at the end
    done = {e.item_id: e.arguments for e in events if e.type == "response.function_call_arguments.done"}
    final = events[-1]
    assert final.type in ("response.completed", "response.incomplete")
    calls = [o for o in final.response.output if o.type == "function_call"]
    assert calls
    assert [c.id for c in calls] == list(pieces) == list(done)
    assert all(done[c.id] == "".join(pieces[c.id]) == c.arguments for c in calls)
    expected = [o for o in whole.output if o.type == "function_call"]
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in expected]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    assert added == list(range(len(final.response.output)))


def test_codex_style_fields_are_accepted_and_ignored(server: LiveServer) -> None:
    body = {
        "model": "any", "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        "tools": [{"type": "web_search"}, {"type": "local_shell"}], "reasoning": {"effort": "low"},
        "include": ["reasoning.encrypted_content"], "store": False, "max_output_tokens": 4,
    }  # fmt: skip
    r = httpx.post(f"{server.url}/v1/responses", json=body, timeout=60)
    assert r.status_code == 200
    assert r.json()["output"]
    assert r.json()["tools"] == []  # none of them is offered to the model


def test_unknown_previous_response_id_is_a_400_naming_it(client: OpenAI) -> None:
    with pytest.raises(BadRequestError) as e:
        client.responses.create(model="any", input="x", previous_response_id="resp_nope")
    assert e.value.body["param"] == "previous_response_id"  # type: ignore[index]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [{"type": "function", "name": 3}]}, "tools[0].name"),
        ({"tools": [{"type": "web_search"}, {"type": "function", "name": "f", "parameters": [1]}]}, "tools[1].parameters"),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
        ({"text": {"format": {"type": "json_schema", "name": "n", "schema": "{}"}}}, "text.format.schema"),
        ({"text": {"format": {"type": "xml"}}}, "text.format"),
        ({"text": {"verbosity": "loud"}}, "text.verbosity"),
        ({"tools": [LOOKUP], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ],
)  # fmt: skip
def test_a_bad_tool_or_text_format_is_a_400_naming_the_field(
    server: LiveServer, fields: dict[str, Any], param: str
) -> None:
    r = httpx.post(f"{server.url}/v1/responses", json={"model": "any", "input": "Hi", **fields}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["message"].startswith(f"{param}: ")


def test_store_false_keeps_nothing(client: OpenAI) -> None:
    r = client.responses.create(model="any", input="Hi", store=False, max_output_tokens=2)
    with pytest.raises(BadRequestError):
        client.responses.create(model="any", input="x", previous_response_id=r.id)


def test_a_stored_response_is_retrieved_and_deleted_by_its_owner_only(server: LiveServer, client: OpenAI) -> None:
    r = client.responses.create(model="any", input="Name a color.", temperature=0, max_output_tokens=4)
    stream = client.responses.create(model="any", input="Hi", max_output_tokens=2, stream=True)
    (ended,) = [e for e in stream if isinstance(e, (ResponseCompletedEvent, ResponseIncompleteEvent))]
    for made in (r, ended.response):
        got = client.responses.retrieve(made.id)
        assert (got.id, got.output_text, got.usage) == (made.id, made.output_text, made.usage)
    other = OpenAI(base_url=f"{server.url}/v1", api_key="someone-else")
    with pytest.raises(NotFoundError):
        other.responses.retrieve(r.id)
    with pytest.raises(NotFoundError):
        other.responses.delete(r.id)
    client.responses.delete(r.id)
    with pytest.raises(NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(BadRequestError):
        client.responses.create(model="any", input="x", previous_response_id=r.id)
    with pytest.raises(NotFoundError):
        client.responses.delete(r.id)


def test_a_stored_responses_input_items_are_listed_page_by_page(server: LiveServer, client: OpenAI) -> None:
    said = ["One.", "Two.", "Three."]
    r = client.responses.create(
        model="any", input=[EasyInputMessageParam(role="user", content=s) for s in said], max_output_tokens=2
    )
    newest_first = list(client.responses.input_items.list(r.id, limit=2))  # two pages, the second after the first
    assert [i.type for i in newest_first] == ["message"] * 3
    texts = [i.content[0].text for i in newest_first if i.type == "message" and i.content[0].type == "input_text"]
    assert texts == said[::-1]
    assert len({i.id for i in newest_first}) == 3
    oldest_first = client.responses.input_items.list(r.id, order="asc")
    assert [i.id for i in oldest_first.data] == [i.id for i in newest_first][::-1]
    assert not oldest_first.has_more
    with pytest.raises(NotFoundError):
        OpenAI(base_url=f"{server.url}/v1", api_key="someone-else").responses.input_items.list(r.id)


def test_an_image_part_is_a_400_naming_it(client: OpenAI) -> None:
    with pytest.raises(BadRequestError) as e:
        client.responses.create(
            model="any",
            input=[
                EasyInputMessageParam(
                    role="user", content=[{"type": "input_image", "image_url": "http://x/y.png", "detail": "auto"}]
                )
            ],
        )
    assert "input[0].content[0]" in str(e.value)


@pytest.mark.parametrize(
    ("item", "named"),
    [
        ({"type": "function_call", "call_id": "c1", "name": "f", "arguments": {"a": 1}}, "input[0].arguments"),
        ({"type": "function_call_output", "output": "ok"}, "input[0].call_id"),
        ({"role": "user", "content": 5}, "input[0].content"),
        ({"role": "user", "content": [{"type": "input_text", "text": 5}]}, "input[0].content[0].text"),
        ({"type": 5, "role": "user", "content": "hi"}, "input[0]: type must be a string"),
        (
            {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_image", "image_url": "x"}]},
            "input[0].output[0]: this model reads text only",
        ),
    ],
)
def test_a_malformed_input_item_is_a_400_naming_its_field(client: OpenAI, item: dict[str, Any], named: str) -> None:
    with pytest.raises(BadRequestError) as e:
        client.responses.create(model="any", input=[item], max_output_tokens=2)  # type: ignore[list-item]
    assert named in e.value.message


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (
            {"tools": [{"type": "web_search"}, {**LOOKUP, "parameters": {"type": 5}}], "tool_choice": "required"},
            "tools[1].parameters: type must be",
        ),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}}, "text.format.schema: type"),
    ],
)
def test_a_schema_that_cannot_constrain_the_reply_is_a_400_naming_its_field(
    client: OpenAI, fields: dict[str, Any], named: str
) -> None:
    with pytest.raises(BadRequestError) as e:
        client.responses.create(model="any", input="Hi", max_output_tokens=2, **fields)
    assert named in e.value.message


def test_translation_groups_function_calls_and_keeps_instructions_out_of_history() -> None:
    items: list[dict[str, Any]] = [
        {"role": "user", "content": "a"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        {"type": "reasoning", "summary": []},
    ]
    msgs = input_messages(ResponsesRequest.model_validate({"input": items}).input)
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool"]
    assert [c["id"] for c in msgs[1]["tool_calls"]] == ["c1", "c2"]
    chat = to_chat(ResponsesRequest.model_validate({"input": "b", "instructions": "sys"}), msgs)
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool", "user"]


def test_the_servers_temperature_applies_where_a_request_sets_none(engine: Engine) -> None:
    """Codex sends no temperature: `--temperature 0` makes its requests greedy; one that sets its own keeps it."""
    for server in serve_in_thread(create_app(engine, ServerConfig(temperature=0))):
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        kw: dict[str, Any] = {"model": "any", "input": "Write a poem about the sea.", "max_output_tokens": 24}
        greedy = client.responses.create(temperature=0, **kw)
        unset = [client.responses.create(**kw) for _ in range(2)]
        assert [r.output_text for r in unset] == [greedy.output_text] * 2
        assert unset[0].temperature == 0
        hot = client.responses.create(temperature=2, **kw)
        assert hot.output_text != greedy.output_text

"""Structured output with the bundled model: response_format, llama.cpp's json_schema and grammar, and
tool_choice hold the reply to a grammar, token by token."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from anchorkv.engine.engine import Engine

SCIENTIST = [{"role": "user", "content": "Give me the name and age of a famous scientist as JSON."}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = [{"role": "user", "content": "What's the weather in Paris?"}]
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"],
        "additionalProperties": False}}},
]  # fmt: skip
FORCED_CALL = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'


def chat(client: TestClient, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    r = client.post("/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 60, **fields})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_a_json_schema_holds_the_answer_the_model_would_not_give_as_json(client: TestClient) -> None:
    free = chat(client, SCIENTIST)["choices"][0]
    with pytest.raises(ValueError):  # left alone, the model writes prose around its JSON
        json.loads(free["message"]["content"])
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    held = chat(client, SCIENTIST, response_format=fmt)
    answer = json.loads(held["choices"][0]["message"]["content"])
    assert set(answer) == {"name", "age"}
    assert isinstance(answer["name"], str)
    assert isinstance(answer["age"], int)
    # the grammar ends the reply once the object is closed, well before max_tokens
    assert held["choices"][0]["finish_reason"] == "stop"
    assert held["usage"]["completion_tokens"] < 60


def test_json_object_json_schema_and_gbnf_grammar(client: TestClient) -> None:
    obj = chat(client, SCIENTIST, response_format={"type": "json_object"}, max_tokens=12)["choices"][0]
    assert obj["message"]["content"].lstrip().startswith("{")
    yes_no = ["yes", "no"]
    answer = chat(client, WEATHER, json_schema={"enum": yes_no})["choices"][0]["message"]["content"]
    assert json.loads(answer) in yes_no
    answer = chat(client, WEATHER, grammar='root ::= "yes" | "no"')["choices"][0]["message"]["content"]
    assert answer in yes_no
    r = client.post("/v1/completions", json={"prompt": "Is Paris in France?", "grammar": 'root ::= "yes" | "no"'})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] in yes_no


def test_a_batch_of_prompts_follows_one_grammar_checked_once(
    client: TestClient, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[str] = []
    check = engine.grammar_error

    def counted(grammar: str) -> str | None:
        checked.append(grammar)
        return check(grammar)

    monkeypatch.setattr(engine, "grammar_error", counted)
    prompts = ["Is Paris in France?", "Is Rome in Spain?", "Is the sea wet?"]
    r = client.post("/v1/completions", json={"prompt": prompts, "grammar": 'root ::= "yes" | "no"', "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert [c["text"] in ("yes", "no") for c in r.json()["choices"]] == [True] * 3
    assert len(checked) == 1


def test_a_named_tool_choice_always_calls_that_tool(client: TestClient) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = chat(client, WEATHER, tools=TOOLS, tool_choice=choice)["choices"][0]
    assert body["finish_reason"] == "tool_calls"
    assert body["message"]["content"] is None
    (call,) = body["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert set(json.loads(call["function"]["arguments"])) == {"city"}
    streamed = client.post(
        "/v1/chat/completions",
        json={"messages": WEATHER, "tools": TOOLS, "tool_choice": choice, "temperature": 0, "stream": True},
    )
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("content") or "" for d in deltas) == ""
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather"
    assert {c["index"] for c in calls} == {0}
    assert "".join(c["function"]["arguments"] for c in calls) == call["function"]["arguments"]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_required_tool_choice_calls_one_of_the_tools(client: TestClient) -> None:
    body = chat(client, WEATHER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)["choices"][0]
    assert body["finish_reason"] == "tool_calls"
    (call,) = body["message"]["tool_calls"]
    params = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call["function"]["name"])
    assert set(json.loads(call["function"]["arguments"])) == set(params["required"])


def test_tool_choice_none_leaves_a_written_call_as_text(client: TestClient) -> None:
    grammar = "start: " + json.dumps(FORCED_CALL)  # Lark: the reply is exactly this call
    auto = chat(client, WEATHER, tools=TOOLS, grammar=grammar)["choices"][0]
    assert auto["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    none = chat(client, WEATHER, tools=TOOLS, grammar=grammar, tool_choice="none")["choices"][0]
    assert none["finish_reason"] == "stop"
    assert "tool_calls" not in none["message"]
    assert none["message"]["content"] == FORCED_CALL


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"grammar": "root ::= ("}, "grammar"),
        ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "response_format"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
          "tool_choice": "required"}, "tools[0].function.parameters"),
    ],
)  # fmt: skip
def test_a_grammar_that_cannot_run_is_a_400_naming_its_field(
    client: TestClient, fields: dict[str, Any], param: str
) -> None:
    r = client.post("/v1/chat/completions", json={"messages": WEATHER, "max_tokens": 4, **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param

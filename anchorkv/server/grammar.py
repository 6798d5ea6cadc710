"""The grammar a request's output must follow, from its OpenAI and llama.cpp fields, in llguidance's form.

- `tool_choice: "required"` or a named function: one `<tool_call>` block per call (the form our tool prompt
  asks for and `tool_calls.py` parses), whose JSON is a call of an offered function with arguments that
  follow its `parameters` schema; one or more calls, or exactly one with `parallel_tool_calls: false` or a
  named function.
- `response_format` `json_object` (any JSON object, or the `schema` given with it, as llama.cpp takes it) or
  `json_schema` (its `schema`); llama.cpp's `json_schema` (a schema) and `grammar` (GBNF or Lark).
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
from llguidance import LLMatcher

from anchorkv.engine.constraint import check_grammar
from anchorkv.server.schemas import ChatCompletionRequest, FunctionTool, NamedToolChoice, SamplingFields
from anchorkv.server.tool_calls import CLOSE, OPEN


class RequestGrammarError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param, self.reason = param, message


def json_grammar(schema: dict[str, Any], param: str) -> str:
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema)
    except ValueError as e:
        raise RequestGrammarError(param, str(e)) from None
    return _checked(grammar, param)


def text_grammar(text: str, param: str) -> str:
    """GBNF as llama.cpp takes it, or Lark."""
    try:
        grammar = llguidance.grammar_from("grammar", text)
    except Exception as e:  # the GBNF converter raises its own error types
        raise RequestGrammarError(param, str(e)) from None
    return _checked(grammar, param)


def tool_grammar(tools: list[FunctionTool], name: str | None, parallel: bool) -> str:
    """Calls of the named function, or of any function offered when name is None."""
    calls = []
    for i, tool in enumerate(tools):
        fn = tool.function
        if name is not None and fn.name != name:
            continue
        call = {
            "type": "object",
            "properties": {"name": {"const": fn.name}, "arguments": fn.parameters or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        json_grammar(call, f"tools[{i}].function.parameters")  # names the tool whose schema is wrong
        calls.append(call)
    body = calls[0] if len(calls) == 1 else {"anyOf": calls}
    opening, closing = json.dumps(OPEN + "\n"), json.dumps("\n" + CLOSE)
    more = "" if name is not None or not parallel else ' ("\\n" call)*'
    lark = f"start: call{more}\ncall: {opening} %json {json.dumps(body)} {closing}\n"
    return _checked(LLMatcher.grammar_from_lark(lark), "tools")


def _checked(grammar: str, param: str) -> str:
    if (error := check_grammar(grammar)) is not None:
        raise RequestGrammarError(param, error)
    return grammar


def request_grammar(req: SamplingFields) -> tuple[str, str] | None:
    """The grammar the request's output follows and the field it came from, or None. A required or named
    tool choice goes first; of grammar, json_schema and response_format at most one may be given."""
    rf = req.response_format if req.response_format is not None and req.response_format.type != "text" else None
    given = [
        p
        for p, v in (("grammar", req.grammar), ("json_schema", req.json_schema), ("response_format", rf))
        if v is not None
    ]
    if len(given) > 1:
        raise RequestGrammarError(given[1], f"give one of grammar, json_schema and response_format, not {given[0]} too")
    if isinstance(req, ChatCompletionRequest) and req.tools and req.tool_choice not in (None, "none", "auto"):
        name = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
        return tool_grammar(req.tools, name, req.parallel_tool_calls), "tools"
    if req.grammar is not None:
        return text_grammar(req.grammar, "grammar"), "grammar"
    if req.json_schema is not None:
        return json_grammar(req.json_schema, "json_schema"), "json_schema"
    if rf is None:
        return None
    if rf.json_schema is not None:
        param = "response_format.json_schema.schema"
        return json_grammar(rf.json_schema.schema_, param), param
    return json_grammar(rf.schema_ or {"type": "object"}, "response_format.schema"), "response_format.schema"

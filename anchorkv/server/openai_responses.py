"""The OpenAI Responses API, translated to and from the internal chat request: pure, no model.

`instructions` becomes the system message; input items become chat messages (a run of `function_call`
items one assistant message with tool_calls, a `function_call_output` a tool message); flat function tools
become chat tools; `text.format` becomes `response_format`. A reply comes back as output items. Responses
are kept (bounded, in memory, per tenant) so that `previous_response_id` continues a conversation, whose
prefix the cache then holds.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from openai.types.responses import (
    FunctionTool,
    Response,
    ResponseFormatTextJSONSchemaConfig,
    ResponseFunctionToolCall,
    ResponseOutputItem,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseTextConfig,
    ResponseUsage,
    Tool,
    ToolChoiceFunction,
)
from openai.types.responses.response import IncompleteDetails
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
from openai.types.shared import ResponseFormatJSONObject, ResponseFormatText
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from anchorkv.server.schemas import ChatCompletionRequest, RequestBody, offered_tool

KEPT_RESPONSES = 1024


def _type(value: Any) -> Any:
    return value.get("type") if isinstance(value, dict) else getattr(value, "type", None)


# A union's members are told apart by tags with a hyphen, which an error's `param` leaves out (errors.py).
# Function tools are checked as the SDK's; the others (web_search, local_shell, ...) are never offered.
RequestTool = Annotated[
    Annotated[FunctionTool, Tag("function-tool")] | Annotated[dict[str, Any], Tag("other-tool")],
    Discriminator(lambda t: "function-tool" if _type(t) == "function" else "other-tool"),
]
TextFormat = Annotated[
    Annotated[ResponseFormatText, Tag("text-format")]
    | Annotated[ResponseFormatTextJSONSchemaConfig, Tag("json_schema-format")]
    | Annotated[ResponseFormatJSONObject, Tag("json_object-format")],
    Discriminator(
        lambda f: f"{_type(f)}-format",
        custom_error_type="format_type",
        custom_error_message="type must be text, json_schema or json_object",
    ),
]


class TextConfig(ResponseTextConfig):
    format: TextFormat | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function_call"]
    call_id: str | None = None
    id: str | None = None
    name: str
    arguments: str = "{}"  # JSON text, as the reply gave it


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]


ITEM_TYPES = ("message", "function_call", "function_call_output")


def _item_tag(item: Any) -> str | None:
    kind = item.get("type", "message") if isinstance(item, dict) else "message"
    return f"{kind}-item" if kind in ITEM_TYPES else "other-item" if isinstance(kind, str) else None


# the other item types (reasoning, ...) are kept as sent and skipped; an item_reference is not looked up
InputItem = Annotated[
    Annotated[MessageItem, Tag("message-item")]
    | Annotated[FunctionCallItem, Tag("function_call-item")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output-item")]
    | Annotated[dict[str, Any], Tag("other-item")],
    Discriminator(_item_tag, custom_error_type="item_type", custom_error_message="type must be a string"),
]


class ResponsesRequest(RequestBody):
    model_config = ConfigDict(extra="ignore")  # reasoning, include, metadata, truncation, ...: accepted, unused
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[RequestTool] | None = None  # non-function tools are accepted and left out
    tool_choice: Literal["auto", "required", "none"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    prompt_cache_key: str | None = None
    text: TextConfig | None = None
    cache_salt: str | None = None


def _text(content: str | list[ContentPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text or "" for p in content)


def _text_only(content: str | list[ContentPart], field: str) -> None:
    for j, part in enumerate(content if isinstance(content, list) else []):
        if part.type not in ("input_text", "output_text", "text"):
            raise ValueError(f"{field}[{j}]: this model reads text only, not {part.type!r}")


def input_messages(items: str | list[InputItem]) -> list[dict[str, Any]]:
    """Input items as chat messages. Raises ValueError naming a part this model cannot read."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if isinstance(item, MessageItem):
            _text_only(item.content, f"input[{i}].content")
            out.append({"role": item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id or item.id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}  # fmt: skip
            if out and out[-1]["role"] == "assistant" and not out[-1].get("content") and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            _text_only(item.output, f"input[{i}].output")
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
    return out


def sent(items: str | list[InputItem]) -> str | list[dict[str, Any]]:
    """The input items as the client sent them."""
    if isinstance(items, str):
        return items
    return [i if isinstance(i, dict) else i.model_dump(exclude_unset=True) for i in items]


def to_chat(req: ResponsesRequest, history: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The internal chat request: the stored conversation `history` (from previous_response_id), then this
    request's instructions and input."""
    # instructions are never carried over from a previous response: the history is kept without them
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    messages += [*history, *input_messages(req.input)]
    tools = [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description or "",
                "parameters": t.parameters or {"type": "object"},
            },
        }
        for t in _tools(req)
    ]
    body: dict[str, Any] = {"messages": messages, "top_p": req.top_p, "stream": req.stream,
                            "parallel_tool_calls": req.parallel_tool_calls}  # fmt: skip
    if "temperature" in req.model_fields_set:  # else the server's default
        body["temperature"] = req.temperature
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    if tools:
        body["tools"] = tools
        choice = _tool_choice(req)
        body["tool_choice"] = (
            choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
        )
    fmt = req.text.format if req.text is not None else None
    if isinstance(fmt, ResponseFormatTextJSONSchemaConfig):
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_}}
    elif isinstance(fmt, ResponseFormatJSONObject):
        body["response_format"] = {"type": "json_object"}
    if req.prompt_cache_key is not None:
        body["prompt_cache_key"] = req.prompt_cache_key
    if req.cache_salt is not None:
        body["cache_salt"] = req.cache_salt
    return ChatCompletionRequest.model_validate(body)


ITEM_IDS = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def listed_inputs(rid: str, items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Response rid's input items as `input_items` lists them: each with an id (the client's, else one
    derived from rid and the item's place), a message's text as content parts."""
    listed = []
    for i, item in enumerate([{"role": "user", "content": items}] if isinstance(items, str) else items):
        kind = item.get("type", "message")
        out = {
            "type": kind,
            **item,
            "id": item.get("id") or f"{ITEM_IDS.get(kind, 'item')}_{rid.removeprefix('resp_')}_{i}",
        }
        if kind == "message":
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            content = item.get("content")
            out["content"] = [{"type": part, "text": content}] if isinstance(content, str) else content
            out.setdefault("status", "completed")
        listed.append(out)
    return listed


class ResponseBody(Response):
    """A response as OpenAI sends it: `created_at` in whole seconds, where the SDK's model has a float."""

    created_at: int
    store: bool | None = None  # sent by OpenAI, missing from the SDK's model


def to_json(model: BaseModel) -> str:
    """A reply's JSON: the fields set (optional ones left unset stay out), each model serialized as its own
    class (a ResponseBody inside an event keeps its integer `created_at`)."""
    return model.model_dump_json(exclude_unset=True, by_alias=True, serialize_as_any=True)


def output_items(reply: dict[str, Any]) -> list[ResponseOutputItem]:
    """An assistant message in the chat form as Responses output items."""
    items: list[ResponseOutputItem] = []
    if reply.get("content"):
        text = ResponseOutputText(type="output_text", text=reply["content"], annotations=[])
        items.append(ResponseOutputMessage(type="message", id=f"msg_{uuid.uuid4().hex[:24]}", status="completed",
                                           role="assistant", content=[text]))  # fmt: skip
    for call in reply.get("tool_calls") or []:
        items.append(ResponseFunctionToolCall(type="function_call", id=f"fc_{uuid.uuid4().hex[:24]}", call_id=call["id"],
                     name=call["function"]["name"], arguments=call["function"]["arguments"], status="completed"))  # fmt: skip
    return items


def _offered(req: ResponsesRequest) -> list[int]:
    """The tools offered to the model, the request's function tools, by their place in the request."""
    return [i for i, t in enumerate(req.tools or []) if isinstance(t, FunctionTool)]


def _tools(req: ResponsesRequest) -> list[FunctionTool]:
    return [t for t in req.tools or [] if isinstance(t, FunctionTool)]


def field(req: ResponsesRequest, chat_param: str) -> str:
    """The request's field behind a field of its chat request (a tool's parameters, the format's schema)."""
    if (i := offered_tool(chat_param, _offered(req))) is not None:
        return f"tools[{i}].parameters"
    return "text.format.schema" if chat_param.startswith("response_format") else chat_param


def _tool_choice(req: ResponsesRequest) -> Literal["auto", "required", "none"] | ToolChoiceFunction:
    choice = req.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return ToolChoiceFunction(type="function", name=str(choice.get("name", "")))
    return choice if isinstance(choice, str) else "auto"


def response(
    rid: str, model: str, req: ResponsesRequest, items: list[ResponseOutputItem], finish: str, prompt: int,
    cached: int, output: int, written: int = 0,
) -> ResponseBody:  # fmt: skip
    """The response object; the request's tools, tool choice and format as they were run."""
    incomplete = finish == "length"
    usage = ResponseUsage(
        input_tokens=prompt, output_tokens=output, total_tokens=prompt + output,
        input_tokens_details=InputTokensDetails(cached_tokens=cached, cache_write_tokens=written),
        output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
    )  # fmt: skip
    return ResponseBody(
        id=rid, object="response", created_at=int(time.time()), model=model, output=items,
        status="incomplete" if incomplete else "completed",
        incomplete_details=IncompleteDetails(reason="max_output_tokens") if incomplete else None,
        error=None, instructions=req.instructions, parallel_tool_calls=req.parallel_tool_calls,
        previous_response_id=req.previous_response_id, temperature=req.temperature, top_p=req.top_p,
        tool_choice=_tool_choice(req), tools=list[Tool](_tools(req)), max_output_tokens=req.max_output_tokens,
        store=req.store, text=req.text or ResponseTextConfig(format=ResponseFormatText(type="text")), usage=usage,
    )  # fmt: skip


@dataclass(frozen=True)
class Kept:
    salt: str | None
    messages: list[dict[str, Any]]  # the conversation so far, ending with the reply
    body: ResponseBody  # the response object, as returned
    input: str | list[dict[str, Any]]  # its input, as sent


class ResponseStore:
    """Recent responses by id, per API key, the oldest dropped first. A conversation continues only under
    the cache_salt it was kept with."""

    def __init__(self, size: int = KEPT_RESPONSES) -> None:
        self.size = size
        self._kept: OrderedDict[tuple[str, str], Kept] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, rid: str) -> Kept | None:
        with self._lock:
            return self._kept.get((key, rid))

    def conversation(self, key: str, rid: str, salt: str | None) -> list[dict[str, Any]] | None:
        kept = self.get(key, rid)
        return kept.messages if kept is not None and kept.salt == salt else None

    def put(self, key: str, rid: str, kept: Kept) -> None:
        with self._lock:
            self._kept[(key, rid)] = kept
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)

    def delete(self, key: str, rid: str) -> bool:
        with self._lock:
            return self._kept.pop((key, rid), None) is not None

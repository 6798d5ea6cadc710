"""The Anthropic Messages API, translated to and from the internal chat request: pure, no model.

A request becomes one `ChatCompletionRequest` (system blocks first, tool_result blocks as `tool` messages,
tool_use blocks as `tool_calls`, `input_schema` as function parameters). A `cache_control` breakpoint on
a system block, a tool or a content block marks the message holding it, so the cache anchors where that
message ends (a breakpoint before a message's last block anchors there too: message ends are where a
prompt is cut exactly). A reply comes back in the `anthropic` SDK's types: content blocks, Anthropic's stop
reasons and usage.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

import anthropic.types as at
from pydantic import BaseModel, ConfigDict, Field, field_validator

from anchorkv.server.schemas import ChatCompletionRequest, RequestBody, offered_tool

MAX_BREAKPOINTS = 4  # as Anthropic's API


# an earlier turn's thinking is left out of the prompt, as Anthropic's API leaves it out of the context
SKIPPED_BLOCKS = ("thinking", "redacted_thinking")


class Block(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    id: str | None = None  # tool_use
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None  # tool_result
    content: str | list[Block] | None = None
    cache_control: dict[str, Any] | None = None

    @field_validator("type")
    @classmethod
    def _readable(cls, kind: str) -> str:
        if kind not in ("text", "tool_use", "tool_result", *SKIPPED_BLOCKS):
            raise ValueError(f"this model reads text only, not {kind!r}")
        return kind


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # output_config and the like
    role: Literal["user", "assistant", "system"]  # Claude Code sends system messages, often empty, mid-list
    content: str | list[Block]


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str | None = None  # "custom", or one of Anthropic's own tools (web_search_..., bash_...)
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    cache_control: dict[str, Any] | None = None


class ToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class MessagesRequest(RequestBody):
    model_config = ConfigDict(extra="ignore")  # metadata, thinking, service_tier, ...: accepted, unused
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)]
    messages: Annotated[list[Message], Field(min_length=1)]
    system: str | list[Block] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    cache_control: dict[str, Any] | None = None  # automatic caching: a breakpoint at the last message


class CountTokensRequest(MessagesRequest):
    max_tokens: int = 1


def _text(content: str | list[Any] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(
        (b.text or "") if isinstance(b, Block) else str(b.get("text", "")) for b in content if _kind(b) == "text"
    )


def _kind(block: Block | dict[str, Any]) -> str:
    return block.type if isinstance(block, Block) else str(block.get("type", ""))


class _Conversation:
    """The chat messages being built, and the cache breakpoints they carry (at most 4 are honoured)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.marks = 0

    def mark(self, target: dict[str, Any]) -> None:
        if self.marks < MAX_BREAKPOINTS and "cache_control" not in target:
            target["cache_control"] = {"type": "ephemeral"}
            self.marks += 1

    def add(self, message: dict[str, Any], marked: bool) -> None:
        if marked:
            self.mark(message)
        self.messages.append(message)

    def text_content(self, blocks: list[Any]) -> tuple[str | list[dict[str, Any]], bool]:
        """The text blocks' content, and whether the last one is a breakpoint (at the message's end). A
        breakpoint on an earlier block stays on that part: it anchors at the block's own end."""
        texts = [b for b in blocks if _kind(b) == "text"]
        inner = [k for k, b in enumerate(texts[:-1]) if b.cache_control]
        last = bool(texts and texts[-1].cache_control)
        if not inner:
            return _text(texts), last
        parts: list[dict[str, Any]] = []
        for k, b in enumerate(texts):
            parts.append({"type": "text", "text": b.text or ""})
            if k in inner:
                self.mark(parts[-1])
        return parts, last

    def add_message(self, m: Message) -> None:
        """tool_use blocks become the assistant's tool_calls; tool_result blocks, tool messages ahead of
        the user's text."""
        if m.role == "system":
            if text := _text(m.content):
                self.add({"role": "system", "content": text}, False)
        elif isinstance(m.content, str):
            self.add({"role": m.role, "content": m.content}, False)
        elif m.role == "assistant":
            calls = [
                {"id": b.id or f"toolu_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": b.name or "", "arguments": json.dumps(b.input or {})}}
                for b in m.content if b.type == "tool_use"
            ]  # fmt: skip
            message: dict[str, Any] = {"role": "assistant", "content": _text(m.content) or None}
            if calls:
                message["tool_calls"] = calls
            self.add(message, any(b.cache_control for b in m.content))
        else:
            results = [b for b in m.content if b.type == "tool_result"]
            for b in results:
                tool = {"role": "tool", "tool_call_id": b.tool_use_id or "", "content": _text(b.content)}
                self.add(tool, bool(b.cache_control))
            texts = [b for b in m.content if b.type == "text"]
            if texts or not results:
                content, last = self.text_content(texts)
                self.add({"role": "user", "content": content}, last)


def to_chat(req: MessagesRequest) -> tuple[ChatCompletionRequest, int]:
    """The internal chat request, and how many cache breakpoints it carries (at most 4 are honoured)."""
    conv = _Conversation()
    if isinstance(req.system, str) and req.system:
        conv.add({"role": "system", "content": req.system}, False)
    elif isinstance(req.system, list) and req.system:
        content, last = conv.text_content(req.system)
        conv.add({"role": "system", "content": content}, last)
    if any(t.cache_control for t in req.tools or []) and conv.messages:
        conv.mark(conv.messages[0])  # the tools render into the system turn
    for m in req.messages:
        conv.add_message(m)
    if req.cache_control is not None and conv.messages:
        conv.mark(conv.messages[-1])
    return ChatCompletionRequest.model_validate(_body(req, conv.messages)), conv.marks


def _offered(req: MessagesRequest) -> list[int]:
    """The tools the model is offered, by their place in the request. Anthropic's own tools are left out:
    server tools run on Anthropic's side, and the schemas of the others (bash, text editor, ...) live there
    too."""
    return [i for i, t in enumerate(req.tools or []) if t.type in (None, "custom")]


def field(req: MessagesRequest, chat_param: str) -> str:
    """The request's field behind a field of its chat request (tools[i].function.parameters)."""
    i = offered_tool(chat_param, _offered(req))
    return chat_param if i is None else f"tools[{i}].input_schema"


def _body(req: MessagesRequest, messages: list[dict[str, Any]]) -> dict[str, Any]:
    offered = [(req.tools or [])[i] for i in _offered(req)]
    tools = [
        {"type": "function", "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema}}
        for t in offered
    ]  # fmt: skip
    body: dict[str, Any] = {"messages": messages, "max_tokens": req.max_tokens, "stream": req.stream}
    if "temperature" in req.model_fields_set:  # else the server's default
        body["temperature"] = req.temperature
    if tools:
        body["tools"] = tools
    if req.top_p is not None:
        body["top_p"] = req.top_p
    if req.top_k is not None:
        body["top_k"] = req.top_k
    if req.stop_sequences:
        body["stop"] = req.stop_sequences[:16]
    if req.tool_choice is not None and tools:
        choice = req.tool_choice
        body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or {
            "type": "function", "function": {"name": choice.name or ""}
        }  # fmt: skip
        body["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    return body


ContentBlock = at.TextBlock | at.ToolUseBlock


def message(
    mid: str, model: str, content: list[ContentBlock], stop: at.StopReason | None, usage: at.Usage
) -> at.Message:
    """The message object: the non-streamed reply, and (empty, with no stop reason yet) message_start's."""
    return at.Message(id=mid, type="message", role="assistant", model=model, content=list(content),
                      stop_reason=stop, stop_sequence=None, usage=usage)  # fmt: skip


def stop_reason(finish: str, tool_calls: bool) -> at.StopReason:
    """Anthropic's stop_reason for an engine finish reason."""
    if tool_calls:
        return "tool_use"
    return "max_tokens" if finish == "length" else "end_turn"


def content_blocks(message: dict[str, Any]) -> list[ContentBlock]:
    """An assistant message in the chat form (tool_calls as OpenAI's) as Anthropic content blocks."""
    blocks: list[ContentBlock] = []
    if message.get("content"):
        blocks.append(at.TextBlock(type="text", text=message["content"]))
    for call in message.get("tool_calls") or []:
        try:
            args = json.loads(call["function"]["arguments"] or "{}")
        except ValueError:
            args = {}
        blocks.append(at.ToolUseBlock(type="tool_use", id=call["id"].replace("call_", "toolu_", 1),
                                      name=call["function"]["name"],
                                      input=args if isinstance(args, dict) else {"value": args}))  # fmt: skip
    return blocks


def usage(prompt: int, cached: int, output: int, anchored: int) -> at.Usage:
    """Anthropic's usage: tokens read from the cache, tokens this request wrote at a breakpoint (past what
    it read), and the rest of the input."""
    created = max(0, anchored - cached)
    return at.Usage(
        input_tokens=prompt - cached - created,
        cache_read_input_tokens=cached,
        cache_creation_input_tokens=created,
        output_tokens=output,
    )

"""Tool calls in generated text (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, the Hermes / Qwen
form that our tool prompt asks for) turned into OpenAI `tool_calls`."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
# a call's JSON up to where its arguments' value starts: what lets the arguments stream as they come
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]] | None:
    """(content outside the blocks or None, tool_calls), or None when the text holds no valid call."""
    calls = []
    for block in _BLOCK.findall(text):
        try:
            obj = json.loads(block)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", {})
        arguments = args if isinstance(args, str) else _raw_arguments(block, args) or json.dumps(args)
        calls.append({
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": obj["name"], "arguments": arguments},
        })  # fmt: skip
    if not calls:
        return None
    return _BLOCK.sub("", text).strip() or None, calls


def _raw_arguments(block: str, args: Any) -> str | None:
    """The arguments' JSON as the model wrote it, when the block starts with the name (as streamed)."""
    if (m := _HEAD.match(block)) is None:
        return None
    call = _Call("", 0, value=m.end())
    call.scan(block)
    raw = block[call.value : call.value + call.scanned]
    return raw if call.closed and json.loads(raw) == args else None


def without_partial_call(text: str) -> str:
    """The text without a trailing `<tool_call>` that never closed (a reply cut by max_tokens mid-call):
    partial markup is neither content nor a call."""
    i = text.rfind(OPEN)
    return text[:i].rstrip() if i >= 0 and CLOSE not in text[i:] else text


def assistant_message(text: str, allowed: int) -> dict[str, Any]:
    """The assistant message a response carries, which a client sends back on its next turn; at most
    `allowed` tool calls (0: none are parsed, 1: parallel_tool_calls false)."""
    if not allowed:
        return {"role": "assistant", "content": text}
    text = without_partial_call(text)
    if (parsed := parse_tool_calls(text)) is not None:
        return {"role": "assistant", "content": parsed[0], "tool_calls": parsed[1][:allowed]}
    return {"role": "assistant", "content": text}


@dataclass(frozen=True)
class CallPiece:
    """The next piece of a call's arguments (their JSON text) as generated; a call's first piece names it."""

    index: int
    id: str
    name: str | None  # on the first piece only
    arguments: str


@dataclass
class _Call:
    id: str
    start: int  # in the stream's text: where the call's JSON starts (after OPEN)
    name: str | None = None
    value: int = -1  # where the arguments' value starts; -2: not a value this streams (then it comes whole)
    scanned: int = 0  # characters of the value scanned so far
    sent: int = 0  # characters of the value sent so far
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    closed: bool = False  # the value is complete
    end: int = -1  # where the call's CLOSE ends

    def scan(self, text: str) -> None:
        """Follow the value's brackets and strings up to the end of text or of the value."""
        i = self.value + self.scanned
        while i < len(text) and not self.closed:
            ch = text[i]
            if self.scanned == 0 and ch.isspace():
                self.value += 1
                i += 1
                continue
            if self.scanned == 0 and ch not in "{[":
                self.value = -2  # a string or scalar: sent whole at the end
                return
            self.scanned += 1
            i += 1
            if self.in_string:
                self.escaped, self.in_string = (False, True) if self.escaped else (ch == "\\", ch != '"')
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                self.closed = self.depth == 0


class ToolCallStream:
    """Passes streamed text through, holding back everything from the first `<tool_call>` on (and any
    tail that could still become one), so a client never sees the raw call."""

    def __init__(self, allowed: int = 2**31) -> None:
        self.text = ""
        self.sent = 0
        self.allowed = allowed  # tool calls kept, the first ones
        self.calls: list[_Call] = []  # the calls met so far, each followed as it is generated

    def pieces(self) -> list[CallPiece]:
        """The calls' arguments generated since the last call: a client can show progress. A call whose
        JSON does not start with its name, or whose arguments are not an object or array, comes whole
        from finish() instead."""
        out: list[CallPiece] = []
        while True:
            if not self.calls or self.calls[-1].end >= 0:
                at = self.text.find(OPEN, self.calls[-1].end if self.calls else self.sent)
                if at < 0 or len(self.calls) >= self.allowed:
                    return out
                self.calls.append(_Call(f"call_{uuid.uuid4().hex[:24]}", at + len(OPEN)))
            i, call = len(self.calls) - 1, self.calls[-1]
            if call.value == -1 and (m := _HEAD.match(self.text, call.start)) is not None:
                call.name, call.value = json.loads(f'"{m.group(1)}"'), m.end()
            if call.value >= 0:
                call.scan(self.text)
            if call.value >= 0 and call.scanned > call.sent:
                first = call.sent == 0
                piece = self.text[call.value + call.sent : call.value + call.scanned]
                out.append(CallPiece(i, call.id, call.name if first else None, piece))
                call.sent = call.scanned
            close = self.text.find(CLOSE, call.start)
            if close < 0:
                return out
            call.end = close + len(CLOSE)

    def push(self, delta: str) -> str:
        self.text += delta
        i = self.text.find(OPEN)
        if i < 0:
            i = len(self.text) - max((k for k in range(1, len(OPEN)) if self.text.endswith(OPEN[:k])), default=0)
        out = self.text[self.sent : i] if i > self.sent else ""
        self.sent = max(self.sent, i)
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]] | None]:
        """The text still to send, and the tool calls if the held text parses as such (a call streamed in
        `pieces` keeps its id; its arguments are the text streamed)."""
        held = without_partial_call(self.text[self.sent :])
        parsed = parse_tool_calls(held)
        if parsed is None:
            return held, None
        content, calls = parsed
        calls = calls[: self.allowed]
        for call, seen in zip(calls, self.calls, strict=False):
            if seen.sent:
                call["id"] = seen.id
        return content or "", calls

    def streamed(self, index: int) -> bool:
        """Whether call `index` went out in pieces (else it is sent whole)."""
        return index < len(self.calls) and self.calls[index].sent > 0

"""Tool calls in generated text (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, the Hermes / Qwen
form that our tool prompt asks for) turned into OpenAI `tool_calls`."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


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
        calls.append({
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)},
        })  # fmt: skip
    if not calls:
        return None
    return _BLOCK.sub("", text).strip() or None, calls


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


class ToolCallStream:
    """Passes streamed text through, holding back everything from the first `<tool_call>` on (and any
    tail that could still become one), so a client never sees the raw call."""

    def __init__(self, allowed: int = 2**31) -> None:
        self.text = ""
        self.sent = 0
        self.allowed = allowed  # tool calls kept, the first ones

    def push(self, delta: str) -> str:
        self.text += delta
        i = self.text.find(OPEN)
        if i < 0:
            i = len(self.text) - max((k for k in range(1, len(OPEN)) if self.text.endswith(OPEN[:k])), default=0)
        out = self.text[self.sent : i] if i > self.sent else ""
        self.sent = max(self.sent, i)
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]] | None]:
        """The text still to send, and the tool calls if the held text parses as such."""
        held = without_partial_call(self.text[self.sent :])
        parsed = parse_tool_calls(held)
        if parsed is None:
            return held, None
        content, calls = parsed
        return content or "", calls[: self.allowed]

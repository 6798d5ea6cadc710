"""Render chat messages through the model's Jinja template, keeping each message's end as a token offset.

Those offsets are the cache's safe chat boundaries: for ChatML, right after `<|im_end|>` and its newline,
or, when the assistant's turn comes next, right after its `<|im_start|>assistant\n`. A boundary is known
when rendering the messages up to it gives a string prefix of the whole render that also falls on a token
boundary; otherwise that message has no boundary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from anchorkv.model.tokenizer import TextTokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template refused the messages (for example, roles that do not alternate)."""


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    token_ids: list[int]
    message_ends: list[int | None]  # per input message: token offset right after it, or None when not on a boundary
    # every safe chat boundary: a message's end, or past the assistant header when the assistant's turn
    # follows it; a system message we added to describe tools counts too
    boundaries: list[int]
    turn_starts: list[int]  # the boundaries past an assistant header: where a prompt can end


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


class ChatTemplate:
    def __init__(self, tokenizer: TextTokenizer, source: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.source = source or tokenizer.chat_template or CHATML
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda v, indent=None, ensure_ascii=False: json.dumps(
            v, indent=indent, ensure_ascii=ensure_ascii
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(self.source)
        self.knows_tools = "tools" in self.source
        self.knows_tool_calls = "tool_calls" in self.source

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> RenderedPrompt:
        messages = [self._normalize(m) for m in messages]
        added = 0
        if tools and not self.knows_tools:
            added = 0 if messages and messages[0]["role"] == "system" else 1
            messages = _tools_in_system_message(messages, tools)
            tools = None
        text = self._render(messages, tools, add_generation_prompt=add_generation_prompt)
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        # char offset -> token offset, for offsets where a token starts (or the text ends)
        starts = {0: 0} | {s: i for i, (s, e) in enumerate(offsets) if e > s} | {len(text): len(ids)}

        def offset(upto: int, header: bool) -> int | None:
            prefix = self._render(messages[:upto], tools, add_generation_prompt=header)
            return starts.get(len(prefix)) if text.startswith(prefix) else None

        ends = [offset(i + 1, False) for i in range(len(messages))]
        # Where the assistant's turn follows a message, the boundary moves past that turn's header: every
        # prompt that continues there shares the header, and the turn's own prefill is then one piece
        # fewer (a prompt ending in the generation prompt is cut only at its end).
        turns = [
            offset(i + 1, True)
            if (messages[i + 1]["role"] == "assistant" if i + 1 < len(messages) else add_generation_prompt)
            else None
            for i in range(len(messages))
        ]
        boundaries = [t or e for t, e in zip(turns, ends, strict=True)]
        return RenderedPrompt(text, ids, ends[added:], [b for b in boundaries if b], [t for t in turns if t])

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, **kw: Any) -> str:
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                bos_token=self.tokenizer.bos_token or "",
                eos_token=self.tokenizer.eos_token or "",
                **kw,
            )
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, KeyError) as e:
            raise ChatTemplateError(f"the chat template could not render these messages: {e}") from e

    def _normalize(self, m: dict[str, Any]) -> dict[str, Any]:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [dict(c) for c in m["tool_calls"]]
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            m["content"] = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        elif content is None:
            m["content"] = ""
        calls = m.get("tool_calls") or []
        for c in calls:  # templates expect arguments as an object; OpenAI sends a JSON string
            c["function"] = {**c["function"], "arguments": _json_or_text(c["function"]["arguments"])}
        if calls and not self.knows_tool_calls:
            m["content"] += "".join(
                f"<tool_call>\n{json.dumps(c['function'], ensure_ascii=False)}\n</tool_call>" for c in calls
            )
        return m


def _json_or_text(arguments: Any) -> Any:
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _tools_in_system_message(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For templates that ignore `tools`: describe them in the system message, Hermes style."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    block = (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n"
        f"Function signatures are within <tools></tools> XML tags:\n<tools>\n{listing}\n</tools>\n\n"
        "For each function call, return a JSON object with the function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
        "\n</tool_call>"
    )
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{block}"}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]

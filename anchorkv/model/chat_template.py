"""Render chat messages through the model's Jinja template, keeping each message's end as a token offset.

Those offsets are the cache's safe chat boundaries: for ChatML, right after `<|im_end|>` and its newline,
or, when the assistant's turn comes next, right after its `<|im_start|>assistant\n`. A boundary is known
when rendering the messages up to it gives a string prefix of the whole render that also falls on a token
boundary; otherwise that message has no boundary.

Rendering every prefix costs O(n^2) in the number of messages, so each prefix's
render is remembered as its length and digest under a chain hash of the messages it covers: a conversation
that grows by a turn renders only the new prefixes, and the remembered ones are checked against the new
render in one pass over its text.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from anchorkv.model.tokenizer import TextTokenizer

PREFIX_MEMO = 16384  # remembered prefix renders (about 100 bytes each), least recently used dropped first

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
    part_ends: list[int] = field(default_factory=list)  # per asked (message, part): tokens up to that part's end


TEXT_PARTS = ("text", "input_text")


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


class ChatTemplate:
    def __init__(
        self, tokenizer: TextTokenizer, source: str | None = None, parse_content_specials: bool = False
    ) -> None:
        """parse_content_specials: read control tokens' text inside message content as those tokens (the
        old way); by default it is plain text, so content cannot forge a turn."""
        self.tokenizer = tokenizer
        self.parse_content_specials = parse_content_specials
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
        self._prefixes: OrderedDict[bytes, tuple[int, bytes]] = OrderedDict()  # key -> (length, digest)
        self._lock = threading.Lock()

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        marked_parts: Sequence[tuple[int, int]] = (),
    ) -> RenderedPrompt:
        """`marked_parts`: (message, content part) pairs whose end to locate in tokens (`part_ends`), rounded
        down to a token boundary; one the template does not render verbatim is left out."""
        raw = messages
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

        n = len(messages)
        ends_at = [(i + 1, False) for i in range(n)]
        # Where the assistant's turn follows a message, the boundary moves past that turn's header: every
        # prompt that continues there shares the header, and the turn's own prefill is then one piece
        # fewer (a prompt ending in the generation prompt is cut only at its end).
        turns_at = [
            (i + 1, True)
            for i in range(n)
            if (messages[i + 1]["role"] == "assistant" if i + 1 < n else add_generation_prompt)
        ]
        lengths = self._prefix_lengths(messages, tools, text, ends_at + turns_at)

        def offset(at: tuple[int, bool]) -> int | None:
            chars = lengths.get(at)
            return None if chars is None else starts.get(chars)

        ends = [offset(at) for at in ends_at]
        turns = [offset((i + 1, True)) for i in range(n)]
        boundaries = [t or e for t, e in zip(turns, ends, strict=True)]
        token_ends = [e for _, e in offsets]
        part_ends = []
        for i, j in marked_parts:
            starts_at = lengths.get((i + added, False)) if i + added else 0
            content = messages[i + added]["content"]
            found = text.find(content, starts_at or 0) if content else -1
            if found >= 0:
                upto = self._text_upto(raw[i]["content"], j)
                part_ends.append(bisect.bisect_right(token_ends, found + upto))
        return RenderedPrompt(
            self.tokenizer.unmark(text), ids, ends[added:], [b for b in boundaries if b], [t for t in turns if t],
            part_ends,
        )  # fmt: skip

    def _text_upto(self, parts: list[dict[str, Any]], j: int) -> int:
        """Characters of a message's rendered content up to the end of its part j."""
        text = "".join(p.get("text") or "" for p in parts[: j + 1] if p.get("type") in TEXT_PARTS)
        return len(text if self.parse_content_specials else self.tokenizer.mark_specials(text))

    def _prefix_lengths(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        text: str,
        wanted: list[tuple[int, bool]],
    ) -> dict[tuple[int, bool], int | None]:
        """For each (upto, header): the length of the render of messages[:upto] (with the assistant header
        when `header`) when it is a prefix of `text`, else None. A remembered render is taken when its digest
        matches text's prefix of its length; otherwise (new, or a template that reads the date) it is
        rendered again."""
        chain = hashlib.blake2b(json.dumps(tools, sort_keys=True, default=str).encode(), digest_size=16)
        chains: list[bytes] = []
        for m in messages:
            chain.update(json.dumps(m, sort_keys=True, default=str).encode())
            chains.append(chain.copy().digest())
        keys = {at: chains[at[0] - 1] + (b"h" if at[1] else b"e") for at in wanted}
        with self._lock:
            remembered = {at: self._prefixes.get(k) for at, k in keys.items()}
            for k in keys.values():
                if k in self._prefixes:
                    self._prefixes.move_to_end(k)
        digests = _prefix_digests(text, sorted({r[0] for r in remembered.values() if r is not None}))
        out: dict[tuple[int, bool], int | None] = {}
        new: dict[bytes, tuple[int, bytes]] = {}
        for at in wanted:
            r = remembered[at]
            if r is not None and digests.get(r[0]) == r[1]:
                out[at] = r[0]
                continue
            prefix = self._render(messages[: at[0]], tools, add_generation_prompt=at[1])
            new[keys[at]] = (len(prefix), _digest(prefix))
            out[at] = len(prefix) if text.startswith(prefix) else None
        with self._lock:
            self._prefixes.update(new)
            while len(self._prefixes) > PREFIX_MEMO:
                self._prefixes.popitem(last=False)
        return out

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
            m["content"] = "".join(p.get("text") or "" for p in content if p.get("type") in TEXT_PARTS)
        elif content is None:
            m["content"] = ""
        calls = m.get("tool_calls") or []
        for c in calls:  # templates expect arguments as an object; OpenAI sends a JSON string
            c["function"] = {**c["function"], "arguments": _json_or_text(c["function"]["arguments"])}
        if not self.parse_content_specials:
            m["content"] = self.tokenizer.mark_specials(m["content"])
        if calls and not self.knows_tool_calls:
            m["content"] += "".join(
                f"<tool_call>\n{json.dumps(c['function'], ensure_ascii=False)}\n</tool_call>" for c in calls
            )
        return m


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _prefix_digests(text: str, lengths: list[int]) -> dict[int, bytes]:
    """_digest(text[:n]) for each n in the sorted `lengths` within text, in one pass over it."""
    h = hashlib.blake2b(digest_size=16)
    out: dict[int, bytes] = {}
    done = 0
    for n in lengths:
        if n > len(text):
            break
        h.update(text[done:n].encode())
        done = n
        out[n] = h.copy().digest()
    return out


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

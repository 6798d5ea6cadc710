"""Workloads for the simulator and the replay benchmark: trace files and built-in generators.

A workload is a list of requests in arrival order. A chat request is a message list; each assistant
message of a recorded session is one LLM request whose prompt is every message before it. A block-trace
request (Mooncake) is a token list made from its 512-token block ids.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from functools import lru_cache
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MOONCAKE_BLOCK = 512
GENERATORS = ("gen:agent", "gen:tasks", "gen:rolling", "gen:interleaved", "gen:sessions")


@dataclass
class Request:
    session: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[int] | None = None  # set for block traces; chat requests are rendered by the caller
    reply_index: int | None = None  # the index of the assistant message this request produced, if known


@lru_cache(maxsize=4096)  # a trace's shared blocks (system prompts, earlier turns) recur request after request
def mooncake_block(block_id: int, vocab: int = 49152, size: int = MOONCAKE_BLOCK) -> tuple[int, ...]:
    """A deterministic block of token ids for a Mooncake hash id: equal ids give equal blocks."""
    return tuple(np.random.default_rng(block_id).integers(100, vocab, size).tolist())


def mooncake_tokens(hash_ids: list[int], input_length: int, vocab: int = 49152) -> list[int]:
    tokens: list[int] = []
    for h in hash_ids:
        tokens += mooncake_block(h, vocab)
    return tokens[:input_length] if input_length else tokens


def session_requests(session: str, messages: list[dict[str, Any]]) -> list[Request]:
    """One request per assistant message: its prompt is everything before it."""
    return [
        Request(session, messages[:i], reply_index=i)
        for i, m in enumerate(messages)
        if m.get("role") == "assistant" and i > 0
    ]


def _messages(obj: Any) -> list[dict[str, Any]] | None:
    if isinstance(obj, list) and obj and isinstance(obj[0], dict) and "role" in obj[0]:
        return obj
    if isinstance(obj, dict):
        for key in ("messages", "traj", "history"):
            if isinstance(obj.get(key), list):
                return _messages(obj[key])
    return None


def _clean(m: dict[str, Any]) -> dict[str, Any]:
    """Keep what the chat template reads; text parts and None contents are normalised by the template."""
    out = {
        "role": m["role"] if m["role"] in ("system", "user", "assistant", "tool") else "user",
        "content": m.get("content"),
    }
    if m.get("tool_calls"):
        out["tool_calls"] = m["tool_calls"]
    if out["content"] is None and "tool_calls" not in out:
        out["content"] = ""
    return out


def _oasst_paths(node: dict[str, Any], prefix: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    msg = {"role": "user" if node.get("role") == "prompter" else "assistant", "content": node.get("text", "")}
    path = [*prefix, msg]
    replies = node.get("replies") or []
    if not replies:
        yield path
    for r in replies:
        yield from _oasst_paths(r, path)


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None


def read_file(path: Path, limit: int | None = None) -> list[Request]:
    """Every request in the file; with a limit, JSONL files stop reading once they have that many."""
    name = path.name
    if path.suffix == ".jsonl":
        out: list[Request] = []
        for i, line in enumerate(path.read_text().splitlines()):
            if limit is not None and len(out) >= limit:
                return out[:limit]
            if not line.strip():
                continue
            obj = _json(line, f"{path}, line {i + 1}")
            if isinstance(obj, dict) and "hash_ids" in obj:
                out.append(Request(f"{name}:{i}", tokens=mooncake_tokens(obj["hash_ids"], obj.get("input_length", 0))))
            elif isinstance(obj, dict) and "prompt" in obj and "message_tree_id" in obj:
                for j, conv in enumerate(_oasst_paths(obj["prompt"], [])):
                    out += session_requests(f"{name}:{i}.{j}", conv)
            elif (msgs := _messages(obj)) is not None:
                out += session_requests(f"{name}:{i}", [_clean(m) for m in msgs])
        return out
    data = _json(path.read_text(), str(path))
    if isinstance(data, list) and data and isinstance(data[0], dict) and "traj" in data[0]:  # tau-bench
        return [
            r for i, rec in enumerate(data) for r in session_requests(f"{name}:{i}", [_clean(m) for m in rec["traj"]])
        ]
    if isinstance(data, list) and data and isinstance(data[0], dict) and "conversations" in data[0]:  # FastChat
        roles = {"human": "user", "gpt": "assistant"}
        return [
            r
            for rec in data
            for r in session_requests(
                f"{name}:{rec.get('id')}",
                [{"role": roles.get(t["from"], "user"), "content": t["value"]} for t in rec["conversations"]],
            )
        ]
    msgs = _messages(data)
    if msgs is None:
        raise ValueError(f"{path}: not a format the simulator reads (see `anchorkv simulate --help`)")
    return session_requests(name, [_clean(m) for m in msgs])


def read_trace(spec: str, limit: int | None = None) -> list[Request]:
    """A file, a folder (every .json, .jsonl and .traj file in it, sorted), or a generator name; with a
    limit, only the first requests (files past it are not read)."""
    if spec.startswith("gen:"):
        return generate(spec)[:limit]
    path = Path(spec)
    if not path.is_dir():
        return read_file(path, limit)[:limit]
    files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl", ".traj") and p.name != "index.json")
    out: list[Request] = []
    for f in files:
        if limit is not None and len(out) >= limit:
            break
        try:
            out += read_file(f, None if limit is None else limit - len(out))
        except ValueError:
            continue
    return out[:limit]


def _system(rng: random.Random, words: int = 900) -> str:
    vocab = "policy order refund shipment account region priority escalate verify customer record".split()
    return "You are a careful support agent. " + " ".join(rng.choices(vocab, k=words))


def generate(name: str, seed: int = 0) -> list[Request]:
    """Built-in workloads: independent tasks on one system prompt, a rolling chat that keeps the last
    K turns (its prefix drifts), a long agent session with tool results, K interleaved sessions."""
    rng = random.Random(seed)
    system = {"role": "system", "content": _system(rng)}
    words = "status ok error line file test passed failed value config path module".split()

    def text(n: int) -> str:
        return " ".join(rng.choices(words, k=n))

    if name == "gen:tasks":
        return [Request(f"task{i}", [system, {"role": "user", "content": f"Task {i}: {text(40)}"}]) for i in range(30)]
    if name == "gen:agent":
        msgs: list[dict[str, Any]] = [system, {"role": "user", "content": "Fix the failing build."}]
        out = []
        for i in range(30):
            out.append(Request("agent", list(msgs), reply_index=len(msgs)))
            call = {"id": f"call{i}", "type": "function", "function": {"name": "run", "arguments": '{"step": %d}' % i}}
            msgs += [
                {"role": "assistant", "content": text(30), "tool_calls": [call]},
                {"role": "tool", "tool_call_id": f"call{i}", "content": text(120)},
            ]
        return out
    if name == "gen:rolling":
        turns: list[dict[str, Any]] = []
        out = []
        for _ in range(30):
            turns += [{"role": "user", "content": text(40)}]
            out.append(Request("rolling", [system, *turns[-8:]]))
            turns += [{"role": "assistant", "content": text(40)}]
        return out
    if name == "gen:sessions":
        # 8 agent sessions on one 1.5k-token system prompt, each its own task, 7 turns of tool results
        system = {"role": "system", "content": _system(rng, words=1400)}
        out = []
        for k in range(8):
            msgs = [system, {"role": "user", "content": f"Task {k}: {text(40)}"}]
            for i in range(7):
                out.append(Request(f"s{k}", list(msgs), reply_index=len(msgs)))
                call = {
                    "id": f"c{k}-{i}",
                    "type": "function",
                    "function": {"name": "run", "arguments": '{"step": %d}' % i},
                }
                msgs += [
                    {"role": "assistant", "content": text(30), "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": f"c{k}-{i}", "content": text(100)},
                ]
        return out
    if name == "gen:interleaved":
        sessions: dict[int, list[dict[str, Any]]] = {
            k: [system, {"role": "user", "content": f"Session {k}: {text(20)}"}] for k in range(4)
        }
        out = []
        for _ in range(8):
            for k, m in sessions.items():
                out.append(Request(f"s{k}", list(m), reply_index=len(m)))
                m += [{"role": "assistant", "content": text(30)}, {"role": "user", "content": text(60)}]
        return out
    raise ValueError(f"unknown generator {name!r}; known: {', '.join(GENERATORS)}")

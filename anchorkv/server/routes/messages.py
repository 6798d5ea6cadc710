"""Anthropic's Messages API: /v1/messages and /v1/messages/count_tokens, through the same chat request
(the translation is anthropic_messages.py)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from anchorkv.engine.engine import Finished
from anchorkv.server import anthropic_messages as am
from anchorkv.server.anthropic_messages import CountTokensRequest, MessagesRequest
from anchorkv.server.service import Service, translated
from anchorkv.server.tool_calls import CallPiece, assistant_message
from anchorkv.server.worker import Job, JobFailed


def router(svc: Service) -> APIRouter:
    r = APIRouter(dependencies=[Depends(svc.auth)])

    @r.post("/v1/messages", response_model=None)
    @r.post("/messages", response_model=None)
    async def messages(req: MessagesRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        chat, _ = translated(lambda: am.to_chat(req), "messages")
        prompt, creq = await svc.chat_prompt(chat)
        params = await svc.params(chat, prompt, "messages", clamp=True)
        job = svc.submit("messages", prompt, params, creq)
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        if req.stream:
            events = _events(svc, mid, job, len(prompt), chat.calls_allowed, t0)
            return StreamingResponse(events, media_type="text/event-stream")
        done = await svc.final(job, request)
        if done is None:
            return Response(status_code=499)
        svc.account("messages", done, t0)
        reply = assistant_message(done.text, chat.calls_allowed)
        stop = am.stop_reason(done.finish_reason, "tool_calls" in reply)
        return JSONResponse(am.message(mid, svc.model_id, am.content_blocks(reply), stop, _usage(done)))

    @r.post("/v1/messages/count_tokens")
    async def count_tokens(req: CountTokensRequest) -> dict[str, int]:
        prompt, _ = await svc.chat_prompt(translated(lambda: am.to_chat(req), "messages")[0])
        return {"input_tokens": len(prompt)}

    return r


def _usage(done: Finished) -> dict[str, int]:
    return am.usage(done.prompt_tokens, done.cached_tokens, done.completion_tokens, done.cache.anchored)


def _event(kind: str, **body: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **body}, ensure_ascii=False)}\n\n"


class _Blocks:
    """The content blocks of a streamed message, opened and closed in order: text, then a tool_use block
    per call whose input streams (a JSON object), then the calls that come whole at the end."""

    def __init__(self) -> None:
        self.index = 0
        self.open: str | None = None  # "text" or "tool_use"
        self.streamed: set[int] = set()  # calls whose input went out in pieces
        self.whole: set[int] = set()  # calls whose input is not an object: sent whole at the end

    def close(self) -> Iterator[str]:
        if self.open is not None:
            yield _event("content_block_stop", index=self.index)
            self.index, self.open = self.index + 1, None

    def start(self, kind: str, block: dict[str, Any]) -> Iterator[str]:
        yield from self.close()
        self.open = kind
        yield _event("content_block_start", index=self.index, content_block=block)

    def piece(self, piece: str | CallPiece) -> Iterator[str]:
        return self.text(piece) if isinstance(piece, str) else self.call(piece)

    def text(self, text: str) -> Iterator[str]:
        if self.open != "text":
            yield from self.start("text", {"type": "text", "text": ""})
        yield _event("content_block_delta", index=self.index, delta={"type": "text_delta", "text": text})

    def call(self, piece: CallPiece) -> Iterator[str]:
        if piece.name is not None and not piece.arguments.lstrip().startswith("{"):
            self.whole.add(piece.index)
        if piece.index in self.whole:
            return
        if piece.name is not None:
            self.streamed.add(piece.index)
            tool_id = piece.id.replace("call_", "toolu_", 1)  # as content_blocks names it
            yield from self.start("tool_use", {"type": "tool_use", "id": tool_id, "name": piece.name, "input": {}})
        delta = {"type": "input_json_delta", "partial_json": piece.arguments}
        yield _event("content_block_delta", index=self.index, delta=delta)

    def end(self, calls: list[dict[str, Any]] | None) -> Iterator[str]:
        yield from self.close()
        for i, block in enumerate(am.content_blocks({"tool_calls": calls or []})):
            if i in self.streamed:
                continue
            yield from self.start("tool_use", {**block, "input": {}})
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            yield _event("content_block_delta", index=self.index, delta=delta)
            yield from self.close()


async def _events(svc: Service, mid: str, job: Job, prompt_len: int, tools: int, t0: float) -> AsyncIterator[str]:
    """Anthropic's server-sent events: message_start, ping, content blocks (each's start, deltas and stop:
    text_delta for text, input_json_delta for a tool call's input as it is generated), message_delta with
    the stop reason and usage, message_stop."""
    yield _event("message_start", message=am.message(mid, svc.model_id, [], None, am.usage(prompt_len, 0, 0, 0)))
    yield _event("ping")
    blocks = _Blocks()
    try:
        async for ev in svc.reply_pieces("messages", job, tools, t0):
            if not isinstance(ev, tuple):
                for e in blocks.piece(ev):
                    yield e
            else:
                done, calls = ev
                for e in blocks.end(calls):
                    yield e
                reason = am.stop_reason(done.finish_reason, bool(calls))
                yield _event("message_delta", delta={"stop_reason": reason, "stop_sequence": None}, usage=_usage(done))
                yield _event("message_stop")
    except JobFailed as e:
        kind = "invalid_request_error" if e.client_error else "api_error"
        yield _event("error", error={"type": kind, "message": f"generation failed: {e}"})

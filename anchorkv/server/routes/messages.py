"""Anthropic's Messages API: /v1/messages and /v1/messages/count_tokens, through the same chat request
(the translation is anthropic_messages.py)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import anthropic.types as at
from anthropic.types.raw_message_delta_event import Delta
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
        params = await svc.params(chat, prompt, "messages", clamp=True, field=lambda p: am.field(req, p))
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
        return JSONResponse(
            am.message(mid, svc.model_id, am.content_blocks(reply), stop, _usage(done)).to_dict(mode="json")
        )

    @r.post("/v1/messages/count_tokens")
    async def count_tokens(req: CountTokensRequest) -> dict[str, int]:
        prompt, _ = await svc.chat_prompt(translated(lambda: am.to_chat(req), "messages")[0])
        return {"input_tokens": len(prompt)}

    return r


def _usage(done: Finished) -> at.Usage:
    return am.usage(done.prompt_tokens, done.cached_tokens, done.completion_tokens, done.cache.anchored)


Event = at.RawMessageStreamEvent | at.ErrorResponse


def _sse(event: Event) -> str:
    """One server-sent event, named by its type."""
    return f"event: {event.type}\ndata: {event.to_json(indent=None)}\n\n"


PING = 'event: ping\ndata: {"type": "ping"}\n\n'


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
            yield _sse(at.RawContentBlockStopEvent(type="content_block_stop", index=self.index))
            self.index, self.open = self.index + 1, None

    def start(self, block: am.ContentBlock) -> Iterator[str]:
        yield from self.close()
        self.open = block.type
        yield _sse(at.RawContentBlockStartEvent(type="content_block_start", index=self.index, content_block=block))

    def delta(self, delta: at.TextDelta | at.InputJSONDelta) -> str:
        return _sse(at.RawContentBlockDeltaEvent(type="content_block_delta", index=self.index, delta=delta))

    def piece(self, piece: str | CallPiece) -> Iterator[str]:
        return self.text(piece) if isinstance(piece, str) else self.call(piece)

    def text(self, text: str) -> Iterator[str]:
        if self.open != "text":
            yield from self.start(at.TextBlock(type="text", text=""))
        yield self.delta(at.TextDelta(type="text_delta", text=text))

    def call(self, piece: CallPiece) -> Iterator[str]:
        if piece.name is not None and not piece.arguments.lstrip().startswith("{"):
            self.whole.add(piece.index)
        if piece.index in self.whole:
            return
        if piece.name is not None:
            self.streamed.add(piece.index)
            tool_id = piece.id.replace("call_", "toolu_", 1)  # as content_blocks names it
            yield from self.start(at.ToolUseBlock(type="tool_use", id=tool_id, name=piece.name, input={}))
        yield self.delta(at.InputJSONDelta(type="input_json_delta", partial_json=piece.arguments))

    def end(self, calls: list[dict[str, object]] | None) -> Iterator[str]:
        yield from self.close()
        for i, block in enumerate(am.content_blocks({"tool_calls": calls or []})):
            if i in self.streamed or not isinstance(block, at.ToolUseBlock):
                continue
            yield from self.start(block.model_copy(update={"input": {}}))
            yield self.delta(at.InputJSONDelta(type="input_json_delta", partial_json=json.dumps(block.input)))
            yield from self.close()


async def _events(svc: Service, mid: str, job: Job, prompt_len: int, tools: int, t0: float) -> AsyncIterator[str]:
    """Anthropic's server-sent events: message_start, ping, content blocks (each's start, deltas and stop:
    text_delta for text, input_json_delta for a tool call's input as it is generated), message_delta with
    the stop reason and usage, message_stop."""
    start = am.message(mid, svc.model_id, [], None, am.usage(prompt_len, 0, 0, 0))
    yield _sse(at.RawMessageStartEvent(type="message_start", message=start))
    yield PING
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
                delta = Delta(stop_reason=am.stop_reason(done.finish_reason, bool(calls)), stop_sequence=None)
                usage = at.MessageDeltaUsage.model_validate(_usage(done).to_dict())
                yield _sse(at.RawMessageDeltaEvent(type="message_delta", delta=delta, usage=usage))
                yield _sse(at.RawMessageStopEvent(type="message_stop"))
    except JobFailed as e:
        kind = "invalid_request_error" if e.client_error else "api_error"
        error = {"type": "error", "error": {"type": kind, "message": f"generation failed: {e}"}}
        yield _sse(at.ErrorResponse.model_validate(error))

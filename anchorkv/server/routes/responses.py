"""OpenAI's Responses API: /v1/responses, through the same chat request (the translation is
openai_responses.py); `previous_response_id` continues a kept conversation."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any, Literal, TypeVar, get_args

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItem,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)
from openai.types.responses.response_output_message import Content
from pydantic import BaseModel

from anchorkv.engine.engine import Finished
from anchorkv.server import openai_responses as oar
from anchorkv.server.errors import APIError
from anchorkv.server.openai_responses import KEPT_RESPONSES, Kept, ResponseBody, ResponsesRequest, ResponseStore
from anchorkv.server.service import Service, dicts, translated
from anchorkv.server.tool_calls import CallPiece, assistant_message
from anchorkv.server.worker import Job, JobFailed


def router(svc: Service) -> APIRouter:
    r = APIRouter(dependencies=[Depends(svc.auth)])
    store = ResponseStore()

    @r.post("/v1/responses", response_model=None)
    @r.post("/responses", response_model=None)
    async def responses(req: ResponsesRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        key = _key(request)
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            kept = store.conversation(key, req.previous_response_id, req.cache_salt)
            if kept is None:
                raise APIError(
                    400, f"previous_response_id: no response {req.previous_response_id!r} is kept here",
                    "previous_response_id",
                )  # fmt: skip
            history = kept
        chat = translated(lambda: oar.to_chat(req, history), "input", same=("tool_choice",))
        prompt, creq = await svc.chat_prompt(chat)
        params = await svc.params(chat, prompt, "input", clamp=True, field=lambda p: oar.field(req, p))
        req = req.model_copy(update={"temperature": params.temperature})  # echoed as run: the server's default
        job = svc.submit("responses", prompt, params, creq)
        rid = f"resp_{uuid.uuid4().hex[:24]}"
        said = dicts(chat.messages)[1 if req.instructions else 0 :]

        def finished(done: Finished) -> ResponseBody:
            reply = assistant_message(done.text, chat.calls_allowed)
            items = oar.output_items(reply)
            body = oar.response(rid, svc.model_id, req, items, done.finish_reason, done.prompt_tokens,
                                done.cached_tokens, done.completion_tokens, done.cache.written)  # fmt: skip
            if req.store:
                store.put(key, rid, Kept(req.cache_salt, [*said, reply], body, oar.sent(req.input)))
            return body

        if req.stream:
            events = _events(svc, rid, req, job, chat.calls_allowed, t0, finished)
            return StreamingResponse(events, media_type="text/event-stream")
        done = await svc.final(job, request)
        if done is None:
            return Response(status_code=499)
        svc.account("responses", done, t0)
        return _json(finished(done))

    @r.get("/v1/responses/{rid}")
    @r.get("/responses/{rid}")
    async def retrieve(rid: str, request: Request) -> Response:
        kept = store.get(_key(request), rid)
        if kept is None:
            raise _not_kept(rid)
        return _json(kept.body)

    @r.get("/v1/responses/{rid}/input_items")
    @r.get("/responses/{rid}/input_items")
    async def input_items(
        rid: str, request: Request, limit: Annotated[int, Query(ge=1, le=100)] = 20,
        order: Literal["asc", "desc"] = "desc", after: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """The response's input items, a page at a time, as OpenAI's: newest first unless order=asc."""
        kept = store.get(_key(request), rid)
        if kept is None:
            raise _not_kept(rid)
        items = oar.listed_inputs(rid, kept.input)
        items = items if order == "asc" else items[::-1]
        ids = [i["id"] for i in items]
        if after is not None:
            if after not in ids:
                raise APIError(400, f"after: no input item {after!r} in response {rid!r}", "after")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}  # fmt: skip

    @r.delete("/v1/responses/{rid}")
    @r.delete("/responses/{rid}")
    async def delete(rid: str, request: Request) -> dict[str, Any]:
        if not store.delete(_key(request), rid):
            raise _not_kept(rid)
        return {"id": rid, "object": "response", "deleted": True}

    return r


def _json(body: ResponseBody) -> Response:
    return Response(oar.to_json(body), media_type="application/json")


def _key(request: Request) -> str:
    """Whose responses these are: the API key sent, if any."""
    return f"{request.headers.get('authorization', '')}|{request.headers.get('x-api-key', '')}"


def _not_kept(rid: str) -> APIError:
    return APIError(
        404, f"no response {rid!r} is kept here (store: true keeps the last {KEPT_RESPONSES})", "response_id"
    )


Event = TypeVar("Event", bound=BaseModel)


class _Items:
    """The output items of a streamed response, in order: the message (its text as it is generated), then
    a function_call item per call, its arguments as they are generated; calls that could not stream come
    whole at the end. Each event carries the next sequence number."""

    def __init__(self) -> None:
        self.number = 0
        self.next = 0  # the next item's output_index
        self.msg_id = f"msg_{uuid.uuid4().hex[:24]}"
        self.msg_index = -1
        self.text: str | None = None  # the message's text while it is open
        self.calls: dict[int, tuple[int, ResponseFunctionToolCall]] = {}  # streamed calls: output_index, item so far

    def event(self, kind: type[Event], **fields: Any) -> str:
        name = get_args(kind.model_fields["type"].annotation)[0]
        data = oar.to_json(kind(type=name, sequence_number=self.number, **fields))
        self.number += 1
        return f"event: {name}\ndata: {data}\n\n"

    def piece(self, piece: str | CallPiece) -> Iterator[str]:
        return self.delta(piece) if isinstance(piece, str) else self.call(piece)

    def message(self, status: Literal["in_progress", "completed"], text: str | None) -> ResponseOutputMessage:
        parts: list[Content] = [] if text is None else [_text_part(text)]
        return ResponseOutputMessage(type="message", id=self.msg_id, status=status, role="assistant", content=parts)

    def delta(self, piece: str) -> Iterator[str]:
        if self.calls:
            return  # text after the calls: in the final response only
        if self.text is None:
            self.text, self.msg_index, self.next = "", self.next, self.next + 1
            yield self.event(
                ResponseOutputItemAddedEvent, output_index=self.msg_index, item=self.message("in_progress", None)
            )
            yield self.event(ResponseContentPartAddedEvent, item_id=self.msg_id, output_index=self.msg_index,
                             content_index=0, part=_text_part(""))  # fmt: skip
        self.text += piece
        yield self.event(ResponseTextDeltaEvent, item_id=self.msg_id, output_index=self.msg_index,
                         content_index=0, delta=piece, logprobs=[])  # fmt: skip

    def close_message(self) -> Iterator[str]:
        if self.text is None:
            return
        part = _text_part(self.text)
        at = {"item_id": self.msg_id, "output_index": self.msg_index, "content_index": 0}
        yield self.event(ResponseTextDoneEvent, **at, text=self.text, logprobs=[])
        yield self.event(ResponseContentPartDoneEvent, **at, part=part)
        yield self.event(
            ResponseOutputItemDoneEvent, output_index=self.msg_index, item=self.message("completed", self.text)
        )
        self.text = None

    def call(self, piece: CallPiece) -> Iterator[str]:
        if piece.name is not None:
            yield from self.close_message()
            item = ResponseFunctionToolCall(type="function_call", id=f"fc_{uuid.uuid4().hex[:24]}", call_id=piece.id,
                                            name=piece.name, arguments="", status="in_progress")  # fmt: skip
            self.calls[piece.index] = (self.next, item)
            self.next += 1
            yield self.event(ResponseOutputItemAddedEvent, output_index=self.calls[piece.index][0], item=item)
        at, item = self.calls[piece.index]
        item.arguments += piece.arguments
        yield self.event(ResponseFunctionCallArgumentsDeltaEvent, item_id=item.id, output_index=at,
                         delta=piece.arguments)  # fmt: skip

    def end(self, output: list[ResponseOutputItem]) -> Iterator[str]:
        """The final output's items, their streamed ids kept: the done events of what is still open, and
        the whole of what never streamed."""
        if self.text is not None:
            self.text = next((_message_text(i) for i in output if isinstance(i, ResponseOutputMessage)), self.text)
        yield from self.close_message()
        calls = 0
        for n, item in enumerate(output):
            if isinstance(item, ResponseOutputMessage):
                output[n] = item.model_copy(update={"id": self.msg_id})
                continue
            assert isinstance(item, ResponseFunctionToolCall)
            calls += 1
            if (sent := self.calls.get(calls - 1)) is not None:
                at, item = sent[0], item.model_copy(update={"id": sent[1].id})
            else:
                at, self.next = self.next, self.next + 1
                pending = item.model_copy(update={"arguments": "", "status": "in_progress"})
                yield self.event(ResponseOutputItemAddedEvent, output_index=at, item=pending)
                yield self.event(ResponseFunctionCallArgumentsDeltaEvent, item_id=item.id, output_index=at,
                                 delta=item.arguments)  # fmt: skip
            output[n] = item
            yield self.event(ResponseFunctionCallArgumentsDoneEvent, item_id=item.id, output_index=at,
                             arguments=item.arguments)  # fmt: skip
            yield self.event(ResponseOutputItemDoneEvent, output_index=at, item=item)


def _text_part(text: str) -> ResponseOutputText:
    return ResponseOutputText(type="output_text", text=text, annotations=[])


def _message_text(message: ResponseOutputMessage) -> str:
    return "".join(p.text for p in message.content if isinstance(p, ResponseOutputText))


async def _events(
    svc: Service, rid: str, req: ResponsesRequest, job: Job, tools: int, t0: float,
    finished: Callable[[Finished], ResponseBody],
) -> AsyncIterator[str]:  # fmt: skip
    """The Responses event sequence: response.created, in_progress, the message item's text deltas, each
    function call's arguments as they are generated, then response.completed (or response.incomplete) with
    the whole response."""
    items = _Items()
    pending = oar.response(rid, svc.model_id, req, [], "", 0, 0, 0).model_copy(
        update={"status": "in_progress", "usage": None}
    )
    yield items.event(ResponseCreatedEvent, response=pending)
    yield items.event(ResponseInProgressEvent, response=pending)
    try:
        async for ev in svc.reply_pieces("responses", job, tools, t0):
            if not isinstance(ev, tuple):
                for e in items.piece(ev):
                    yield e
            else:
                whole = finished(ev[0])
                for e in items.end(whole.output):
                    yield e
                if whole.status == "completed":
                    yield items.event(ResponseCompletedEvent, response=whole)
                else:
                    yield items.event(ResponseIncompleteEvent, response=whole)
    except JobFailed as e:
        kind = "invalid_request_error" if e.client_error else "server_error"
        yield items.event(ResponseErrorEvent, code=kind, message=f"generation failed: {e}", param=None)

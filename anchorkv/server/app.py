"""The OpenAI-compatible HTTP API."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from pydantic import ValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from anchorkv import __version__
from anchorkv.cache.prefix_cache import CacheRequest
from anchorkv.config import ServerConfig
from anchorkv.engine.engine import Delta, Engine, Finished, PromptTooLong
from anchorkv.engine.sampling import SamplingParams, TokenLogprob
from anchorkv.model.chat_template import ChatTemplateError, RenderedPrompt
from anchorkv.server import errors
from anchorkv.server.errors import APIError
from anchorkv.server.grammar import RequestGrammarError, request_grammar
from anchorkv.server.logprobs import chat_logprobs, completion_logprobs
from anchorkv.server.limits import BodyLimit, KeyedPages, key_matches
from anchorkv.server.metrics import Metrics
from anchorkv.server import anthropic_messages
from anchorkv.server import openai_responses
from anchorkv.server.anthropic_messages import CountTokensRequest, MessagesRequest
from anchorkv.server.openai_responses import ResponsesRequest, ResponseStore
from anchorkv.server.schemas import (
    ApplyTemplateRequest,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)
from anchorkv.server.tool_calls import CallPiece, ToolCallStream, assistant_message
from anchorkv.server.worker import EngineWorker, Job, JobFailed, QueueFull

log = logging.getLogger("anchorkv.server")

T = TypeVar("T")
PRIVATE_PAGES = {"/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def create_app(engine: Engine, cfg: ServerConfig, start_worker: bool = True) -> FastAPI:
    """The app; its engine worker runs on a thread of its own unless start_worker is False, in which case the
    caller runs `app.state.worker.run()` (see serve_on_main_thread)."""
    metrics = Metrics()
    worker = EngineWorker(engine, cfg.max_queue, on_cancel=metrics.cancelled.inc)
    model_id = cfg.model_alias or engine.model_name
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if start_worker:
            worker.start()
        yield
        worker.stop()
        engine.cache.flush()  # a clean shutdown loses no queued save

    app = FastAPI(title="anchorkv", version=__version__, lifespan=lifespan)
    app.state.worker = worker
    app.state.metrics = metrics
    errors.install(app)

    app.add_middleware(BodyLimit, max_bytes=int(cfg.max_body_mb * 2**20))
    if not cfg.pages_public:
        app.add_middleware(KeyedPages, paths=PRIVATE_PAGES, key=cfg.api_key or "")

    async def auth(request: Request) -> None:
        if cfg.api_key is not None and not key_matches(request.headers, cfg.api_key):
            raise APIError(
                401, "invalid or missing API key (send Authorization: Bearer <key>)", type_="authentication_error"
            )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stages = [asdict(h) for h in await asyncio.to_thread(engine.pipeline.health)]
        status = "ok" if all(h["state"] == "alive" for h in stages) else "degraded"
        return {
            "status": status,
            "queue": worker.waiting,
            "running": worker.running,
            "busy": worker.busy,
            "stages": stages,
        }

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": started, "owned_by": "anchorkv"}],
        }

    @app.get("/v1/models/{name}", dependencies=[Depends(auth)])
    async def model(name: str) -> dict[str, Any]:
        if name != model_id:
            raise APIError(404, f"model {name!r} is not served here; this server serves {model_id!r}", "model")
        return {"id": model_id, "object": "model", "created": started, "owned_by": "anchorkv"}

    @app.get("/props", dependencies=[Depends(auth)])
    async def props() -> dict[str, Any]:
        mc = engine.model_cfg
        stages = await asyncio.to_thread(engine.stages_report)
        return {
            "model": model_id,
            "model_path": str(engine.files.source),
            "model_fingerprint": engine.files.fingerprint,
            "architecture": mc.arch,
            "n_layers": mc.n_layers,
            "n_ctx": engine.ctx,
            "dtype": engine.cfg.dtype,
            "device": engine.cfg.device,
            "threads": engine.cfg.threads,
            "chunk_size": engine.cfg.chunk_size,
            "decode_weights": engine.decode_weights,
            "attention_softmax": engine.softmax_kind,
            "decode_attention": engine.decode_attention_kind,
            "linear_kernel": engine.linear_kind,
            "distributed": engine.pipeline.kind,
            "stages": stages,
            "parallel": engine.cfg.parallel,
            "decode_rows": "batched" if engine.batch_rows else "one at a time",
            "kv_pool": {
                "slots": engine.cfg.parallel,
                "positions_per_slot": engine.ctx,
                "bytes": engine.kv_bytes,
                "touched_bytes": sum(int(s["kv_touched_bytes"]) for s in stages),  # type: ignore[call-overload]
            },  # fmt: skip
            "chat_template": engine.template.source,
            "default_generation_settings": {"n_ctx": engine.ctx},
            "total_slots": engine.cfg.parallel,
            "max_queue": cfg.max_queue,
            "prefix_cache": (cache := await asyncio.to_thread(engine.cache.stats)),
            "full_cache": cache,  # the name lucebox's clients read
            "version": __version__,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_depth.set(worker.waiting)
        metrics.observe_cache(await asyncio.to_thread(engine.cache.stats))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _check_size(value: Any, param: str) -> None:
        """Before any tokenizing: text with more characters than the context could hold is refused at once."""
        limit = engine.ctx * engine.tokenizer.longest_token_chars
        if (n := text_chars(value)) > limit:
            raise APIError(
                400, f"{param}: {n} characters cannot fit the context of {engine.ctx} tokens (at most {limit})", param
            )

    async def _render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, **kw: Any) -> RenderedPrompt:
        _check_size([messages, tools], "messages")
        try:
            return await asyncio.to_thread(engine.render_chat, messages, tools, **kw)
        except ChatTemplateError as e:
            raise APIError(400, str(e), "messages") from None

    def _check_vocab(ids: list[int], param: str) -> None:
        if (bad := next((t for t in ids if t >= engine.model_cfg.vocab_size), None)) is not None:
            raise APIError(400, f"{param}: token id {bad} is outside the vocabulary", param)

    @app.post("/tokenize", dependencies=[Depends(auth)])
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        """Token ids of a prompt as the completion endpoints would see it. For messages also each message's
        end as a token count: what `prompt_cache_anchor_tokens` takes to anchor through that message."""
        out: dict[str, Any] = {}
        if req.messages is not None:
            messages = _dicts(req.messages)
            rendered = await _render(messages, req.tools, add_generation_prompt=req.add_generation_prompt)
            ids, out["message_ends"] = rendered.token_ids, rendered.message_ends
        else:
            ids = await asyncio.to_thread(engine.tokenizer.encode, req.content or "")
        out["tokens"] = (
            [{"id": t, "piece": _piece(engine.tokenizer.token_bytes(t))} for t in ids] if req.with_pieces else ids
        )
        return out

    @app.post("/detokenize", dependencies=[Depends(auth)])
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        _check_vocab(req.tokens, "tokens")
        return {"content": engine.tokenizer.decode(req.tokens)}

    @app.post("/apply-template", dependencies=[Depends(auth)])
    async def apply_template(req: ApplyTemplateRequest) -> dict[str, Any]:
        return {"prompt": (await _render(_dicts(req.messages), req.tools)).text}

    def _translated(translate: Callable[[], T], param: str) -> T:
        """An agent API's request as the chat request; what the chat request refuses is a 400."""
        try:
            return translate()
        except ValidationError as e:
            first = e.errors()[0]
            raise APIError(400, f"{errors.field_path(first['loc'])}: {first['msg']}", param) from None
        except ValueError as e:
            raise APIError(400, str(e), param) from None

    async def _chat_prompt(req: ChatCompletionRequest) -> tuple[list[int], CacheRequest]:
        messages = _dicts(req.messages)
        breaks = [(i, j) for i, m in enumerate(req.messages) for j in m.marked_parts]
        rendered = await _render(messages, req.tools, part_breaks=breaks)
        # a marked message anchors at its chat boundary: its end, or past the assistant's header when that
        # turn follows it (the prompt is cut there, not at the end; for the last message, the whole prompt);
        # a marked part before a message's last anchors at its own end (recorded at the cut before it)
        ends = rendered.message_ends
        marked = [
            min(b for b in rendered.boundaries if b >= e)
            for m, e in zip(req.messages, ends, strict=True)
            if m.marked and e is not None
        ] + rendered.part_ends
        creq = _cache_request(req, rendered, marked, next_turn_renderer(engine, messages, req.tools, req.calls_allowed))
        return rendered.token_ids, creq

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)], response_model=None)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        prompt, creq = await _chat_prompt(req)
        return await _serve("chat", req, prompt, request, "messages", creq)

    responses_store = ResponseStore()

    @app.post("/v1/messages", dependencies=[Depends(auth)], response_model=None)
    async def messages(req: MessagesRequest, request: Request) -> Response:
        """Anthropic's Messages API, through the same chat request (anthropic_messages.py)."""
        t0 = time.perf_counter()
        chat, _ = _translated(lambda: anthropic_messages.to_chat(req), "messages")
        prompt, creq = await _chat_prompt(chat)
        params = await _params(chat, prompt, "messages", clamp=True)
        job = _submit("messages", prompt, params, creq)
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(
                _message_events(mid, job, len(prompt), chat.calls_allowed, t0), media_type="text/event-stream"
            )
        done = await _final(job, request)
        if done is None:
            return Response(status_code=499)
        _account("messages", done, t0)
        reply = assistant_message(done.text, chat.calls_allowed)
        body = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model_id,
            "content": anthropic_messages.content_blocks(reply),
            "stop_reason": anthropic_messages.stop_reason(done.finish_reason, "tool_calls" in reply),
            "stop_sequence": None,
            "usage": _message_usage(done),
        }
        return JSONResponse(body)

    @app.post("/v1/responses", dependencies=[Depends(auth)], response_model=None)
    async def responses(req: ResponsesRequest, request: Request) -> Response:
        """OpenAI's Responses API, through the same chat request (openai_responses.py)."""
        t0 = time.perf_counter()
        tenant = f"{request.headers.get('authorization', '')}|{request.headers.get('x-api-key', '')}|{req.cache_salt}"
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            kept = responses_store.get(tenant, req.previous_response_id)
            if kept is None:
                raise APIError(
                    400,
                    f"previous_response_id: no response {req.previous_response_id!r} is kept here",
                    "previous_response_id",
                )
            history = kept
        chat = _translated(lambda: openai_responses.to_chat(req, history), "input")
        prompt, creq = await _chat_prompt(chat)
        params = await _params(chat, prompt, "input", clamp=True)
        job = _submit("responses", prompt, params, creq)
        rid = f"resp_{uuid.uuid4().hex[:24]}"
        said = _dicts(chat.messages)[1 if req.instructions else 0 :]

        def finished(done: Finished) -> dict[str, Any]:
            reply = assistant_message(done.text, chat.calls_allowed)
            if req.store:
                responses_store.put(tenant, rid, [*said, reply])
            items = openai_responses.output_items(reply)
            return openai_responses.response(
                rid,
                model_id,
                req,
                items,
                done.finish_reason,
                done.prompt_tokens,
                done.cached_tokens,
                done.completion_tokens,
            )

        if req.stream:
            return StreamingResponse(
                _response_events(rid, req, job, chat.calls_allowed, t0, finished), media_type="text/event-stream"
            )
        done = await _final(job, request)
        if done is None:
            return Response(status_code=499)
        _account("responses", done, t0)
        return JSONResponse(finished(done))

    async def _response_events(
        rid: str,
        req: ResponsesRequest,
        job: Job,
        tools: int,
        t0: float,
        finished: Callable[[Finished], dict[str, Any]],
    ) -> AsyncIterator[str]:
        """The Responses event sequence: response.created, in_progress, a message item's text deltas, each
        function call's arguments, then response.completed (or response.incomplete) with the whole response."""
        number = 0

        def event(kind: str, **body: Any) -> str:
            nonlocal number
            number += 1
            data = {"type": kind, "sequence_number": number - 1, **body}
            return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

        pending = {
            **openai_responses.response(rid, model_id, req, [], "", 0, 0, 0),
            "status": "in_progress",
            "usage": None,
        }
        yield event("response.created", response=pending)
        yield event("response.in_progress", response=pending)
        msg_id, text, index = f"msg_{uuid.uuid4().hex[:24]}", "", 0

        def delta(piece: str) -> Iterator[str]:
            nonlocal text
            if not text:
                item = {"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}
                yield event("response.output_item.added", output_index=0, item=item)
                part = {"type": "output_text", "text": "", "annotations": []}
                yield event("response.content_part.added", item_id=msg_id, output_index=0, content_index=0, part=part)
            text += piece
            yield event("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0, delta=piece)

        try:
            async for ev in _reply_pieces("responses", job, tools, t0):
                if isinstance(ev, str):
                    for e in delta(ev):
                        yield e
                    continue
                whole = finished(ev[0])
                for item in whole["output"]:
                    if item["type"] == "message":
                        item = {**item, "id": msg_id}
                        part = item["content"][0]
                        yield event(
                            "response.output_text.done",
                            item_id=msg_id,
                            output_index=index,
                            content_index=0,
                            text=part["text"],
                        )
                        yield event(
                            "response.content_part.done", item_id=msg_id, output_index=index, content_index=0, part=part
                        )
                    else:
                        yield event(
                            "response.output_item.added",
                            output_index=index,
                            item={**item, "arguments": "", "status": "in_progress"},
                        )
                        args = item["arguments"]
                        yield event(
                            "response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=args
                        )
                        yield event(
                            "response.function_call_arguments.done",
                            item_id=item["id"],
                            output_index=index,
                            arguments=args,
                        )
                    yield event("response.output_item.done", output_index=index, item=item)
                    index += 1
                whole["output"] = [({**i, "id": msg_id} if i["type"] == "message" else i) for i in whole["output"]]
                yield event(
                    "response.completed" if whole["status"] == "completed" else "response.incomplete", response=whole
                )
        except JobFailed as e:
            kind = "invalid_request_error" if e.client_error else "server_error"
            yield event("error", code=kind, message=f"generation failed: {e}", param=None)

    @app.post("/v1/messages/count_tokens", dependencies=[Depends(auth)])
    async def count_tokens(req: CountTokensRequest) -> dict[str, int]:
        prompt, _ = await _chat_prompt(_translated(lambda: anthropic_messages.to_chat(req), "messages")[0])
        return {"input_tokens": len(prompt)}

    def _message_usage(done: Finished) -> dict[str, int]:
        anchored = max((int(d["at"]) for d in done.cache.get("recorded", []) if d.get("kind") == "anchor"), default=0)  # type: ignore[call-overload]
        return anthropic_messages.usage(done.prompt_tokens, done.cached_tokens, done.completion_tokens, anchored)

    async def _reply_pieces(
        kind: str, job: Job, tools: int, t0: float
    ) -> AsyncIterator[str | tuple[Finished, list[dict[str, Any]] | None]]:
        """A reply's text as a client may see it (tool-call markup held back), piece by piece, then the
        Finished event with the tool calls it carried; the request is counted when it ends."""
        calls_stream = ToolCallStream(tools) if tools else None
        ttft: float | None = None
        async for ev in job.stream():
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            if isinstance(ev, Delta):
                if text := calls_stream.push(ev.text) if calls_stream else ev.text:
                    yield text
                continue
            _account(kind, ev, t0, ttft)
            rest, calls = calls_stream.finish() if calls_stream else ("", None)
            if rest:
                yield rest
            yield ev, calls

    async def _message_events(mid: str, job: Job, prompt_len: int, tools: int, t0: float) -> AsyncIterator[str]:
        """Anthropic's server-sent events: message_start, a text block's start / deltas / stop, one block
        per tool call (its input as one input_json_delta), message_delta with the stop reason and usage,
        message_stop."""

        def event(kind: str, **body: Any) -> str:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **body}, ensure_ascii=False)}\n\n"

        start = {"id": mid, "type": "message", "role": "assistant", "model": model_id, "content": [],
                 "stop_reason": None, "stop_sequence": None, "usage": anthropic_messages.usage(prompt_len, 0, 0, 0)}  # fmt: skip
        yield event("message_start", message=start)
        yield event("ping")
        index, text_open = 0, False

        def text_delta(text: str) -> Iterator[str]:
            nonlocal text_open
            if not text_open:
                text_open = True
                yield event("content_block_start", index=index, content_block={"type": "text", "text": ""})
            yield event("content_block_delta", index=index, delta={"type": "text_delta", "text": text})

        try:
            async for ev in _reply_pieces("messages", job, tools, t0):
                if isinstance(ev, str):
                    for e in text_delta(ev):
                        yield e
                    continue
                done, calls = ev
                if text_open:
                    yield event("content_block_stop", index=index)
                    index += 1
                for block in anthropic_messages.content_blocks({"tool_calls": calls or []}):
                    yield event("content_block_start", index=index, content_block={**block, "input": {}})
                    delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
                    yield event("content_block_delta", index=index, delta=delta)
                    yield event("content_block_stop", index=index)
                    index += 1
                reason = anthropic_messages.stop_reason(done.finish_reason, bool(calls))
                yield event(
                    "message_delta", delta={"stop_reason": reason, "stop_sequence": None}, usage=_message_usage(done)
                )
                yield event("message_stop")
        except JobFailed as e:
            kind = "invalid_request_error" if e.client_error else "api_error"
            yield event("error", error={"type": kind, "message": f"generation failed: {e}"})

    @app.post("/v1/completions", dependencies=[Depends(auth)], response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        if isinstance(req.prompt, str):
            _check_size(req.prompt, "prompt")
            prompt = await asyncio.to_thread(engine.tokenizer.encode, req.prompt)
        else:
            prompt = list(req.prompt)
            _check_vocab(prompt, "prompt")
        return await _serve("completion", req, prompt, request, "prompt", _cache_request(req, None, []))

    def _cache_request(
        req: SamplingFields,
        rendered: RenderedPrompt | None,
        marked: list[int],
        next_turn: Callable[[str], tuple[list[int], list[int]]] | None = None,
    ) -> CacheRequest:
        scope = req.prefix_cache.resolve(engine.cache.default_scope) if req.prefix_cache else None
        return CacheRequest(
            chat_ends=rendered.boundaries if rendered else (),
            anchors=req.anchor_list,
            has_key=req.prompt_cache_key is not None,
            marked=marked,
            salt=req.cache_salt,
            scope=scope,
            next_turn=next_turn,
            turn_starts=rendered.turn_starts if rendered else (),
        )

    async def _params(req: SamplingFields, prompt: list[int], prompt_param: str, clamp: bool = False) -> SamplingParams:
        """The request's sampling, checked against the prompt: a 400 naming the field where it cannot run.
        With `clamp`, a max_tokens past the context's room is taken as that room (the agent APIs: Claude
        Code asks for 128k output tokens whatever the model)."""
        limit = req.token_limit
        if clamp and limit is not None:
            limit = max(1, min(limit, engine.ctx - len(prompt)))
        try:
            max_tokens = engine.check_fits(len(prompt), limit)
        except PromptTooLong as e:
            param = "max_tokens" if req.token_limit is not None and len(prompt) < engine.ctx else prompt_param
            raise APIError(400, str(e), param) from None
        try:
            found = request_grammar(req)
        except RequestGrammarError as e:
            raise APIError(400, str(e), e.param) from None
        grammar = found[0] if found else None
        if found is not None and (error := await asyncio.to_thread(engine.grammar_error, found[0])) is not None:
            raise APIError(400, f"{found[1]}: {error}", found[1])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stop=req.stop_list,
            ignore_eos=req.ignore_eos,
            logprobs=req.logprob_alternatives,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            grammar=grammar,
        )

    def _submit(kind: str, prompt: list[int], params: SamplingParams, creq: CacheRequest) -> Job:
        try:
            job = worker.submit(prompt, params, creq)
        except QueueFull:
            metrics.requests.labels(kind, "503").inc()
            raise APIError(
                503, "the server is busy: the request queue is full", type_="server_busy", headers={"Retry-After": "1"}
            ) from None
        metrics.queue_depth.set(worker.waiting)
        return job

    async def _serve(
        kind: str, req: SamplingFields, prompt: list[int], request: Request, prompt_param: str, creq: CacheRequest
    ) -> Response:
        t0 = time.perf_counter()
        params = await _params(req, prompt, prompt_param)

        def submit(i: int) -> Job:
            """Choice i, generated after choice i - 1: with the prefix cache on, its prompt then restores whole,
            so n choices cost one prefill. A seed gives choice i the seed + i."""
            seed = None if params.seed is None else params.seed + i
            return _submit(kind, prompt, replace(params, seed=seed), creq)

        first = submit(0)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        tools = req.calls_allowed if isinstance(req, ChatCompletionRequest) else 0
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = _sse(kind, rid, first, submit, req.n, include_usage, t0, tools, params.logprobs is not None)
            return StreamingResponse(stream, media_type="text/event-stream")
        dones: list[Finished] = []
        for i in range(req.n):
            done = await _final(first if i == 0 else submit(i), request)
            if done is None:  # the client went away; nobody reads this
                return Response(status_code=499)
            _account(kind, done, t0, first=i == 0)
            dones.append(done)
        return JSONResponse(_response(kind, rid, dones, tools))

    async def _final(job: Job, request: Request) -> Finished | None:
        """The job's Finished event, or None once the client has gone (its sequence is then cancelled and
        freed at the engine's next step)."""

        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
            job.cancel.set()

        watcher = asyncio.create_task(watch())
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, JobFailed) and event.unavailable:
                    raise APIError(503, str(event.error), type_="server_busy", headers={"Retry-After": "5"})
                if isinstance(event, JobFailed) and event.client_error:
                    raise APIError(400, f"the grammar failed while generating: {event.error}")
                if isinstance(event, JobFailed):
                    raise APIError(500, f"generation failed: {event}", type_="server_error")
                if isinstance(event, Finished):
                    return None if event.finish_reason == "cancelled" else event
        finally:
            watcher.cancel()
            job.cancel.set()

    def _account(kind: str, done: Finished, t0: float, ttft: float | None = None, first: bool = True) -> None:
        """Counts one generation's tokens; the request and its TTFT once, with its first choice."""
        if first:
            metrics.requests.labels(kind, "200").inc()
            metrics.ttft.observe(ttft if ttft is not None else done.prompt_ms / 1000)
        metrics.prompt_tokens.inc(done.prompt_tokens)
        metrics.prefilled_tokens.inc(done.prompt_tokens - done.cached_tokens)
        metrics.cached_tokens.inc(done.cached_tokens)
        metrics.generated_tokens.inc(done.completion_tokens)
        if done.cached_tokens:
            metrics.cache_hits.labels(done.cache.get("kind"), done.cache.get("tier")).inc()
        log.info(
            "[request] %s prompt=%d cached=%d generated=%d prompt_ms=%.1f predicted_ms=%.1f finish=%s total_ms=%.1f",
            kind, done.prompt_tokens, done.cached_tokens, done.completion_tokens,
            done.prompt_ms, done.predicted_ms, done.finish_reason, (time.perf_counter() - t0) * 1000,
        )  # fmt: skip

    def _logprobs(kind: str, entries: Sequence[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
        if entries is None:
            return None
        if kind == "chat":
            return chat_logprobs(entries, engine.tokenizer)
        return completion_logprobs(entries, engine.tokenizer, offset)

    def _response(kind: str, rid: str, dones: list[Finished], tools: int = 0) -> dict[str, Any]:
        """One choice per generation; timings and prefix_cache are the first's, which did the prefill."""
        choices = []
        for i, done in enumerate(dones):
            choice: dict[str, Any] = {"index": i, "finish_reason": done.finish_reason}
            choice["logprobs"] = _logprobs(kind, done.logprobs)
            if kind == "chat":
                choice["message"] = assistant_message(done.text, tools)
                if "tool_calls" in choice["message"] and done.finish_reason != "length":
                    choice["finish_reason"] = "tool_calls"
            else:
                choice["text"] = done.text
            choices.append(choice)
        return {
            "id": rid,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model_id,
            "choices": choices,
            "usage": _usage(dones),
            "timings": dones[0].timings(),
            "prefix_cache": dones[0].cache,
        }

    async def _sse(
        kind: str,
        rid: str,
        first: Job,
        submit: Callable[[int], Job],
        n: int,
        include_usage: bool,
        t0: float,
        tools: int = 0,
        logprobs: bool = False,
    ) -> AsyncIterator[str]:
        """The choices one after another, each chunk naming its choice's index."""
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        index = 0
        unsent: list[TokenLogprob] | None = None  # sampled, not yet in a chunk
        offset = 0  # characters of this choice's completion text sent so far

        def chunk(
            delta: str | None, finish: str | None = None, tool_calls: list[dict[str, Any]] | None = None, **extra: Any
        ) -> str:
            """One SSE chunk: content text or tool-call deltas, the finish reason, extras (usage, timings)."""
            nonlocal unsent, offset
            lps = _logprobs(kind, unsent, offset) if unsent else None
            unsent, offset = ([] if logprobs else None), offset + len(delta or "")
            if kind == "chat":
                d: dict[str, Any] = {} if delta is None else {"content": delta}
                if tool_calls is not None:
                    d["tool_calls"] = tool_calls
                choice: dict[str, Any] = {"index": index, "delta": d, "finish_reason": finish, "logprobs": lps}
            else:
                choice = {"index": index, "text": delta or "", "finish_reason": finish, "logprobs": lps}
            body = {"id": rid, "object": obj, "created": created, "model": model_id, "choices": [choice], **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        dones: list[Finished] = []
        ttft: float | None = None
        try:
            for index in range(n):
                job = first if index == 0 else submit(index)
                unsent, offset = ([] if logprobs else None), 0
                if kind == "chat":
                    opening = json.loads(chunk("")[6:])
                    opening["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                    yield f"data: {json.dumps(opening)}\n\n"
                calls_stream = ToolCallStream(tools) if tools else None
                async for event in job.stream():
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    if isinstance(event, Delta):
                        if unsent is not None:
                            unsent.extend(event.logprobs)
                        if text := calls_stream.push(event.text) if calls_stream else event.text:
                            yield chunk(text)
                        for piece in calls_stream.pieces() if calls_stream else ():
                            yield chunk(None, tool_calls=[_call_delta(piece)])
                        continue
                    _account(kind, event, t0, ttft, first=index == 0)
                    dones.append(event)
                    finish = event.finish_reason
                    if calls_stream is not None:
                        rest, calls = calls_stream.finish()
                        if rest:
                            yield chunk(rest)
                        if calls and finish != "length":
                            finish = "tool_calls"
                            whole = [{"index": i, **c} for i, c in enumerate(calls) if not calls_stream.streamed(i)]
                            if whole:  # calls whose arguments could not stream come in one piece
                                yield chunk(None, tool_calls=whole)
                    yield chunk(None, finish, timings=event.timings(), prefix_cache=event.cache)
            if include_usage:
                body = {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": model_id,
                    "choices": [],
                    "usage": _usage(dones),
                    "timings": dones[0].timings(),
                }
                yield f"data: {json.dumps(body)}\n\n"
        except JobFailed as e:
            kind = "invalid_request_error" if e.client_error else "server_error"
            yield f"data: {json.dumps(errors.error_body(f'generation failed: {e}', kind))}\n\n"
        except APIError as e:  # the queue filled up before a later choice
            yield f"data: {json.dumps(errors.error_body(e.message, e.type))}\n\n"
        yield "data: [DONE]\n\n"

    # llama.cpp's server also answers without the /v1 prefix
    for path, endpoint in (("/chat/completions", chat_completions), ("/completions", completions),
                           ("/messages", messages), ("/responses", responses)):  # fmt: skip
        app.add_api_route(path, endpoint, methods=["POST"], dependencies=[Depends(auth)], response_model=None)
    app.add_api_route("/models", models, methods=["GET"], dependencies=[Depends(auth)])
    return app


def text_chars(value: Any) -> int:
    """Characters in every string inside value."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(text_chars(v) for v in value.values())
    if isinstance(value, list):
        return sum(text_chars(v) for v in value)
    return 0


def _call_delta(piece: CallPiece) -> dict[str, Any]:
    """A streamed tool call's piece as OpenAI's delta: the first names the call, the rest add arguments."""
    if piece.name is None:
        return {"index": piece.index, "function": {"arguments": piece.arguments}}
    return {"index": piece.index, "id": piece.id, "type": "function",
            "function": {"name": piece.name, "arguments": piece.arguments}}  # fmt: skip


def next_turn_renderer(
    engine: Engine, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, calls: int
) -> Callable[[str], tuple[list[int], list[int]]]:
    """For CacheRequest.next_turn: the conversation as the client will send it back, ending with the reply
    as this server returns it (tokens, chat boundaries)."""

    def render(reply: str) -> tuple[list[int], list[int]]:
        r = engine.render_chat([*messages, assistant_message(reply, calls)], tools, add_generation_prompt=False)
        return r.token_ids, r.boundaries

    return render


def _dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    return [m.model_dump(exclude_none=True) for m in messages]


def _piece(raw: bytes) -> str | list[int]:
    """A token's text, or its bytes where it holds part of a UTF-8 character (as llama.cpp's /tokenize)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return list(raw)


def _usage(dones: list[Finished]) -> dict[str, Any]:
    """The prompt once (with the first choice's cached tokens), the completions of every choice."""
    completion = sum(d.completion_tokens for d in dones)
    return {
        "prompt_tokens": dones[0].prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": dones[0].prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": dones[0].cached_tokens},
    }

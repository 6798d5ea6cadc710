"""What every API's routes share: the engine and its worker, the metrics, and the steps of serving one
request (check, render, plan the cache, submit, await or stream, account)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any, TypeVar

from fastapi import Request
from pydantic import ValidationError

from anchorkv.cache.prefix_cache import CacheRequest
from anchorkv.config import ServerConfig
from anchorkv.engine.engine import Delta, Engine, Finished, PromptTooLong
from anchorkv.engine.sampling import SamplingParams
from anchorkv.model.chat_template import ChatTemplateError, RenderedPrompt
from anchorkv.server import errors
from anchorkv.server.errors import APIError
from anchorkv.server.grammar import RequestGrammarError, request_grammar
from anchorkv.server.limits import key_matches
from anchorkv.server.metrics import Metrics
from anchorkv.server.schemas import ChatCompletionRequest, ChatMessage, SamplingFields, tool_dicts
from anchorkv.server.tool_calls import CallPiece, ToolCallStream, assistant_message
from anchorkv.server.worker import EngineWorker, Job, JobFailed, QueueFull

log = logging.getLogger("anchorkv.server")

T = TypeVar("T")

# what `reply_pieces` yields: text a client may see and tool calls' argument pieces, then the end with the
# tool calls the reply carried
ReplyPiece = str | CallPiece | tuple[Finished, list[dict[str, Any]] | None]


class Service:
    def __init__(self, engine: Engine, cfg: ServerConfig, worker: EngineWorker, metrics: Metrics) -> None:
        self.engine = engine
        self.cfg = cfg
        self.worker = worker
        self.metrics = metrics
        self.model_id = cfg.model_alias or engine.model_name
        self.started = int(time.time())

    async def auth(self, request: Request) -> None:
        """A route dependency: with --api-key, the key in Authorization: Bearer or x-api-key."""
        if self.cfg.api_key is not None and not key_matches(request.headers, self.cfg.api_key):
            raise APIError(
                401, "invalid or missing API key (send Authorization: Bearer <key>)", type_="authentication_error"
            )

    # -- checking and rendering the prompt ---------------------------------------------------------------
    def check_size(self, value: Any, param: str) -> None:
        """Before any tokenizing: text with more characters than the context could hold is refused at once."""
        limit = self.engine.ctx * self.engine.tokenizer.longest_token_chars
        if (n := text_chars(value)) > limit:
            raise APIError(
                400, f"{param}: {n} characters cannot fit the context of {self.engine.ctx} tokens (at most {limit})",
                param,
            )  # fmt: skip

    def check_vocab(self, ids: list[int], param: str) -> None:
        if (bad := next((t for t in ids if t >= self.engine.model_cfg.vocab_size), None)) is not None:
            raise APIError(400, f"{param}: token id {bad} is outside the vocabulary", param)

    async def render(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, **kw: Any
    ) -> RenderedPrompt:
        self.check_size([messages, tools], "messages")
        try:
            return await asyncio.to_thread(self.engine.render_chat, messages, tools, **kw)
        except ChatTemplateError as e:
            raise APIError(400, str(e), "messages") from None

    async def chat_prompt(self, req: ChatCompletionRequest) -> tuple[list[int], CacheRequest]:
        messages = dicts(req.messages)
        parts = [(i, j) for i, m in enumerate(req.messages) for j in m.marked_parts]
        tools = tool_dicts(req.tools)
        rendered = await self.render(messages, tools, marked_parts=parts)
        # a marked message anchors at its chat boundary: its end, or past the assistant's header when that
        # turn follows it (the prompt is cut there, not at the end; for the last message, the whole prompt);
        # a marked part before a message's last anchors at its own end (recorded at the cut before it)
        ends = rendered.message_ends
        marked = [
            min(b for b in rendered.boundaries if b >= e)
            for m, e in zip(req.messages, ends, strict=True)
            if m.marked and e is not None
        ] + rendered.part_ends
        next_turn = next_turn_renderer(self.engine, messages, tools, req.calls_allowed)
        return rendered.token_ids, self.cache_request(req, rendered, marked, next_turn)

    def cache_request(
        self,
        req: SamplingFields,
        rendered: RenderedPrompt | None,
        marked: list[int],
        next_turn: Callable[[str], tuple[list[int], list[int]]] | None = None,
    ) -> CacheRequest:
        scope = req.prefix_cache.resolve(self.engine.cache.default_scope) if req.prefix_cache else None
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

    def _temperature(self, req: SamplingFields) -> float:
        """The request's temperature, or where it sets none the server's `--temperature`."""
        if "temperature" in req.model_fields_set or self.cfg.temperature is None:
            return req.temperature
        return self.cfg.temperature

    async def params(
        self,
        req: SamplingFields,
        prompt: list[int],
        prompt_param: str,
        clamp: bool = False,
        field: Callable[[str], str] = str,
    ) -> SamplingParams:
        """The request's sampling, checked against the prompt: a 400 naming the field where it cannot run
        (`field`: the agent API's name for a field of the chat request). With `clamp`, a max_tokens past the
        context's room is taken as that room (the agent APIs: Claude Code asks for 128k output tokens
        whatever the model)."""
        engine = self.engine
        max_tokens = self.max_tokens(req, prompt, prompt_param, clamp)
        bias = tuple((req.logit_bias or {}).items())
        self.check_vocab([t for t, _ in bias], "logit_bias")
        try:
            found = request_grammar(req)
        except RequestGrammarError as e:
            param = field(e.param)
            raise APIError(400, f"{param}: {e.reason}", param) from None
        if found is not None and (error := await asyncio.to_thread(engine.grammar_error, found[0])) is not None:
            param = field(found[1])
            raise APIError(400, f"{param}: {error}", param)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self._temperature(req),
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stop=req.stop_list,
            ignore_eos=req.ignore_eos,
            logprobs=req.logprob_alternatives,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            grammar=found[0] if found else None,
            logit_bias=bias,
        )

    def max_tokens(self, req: SamplingFields, prompt: list[int], prompt_param: str, clamp: bool = False) -> int:
        """The tokens the reply may have past the prompt: a 400 naming the field where the prompt leaves no room."""
        limit = req.token_limit
        if clamp and limit is not None:
            limit = max(1, min(limit, self.engine.ctx - len(prompt)))
        try:
            return self.engine.check_fits(len(prompt), limit)
        except PromptTooLong as e:
            param = "max_tokens" if req.token_limit is not None and len(prompt) < self.engine.ctx else prompt_param
            raise APIError(400, str(e), param) from None

    # -- running it ----------------------------------------------------------------------------------------
    def submit(self, kind: str, prompt: list[int], params: SamplingParams, creq: CacheRequest) -> Job:
        try:
            job = self.worker.submit(prompt, params, creq)
        except QueueFull:
            self.metrics.requests.labels(kind, "503").inc()
            raise APIError(
                503, "the server is busy: the request queue is full", type_="server_busy", headers={"Retry-After": "1"}
            ) from None
        self.metrics.queue_depth.set(self.worker.waiting)
        return job

    async def final(self, job: Job, request: Request) -> Finished | None:
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

    async def reply_pieces(self, kind: str, job: Job, tools: int, t0: float) -> AsyncIterator[ReplyPiece]:
        """A reply's text as a client may see it (tool-call markup held back) and its calls' arguments, piece
        by piece, then the Finished event with the tool calls it carried; the request is counted when it
        ends."""
        calls_stream = ToolCallStream(tools) if tools else None
        ttft: float | None = None
        async for ev in job.stream():
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            if isinstance(ev, Delta):
                if text := calls_stream.push(ev.text) if calls_stream else ev.text:
                    yield text
                for piece in calls_stream.pieces() if calls_stream else ():
                    yield piece
                continue
            self.account(kind, ev, t0, ttft)
            rest, calls = calls_stream.finish() if calls_stream else ("", None)
            if rest:
                yield rest
            yield ev, calls

    def account(self, kind: str, done: Finished, t0: float, ttft: float | None = None, first: bool = True) -> None:
        """Counts one generation's tokens; the request and its TTFT once, with its first choice."""
        m = self.metrics
        if first:
            m.requests.labels(kind, "200").inc()
            m.ttft.observe(ttft if ttft is not None else done.prompt_ms / 1000)
        m.prompt_tokens.inc(done.prompt_tokens)
        m.prefilled_tokens.inc(done.prompt_tokens - done.cached_tokens)
        m.cached_tokens.inc(done.cached_tokens)
        m.generated_tokens.inc(done.completion_tokens)
        if done.cached_tokens:
            m.cache_hits.labels(done.cache.kind, done.cache.tier).inc()
        log.info(
            "[request] %s prompt=%d cached=%d generated=%d prompt_ms=%.1f predicted_ms=%.1f finish=%s total_ms=%.1f",
            kind, done.prompt_tokens, done.cached_tokens, done.completion_tokens,
            done.prompt_ms, done.predicted_ms, done.finish_reason, (time.perf_counter() - t0) * 1000,
        )  # fmt: skip


def translated(translate: Callable[[], T], param: str, same: Collection[str] = ()) -> T:
    """An agent API's request as the chat request; what the chat request refuses is a 400 naming `param`,
    or the chat request's own field where the agent API has one of that name (`same`)."""
    try:
        return translate()
    except ValidationError as e:
        message, chat_param = errors.invalid(e.errors())
        field = re.split(r"[.\[]", chat_param or "")[0]
        raise APIError(400, message, chat_param if field in same else param) from None
    except ValueError as e:
        raise APIError(400, str(e), param) from None


def text_chars(value: Any) -> int:
    """Characters in every string inside value."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(text_chars(v) for v in value.values())
    if isinstance(value, list):
        return sum(text_chars(v) for v in value)
    return 0


def next_turn_renderer(
    engine: Engine, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, calls: int
) -> Callable[[str], tuple[list[int], list[int]]]:
    """For CacheRequest.next_turn: the conversation as the client will send it back, ending with the reply
    as this server returns it (tokens, chat boundaries)."""

    def render(reply: str) -> tuple[list[int], list[int]]:
        r = engine.render_chat([*messages, assistant_message(reply, calls)], tools, add_generation_prompt=False)
        return r.token_ids, r.boundaries

    return render


def dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    return [m.model_dump(exclude_none=True) for m in messages]

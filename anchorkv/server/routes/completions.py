"""OpenAI's two completion APIs, which share their envelope and stream: /v1/chat/completions and
/v1/completions (and both without /v1, as llama.cpp's server answers)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from openai.types import Completion, CompletionChoice
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from anchorkv.cache.prefix_cache import CacheRequest
from anchorkv.engine.engine import Delta, Finished
from anchorkv.engine.sampling import TokenLogprob
from anchorkv.model.tokenizer import TextTokenizer
from anchorkv.server import errors
from anchorkv.server.errors import APIError
from anchorkv.server.logprobs import chat_logprobs, completion_logprobs
from anchorkv.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from anchorkv.server.service import Service
from anchorkv.server.tool_calls import CallPiece, ToolCallStream, assistant_message
from anchorkv.server.worker import Job, JobFailed

Kind = Literal["chat", "completion"]


def router(svc: Service) -> APIRouter:
    r = APIRouter(dependencies=[Depends(svc.auth)])

    @r.post("/v1/chat/completions", response_model=None)
    @r.post("/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        prompt, creq = await svc.chat_prompt(req)
        return await _serve(svc, "chat", req, [Prompt(prompt, creq, "messages")], request)

    @r.post("/v1/completions", response_model=None)
    @r.post("/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        batch = req.prompts
        prompts = []
        for i, p in enumerate(batch):
            param = "prompt" if len(batch) == 1 else f"prompt[{i}]"
            if isinstance(p, str):
                svc.check_size(p, param)
                tokens = await asyncio.to_thread(svc.engine.tokenizer.encode, p)
            else:
                tokens = list(p)
                svc.check_vocab(tokens, param)
            prompts.append(Prompt(tokens, svc.cache_request(req, None, []), param))
        return await _serve(svc, "completion", req, prompts, request)

    return r


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]
    cache: CacheRequest
    param: str  # the request field it came from, which its errors name


async def _serve(svc: Service, kind: Kind, req: SamplingFields, prompts: list[Prompt], request: Request) -> Response:
    """Every prompt's n choices, choice i of prompt p at choices[p * n + i]. The prompts run side by side;
    a prompt's first choice runs from the start, its others from when it has prefilled the prompt: with
    the prefix cache on, each then restores the whole prompt, so n choices cost one prefill, and they
    decode side by side."""
    t0 = time.perf_counter()
    checked = await svc.params(req, prompts[0].tokens, prompts[0].param)  # the grammar is checked once
    params = [checked, *(replace(checked, max_tokens=svc.max_tokens(req, p.tokens, p.param)) for p in prompts[1:])]

    def submit(p: int, i: int) -> Job:
        """Choice i of prompt p. A seed gives choice i the seed + i, as the prompt alone would get."""
        seed = params[p].seed
        return svc.submit(
            kind, prompts[p].tokens, replace(params[p], seed=None if seed is None else seed + i), prompts[p].cache
        )

    firsts = _all_or_none(lambda p: submit(p, 0), range(len(prompts)))
    tools = req.calls_allowed if isinstance(req, ChatCompletionRequest) else 0
    env = Envelope(kind, ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24], svc.model_id)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        stream = _stream(svc, env, firsts, submit, req.n, include_usage, t0, tools, params[0].logprobs is not None)
        return StreamingResponse(stream, media_type="text/event-stream")

    async def choices(p: int) -> list[Finished] | None:
        jobs = [firsts[p]]
        try:
            if req.n > 1:
                await firsts[p].started.wait()
                jobs += _all_or_none(lambda i: submit(p, i), range(1, req.n))
            dones: list[Finished] = []
            for i, job in enumerate(jobs):
                done = await svc.final(job, request)
                if done is None:  # the client went away; nobody reads this
                    return None
                svc.account(kind, done, t0, first=p == 0 and i == 0)
                dones.append(done)
            return dones
        finally:
            _cancel(jobs)

    tasks = [asyncio.ensure_future(choices(p)) for p in range(len(prompts))]
    try:
        per_prompt = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        _cancel(firsts)
    if any(dones is None for dones in per_prompt):
        return Response(status_code=499)
    done_lists = [dones for dones in per_prompt if dones is not None]
    tokenizer, first = svc.engine.tokenizer, done_lists[0][0]
    body = [
        _choice(env, p * req.n + i, d, tools, _logprobs(kind, d.logprobs, tokenizer))
        for p, dones in enumerate(done_lists)
        for i, d in enumerate(dones)
    ]
    reply = env.body(body, stream=False, usage=_usage(done_lists), timings=first.timings(),
                     prefix_cache=first.cache.as_dict())  # fmt: skip
    return JSONResponse(reply.to_dict(mode="json"))


def _all_or_none(submit: Callable[[int], Job], indices: range) -> list[Job]:
    """A job for each index, or none: a full queue (503) cancels those already queued."""
    jobs: list[Job] = []
    try:
        for i in indices:
            jobs.append(submit(i))
    except APIError:
        _cancel(jobs)
        raise
    return jobs


def _cancel(jobs: Sequence[Job]) -> None:
    """Stop jobs no one will read (a job that has finished is unaffected)."""
    for job in jobs:
        job.cancel.set()


class CompletionChunkChoice(CompletionChoice):
    # a stream's chunks carry no finish_reason until the last
    finish_reason: Literal["stop", "length", "content_filter"] | None = None  # type: ignore[assignment]


class CompletionChunk(Completion):
    """A streamed /v1/completions chunk: the SDK reads it as a Completion, whose choices always finish."""

    choices: list[CompletionChunkChoice]  # type: ignore[assignment]


Body = ChatCompletion | ChatCompletionChunk | Completion | CompletionChunk


@dataclass
class Envelope:
    """The one place a response or a chunk is put together: id, object, created, model, choices, extras.
    Each is the `openai` SDK's model of it (extras such as `timings` ride along), so a body that strays
    from the API's schema fails where it is made."""

    kind: Kind
    rid: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, choices: list[dict[str, Any]], stream: bool, **extra: Any) -> Body:
        chat = self.kind == "chat"
        model: type[Body] = (ChatCompletionChunk if stream else ChatCompletion) if chat else (
            CompletionChunk if stream else Completion)  # fmt: skip
        obj = "text_completion" if not chat else "chat.completion.chunk" if stream else "chat.completion"
        return model.model_validate({"id": self.rid, "object": obj, "created": self.created, "model": self.model,
                                     "choices": choices, **extra})  # fmt: skip

    def sse(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {self.body(choices, stream=True, **extra).to_json(indent=None)}\n\n"


def _choice(env: Envelope, i: int, done: Finished, tools: int, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    """One generation as a non-streamed choice."""
    choice: dict[str, Any] = {"index": i, "finish_reason": done.finish_reason, "logprobs": logprobs}
    if env.kind == "completion":
        return {**choice, "text": done.text}
    choice["message"] = assistant_message(done.text, tools)
    if "tool_calls" in choice["message"] and done.finish_reason != "length":
        choice["finish_reason"] = "tool_calls"
    return choice


class _Choice:
    """The chunks of one streamed choice; each takes the logprobs of the tokens sampled since the last."""

    def __init__(self, svc: Service, env: Envelope, index: int, logprobs: bool) -> None:
        self.tokenizer = svc.engine.tokenizer
        self.env, self.index, self.logprobs = env, index, logprobs
        self.unsent: list[TokenLogprob] | None = [] if logprobs else None
        self.offset = 0  # characters of this choice's text sent so far

    def chunk(
        self, text: str | None, finish: str | None = None, tool_calls: list[dict[str, Any]] | None = None,
        opening: bool = False, **extra: Any,
    ) -> str:  # fmt: skip
        lps = _logprobs(self.env.kind, self.unsent, self.tokenizer, self.offset) if self.unsent else None
        self.unsent, self.offset = ([] if self.logprobs else None), self.offset + len(text or "")
        if self.env.kind == "completion":
            choice = {"index": self.index, "text": text or "", "finish_reason": finish, "logprobs": lps}
            return self.env.sse([choice], **extra)
        delta: dict[str, Any] = {} if text is None else {"content": text}
        if opening:
            delta = {"role": "assistant", "content": ""}
        if tool_calls is not None:
            delta["tool_calls"] = tool_calls
        return self.env.sse([{"index": self.index, "delta": delta, "finish_reason": finish, "logprobs": lps}], **extra)


async def _stream(
    svc: Service, env: Envelope, firsts: list[Job], submit: Callable[[int, int], Job], n: int, include_usage: bool,
    t0: float, tools: int = 0, logprobs: bool = False,
) -> AsyncIterator[str]:  # fmt: skip
    """The choices one after another, prompt by prompt, each chunk naming its choice's index. Every prompt's
    first choice runs from the start and its others from when it is prefilled, so later chunks wait here,
    not in the engine."""
    dones: list[list[Finished]] = []
    ttft: float | None = None
    jobs = list(firsts)
    try:
        for p, first in enumerate(firsts):
            dones.append([])
            others: list[Job] = []
            for i in range(n):
                job = first if i == 0 else others[i - 1]
                out = _Choice(svc, env, p * n + i, logprobs)
                if env.kind == "chat":
                    yield out.chunk(None, opening=True)
                calls_stream = ToolCallStream(tools) if tools else None
                async for event in job.stream():
                    if i == 0 and n > 1 and not others:  # the prompt is prefilled: the other choices run beside
                        others = _all_or_none(lambda k: submit(p, k), range(1, n))
                        jobs += others
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    if isinstance(event, Delta):
                        if out.unsent is not None:
                            out.unsent.extend(event.logprobs)
                        if text := calls_stream.push(event.text) if calls_stream else event.text:
                            yield out.chunk(text)
                        for piece in calls_stream.pieces() if calls_stream else ():
                            yield out.chunk(None, tool_calls=[_call_delta(piece)])
                        continue
                    svc.account(env.kind, event, t0, ttft, first=p == 0 and i == 0)
                    dones[p].append(event)
                    finish = event.finish_reason
                    if calls_stream is not None:
                        rest, calls = calls_stream.finish()
                        if rest:
                            yield out.chunk(rest)
                        if calls and finish != "length":
                            finish = "tool_calls"
                            whole = [{"index": k, **c} for k, c in enumerate(calls) if not calls_stream.streamed(k)]
                            if whole:  # calls whose arguments could not stream come in one piece
                                yield out.chunk(None, tool_calls=whole)
                    yield out.chunk(None, finish, timings=event.timings(), prefix_cache=event.cache.as_dict())
        if include_usage:
            yield env.sse([], usage=_usage(dones), timings=dones[0][0].timings())
    except JobFailed as e:
        kind = "invalid_request_error" if e.client_error else "server_error"
        yield f"data: {json.dumps(errors.error_body(f'generation failed: {e}', kind))}\n\n"
    except APIError as e:  # the queue filled up before a later choice
        yield f"data: {json.dumps(errors.error_body(e.message, e.type))}\n\n"
    finally:
        _cancel(jobs)  # a client gone early: the prompts and choices not reached stop too
    yield "data: [DONE]\n\n"


def _logprobs(
    kind: Kind, entries: Sequence[TokenLogprob] | None, tokenizer: TextTokenizer, offset: int = 0
) -> dict[str, Any] | None:
    if entries is None:
        return None
    if kind == "chat":
        return chat_logprobs(entries, tokenizer)
    return completion_logprobs(entries, tokenizer, offset)


def _call_delta(piece: CallPiece) -> dict[str, Any]:
    """A streamed tool call's piece as OpenAI's delta: the first names the call, the rest add arguments."""
    if piece.name is None:
        return {"index": piece.index, "function": {"arguments": piece.arguments}}
    return {"index": piece.index, "id": piece.id, "type": "function",
            "function": {"name": piece.name, "arguments": piece.arguments}}  # fmt: skip


def _usage(per_prompt: list[list[Finished]]) -> dict[str, Any]:
    """Each prompt once (with its first choice's cached and written tokens), the completions of every choice."""
    prompt = sum(dones[0].prompt_tokens for dones in per_prompt)
    completion = sum(d.completion_tokens for dones in per_prompt for d in dones)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {
            "cached_tokens": sum(dones[0].cached_tokens for dones in per_prompt),
            "cache_write_tokens": sum(dones[0].cache.written for dones in per_prompt),
        },
    }

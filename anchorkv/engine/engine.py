"""The engine: a loaded model split into stages, and the generation loop (prefill, then decode)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from anchorkv.config import EngineConfig
from anchorkv.engine.kv import StageKV
from anchorkv.engine.pipeline import Pipeline
from anchorkv.engine.plan import RequestPlan
from anchorkv.engine.sampling import Sampler, SamplingParams
from anchorkv.engine.stage import Stage
from anchorkv.engine.text_stream import TextStream
from anchorkv.model.chat_template import ChatTemplate, RenderedPrompt
from anchorkv.model.loader import load_config, load_stages, prepared_weights, resolve_model
from anchorkv.model.tokenizer import TextTokenizer

MAX_DEFAULT_CTX = 8192


class PromptTooLong(ValueError):
    pass


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    prompt_ms: float
    predicted_ms: float
    token_ids: list[int] = field(default_factory=list)

    def timings(self) -> dict[str, Any]:
        """llama.cpp's `timings` object."""
        prompt_n = self.prompt_tokens - self.cached_tokens
        return {
            "cache_n": self.cached_tokens,
            "prompt_n": prompt_n,
            "prompt_ms": round(self.prompt_ms, 3),
            "prompt_per_second": prompt_n / self.prompt_ms * 1000 if self.prompt_ms else 0.0,
            "predicted_n": self.completion_tokens,
            "predicted_ms": round(self.predicted_ms, 3),
            "predicted_per_second": self.completion_tokens / self.predicted_ms * 1000 if self.predicted_ms else 0.0,
        }


class Engine:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        self.files = resolve_model(cfg.model, cfg.cache_home)
        self.model_cfg = load_config(self.files.folder)
        self.dtype = getattr(torch, cfg.dtype)
        self.device = torch.device(cfg.device)
        self.ctx = cfg.ctx or min(self.model_cfg.max_ctx, MAX_DEFAULT_CTX)
        self.tokenizer = TextTokenizer(self.files.folder, self.model_cfg.eos_token_ids)
        self.template = ChatTemplate(self.tokenizer)
        mc = self.model_cfg
        weights = prepared_weights(self.files, mc, self.dtype, cfg.int8_decode, cfg.cache_home)
        models = load_stages(weights, mc, cfg.stages, self.device)
        stages = [
            Stage(i, m, StageKV(len(m.layer_range), mc.n_kv_heads, self.ctx, mc.head_dim, self.dtype))
            for i, m in enumerate(models)
        ]
        for s in stages:
            s.kv.k, s.kv.v = s.kv.k.to(self.device), s.kv.v.to(self.device)
        self.pipeline = Pipeline(stages, cfg.chunk_size, self.device)
        self.model_name = self.files.source.stem if self.files.source.is_file() else self.files.source.name
        self.lock = threading.Lock()  # one generation at a time owns the KV

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> RenderedPrompt:
        return self.template.render(messages, tools)

    def check_fits(self, prompt_len: int, max_tokens: int | None) -> int:
        """The max_tokens to use; raises PromptTooLong when the prompt leaves no room to generate."""
        room = self.ctx - prompt_len
        if prompt_len == 0:
            raise PromptTooLong("the prompt is empty")
        if room < 1:
            raise PromptTooLong(f"the prompt is {prompt_len} tokens; the context size is {self.ctx}")
        if max_tokens is not None and max_tokens > room:
            raise PromptTooLong(
                f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds the context size {self.ctx}"
            )
        return max_tokens if max_tokens is not None else room

    @torch.inference_mode()
    def generate(
        self, prompt: list[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[Delta | Finished]:
        self.check_fits(len(prompt), params.max_tokens)
        with self.lock:
            yield from self._generate(prompt, params, cancel)

    def _generate(
        self, prompt: list[int], params: SamplingParams, cancel: threading.Event | None
    ) -> Iterator[Delta | Finished]:
        plan = RequestPlan(uuid.uuid4().hex, len(prompt))
        t0 = time.perf_counter()
        self.pipeline.truncate(0)
        logits = self.pipeline.prefill(prompt, 0, plan)
        t1 = time.perf_counter()
        sampler = Sampler(params)
        stream = TextStream(self.tokenizer, params.stop)
        eos = self.tokenizer.eos_token_ids
        pos, out, finish = len(prompt), [], "length"
        while True:
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            token = sampler(logits)
            if token in eos and not params.ignore_eos:
                finish = "stop"
                break
            out.append(token)
            if delta := stream.push(token):
                yield Delta(delta)
            if stream.stopped:
                finish = "stop"
                break
            if len(out) >= params.max_tokens or pos >= self.ctx:
                break
            logits = self.pipeline.decode(token, pos, plan)
            pos += 1
        if rest := stream.flush():
            yield Delta(rest)
        t2 = time.perf_counter()
        yield Finished(
            text=stream.text,
            finish_reason=finish,
            prompt_tokens=len(prompt),
            completion_tokens=len(out),
            cached_tokens=0,
            prompt_ms=(t1 - t0) * 1000,
            predicted_ms=(t2 - t1) * 1000,
            token_ids=out,
        )

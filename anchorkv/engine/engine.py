"""The engine: a loaded model split into stages, and the generation loop (prefill, then decode)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from llguidance import LLTokenizer

from anchorkv.cache.keys import Namespace
from anchorkv.cache.policy import Boundary, common_prefix, cut_floor, shared_cut
from anchorkv.cache.prefix_cache import CacheConfig, CacheMiss, CachePlan, CacheRequest, PrefixCache
from anchorkv.config import EngineConfig
from anchorkv.engine.constraint import Constraint, grammar_tokenizer
from anchorkv.engine.kv import StageKV
from anchorkv.engine.pipeline import Pipeline, aligned_chunks
from anchorkv.engine.plan import RequestPlan
from anchorkv.engine.sampling import Sampler, SamplingParams, TokenLogprob, token_logprob
from anchorkv.engine.stage import Stage
from anchorkv.engine.text_stream import TextStream
from anchorkv.model.chat_template import ChatTemplate, RenderedPrompt
from anchorkv.model.loader import default_cache_home, load_config, load_stages, prepared_weights, resolve_model
from anchorkv.model.decode_attention import DecodeAttention
from anchorkv.model.kernels import load_kernel
from anchorkv.model.softmax import AttentionSoftmax
from anchorkv.model.tokenizer import TextTokenizer
from anchorkv.model.transformer import FORWARD_VERSION, Interrupted, pack_linears

MAX_DEFAULT_CTX = 8192

log = logging.getLogger("anchorkv.engine")


class PromptTooLong(ValueError):
    pass


@dataclass(frozen=True)
class Delta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens sampled since the last Delta, when asked for


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
    cache: dict[str, Any] = field(default_factory=dict)  # the prefix_cache report
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when asked for

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
    def __init__(self, cfg: EngineConfig, cache_cfg: CacheConfig | None = None) -> None:
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
        weights = prepared_weights(self.files, mc, self.dtype, cfg.decode_quant, cfg.cache_home)
        kernel = (
            load_kernel((cfg.cache_home or default_cache_home()) / "kernels") if self.device.type == "cpu" else None
        )
        self.softmax = AttentionSoftmax(kernel, self.dtype)
        self.decode_attention = DecodeAttention(kernel, self.dtype, mc.head_dim, mc.n_heads // mc.n_kv_heads)
        models = load_stages(weights, mc, cfg.stages, self.device, self.softmax, self.decode_attention)
        self.linear_kind = pack_linears([lin for m in models for lin in m.linears], cfg.chunk_size)
        stages = [
            Stage(i, m, StageKV(len(m.layer_range), mc.n_kv_heads, self.ctx, mc.head_dim, self.dtype))
            for i, m in enumerate(models)
        ]
        for s in stages:
            s.kv.k, s.kv.v = s.kv.k.to(self.device), s.kv.v.to(self.device)
        self.pipeline = Pipeline(stages, cfg.chunk_size, self.device)
        self.model_name = self.files.source.stem if self.files.source.is_file() else self.files.source.name
        self.lock = threading.Lock()  # one generation at a time owns the KV
        self.cache_cfg = cache_cfg or CacheConfig(ram_mb=0, scope="off")
        self.cache = PrefixCache(self.cache_cfg, self._namespaces(), cfg.chunk_size)
        # what the stages' KV holds from the last request: [0, slot_valid) is reusable KV of slot_tokens,
        # prefilled with cuts at slot_ends
        self.slot_tokens: list[int] = []
        self.slot_ends: list[int] = []
        self.slot_valid = 0
        self.slot_salt: str | None = None
        self._reply: _Reply | None = None
        self._warm = bool(self.cache.disk) and self.cache.enabled  # the last run's latest chain, to bring back
        self._grammar_tokenizer: LLTokenizer | None = None  # built on the first constrained request

    @property
    def decode_weights(self) -> dict[str, int]:
        """How many linear layers decode steps read as int4, int8 or dense."""
        kinds = [lin.decode_kind for s in self.pipeline.stages for lin in s.model.linears]
        return {k: kinds.count(k) for k in sorted(set(kinds))}

    def _namespaces(self) -> list[Namespace]:
        """Everything that changes the KV values, per stage. In exact mode also what changes their bits."""
        exact = self.cache_cfg.exact
        base: dict[str, Any] = {
            "model": self.files.fingerprint,
            "dtype": self.cfg.dtype,
            "kv": self.model_cfg.kv_params(),
            "exact": exact,
        }
        if exact:
            base |= {"chunk": self.cfg.chunk_size, "threads": self.cfg.threads, "device": self.cfg.device}
            base |= {"torch": torch.__version__, "forward": FORWARD_VERSION, "softmax": self.softmax.kind}
            base |= {"linear": self.linear_kind}
        else:  # decoded KV is reused too, so the decode weights matter
            base |= {"decode_weights": list(self.cfg.decode_quant), "decode_attention": self.decode_attention.kind}
        return [Namespace.of(**base, layers=[s.layer_range.start, s.layer_range.stop]) for s in self.pipeline.stages]

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> RenderedPrompt:
        return self.template.render(messages, tools, add_generation_prompt)

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
        self,
        prompt: list[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
        cache_req: CacheRequest | None = None,
        background: bool = False,
    ) -> Iterator[Delta | Finished]:
        """Plan, restore, prefill, decode; then record into the cache after the response is out.

        In exact mode the reply is prefilled again, cut as a cold run of the next turn would be, so that
        turn hits on it: right after the response, or with `background` left pending for `idle_work()`,
        which a server calls while no request waits."""
        self.check_fits(len(prompt), params.max_tokens)
        with self.lock:
            self._warm = False  # a request came first: it restores what it needs itself
            self._settle_reply()
            yield from self._generate(prompt, params, cancel, cache_req or CacheRequest())
            if not background:
                while self._reply_step():
                    pass

    @property
    def has_idle_work(self) -> bool:
        return self._reply is not None or self._warm

    @torch.inference_mode()
    def idle_work(self, interrupt: Callable[[], bool] | None = None) -> bool:
        """One step of background work: after a restart, bringing back the last run's latest chain; after a
        response, one piece of the reply's prefill (recorded when the last one is done). `interrupt` is
        asked between layers: when it says a request waits, the piece is given up (and done again later),
        so a request waits for one layer, not one piece; the warm start stops between chunks. Returns
        whether work remains."""
        with self.lock:
            if self._warm:
                self._warm_start(interrupt)
                return self.has_idle_work
            return self._reply_step(interrupt)

    def _warm_start(self, interrupt: Callable[[], bool] | None = None) -> None:
        """Load the chain the last run used last from disk into the stages' KV, as the slot: a first request
        that continues it then restores as from a warm server. Interrupted, the slot is what was loaded."""
        self._warm = False
        chunks = self.cache.warm_start([s.kv for s in self.pipeline.stages], self.ctx - 1, interrupt)
        if not chunks:
            return
        tokens = [t for c in chunks for t in c.tokens.tolist()]
        # chain chunks end at cuts the prompt was prefilled at; taken as its chat boundaries they give back
        # its cuts (with C >= TAIL_MERGE; a smaller C drops some, so less is shared, never more)
        ends = [c.end for c in chunks]
        self._set_slot(tokens, ends, len(tokens))
        self.slot_salt = None
        log.info("[cache] warm start: %d tokens of the last run's latest prompt back in the KV", len(tokens))

    @torch.inference_mode()
    def prompt_logits(self, prompt: list[int], cache_req: CacheRequest | None = None) -> tuple[torch.Tensor, CachePlan]:
        """Restore what the cache has, prefill the rest, record; return the last position's logits [vocab]."""
        with self.lock:
            logits, cplan, _, at = self._prefill(prompt, cache_req or CacheRequest())
            self._record_prompt(cplan, prompt, at)
        return logits, cplan

    def _prefill(
        self, prompt: list[int], creq: CacheRequest
    ) -> tuple[torch.Tensor, CachePlan, RequestPlan, dict[int, torch.Tensor]]:
        """Restore what the cache has, prefill the rest. Returns the last position's logits [vocab], the
        plans, and the logits before each turn start prefilled (the prompt's end included), for the cache."""
        cplan = self._restore(prompt, creq)
        r = cplan.restore_to
        plan = RequestPlan(uuid.uuid4().hex, len(prompt), restore_to=r)
        at: dict[int, torch.Tensor] = {}
        if r == len(prompt) and cplan.logits is not None:
            logits = cplan.logits  # the same prompt, cut the same way, was prefilled before: nothing to do
        else:
            logits = self.pipeline.prefill(
                prompt[r:], r, plan, breaks=cplan.chat_ends, logits_at=creq.turn_starts, kept=at
            )
            at[len(prompt)] = logits
        self._set_slot(prompt, cplan.chat_ends, cut_floor(len(prompt), self.cfg.chunk_size, cplan.chat_ends))
        self.slot_salt = creq.salt
        return logits, cplan, plan, at

    def _set_slot(self, tokens: list[int], ends: list[int], valid: int) -> None:
        self.slot_tokens, self.slot_ends, self.slot_valid = tokens, ends, valid

    def _record_prompt(self, cplan: CachePlan, prompt: list[int], logits: dict[int, torch.Tensor]) -> None:
        kvs = [s.kv for s in self.pipeline.stages]
        computed = self.slot_valid if self.cache_cfg.exact else len(prompt)
        # the head computes in the KV's dtype, so the logits keep in it losslessly (half the bytes in bf16)
        kept = {p: x.to(kvs[-1].k.dtype) for p, x in logits.items()} if self.cache_cfg.exact else {}
        self.cache.record(cplan, prompt, kvs, computed, logits=kept)
        self.cache.remember(cplan, prompt)

    def _restore(self, prompt: list[int], creq: CacheRequest) -> CachePlan:
        plan = self.cache.plan(prompt, creq)
        kvs = [s.kv for s in self.pipeline.stages]
        keep = 0
        if self.slot_salt == creq.salt:
            slot = self.slot_tokens[: self.slot_valid]
            keep = shared_cut(prompt[: plan.restore_to], plan.chat_ends, slot, self.slot_ends, self.cfg.chunk_size)
        self.pipeline.truncate(keep)
        try:
            self.cache.restore(plan, prompt, kvs, skip_upto=keep)
        except CacheMiss as e:
            log.warning("restore failed, prefilling cold: %s", e)
            plan.restore_to, plan.chains, plan.kind, plan.tier = 0, [[] for _ in kvs], None, None
        self.pipeline.truncate(plan.restore_to)
        return plan

    def _generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        cancel: threading.Event | None,
        creq: CacheRequest,
    ) -> Iterator[Delta | Finished]:
        t0 = time.perf_counter()
        logits, cplan, plan, at = self._prefill(prompt, creq)
        r = cplan.restore_to
        t1 = time.perf_counter()
        sampler = Sampler(params, prompt, self._constraint(params.grammar))
        stream = TextStream(self.tokenizer, params.stop)
        eos = self.tokenizer.eos_token_ids
        pos, out, finish = len(prompt), [], "length"
        lps: list[TokenLogprob] = []
        sent = 0  # logprobs already carried by a Delta
        while True:
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            token = sampler(logits)
            if token in eos and not params.ignore_eos:
                finish = "stop"
                break
            out.append(token)
            if params.logprobs is not None:
                lps.append(token_logprob(logits, token, params.logprobs))
            if delta := stream.push(token):
                yield Delta(delta, tuple(lps[sent:]))
                sent = len(lps)
            if stream.stopped or (sampler.constraint is not None and sampler.constraint.done):
                finish = "stop"
                break
            if len(out) >= params.max_tokens or pos >= self.ctx:
                break
            logits = self.pipeline.decode(token, pos, plan)
            pos += 1
        if rest := stream.flush():
            yield Delta(rest, tuple(lps[sent:]))
        t2 = time.perf_counter()
        yield Finished(
            text=stream.text,
            finish_reason=finish,
            prompt_tokens=len(prompt),
            completion_tokens=len(out),
            cached_tokens=r,
            prompt_ms=(t1 - t0) * 1000,
            predicted_ms=(t2 - t1) * 1000,
            token_ids=out,
            cache=cplan.report(),
            logprobs=lps if params.logprobs is not None else None,
        )
        # The response is out; now keep what it computed. Prompt KV first, then the reply for the next turn.
        self._record_prompt(cplan, prompt, at)
        log.info(
            "[cache] restore=%d kind=%s tier=%s recorded=%s",
            r, cplan.kind, cplan.tier, ",".join(f"{d['kind']}@{d['at']}" for d in cplan.recorded) or "-",
        )  # fmt: skip
        if out and finish != "cancelled" and self.cache.enabled:
            self._keep_reply(cplan, prompt, out, stream.text, creq)

    def _constraint(self, grammar: str | None) -> Constraint | None:
        if grammar is None:
            return None
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = grammar_tokenizer(self.tokenizer, self.model_cfg.vocab_size)
        return Constraint(self._grammar_tokenizer, grammar)

    def _keep_reply(self, cplan: CachePlan, prompt: list[int], out: list[int], text: str, creq: CacheRequest) -> None:
        """Record the conversation with its reply so the next turn hits: as the next turn will render it when
        the request says how, else as prompt + reply tokens. Without exact mode the decoded KV is recorded
        at once; in exact mode the reply is prefilled again, cut like a cold run of the next turn, as idle
        work (`_reply_step`), which also renders it."""
        next_turn = creq.next_turn
        reply = _Reply(cplan, (lambda: next_turn(text)) if next_turn else (lambda: (prompt + out, cplan.chat_ends)))
        if self.cache_cfg.exact:
            self._reply = reply
        elif reply.prepare():
            decoded = len(prompt) + len(out) - 1  # the last token was sampled, never run
            self._record_reply(reply, min(common_prefix(reply.tokens, prompt + out), decoded))

    def _record_reply(self, reply: _Reply, computed: int) -> None:
        kvs = [s.kv for s in self.pipeline.stages]
        full = (Boundary(len(reply.tokens), "full"),)
        self.cache.record(
            reply.plan, reply.tokens, kvs, computed=computed, extra=full, only_extra=True, chat_ends=reply.ends
        )

    def _reply_step(self, interrupt: Callable[[], bool] | None = None) -> bool:
        """One unit of the pending reply's work: rendering it, then each prefill piece. Returns whether work
        remains."""
        if (reply := self._reply) is None:
            return False
        if reply.began is None:
            if not reply.prepare():
                self._reply = None
                return False
            slot = self.slot_tokens[: self.slot_valid]
            reply.began = shared_cut(reply.tokens, reply.ends, slot, self.slot_ends, self.cfg.chunk_size)
            self.pipeline.truncate(reply.began)
            self._set_slot(reply.tokens, reply.ends, reply.began)
            return True
        c = self.cfg.chunk_size
        chunks = aligned_chunks(self.slot_valid, cut_floor(len(reply.tokens), c, reply.ends), c, reply.ends)
        if chunks:
            a, b = chunks[0]
            plan = RequestPlan(reply.plan.history_ns, len(reply.tokens))
            try:
                self.pipeline.forward(reply.tokens[a:b], a, plan, logits="none", interrupt=interrupt)
            except Interrupted:
                self.pipeline.truncate(a)
                return True
            self.slot_valid = b
        if len(chunks) > 1:
            return True
        self._settle_reply()
        return False

    def _settle_reply(self) -> None:
        """Record what the reply's prefill has computed so far, and drop the rest of it."""
        if (reply := self._reply) is None:
            return
        self._reply = None
        if reply.began is not None and self.slot_valid > reply.began:
            self._record_reply(reply, computed=self.slot_valid)


@dataclass
class _Reply:
    """A finished reply to record for the next turn: how to render that turn's beginning, then its tokens
    and chat boundaries, and where their prefill began (None until rendered)."""

    plan: CachePlan
    render: Callable[[], tuple[list[int], list[int]]]
    tokens: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    began: int | None = None

    def prepare(self) -> bool:
        try:
            self.tokens, self.ends = self.render()
        except ValueError as e:  # the template refused the reply: there is no next turn to prepare
            log.warning("not keeping the reply: %s", e)
            return False
        return True

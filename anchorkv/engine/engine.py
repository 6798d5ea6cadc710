"""The engine: a loaded model split into stages, and the scheduler that runs many sequences on it.

`step()` is a request's journey: admit waiting sequences into free KV slots (plan, restore from the
prefix cache), run one batch (prefill pieces under a token budget, then every decoding sequence's next
token), each half followed by its post-processing (sample, stream, finish, record). A sequence's tokens
never depend on what else runs: prefill pieces run one sequence at a time, cut as a lone cold run cuts
them, and a decode step's rows go through linears whose rows were checked at start not to depend on the
batch (`rows_invariant`), else one row at a time.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence as Seq
from dataclasses import replace
from typing import Any

import torch
from llguidance import LLTokenizer

from anchorkv.cache.policy import common_prefix, cut_floor, shared_cut, step_budget
from anchorkv.cache.prefix_cache import (
    CacheConfig,
    CacheMiss,
    CachePlan,
    CacheReport,
    CacheRequest,
    PrefixCache,
    Restore,
)
from anchorkv.config import EngineConfig
from anchorkv.engine.allocator import keep_freed_memory
from anchorkv.engine.constraint import Constraint, GrammarError, grammar_tokenizer
from anchorkv.engine.pipeline import LocalPipeline, Pipeline, StageFailed, aligned_chunks
from anchorkv.engine.plan import RequestPlan, Span
from anchorkv.engine.sampling import Sampler, SamplingParams, token_logprob
from anchorkv.engine.scheduler import StepPlan, forwards, pick_slot, same_prefixes, schedule, should_wait
from anchorkv.engine.sequence import Delta, Event, Failed, Finished, Sequence, Status
from anchorkv.engine.slot import PendingReply, Slot
from anchorkv.engine.stage import MAX_DEFAULT_CTX, StageCacheUse, StageReport, build_stages
from anchorkv.engine.text_stream import TextStream
from anchorkv.model.chat_template import ChatTemplate, RenderedPrompt
from anchorkv.model.loader import load_config, resolve_model
from anchorkv.model.tokenizer import TextTokenizer
from anchorkv.model.transformer import Interrupted

__all__ = ["Delta", "Engine", "Failed", "Finished", "PromptTooLong"]

log = logging.getLogger("anchorkv.engine")


PREFAULT_S = 0.05  # an idle step's time for making the KV pool resident


class PromptTooLong(ValueError):
    pass


class Engine:
    def __init__(
        self, cfg: EngineConfig, cache_cfg: CacheConfig | None = None, pipeline: Pipeline | None = None
    ) -> None:
        """`pipeline`: the stages elsewhere (a RayPipeline); by default they are built in this process."""
        self.cfg = cfg
        keep_freed_memory()
        torch.set_num_threads(cfg.threads)
        self.files = resolve_model(cfg.model, cfg.cache_home)
        self.model_cfg = load_config(self.files.folder)
        self.dtype = getattr(torch, cfg.dtype)
        self.device = torch.device(cfg.device)
        self.ctx = cfg.ctx or min(self.model_cfg.max_ctx, MAX_DEFAULT_CTX)
        self.tokenizer = TextTokenizer(self.files.folder, self.model_cfg.eos_token_ids)
        self.template = ChatTemplate(self.tokenizer, parse_content_specials=cfg.content_specials)
        self.cache_cfg = cache_cfg or CacheConfig(ram_mb=0, scope="off")
        self.pipeline = pipeline or LocalPipeline(build_stages(cfg, self.cache_cfg), cfg.chunk_size, self.device)
        self.stage_infos = self.pipeline.infos()
        first = self.stage_infos[0]
        self.linear_kind, self.softmax_kind = first.linear_kind, first.softmax
        self.prefill_attention_kind, self.elementwise_kind = first.prefill_attention, first.elementwise
        self.decode_attention_kind, self.decode_int4_kind = first.decode_attention, first.decode_int4
        self.batch_rows = all(i.batch_rows for i in self.stage_infos)
        self.prefill_rows = min(i.prefill_rows for i in self.stage_infos)  # pieces merged into one forward
        self.model_name = self.files.source.stem if self.files.source.is_file() else self.files.source.name
        self.lock = threading.RLock()  # held by whoever steps the scheduler
        self.cache = PrefixCache(
            self.cache_cfg,
            [i.namespace for i in self.stage_infos],
            cfg.chunk_size,
            vocab_size=self.model_cfg.vocab_size,
        )
        self.cache.attach(self.pipeline.cache_stages)
        self.slots = [Slot(i) for i in range(cfg.parallel)]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._warm = self.cache.has_disk and self.cache.enabled  # the last run's latest chain, to bring back
        self._prefault = self._pool_to_prefault()  # slots not yet resident whole
        self._grammar_tokenizer: LLTokenizer | None = None  # built on the first constrained request
        self._shared: dict[tuple[str, str], int] = {}  # two decoding sequences' bit-identical prefix

    @property
    def decode_weights(self) -> dict[str, int]:
        """How many linear layers decode steps read as int4, int8 or dense."""
        kinds = [k for i in self.stage_infos for k in i.decode_kinds]
        return {k: kinds.count(k) for k in sorted(set(kinds))}

    @property
    def prefill_budget(self) -> int:
        """Prefill tokens a step may run beside the decode rows: the longest piece (C plus a message's short
        remainder), so a step never stalls the streams for more than one piece, and a warm turn's reply and
        new message often go in one step."""
        return step_budget(self.cfg.chunk_size)

    @property
    def kv_bytes(self) -> int:
        """The KV pools of every stage: `parallel` slots of `ctx` positions each."""
        return sum(i.kv_bytes for i in self.stage_infos)

    def stages_report(self) -> list[StageReport]:
        stats = self.pipeline.cache_stages.cache_stats()
        touched = self.pipeline.kv_touched()
        return [
            StageReport(h.index, h.node, h.layers, h.state, i.threads, i.prefill_rows, i.row_floor, i.kv_bytes, t,
                        StageCacheUse(s.ram_bytes, s.disk_bytes, s.ram_entries))
            for h, i, s, t in zip(self.pipeline.health(), self.stage_infos, stats, touched, strict=True)
        ]  # fmt: skip

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        marked_parts: Seq[tuple[int, int]] = (),
    ) -> RenderedPrompt:
        return self.template.render(messages, tools, add_generation_prompt, marked_parts)

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

    # -- the scheduler's interface ----------------------------------------------------------------------
    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        emit: Callable[[Event], None],
        cancel: threading.Event | None = None,
        cache_req: CacheRequest | None = None,
        keep_reply: bool = True,
    ) -> Sequence:
        """Queue a sequence; `step()` runs it. Call with the lock held, or from the thread that steps."""
        seq = Sequence(
            uuid.uuid4().hex, prompt, params, cache_req or CacheRequest(), emit, cancel or threading.Event(),
            time.perf_counter(), keep_reply=keep_reply,
        )  # fmt: skip
        self.waiting.append(seq)
        return seq

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def has_idle_work(self) -> bool:
        return self._warm or self._reply_slot() is not None or bool(self._prefault)

    @torch.inference_mode()
    def step(self, interrupt: Callable[[], bool] | None = None) -> bool:
        """Admit, run one batch, post-process. Returns whether anything ran. `interrupt` says whether a
        request has arrived: background work beside the batch then gives way between two layers."""
        try:
            self._admit()
            plan = schedule(self.running, self.prefill_budget)
            if not plan:
                return False
            # a prompt done this step gets its first token out before the decode rows run: its TTFT never
            # waits for them, and their tokens come no later than they would after both forwards
            self._run_prefill(plan)
            self._post_prefill()
            self._run_decode(plan)
            self._post_decode(plan)
        except StageFailed as e:
            self._stage_lost(e)
            return True
        if self.running and not plan.prefill and not self.waiting and (slot := self._reply_slot()) is not None:
            self._background(slot, interrupt)  # beside decoding sequences, the budget left: background work
        return True

    @torch.inference_mode()
    def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
        cache_req: CacheRequest | None = None,
        background: bool = False,
    ) -> Iterator[Delta | Finished]:
        """Run one sequence to its end on the calling thread, stepping the scheduler (and whatever else
        it runs). In exact mode the reply is then prefilled again, cut as a cold run of the next turn would
        be, so that turn hits on it; with `background` that is left to `idle_work()`."""
        self.check_fits(len(prompt), params.max_tokens)
        events: deque[Event] = deque()
        with self.lock:
            seq = self.submit(prompt, params, events.append, cancel, cache_req)
        while not (seq.done and not events):
            if not events:
                with self.lock:
                    self.step()
            while events:
                event = events.popleft()
                if isinstance(event, Failed):
                    raise event.error
                yield event
        if not background and seq.slot is not None:
            with self.lock:
                slot = self.slots[seq.slot]
                while slot.seq is None and self._reply_step(slot):
                    pass

    @torch.inference_mode()
    def prompt_logits(
        self, prompt: list[int], cache_req: CacheRequest | None = None
    ) -> tuple[torch.Tensor, CacheReport]:
        """Restore what the cache has, prefill the rest, record; return the last position's logits [vocab]
        and what the cache did."""
        if not prompt:
            raise PromptTooLong("the prompt is empty")
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        with self.lock:
            seq = self.submit(prompt, params, lambda _: None, cache_req=cache_req, keep_reply=False)
            while not seq.done:
                self.step()
        assert seq.first_logits is not None
        assert seq.cplan is not None
        return seq.first_logits, seq.cplan.report(seq.restored)

    @torch.inference_mode()
    def idle_work(self, interrupt: Callable[[], bool] | None = None) -> bool:
        """One step of background work while nothing runs: after a restart, bringing back the last run's
        latest chain; after a response, one piece of the reply's prefill (recorded when the last one is
        done); else 50 ms of making the KV pool resident, so that requests never wait on fresh memory.
        `interrupt` is asked between layers: when it says a request waits, the piece is given up (and done
        again later), so a request waits for one layer, not one piece; the warm start stops between chunks.
        Returns whether work remains."""
        with self.lock:
            if self._warm:
                self._warm_start(interrupt)
            elif (slot := self._reply_slot()) is not None:
                self._background(slot, interrupt)
            elif self._prefault:
                self._prefault_for(PREFAULT_S, interrupt)
            return self.has_idle_work

    def _pool_to_prefault(self) -> deque[int]:
        return deque(range(self.cfg.parallel) if self.cfg.kv_prefault else ())

    def _prefault_for(self, seconds: float, interrupt: Callable[[], bool] | None) -> None:
        """Make the pool resident a MiB a stage at a time, for `seconds` or until `interrupt` says a request
        waits (after at least one MiB)."""
        deadline = time.perf_counter() + seconds
        try:
            while self._prefault:
                if not self.pipeline.prefault(self._prefault[0]):
                    self._prefault.popleft()
                if (interrupt is not None and interrupt()) or time.perf_counter() > deadline:
                    return
        except StageFailed as e:
            self._stage_lost(e)

    def _background(self, slot: Slot, interrupt: Callable[[], bool] | None = None) -> None:
        """One unit of the slot's reply work; a fault drops that work and what the slot held, nothing more."""
        try:
            self._reply_step(slot, interrupt)
        except StageFailed as e:
            self._stage_lost(e)
        except Exception:
            log.exception("background prefill of a reply failed; the next turn prefills it itself")
            slot.reply = None
            slot.clear()
            self.pipeline.truncate(0, slot.index)

    # -- admit -----------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Give waiting sequences, oldest first, a free slot each: the one holding most of their prefix.
        A sequence that waits on a prefix another one is prefilling lets the next one pass."""
        for seq in [s for s in self.running if s.cancel.is_set()]:
            self._finish(seq, "cancelled")
        for seq in list(self.waiting):
            if seq.cancel.is_set():
                self.waiting.remove(seq)
                self._finish(seq, "cancelled")
                continue
            slot = pick_slot(seq.prompt, seq.cache_req.salt, self.slots)
            if slot is None:
                return
            self._warm = False  # a request came first: it restores what it needs itself
            try:
                cplan = self.cache.plan(seq.prompt, seq.cache_req)
            except StageFailed as err:  # not left waiting on a stage that may not come back: the client retries
                self.waiting.remove(seq)
                self._fail(seq, err)
                raise
            held = self._held(seq, slot, cplan)
            salt = seq.cache_req.salt  # another tenant's recording never serves this prompt
            prefilling = [s for s in self.running if s.status is Status.PREFILLING and s.cache_req.salt == salt]
            if should_wait(seq.prompt, max(cplan.restore_to, held), prefilling, self.cfg.chunk_size):
                continue
            self.waiting.remove(seq)
            if slot.reply is not None:
                self._settle(slot)  # what its reply's prefill recorded may serve this prompt: plan again
                cplan = self.cache.plan(seq.prompt, seq.cache_req)
            try:
                self._start(seq, slot, cplan, held)
            except StageFailed as err:
                self._fail(seq, err)
                raise
            except Exception as e:  # noqa: BLE001 - the request fails, the engine lives on
                self._fail(seq, e)

    def _start(self, seq: Sequence, slot: Slot, cplan: CachePlan, keep: int) -> None:
        """Restore what the cache has into the slot (its first `keep` positions, which the slot holds, stay),
        and line up the prefill pieces of the rest."""
        prompt, c = seq.prompt, self.cfg.chunk_size
        if keep > cplan.restore_to:
            cplan = replace(cplan, restore_to=keep, labels=frozenset())  # the slot holds more than the cache still does
        seq.slot, slot.seq, seq.cplan = slot.index, seq, cplan
        seq.admitted = time.perf_counter()
        slot.clear()
        try:
            seq.restored = self.cache.restore(cplan, prompt, slot.index, skip_upto=keep)  # stages keep [0, keep)
        except CacheMiss as e:
            log.warning("restore failed, prefilling cold: %s", e)
            seq.restored = Restore()
        r = seq.restored.tokens
        if not r:
            self.pipeline.truncate(0, slot.index)
        seq.plan = RequestPlan(seq.id, len(prompt), restore_to=r)
        seq.sampler = Sampler(seq.params, prompt, self._constraint(seq.params.grammar))
        seq.stream = TextStream(self.tokenizer, seq.params.stop)
        seq.pos = len(prompt)
        if r == len(prompt) and seq.restored.logits is not None:
            seq.logits = seq.restored.logits  # the same prompt, cut the same way, was prefilled before: nothing to do
        else:
            seq.pieces = deque(aligned_chunks(r, len(prompt), c, cplan.chat_ends))
        seq.status = Status.PREFILLING
        self.running.append(seq)

    def _held(self, seq: Sequence, slot: Slot, cplan: CachePlan) -> int:
        """How much of the prompt the slot's KV holds bit for bit, up to the furthest restore (none without a
        cache: a server told to keep nothing reuses nothing)."""
        if not self.cache.enabled or slot.salt != seq.cache_req.salt:
            return 0
        tokens, c = slot.tokens[: slot.valid], self.cfg.chunk_size
        return shared_cut(seq.prompt[: cplan.limit], cplan.chat_ends, tokens, slot.ends, c)

    def grammar_error(self, grammar: str) -> str | None:
        """Why the grammar cannot constrain this model's first token, or None: checked at the request."""
        try:
            constraint = self._constraint(grammar)
        except GrammarError as e:
            return str(e)
        return constraint.first_mask_error() if constraint is not None else None

    def _constraint(self, grammar: str | None) -> Constraint | None:
        if grammar is None:
            return None
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = grammar_tokenizer(self.tokenizer, self.model_cfg.vocab_size)
        return Constraint(self._grammar_tokenizer, grammar)

    # -- run -------------------------------------------------------------------------------------------
    def _run_prefill(self, plan: StepPlan) -> None:
        """Each prefill piece in its own forward (a sequence's consecutive pieces merged where rows are their
        own): a piece's shapes are those of a lone cold run, which is what makes a cache hit exact."""
        for seq, (a, b), pieces in forwards(plan.prefill, self.prefill_rows):
            if seq.done:
                continue
            stops = seq.cache_req.turn_starts
            last = b == len(seq.prompt)
            try:
                out = self.pipeline.forward(
                    seq.prompt[a:b], a, self._plan_of(seq), "last" if last or b in stops else "none",
                    slot=self._slot_of(seq),
                )  # fmt: skip
            except StageFailed:
                raise
            except Exception as e:  # noqa: BLE001
                self._fail(seq, e)
                continue
            for _ in range(pieces):
                seq.pieces.popleft()
            if b in stops or last:
                seq.kept_logits[b] = out
            if last:
                seq.logits = out

    def _run_decode(self, plan: StepPlan) -> None:
        """The decoding sequences' rows in one forward."""
        if not plan.decode:
            return
        same = self._same_prefixes(plan.decode)
        rows = [(s.token, Span(self._slot_of(s), s.pos, 1, self._plan_of(s), m)) for s, m in zip(plan.decode, same)]
        try:
            logits = self.pipeline.decode_rows(rows)
        except StageFailed:
            raise
        except Exception as e:  # noqa: BLE001
            for seq in plan.decode:
                self._fail(seq, e)
        else:
            for seq, row in zip(plan.decode, logits, strict=True):
                seq.logits, seq.pos = row, seq.pos + 1

    def _same_prefixes(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """For each decode row, (slot, n): another row's slot that holds its first n positions bit for bit,
        or (-1, 0). Slots are alike only where both prefilled or restored the same tokens cut alike: in exact
        mode, where a slot's [0, valid) is never decoded KV, and under one salt."""
        if not self.cache_cfg.exact or len(seqs) < 2:
            return [(-1, 0)] * len(seqs)
        slots = [self.slots[self._slot_of(s)] for s in seqs]
        if len(self._shared) > 64 * len(self.slots) ** 2:
            self._shared.clear()

        def shared(a: int, b: int) -> int:
            key = (seqs[a].id, seqs[b].id)  # a decoding sequence's slot holds its prompt: fixed until it ends
            if key not in self._shared:
                x, y = slots[a], slots[b]
                same_salt = x.salt == y.salt
                n = shared_cut(x.tokens[: x.valid], x.ends, y.tokens[: y.valid], y.ends, self.cfg.chunk_size)
                self._shared[key] = n if same_salt else 0
            return self._shared[key]

        return [(slots[a].index, n) if a >= 0 else (-1, 0) for a, n in same_prefixes(len(seqs), shared)]

    @staticmethod
    def _slot_of(seq: Sequence) -> int:
        assert seq.slot is not None
        return seq.slot

    @staticmethod
    def _plan_of(seq: Sequence) -> RequestPlan:
        assert seq.plan is not None
        return seq.plan

    # -- post-process ----------------------------------------------------------------------------------
    def _post_prefill(self) -> None:
        """Sample the first token of each sequence whose prompt is done (prefilled, or restored whole). A
        sequence that raises fails alone."""
        for seq in [s for s in self.running if s.status is Status.PREFILLING and not s.pieces]:
            if seq.logits is None:
                continue
            seq.prefilled, seq.first_logits = time.perf_counter(), seq.logits
            slot = self.slots[self._slot_of(seq)]
            c, ends = self.cfg.chunk_size, self._cplan_of(seq).chat_ends
            slot.hold(seq.prompt, ends, cut_floor(len(seq.prompt), c, ends), seq.cache_req.salt)
            self._guarded(seq, self._advance)
            if not seq.done:
                # now, not at the end: a sequence arriving meanwhile can restore it
                self._guarded(seq, self._record_prompt)

    def _post_decode(self, plan: StepPlan) -> None:
        """Sample the decode rows' next tokens."""
        for seq in plan.decode:
            if not seq.done:
                self._guarded(seq, self._advance)

    def _guarded(self, seq: Sequence, action: Callable[[Sequence], None]) -> None:
        try:
            action(seq)
        except StageFailed:
            raise
        except Exception as e:  # noqa: BLE001 - the request fails, the engine lives on
            if not seq.done:
                self._fail(seq, e)
            else:
                log.exception("after %s finished", seq.id)

    def _stage_lost(self, error: StageFailed) -> None:
        """A stage worker died, and every slot's KV with it: fail what runs (503), forget what slots held.
        Waiting sequences stay queued; they run once the stage is back."""
        for seq in list(self.running):
            self._fail(seq, error)
        for slot in self.slots:
            slot.reply = None
            slot.clear()
        self._warm = False
        self._prefault = self._pool_to_prefault()  # a new pool

    def fail_all(self, error: Exception) -> None:
        """Give up every sequence (a fault in the scheduler itself): their clients get an error, not a hang."""
        for seq in [*self.running, *self.waiting]:
            self._fail(seq, error)
        self.waiting.clear()

    @staticmethod
    def _cplan_of(seq: Sequence) -> CachePlan:
        assert seq.cplan is not None
        return seq.cplan

    def _advance(self, seq: Sequence) -> None:
        """Sample the next token from seq.logits, stream it, and finish or line up its decode step."""
        assert seq.sampler is not None and seq.stream is not None and seq.logits is not None
        params = seq.params
        if seq.cancel.is_set():
            return self._finish(seq, "cancelled")
        token = seq.sampler(seq.logits)
        if token in self.tokenizer.eos_token_ids and not params.ignore_eos:
            return self._finish(seq, "stop")
        seq.out.append(token)
        if params.logprobs is not None:
            seq.logprobs.append(token_logprob(seq.logits, token, params.logprobs))
        if delta := seq.stream.push(token):
            seq.emit(Delta(delta, tuple(seq.logprobs[seq.sent :])))
            seq.sent = len(seq.logprobs)
        if seq.stream.stopped or (seq.sampler.constraint is not None and seq.sampler.constraint.done):
            return self._finish(seq, "stop")
        if len(seq.out) >= params.max_tokens or seq.pos >= self.ctx:
            return self._finish(seq, "length")
        seq.token, seq.status = token, Status.DECODING
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        """Stream the end, then keep what it computed (the prompt's KV, then the reply for the next turn)
        and free its slot."""
        if seq.stream is not None and (rest := seq.stream.flush()):
            seq.emit(Delta(rest, tuple(seq.logprobs[seq.sent :])))
        now = time.perf_counter()
        cplan = seq.cplan
        prompt_ms = ((seq.prefilled or now) - (seq.admitted or now)) * 1000
        seq.emit(
            Finished(
                text=seq.stream.text if seq.stream is not None else "",
                finish_reason=reason,
                prompt_tokens=len(seq.prompt),
                completion_tokens=len(seq.out),
                cached_tokens=seq.restored.tokens,
                prompt_ms=prompt_ms,
                predicted_ms=(now - seq.prefilled) * 1000 if seq.prefilled else 0.0,
                token_ids=seq.out,
                cache=cplan.report(seq.restored) if cplan is not None else CacheReport(),
                logprobs=seq.logprobs if seq.params.logprobs is not None else None,
            )
        )
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is None:
            return
        slot = self.slots[seq.slot]
        slot.seq, slot.used = None, now
        if not seq.prefilled:  # given up during prefill: the slot's KV is part of a prompt, of no use
            slot.clear()
            return
        if not seq.recorded:
            self._record_prompt(seq)
        assert cplan is not None
        log.info(
            "[cache] restore=%d kind=%s tier=%s recorded=%s",
            seq.restored.tokens, seq.restored.kind, seq.restored.tier, ",".join(f"{r.kind}@{r.at}" for r in cplan.recorded) or "-",
        )  # fmt: skip
        if seq.out and reason != "cancelled" and seq.keep_reply and self.cache.enabled:
            self._keep_reply(seq, slot)

    def _fail(self, seq: Sequence, error: Exception) -> None:
        log.error(
            "generation failed: %s: %s", type(error).__name__, error, exc_info=error if error.__traceback__ else None
        )
        seq.emit(Failed(error))
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            slot = self.slots[seq.slot]
            slot.seq, slot.used = None, time.perf_counter()
            slot.clear()
            self.pipeline.truncate(0, slot.index)

    # -- record ----------------------------------------------------------------------------------------
    def _record_prompt(self, seq: Sequence) -> None:
        seq.recorded = True
        cplan, slot = self._cplan_of(seq), self.slots[self._slot_of(seq)]
        computed = slot.valid if self.cache_cfg.exact else len(seq.prompt)
        # the head computes in the KV's dtype, so the logits keep in it losslessly (half the bytes in bf16)
        kept = {p: x.to(self.dtype) for p, x in seq.kept_logits.items()} if self.cache_cfg.exact else {}
        self.cache.record_prompt(cplan, seq.prompt, slot.index, computed, kept)

    def _keep_reply(self, seq: Sequence, slot: Slot) -> None:
        """Record the conversation with its reply so the next turn hits: as the next turn will render it when
        the request says how, else as prompt + reply tokens. Without exact mode the decoded KV is recorded
        at once; in exact mode the reply is prefilled again, cut like a cold run of the next turn, as
        background work (`_reply_step`), which also renders it."""
        cplan, prompt, out, text = self._cplan_of(seq), seq.prompt, seq.out, seq.stream.text if seq.stream else ""
        next_turn = seq.cache_req.next_turn
        reply = PendingReply(
            cplan, (lambda: next_turn(text)) if next_turn else (lambda: (prompt + out, cplan.chat_ends))
        )
        if self.cache_cfg.exact:
            slot.reply = reply
        elif reply.prepare():
            decoded = len(prompt) + len(out) - 1  # the last token was sampled, never run
            self._record_reply(reply, slot, min(common_prefix(reply.tokens, prompt + out), decoded))

    def _record_reply(self, reply: PendingReply, slot: Slot, computed: int) -> None:
        self.cache.record_reply(reply.plan, reply.tokens, reply.ends, slot.index, computed)

    def _reply_slot(self) -> Slot | None:
        """The free slot whose reply waits longest for its prefill."""
        pending = [s for s in self.slots if s.reply is not None and s.seq is None]
        return min(pending, key=lambda s: s.used) if pending else None

    def _reply_step(self, slot: Slot, interrupt: Callable[[], bool] | None = None) -> bool:
        """One unit of the slot's pending reply: rendering it, then each prefill piece. Returns whether work
        remains."""
        if (reply := slot.reply) is None:
            return False
        c = self.cfg.chunk_size
        if reply.began is None:
            if not reply.prepare() or len(reply.tokens) >= self.ctx:  # no next turn, or none that could fit
                slot.reply = None
                return False
            reply.began = shared_cut(reply.tokens, reply.ends, slot.tokens[: slot.valid], slot.ends, c)
            self.pipeline.truncate(reply.began, slot.index)
            slot.hold(reply.tokens, reply.ends, reply.began, slot.salt)
            return True
        chunks = aligned_chunks(slot.valid, cut_floor(len(reply.tokens), c, reply.ends), c, reply.ends)
        if chunks:
            a, b = chunks[0]
            plan = RequestPlan(reply.plan.history_ns, len(reply.tokens))
            try:
                self.pipeline.forward(reply.tokens[a:b], a, plan, logits="none", interrupt=interrupt, slot=slot.index)
            except Interrupted:
                self.pipeline.truncate(a, slot.index)
                return True
            slot.valid = b
        if len(chunks) > 1:
            return True
        self._settle(slot)
        return False

    def _settle(self, slot: Slot) -> None:
        """Record what the slot's reply prefill has computed so far, and drop the rest of it."""
        if (reply := slot.reply) is None:
            return
        slot.reply = None
        if reply.began is not None and slot.valid > reply.began:
            self._record_reply(reply, slot, computed=slot.valid)

    def _warm_start(self, interrupt: Callable[[], bool] | None = None) -> None:
        """Load the chain the last run used last from disk into a free slot: a first request that
        continues it then restores as from a warm server. Interrupted, the slot holds what was loaded."""
        self._warm = False
        slot = pick_slot([], None, self.slots)
        if slot is None:
            return
        self.pipeline.truncate(0, slot.index)
        chain = self.cache.warm_start(slot.index, self.ctx - 1, interrupt)
        if not chain.tokens:
            return
        slot.hold(chain.tokens, chain.ends, len(chain.tokens), None)
        log.info("[cache] warm start: %d tokens of the last run's latest prompt back in the KV", len(chain.tokens))

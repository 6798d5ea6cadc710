"""Choosing the next token from logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from anchorkv.engine.constraint import Constraint

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100  # OpenAI's range: -100 bans a token in effect, 100 all but forces it


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # report each token's log-probability and this many alternatives; None: off
    presence_penalty: float = 0.0  # OpenAI: subtracted once from the logit of every token generated so far
    frequency_penalty: float = 0.0  # OpenAI: subtracted per time a token was generated so far
    # vLLM / HF: the logit of a token in the prompt or generated so far is divided by it (multiplied if < 0)
    repetition_penalty: float = 1.0
    grammar: str | None = None  # llguidance grammar the output must follow (see engine/constraint.py)
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI: (token, bias) added to its logit before sampling

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            raise ValueError("presence_penalty and frequency_penalty must be between -2 and 2")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        if any(t < 0 or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for t, b in self.logit_bias):
            raise ValueError(
                f"logit_bias takes token ids >= 0 and biases between -{MAX_LOGIT_BIAS} and {MAX_LOGIT_BIAS}"
            )


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens and their log-probabilities, best first


def token_logprob(logits: Tensor, token: int, top: int) -> TokenLogprob:
    """The log-probability of token under the model's own distribution: before penalties, temperature, top-k
    and top-p, so it does not depend on how the token was sampled."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(lp, top) if top else None
    alternatives = () if best is None else tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    return TokenLogprob(token, float(lp[token]), alternatives)


class Sampler:
    def __init__(
        self, params: SamplingParams, prompt: list[int] | None = None, constraint: Constraint | None = None
    ) -> None:
        self.params = params
        self.constraint = constraint
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.penalized = params.presence_penalty != 0 or params.frequency_penalty != 0 or params.repetition_penalty != 1
        ids, biases = zip(*params.logit_bias) if params.logit_bias else ((), ())
        self._bias_ids, self._biases = torch.tensor(ids, dtype=torch.long), torch.tensor(biases)
        self._counts: Tensor | None = None  # [vocab] times each token was generated
        self._seen: Tensor | None = None  # [vocab] in the prompt or generated
        self._prompt = prompt or []

    def __call__(self, logits: Tensor) -> int:
        """logits: [vocab] float32. Returns the next token, counted as generated."""
        if self.penalized:
            logits = self._penalize(logits)
        if self.params.logit_bias:
            logits = logits.float().cpu().index_add(0, self._bias_ids, self._biases)
        if self.constraint is not None:
            logits = self.constraint.allow(logits)
        token = self._choose(logits)
        if self.constraint is not None:
            self.constraint.accept(token)
        if self._counts is not None and self._seen is not None:
            self._counts[token] += 1
            self._seen[token] = True
        return token

    def _penalize(self, logits: Tensor) -> Tensor:
        p = self.params
        if self._counts is None or self._seen is None:
            self._counts = torch.zeros(logits.shape[-1])
            self._seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
            self._seen[torch.tensor(self._prompt, dtype=torch.long)] = True
        logits = logits.float().cpu().clone()
        if p.repetition_penalty != 1:
            seen = logits[self._seen]
            logits[self._seen] = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        logits = logits - p.frequency_penalty * self._counts - p.presence_penalty * (self._counts > 0).float()
        return torch.nan_to_num(logits, nan=float("-inf"))  # an extreme penalty may overflow: keep the order

    def _choose(self, logits: Tensor) -> int:
        """Greedy at temperature 0; else one uniform draw inverted through the cumulative probabilities of the
        candidates: the whole vocabulary, or (best first) the top k, renormalized, then the smallest set whose
        mass reaches top_p. torch's multinomial drew one exponential per vocabulary entry and top-p sorted the
        whole vocabulary: 3.3 ms a row, as long as an 8-row decode step's forward."""
        p = self.params
        if p.temperature == 0:
            return int(logits.argmax())
        logits = logits.double().cpu() / p.temperature
        if not torch.isfinite(logits.max()):  # a temperature too small to divide by: its limit, greedy
            return int(logits.argmax())
        probs = torch.softmax(logits, dim=-1)
        ids: Tensor | None = None
        if p.top_k and p.top_k < probs.shape[0]:
            probs, ids = torch.topk(probs, p.top_k)
            probs = probs / probs.sum()
        if p.top_p < 1:
            probs, ids = _nucleus(probs, ids, p.top_p)
        cdf = probs.cumsum(0)
        u = torch.rand((), dtype=torch.float64, generator=self.generator) * cdf[-1]
        i = min(int(torch.searchsorted(cdf, u, right=True)), cdf.shape[0] - 1)
        return i if ids is None else int(ids[i])


NUCLEUS_FIRST = 64  # candidates looked at first for top-p; four times as many while their mass falls short


def _nucleus(probs: Tensor, ids: Tensor | None, top_p: float) -> tuple[Tensor, Tensor]:
    """The smallest set of the most likely tokens whose mass reaches top_p (the first is always kept), best
    first: their probabilities and token ids. `ids`: probs are already those tokens', best first."""
    if ids is not None:
        return _reaching(probs, ids, top_p)
    n = probs.shape[0]
    want = min(NUCLEUS_FIRST, n)
    while True:
        top, order = torch.topk(probs, want)
        if (kept := _reaching(top, order, top_p))[0].shape[0] < want or want == n:
            return kept
        want = min(4 * want, n)


def _reaching(probs: Tensor, ids: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """The shortest prefix of probs (best first) whose mass reaches top_p."""
    keep = int((probs.cumsum(0) - probs < top_p).sum())
    return probs[:keep], ids[:keep]

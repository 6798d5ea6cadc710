"""Command line: `anchorkv serve` and `anchorkv bench engine`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from anchorkv.config import DECODE_WEIGHTS, DEVICES, DTYPES, EngineConfig, ServerConfig


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
        "--chunk-size",
        type=int,
        default=d.chunk_size,
        help=f"prefill chunk C, aligned to multiples of C (default {d.chunk_size})",
    )
    p.add_argument(
        "--decode-weights",
        default=d.decode_weights,
        choices=DECODE_WEIGHTS,
        help="weights that decode steps read: int8 copies (faster: decode is memory-bound) or the dense ones;"
        " auto = int8 for bfloat16 on CPU (default auto)",
    )
    p.add_argument(
        "--cache-home", type=Path, default=None, help="where imported weights are kept (default ~/.cache/anchorkv)"
    )


def _engine_config(p: argparse.ArgumentParser, a: argparse.Namespace) -> EngineConfig:
    try:
        return EngineConfig(
            model=a.model, dtype=a.dtype, threads=a.threads, device=a.device, ctx=a.ctx,
            stages=a.stages, chunk_size=a.chunk_size, decode_weights=a.decode_weights, cache_home=a.cache_home,
        )  # fmt: skip
    except ValueError as e:
        p.error(str(e))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anchorkv", description="OpenAI-compatible server with an exact prefix KV cache"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server")
    _engine_args(serve)
    s = ServerConfig()
    serve.add_argument("--host", default=s.host, help=f"address to bind (default {s.host})")
    serve.add_argument("--port", type=int, default=s.port, help=f"port (default {s.port})")
    serve.add_argument("--api-key", default=None, help="require Authorization: Bearer <key> on /v1 and /props")
    serve.add_argument(
        "--max-queue",
        type=int,
        default=s.max_queue,
        help=f"requests that may wait; more get 503 (default {s.max_queue})",
    )
    serve.add_argument("--alias", default=None, help="model id shown to clients (default: the model file's name)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    eng = bench_sub.add_parser("engine", help="prefill and decode tokens/s of the loaded model")
    _engine_args(eng)
    eng.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is shown (default 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(parser, args)
    return _bench_engine(parser, args)


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import uvicorn

    from anchorkv.engine.engine import Engine
    from anchorkv.server.app import create_app

    ecfg = _engine_config(parser, args)
    try:
        scfg = ServerConfig(
            host=args.host, port=args.port, api_key=args.api_key, max_queue=args.max_queue, model_alias=args.alias
        )
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine(ecfg)
    logging.getLogger("anchorkv").info(
        "loaded %s (%s, %d layers, %d stages, ctx %d)", engine.model_name, engine.model_cfg.arch,
        engine.model_cfg.n_layers, ecfg.stages, engine.ctx,
    )  # fmt: skip
    uvicorn.run(create_app(engine, scfg), host=scfg.host, port=scfg.port, log_level=args.log_level)
    return 0


def _bench_engine(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from anchorkv.bench import engine_bench
    from anchorkv.engine.engine import Engine

    engine = Engine(_engine_config(parser, args))
    print(engine_bench.report(engine, engine_bench.run(engine, repeats=args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

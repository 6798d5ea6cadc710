"""Validated configuration, one dataclass per concern, built from the CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("bfloat16", "float32")
DEVICES = ("cpu", "cuda")
DECODE_WEIGHTS = ("auto", "int8", "dense")


@dataclass(frozen=True)
class EngineConfig:
    model: Path | None = None  # None: the bundled SmolLM2-135M-Instruct GGUF
    dtype: str = "bfloat16"
    threads: int = os.cpu_count() or 1
    device: str = "cpu"
    ctx: int | None = None  # None: the model's trained context, capped at 8192
    stages: int = 1
    chunk_size: int = 128  # prefill chunk C; prefill is cut at chat boundaries and every C tokens after each
    decode_weights: str = "auto"  # int8 | dense | auto (see decode_quant)
    cache_home: Path | None = None  # where imported weights are kept; None: ~/.cache/anchorkv
    content_specials: bool = False  # parse control tokens' text in message content as those tokens (unsafe)
    parallel: int = 8  # sequences running at once, each with a KV slot of ctx positions in every stage
    kv_prefault: bool = True  # make the KV pool resident while idle, so no request waits on fresh memory

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.ctx is not None and self.ctx < 16:
            raise ValueError(f"--ctx must be at least 16, got {self.ctx}")
        if self.stages < 1:
            raise ValueError(f"--stages must be at least 1, got {self.stages}")
        if not 1 <= self.parallel <= 64:
            raise ValueError(f"--parallel must be between 1 and 64, got {self.parallel}")
        if self.decode_weights not in DECODE_WEIGHTS:
            raise ValueError(
                f"--decode-weights must be one of {', '.join(DECODE_WEIGHTS)}, got {self.decode_weights!r}"
            )
        if self.decode_weights == "int8" and self.device != "cpu":
            raise ValueError("--decode-weights int8 is for --device cpu; use dense or auto")
        if not 16 <= self.chunk_size <= 4096:
            raise ValueError(f"--chunk-size must be between 16 and 4096, got {self.chunk_size}")

    @property
    def decode_quant(self) -> tuple[str, ...]:
        """The quantized copies decode steps may read, most preferred first. auto, for bfloat16 on CPU: int4
        where that is lossless (Q4_0, Q4_1 and Q8_0 weights), else int8; in float32 both kernels are slower."""
        if self.decode_weights == "auto":
            return ("int4", "int8") if self.dtype == "bfloat16" and self.device == "cpu" else ()
        return ("int8",) if self.decode_weights == "int8" else ()


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_queue: int = 16  # requests waiting for a slot beyond the --parallel running
    model_alias: str | None = None  # the model id clients see; None: the model file's name
    max_body_mb: float = 8.0  # a larger request body gets 413 before it is parsed
    metrics_public: bool | None = None  # /metrics and the API docs without the key; None: only when no key is set
    temperature: float | None = None  # for requests that set none; None: each API's default, 1.0
    allowed_origins: tuple[str, ...] = ("*",)  # browser pages that may call the API (CORS); () for none
    turn_grace_ms: float = 20.0  # after a reply ends, how long the next step waits for that client's next turn

    @property
    def pages_public(self) -> bool:
        return self.api_key is None if self.metrics_public is None else self.metrics_public

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be between 0 and 65535, got {self.port}")
        if not 0 < self.max_body_mb <= 1024:
            raise ValueError(f"--max-body-mb must be between 0 and 1024, got {self.max_body_mb}")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise ValueError(f"--temperature must be between 0 and 2, got {self.temperature}")
        if self.max_queue < 1:
            raise ValueError(f"--max-queue must be at least 1, got {self.max_queue}")
        if not 0 <= self.turn_grace_ms <= 1000:
            raise ValueError(f"--turn-grace-ms must be between 0 and 1000, got {self.turn_grace_ms:g}")

"""The C kernels (csrc/*.c: the attention softmax, prefill and decode attention, int4 linears, a layer's
elementwise ops), built together with gcc for this CPU
on first use into one library under the cache home, where the CPU has AVX-512 with bfloat16. Without gcc,
on other CPUs or where the folder cannot be written, there is no library and torch's ops run instead."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import subprocess
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch

from anchorkv.model.config import ModelConfig
from anchorkv.model.decode_attention import DecodeAttention
from anchorkv.model.elementwise import Elementwise
from anchorkv.model.int4_matmul import Int4Matmul
from anchorkv.model.prefill_attention import PrefillAttention
from anchorkv.model.softmax import AttentionSoftmax

log = logging.getLogger("anchorkv.model")

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(sorted(CSRC.glob("*.c")))
HEADERS = tuple(sorted(CSRC.glob("*.h")))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}
ISA_FLAGS = ("avx", "amx", "fma", "f16c", "sse", "asimd", "sve")  # the flags that change a kernel's bits


def _cpu() -> str | None:
    """This CPU's model name and flags, or None where it lacks what the kernels need."""
    return cpu_name() if CPU_FLAGS <= cpu_flags() else None


def cpu_flags() -> set[str]:
    """This CPU's feature flags (x86's `flags`, Arm's `Features`)."""
    f = _cpuinfo()
    return set((f.get("flags") or f.get("Features", "")).split())


def cpu_name() -> str:
    """This CPU's model name and flags ("" where /proc/cpuinfo cannot be read)."""
    fields = _cpuinfo()
    return f"{fields.get('model name')}|{fields.get('flags', '')}" if fields else ""


def cpu_kind() -> str:
    """What decides the bits this CPU's kernels compute: its make and model, and its vector and matrix
    instructions (oneDNN picks its kernels and blocking by them). Other flags, a hypervisor's among them,
    change no result."""
    f = _cpuinfo()
    model = " ".join(
        f.get(k, "") for k in ("vendor_id", "cpu family", "model", "model name", "CPU implementer", "CPU part")
    )
    isa = sorted(x for x in cpu_flags() if x.startswith(ISA_FLAGS))
    return f"{' '.join(model.split())}|{' '.join(isa)}"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ({} where it cannot be read)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in info.splitlines()[:40] if ":" in line)}


@cache
def load_kernel(folder: Path) -> ctypes.CDLL | None:
    """The kernels built for this CPU under folder (once per CPU and sources), or None where they cannot be."""
    cpu = _cpu()
    if cpu is None:
        return None
    sources = b"".join(s.read_bytes() for s in (*SOURCES, *HEADERS))
    key = hashlib.sha256(sources + " ".join(FLAGS).encode() + cpu.encode()).hexdigest()[:16]
    lib = folder / f"kernels-{key}.so"
    if not lib.exists():
        tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            cmd = ["gcc", *FLAGS, "-o", str(tmp), *map(str, SOURCES)]
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            detail = e.stderr.decode(errors="replace")[-500:] if isinstance(e, subprocess.CalledProcessError) else e
            log.warning("could not build the C kernels, using torch's ops (%s)", detail)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return None
        os.replace(tmp, lib)
    # loaded after torch, so its libgomp.so.1 is the one torch loaded: one OpenMP thread pool, not two
    kernel = ctypes.CDLL(str(lib))
    kernel.softmax_bf16.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 5, ctypes.c_int]
    kernel.softmax_bf16.restype = None
    decode_args: list[Any] = [
        ctypes.c_int64,
        *[ctypes.c_void_p, ctypes.c_int64] * 3,  # q, the new keys, the new values: each with its row stride
        *[ctypes.c_void_p] * 3,  # each row's key cache, value cache and key count
        *[ctypes.c_void_p] * 2,  # each row's sharing row (or -1) and how far they share
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_float,
        ctypes.c_int,
    ]
    kernel.decode_attention_bf16.argtypes = decode_args
    kernel.decode_attention_bf16.restype = ctypes.c_int
    kernel.prefill_attention_bf16.argtypes = [
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int64,  # q and its row stride
        *[ctypes.c_void_p] * 2,  # the key and value caches
        *[ctypes.c_int64] * 2,  # ctx, the key count
        ctypes.c_void_p,
        *[ctypes.c_int64] * 2,
        ctypes.c_float,
        ctypes.c_int,  # on AMX's tiles
        ctypes.c_int,
    ]
    kernel.prefill_attention_bf16.restype = ctypes.c_int
    kernel.prefill_attention_amx.argtypes = []
    kernel.prefill_attention_amx.restype = ctypes.c_int
    kernel.rms_norm_bf16.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_float]
    kernel.rms_norm_bf16.argtypes += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    kernel.rope_bf16.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, *[ctypes.c_void_p] * 3, ctypes.c_int]
    kernel.silu_mul_bf16.argtypes = [
        ctypes.c_void_p,
        *[ctypes.c_int64] * 3,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int,
    ]
    for f in (kernel.rms_norm_bf16, kernel.rope_bf16, kernel.silu_mul_bf16):
        f.restype = None
    kernel.int4_matmul_bf16.argtypes = [*[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 4, ctypes.c_int]
    kernel.int4_matmul_bf16.restype = ctypes.c_int
    return kernel


@dataclass(frozen=True)
class Kernels:
    """What computes each part of the forward: the C kernels where they serve the model, else torch's ops."""

    softmax: AttentionSoftmax = field(default_factory=AttentionSoftmax)
    prefill_attention: PrefillAttention = field(default_factory=PrefillAttention)
    decode_attention: DecodeAttention = field(default_factory=DecodeAttention)
    elementwise: Elementwise = field(default_factory=Elementwise)
    int4_matmul: Int4Matmul = field(default_factory=Int4Matmul)

    @classmethod
    def of(cls, lib: ctypes.CDLL | None, dtype: torch.dtype, cfg: ModelConfig) -> Kernels:
        """lib (from load_kernel, or None) for a model of this dtype and shape."""
        return cls(
            AttentionSoftmax(lib, dtype),
            PrefillAttention(lib, dtype, cfg.head_dim),
            DecodeAttention(lib, dtype, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads),
            Elementwise(lib, dtype),
            Int4Matmul(lib, dtype),
        )

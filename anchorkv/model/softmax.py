"""The attention softmax over bfloat16 score blocks: a small C kernel (csrc/softmax.c) built with gcc for this
CPU on first use, where it has AVX-512 with bfloat16, else torch's softmax.

torch's softmax spends most of a long-context prefill's non-GEMM time (27 of 146 ms for 129 tokens after 3k):
its exp is accurate to an ulp of float32 and its bfloat16 reductions are slow, while the result is rounded
to bfloat16's 8 bits. The kernel's exp is good to about 2e-7 and it masks the chunk's own future keys itself,
2.6x faster than torch's softmax on a [167, 3129] block. Its results differ from torch's in the last bit of
some probabilities, so which one ran is part of the exact cache's namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import subprocess
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("anchorkv.model")

SOURCE = Path(__file__).with_name("csrc") / "softmax.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}


def _cpu() -> str | None:
    """This CPU's model name and flags, or None where it lacks what the kernel needs."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in info.splitlines()[:40] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    if not CPU_FLAGS <= set(fields.get("flags", "").split()):
        return None
    return f"{fields.get('model name')}|{fields['flags']}"


@cache
def load_kernel(folder: Path) -> ctypes.CDLL | None:
    """The kernel built for this CPU under folder (once per CPU and source), or None where it cannot be."""
    cpu = _cpu()
    if cpu is None:
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + cpu.encode()).hexdigest()[:16]
    lib = folder / f"softmax-{key}.so"
    if not lib.exists():
        tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            subprocess.run(["gcc", *FLAGS, "-o", str(tmp), str(SOURCE)], check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            detail = e.stderr.decode(errors="replace")[-500:] if isinstance(e, subprocess.CalledProcessError) else e
            log.warning("attention softmax: could not build the kernel, using torch's (%s)", detail)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return None
        os.replace(tmp, lib)
    # loaded after torch, so its libgomp.so.1 is the one torch loaded: one OpenMP thread pool, not two
    kernel = ctypes.CDLL(str(lib))
    kernel.softmax_bf16.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 5, ctypes.c_int]
    kernel.softmax_bf16.restype = None
    return kernel


class AttentionSoftmax:
    """softmax over the last dim of a score block [n, L] whose rows are queries row0, row0 + 1, ... (mod T)
    of a T-token chunk holding the last T of the L keys; each query sees the keys up to its own."""

    def __init__(self, kernel: ctypes.CDLL | None = None, dtype: torch.dtype = torch.bfloat16) -> None:
        self._kernel = kernel if dtype == torch.bfloat16 else None

    @property
    def kind(self) -> str:
        return "kernel" if self._kernel is not None else "torch"

    @property
    def needs_bias(self) -> bool:
        """Whether a chunk's causal mask must come as a bias (torch's softmax); the kernel masks by itself."""
        return self._kernel is None

    def __call__(self, s: Tensor, bias: Tensor | None, row0: int, T: int) -> Tensor:
        """s: [n, L] scores, overwritten. bias: [G * T, T], 0 or -inf for the chunk's own keys, or None for
        a single query; only torch's softmax reads it."""
        n, L = s.shape
        if self._kernel is not None and s.dtype == torch.bfloat16 and s.device.type == "cpu" and s.stride(1) == 1:
            self._kernel.softmax_bf16(s.data_ptr(), n, L, s.stride(0), row0, T, torch.get_num_threads())
            return s
        if bias is not None:
            s[:, L - T :].add_(bias[row0 : row0 + n])
        return torch.softmax(s, dim=-1)

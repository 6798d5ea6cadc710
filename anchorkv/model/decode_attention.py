"""A decode step's attention: one query position over a layer's cached keys, through a C kernel
(csrc/decode_attention.c, built by kernels.load_kernel) in bfloat16, else through torch.

For one query torch's flash SDPA is bound by its per-block overhead, not by reading the keys; the kernel
reads each key and value once, in blocks merged in a fixed order (so its bits do not depend on the thread
count), with the same error against a float64 reference (docs/benchmarks.md has the figures)."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

HEAD_DIM = 64  # the kernel's (SmolLM2's, and most small Llamas')
MAX_GROUP = 16  # query heads per KV head


class DecodeAttention:
    def __init__(
        self,
        kernel: ctypes.CDLL | None = None,
        dtype: torch.dtype = torch.bfloat16,
        head_dim: int = HEAD_DIM,
        group: int = 1,
    ) -> None:
        """kernel: from kernels.load_kernel; it serves bfloat16 models with HEAD_DIM-wide heads and at most
        MAX_GROUP query heads per KV head."""
        fits = dtype == torch.bfloat16 and head_dim == HEAD_DIM and group <= MAX_GROUP
        self._kernel = kernel if fits else None

    @property
    def kind(self) -> str:
        return "kernel" if self._kernel is not None else "torch"

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        """q: [H, 1, hd]; k, v: [Hkv, L, hd] views of a layer's cache [Hkv, ctx, hd]. Returns [1, H * hd],
        or None where the kernel cannot take these shapes (then torch computes it)."""
        H, hd, (Hkv, L) = q.shape[0], q.shape[2], k.shape[:2]
        if (
            self._kernel is None
            or hd != HEAD_DIM
            or H % Hkv
            or H // Hkv > MAX_GROUP
            or q.dtype != torch.bfloat16
            or q.device.type != "cpu"
            or q.stride(0) != hd
            or q.stride(2) != 1
            or any(t.stride(1) != hd or t.stride(2) != 1 or t.stride(0) % hd for t in (k, v))
            or k.stride(0) != v.stride(0)
        ):
            return None
        out = q.new_empty(1, H * hd)
        ctx = k.stride(0) // hd
        err = self._kernel.decode_attention_bf16(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), H, Hkv, L, ctx, hd**-0.5, torch.get_num_threads()
        )
        return out if err == 0 else None

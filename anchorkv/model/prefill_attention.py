"""A prefill piece's attention: the piece's queries over their sequence's cached keys, in one call to a C kernel
(csrc/prefill_attention.c, built by kernels.load_kernel) in bfloat16, else through torch (StageModel._attention).

The kernel keeps a query row's scores in a per-thread buffer between the two products instead of streaming
score blocks through memory, and sums every row in an order fixed by its own key count: a row's bits depend on
its query and its keys alone, not on the piece's length nor on the thread count (docs/benchmarks.md has the
speed and the error against a float64 reference). On CPUs with AMX both products run on its tiles (kind "amx"),
whose sums round otherwise than the vector instructions': which one ran is part of the exact cache's namespace."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from anchorkv.model.kernel_op import KernelOp

HEAD_DIM = 64  # the kernel's (SmolLM2's, and most small Llamas')


class PrefillAttention(KernelOp):
    def __init__(
        self,
        kernel: ctypes.CDLL | None = None,
        dtype: torch.dtype = torch.bfloat16,
        head_dim: int = HEAD_DIM,
        amx: bool = True,
    ) -> None:
        """kernel: from kernels.load_kernel; it serves bfloat16 models with HEAD_DIM-wide heads, on AMX's tiles
        where the CPU has them and `amx` allows."""
        super().__init__(kernel, dtype == torch.bfloat16 and head_dim == HEAD_DIM)
        self.amx = amx and self._kernel is not None and self._kernel.prefill_attention_amx() == 1

    @property
    def kind(self) -> str:
        return "amx" if self.amx else super().kind

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, end: int) -> Tensor | None:
        """q: [T, H, hd], the queries of positions [end - T, end); k, v: one layer's caches [Hkv, ctx, hd], holding
        keys [0, end). Query t sees keys [0, end - T + t]. Returns [T, H * hd], or None where the kernel cannot
        take these shapes (then torch computes it)."""
        T, H, hd = q.shape
        Hkv, ctx = k.shape[0], k.shape[1]
        if (
            self._kernel is None
            or hd != HEAD_DIM
            or H % Hkv
            or q.dtype != torch.bfloat16
            or q.device.type != "cpu"
            or q.stride(1) != hd
            or q.stride(2) != 1
            or not T <= end <= ctx
            or any(c.dtype != q.dtype or c.shape != (Hkv, ctx, hd) or not c.is_contiguous() for c in (k, v))
        ):
            return None
        out = q.new_empty(T, H * hd)
        err = self._kernel.prefill_attention_bf16(
            T, q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), ctx, end, out.data_ptr(), H, Hkv, hd**-0.5,
            self.amx, torch.get_num_threads(),
        )  # fmt: skip
        return out if err == 0 else None

"""A layer's elementwise work (RMS norm, rotary embedding, SiLU(gate) * up) in a C kernel (csrc/elementwise.c,
built by kernels.load_kernel) on bfloat16 rows, else through torch's ops.

Through torch each is several ops, each a pass over memory and a dispatch; at a decode step's few rows the
dispatches cost more than the arithmetic. The kernel rounds to bfloat16 where torch's ops do, but its sums
and exp are its own, so its last bits differ from torch's: which one ran is part of the exact cache's
namespace. Each row is computed on its own, so a row's bits do not depend on the others."""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor

from anchorkv.model.kernel_op import KernelOp

HEAD_DIM = 64  # the rotary kernel's


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [T, heads, hd]; cos, sin: [T, 1, hd/2] in float32. Half-split (neox / HF) layout."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Elementwise(KernelOp):
    def __init__(self, kernel: ctypes.CDLL | None = None, dtype: torch.dtype = torch.bfloat16) -> None:
        """kernel: from kernels.load_kernel; it serves bfloat16 models."""
        super().__init__(kernel, dtype == torch.bfloat16)

    def _fits(self, *ts: Tensor) -> bool:
        return self._kernel is not None and all(
            t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.dim() == 2 and t.stride(1) == 1 for t in ts
        )

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """x: [T, D]; weight: [D]."""
        if not self._fits(x, weight[None]) or x.shape[1] != weight.shape[0]:
            return rms_norm(x, weight, eps)
        out = x.new_empty(x.shape)
        self.kernel.rms_norm_bf16(
            x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), weight.data_ptr(), eps, out.data_ptr(), out.stride(0),
            torch.get_num_threads(),
        )  # fmt: skip
        return out

    def rope(self, x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x: [T, heads, hd], each row's heads contiguous; positions: [T] int64; cos, sin: [ctx, hd/2] float32
        tables. Rotated in place where the kernel runs (x returned), else a new tensor."""
        T, heads, hd = x.shape
        if (
            not self._fits(x[:, 0])
            or hd != HEAD_DIM
            or x.stride(1) != hd
            or positions.dtype != torch.int64
            or not positions.is_contiguous()
            or not (cos.is_contiguous() and sin.is_contiguous() and cos.dtype == sin.dtype == torch.float32)
        ):
            return apply_rope(x, cos[positions, None], sin[positions, None])
        self.kernel.rope_bf16(
            x.data_ptr(), T, heads, x.stride(0), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return x

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        """gate_up: [T, 2 n], gate then up. Returns silu(gate) * up [T, n]."""
        if not self._fits(gate_up) or gate_up.shape[1] % 2:
            gate, up = gate_up.chunk(2, dim=-1)
            return F.silu(gate) * up
        n = gate_up.shape[1] // 2
        out = gate_up.new_empty(gate_up.shape[0], n)
        self.kernel.silu_mul_bf16(
            gate_up.data_ptr(), gate_up.shape[0], n, gate_up.stride(0), out.data_ptr(), out.stride(0),
            torch.get_num_threads(),
        )  # fmt: skip
        return out

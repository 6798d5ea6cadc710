"""Decode steps' int4 linears through a C kernel (csrc/int4_matmul.c, built by kernels.load_kernel) in
bfloat16, else through torch's int4 kernel.

torch's kernel widens the weights again for every few rows, so a step of 8 rows cost 3.4x one row; this one
widens each weight once for up to 8 rows, to bfloat16 (q - 8), summed against the rows by dot products into
float and scaled per group after (docs/benchmarks.md). A row's sums run in one order whatever the number of
rows, so rows never depend on each other."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import Tensor

from anchorkv.model.kernel_op import KernelOp

ARITHMETIC = 2  # bumped when the kernel's sums change: decoded KV is reused in non-exact mode (stage namespace)
TILE = 16  # outputs a unit of the kernel's work computes
GROUP = 32  # inputs sharing a scale and a zero (transformer.INT4_GROUP)


@dataclass(frozen=True)
class Int4Tiles:
    """A weight's int4 parts in the kernel's layout, by tiles of TILE outputs."""

    nibbles: Tensor  # [P, out / TILE, in / 2, TILE] uint8: pair j of output o, inputs 2j (low) and 2j + 1 (high)
    scale_zero: Tensor  # [P, out / TILE, in / GROUP, 2, TILE] bfloat16: each group's scales, then its zeros

    @property
    def parts(self) -> int:
        return self.nibbles.shape[0]

    @property
    def out_features(self) -> int:
        return self.nibbles.shape[1] * TILE

    @property
    def in_features(self) -> int:
        return self.nibbles.shape[2] * 2


class Int4Matmul(KernelOp):
    def __init__(self, kernel: ctypes.CDLL | None = None, dtype: torch.dtype = torch.bfloat16) -> None:
        """kernel: from kernels.load_kernel; it serves bfloat16 activations."""
        super().__init__(kernel, dtype == torch.bfloat16)

    def pack(self, nibbles: Tensor, scale_zero: Tensor) -> Int4Tiles | None:
        """quantize_int4's parts (nibbles [P, out, in / 2], scale_zero [P, in / GROUP, out, 2]) laid out for
        the kernel, or None where it cannot take them."""
        P, out, half = nibbles.shape
        if self._kernel is None or nibbles.device.type != "cpu" or out % TILE or (2 * half) % GROUP:
            return None
        tiles = nibbles.view(P, out // TILE, TILE, half).transpose(2, 3).contiguous()
        sz = scale_zero.to(torch.bfloat16).view(P, 2 * half // GROUP, out // TILE, TILE, 2)
        return Int4Tiles(tiles, sz.permute(0, 2, 1, 4, 3).contiguous())

    def __call__(self, x: Tensor, w: Int4Tiles) -> Tensor:
        """x [M, in] bfloat16 times the weight: [M, out] bfloat16."""
        assert self._kernel is not None, "pack() gave these tiles only where the kernel runs"
        x = x.to(torch.bfloat16).contiguous()
        M, n_in = x.shape
        if n_in != w.in_features:
            raise ValueError(f"int4 linear: {n_in} inputs given, {w.in_features} expected")
        y = x.new_empty(M, w.out_features)
        err = self._kernel.int4_matmul_bf16(
            x.data_ptr(), w.nibbles.data_ptr(), w.scale_zero.data_ptr(), y.data_ptr(),
            M, w.out_features, n_in, w.parts, torch.get_num_threads(),
        )  # fmt: skip
        if err:
            raise RuntimeError(f"the int4 kernel refused [{M}, {n_in}] x [{w.out_features}, {n_in}]")
        return y

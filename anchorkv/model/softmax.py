"""The attention softmax over bfloat16 score blocks: a small C kernel (csrc/softmax.c, built by
kernels.load_kernel), else torch's softmax.

torch's softmax is most of a long-context prefill's non-GEMM time: its exp is accurate to an ulp of
float32 and its bfloat16 reductions are slow, while the result is rounded to bfloat16's 8 bits. The
kernel's exp is good to about 2e-7 and it masks the chunk's own future keys itself (speed: docs/
benchmarks.md). Its results differ from torch's in the last bit of some probabilities, so which one ran
is part of the exact cache's namespace.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from anchorkv.model.kernel_op import KernelOp


class AttentionSoftmax(KernelOp):
    """softmax over the last dim of a score block [n, L] whose rows are queries row0, row0 + 1, ... (mod T)
    of a T-token chunk holding the last T of the L keys; each query sees the keys up to its own."""

    def __init__(self, kernel: ctypes.CDLL | None = None, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(kernel, dtype == torch.bfloat16)

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

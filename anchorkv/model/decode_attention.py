"""A decode step's attention: each row's query over its own sequence's cached keys, all rows in one call to a
C kernel (csrc/decode_attention.c, built by kernels.load_kernel) in bfloat16, else through torch.

For one query torch's flash SDPA is bound by its per-block overhead, not by reading the keys; the kernel
reads each key and value once, in blocks merged in a fixed order (so a row's bits depend neither on the thread
count nor on the other rows), with the same error against a float64 reference (docs/benchmarks.md has the figures)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch import Tensor

from anchorkv.model.kernel_op import KernelOp

HEAD_DIM = 64  # the kernel's (SmolLM2's, and most small Llamas')
MAX_GROUP = 16  # query heads per KV head


class DecodeAttention(KernelOp):
    def __init__(
        self,
        kernel: ctypes.CDLL | None = None,
        dtype: torch.dtype = torch.bfloat16,
        head_dim: int = HEAD_DIM,
        group: int = 1,
    ) -> None:
        """kernel: from kernels.load_kernel; it serves bfloat16 models with HEAD_DIM-wide heads and at most
        MAX_GROUP query heads per KV head."""
        super().__init__(kernel, dtype == torch.bfloat16 and head_dim == HEAD_DIM and group <= MAX_GROUP)

    def step(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        caches: Sequence[tuple[Tensor, Tensor]],
        ends: Sequence[int],
        same: Sequence[tuple[int, int]] = (),
    ) -> Tensor | None:
        """A decode step's attention for all its rows in one call. Row b writes its new key and value k[b], v[b]
        ([Hkv, hd]) into its layer's caches[b] ([Hkv, ctx, hd] each) at position ends[b] - 1, then its query
        q[b] ([H, hd]) attends over keys [0, ends[b]). same[b] = (a, n): row a's caches hold row b's first n
        keys and values bit for bit, so row b may read them there, once for both ((-1, 0): none). Returns
        [B, H * hd], or None, having written nothing, where the kernel cannot take these shapes (then torch
        computes it)."""
        B, H, hd = q.shape
        Hkv = k.shape[1]
        if (
            self._kernel is None
            or hd != HEAD_DIM
            or H % Hkv
            or H // Hkv > MAX_GROUP
            or q.dtype != torch.bfloat16
            or q.device.type != "cpu"
            or any(t.dtype != q.dtype or t.shape[0] != B or t.stride(1) != hd or t.stride(2) != 1 for t in (q, k, v))
            or len(caches) != B
            or len(ends) != B
            or (same and len(same) != B)
        ):
            return None
        ctx = caches[0][0].shape[1]
        shape, strides = (Hkv, ctx, hd), (ctx * hd, hd, 1)
        if any(c.shape != shape or c.stride() != strides or c.dtype != q.dtype for kv in caches for c in kv):
            return None
        out = q.new_empty(B, H * hd)
        rows, upto = zip(*same) if same else ((-1,) * B, (0,) * B)
        err = self._kernel.decode_attention_bf16(
            B, q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
            (ctypes.c_void_p * B)(*(kc.data_ptr() for kc, _ in caches)),
            (ctypes.c_void_p * B)(*(vc.data_ptr() for _, vc in caches)),
            (ctypes.c_int64 * B)(*ends), (ctypes.c_int64 * B)(*rows), (ctypes.c_int64 * B)(*upto), ctx,
            out.data_ptr(), H, Hkv, hd**-0.5, torch.get_num_threads(),
        )  # fmt: skip
        return out if err == 0 else None

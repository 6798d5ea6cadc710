"""The Llama-family forward pass (llama, qwen2, qwen3) over one contiguous layer range.

Shapes: T = rows in this forward, D = hidden size, H / Hkv = query / KV heads, hd = head dim.
A forward is one prefill piece of one sequence (T positions in a row), or one decode step of B sequences
(T = B rows, one position each): linears and norms take all rows at once, attention runs per sequence.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from anchorkv.model.config import ModelConfig
from anchorkv.model.elementwise import rms_norm
from anchorkv.model.int4_matmul import Int4Matmul, Int4Tiles
from anchorkv.model.kernels import Kernels

log = logging.getLogger("anchorkv.model")

Logits = Literal["last", "all", "none"]  # which positions the last stage turns into logits
# Bump when the prefill's arithmetic or cuts change: it is part of the exact cache's namespace, so KV saved
# by an older forward is never mixed with a newer one (exact mode never reuses decoded KV).
FORWARD_VERSION = 7
# A decode step attends through torch's fused SDPA kernel up to this many keys (faster on short caches) and
# through the per-KV-head matmuls past it, which read long caches faster (docs/benchmarks.md).
DECODE_SDPA_KEYS = 4096
SCORE_BLOCK = 2**21  # attention scores computed at once (4 MiB in bfloat16), see StageModel._attention
INT4_GROUP = 32  # inputs sharing one scale and zero in int4 decode weights, as in Q4_0 / Q4_1 blocks


@dataclass(frozen=True)
class Rows:
    """One sequence's rows in a forward: positions [start, start + length), with its caches k, v:
    [n_layers, Hkv, ctx, hd]. same = (a, n): in a decode step, the caches of the forward's Rows a hold this
    one's first n positions bit for bit ((-1, 0): none)."""

    start: int
    length: int
    k: Tensor
    v: Tensor
    same: tuple[int, int] = (-1, 0)

    @property
    def end(self) -> int:
        return self.start + self.length


class Interrupted(Exception):
    """A forward given up between two layers because its caller asked: the KV of its positions is not valid."""


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8: weight ~= q * scale[:, None]. Returns q [out, in] int8, scale [out]."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.to(weight.dtype)


def quantize_int4(weight: Tensor) -> tuple[Tensor, Tensor] | None:
    """The weight as a sum of P int4 parts, in groups of INT4_GROUP inputs, only where that is lossless.
    Else None.

    - P = 1 where every group holds at most 16 evenly spaced values from its minimum, as Q4_1 blocks do, or
      is d * k with k in [-8, 7] and d = max |w| / 8 signed so that the largest magnitude is k = -8, as
      Q4_0 blocks are;
    - P = 2 where every group is d * q with q in [-127, 127] and d = max |w| / 127, as Q8_0 blocks are:
      q + 128 = 16 hi + lo, so w = 16d (hi - 8) + d (lo - 8) + 8d.

    Returns nibbles [P, out, in / 2] uint8 (input 2j in the low half of byte j) and scale_zero
    [P, in / G, out, 2] float32, the layout of torch's int4 kernel, which reads w = (q - 8) * scale + zero."""
    out, n_in = weight.shape
    if out % 16 or n_in % INT4_GROUP:
        return None
    g = weight.float().view(out, n_in // INT4_GROUP, INT4_GROUP)
    parts = _q4_1_parts(g) or _q4_0_parts(g) or _q8_0_parts(g)
    if parts is None:
        return None
    nibbles, scale_zero = [], []
    for q, scale, zero in parts:
        b = q.to(torch.uint8).view(out, n_in)
        nibbles.append(b[:, 0::2] | (b[:, 1::2] << 4))
        scale_zero.append(torch.cat([scale, zero], -1).transpose(0, 1))
    return torch.stack(nibbles), torch.stack(scale_zero).contiguous()


# Each takes groups g [out, in / G, G] and gives its int4 parts (q in 0..15, scale, zero) when they hold g exactly.
Int4Parts = list[tuple[Tensor, Tensor, Tensor]]


def _exact(q: Tensor, scale: Tensor, offset: Tensor, g: Tensor) -> bool:
    return bool(torch.all((q * scale + offset - g).abs() <= 1e-3 * scale.abs()))


def _q4_1_parts(g: Tensor) -> Int4Parts | None:
    low = g.amin(-1, keepdim=True)
    step = (g.amax(-1, keepdim=True) - low) / 15
    q = torch.round((g - low) / step.clamp(min=1e-30)).clamp(0, 15)
    return [(q, step, low + 8 * step)] if _exact(q, step, low, g) else None


def _q4_0_parts(g: Tensor) -> Int4Parts | None:
    d = -g.gather(-1, g.abs().argmax(-1, keepdim=True)) / 8  # the largest magnitude is k = -8
    k = torch.round(g / d.where(d != 0, 1.0)).clamp(-8, 7)
    zero = torch.zeros_like(d)
    return [(k + 8, d, zero)] if _exact(k, d, zero, g) else None


def _q8_0_parts(g: Tensor) -> Int4Parts | None:
    d = g.abs().amax(-1, keepdim=True) / 127
    q = torch.round(g / d.clamp(min=1e-30)).clamp(-127, 127)
    if not _exact(q, d, torch.zeros_like(d), g):
        return None
    u = q + 128
    return [(torch.div(u, 16, rounding_mode="floor"), 16 * d, torch.zeros_like(d)), (u % 16, d, 8 * d)]


def pack_int4(nibbles: Tensor) -> list[Tensor]:
    """quantize_int4's parts in the layout torch's int4 kernel reads on this CPU (it differs by ISA)."""
    return [
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.stack([part & 15, part >> 4], -1).view(part.shape[0], -1).to(torch.int32), 1
        )
        for part in nibbles
    ]


class Linear:
    """y = x W^T (+ b). Given a quantized copy of W, decode steps read that instead: int4 parts that sum
    to W (packed for torch's kernel, with scale_zero, or as tiles for int4_matmul's) or int8 (q, scale).

    Decode reads every weight once per token, so it is bound by how fast the kernel streams them: int8
    reads half the bytes of bf16, int4 a quarter. Prefill keeps the dense weights, so KV computed by
    prefill, the only KV the exact cache reuses, does not depend on this choice.

    With transposed=True the dense weight is held as W^T [in, out], contiguous: for prefill-sized inputs
    (128 rows) oneDNN's bf16 matmul runs 15-20% faster on that layout than F.linear on W.

    Given `packed` (W laid out once by oneDNN for its inner product, see pack_linears), every other call
    reads that: an unpacked matmul lays W out again on every call, which at the 30-130 rows of a warm turn
    costs as much as the product (1.2-1.4x on a whole forward at 69-128 rows, bit-identical in bfloat16).
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        q: Tensor | None = None,
        scale: Tensor | None = None,
        transposed: bool = False,
        int4: list[Tensor] | None = None,
        scale_zero: Tensor | None = None,
        tiles: Int4Tiles | None = None,
        int4_matmul: Int4Matmul | None = None,
    ) -> None:
        self.weight = weight  # [out, in], or [in, out] when transposed
        self.bias = bias
        self.q = q  # [out, in] int8
        self.scale = scale  # [out]
        self.transposed = transposed
        self.int4 = int4  # P parts in pack_int4's layout
        self.scale_zero = scale_zero  # [P, in / INT4_GROUP, out, 2], in the activations' dtype
        self.tiles = tiles  # or the parts laid out for int4_matmul's kernel, which then reads them instead
        self.int4_matmul = int4_matmul
        self.packed: Tensor | None = None  # an opaque oneDNN tensor holding W
        # prefill inputs of fewer rows are padded to this many: for short inputs oneDNN may pick kernels whose
        # rows' bits depend on the rows beside them (an AMX Xeon's, under about 40 rows); see prefill_row_floor
        self.min_rows = 0

    @property
    def decode_kind(self) -> str:
        parts = self.tiles.parts if self.tiles is not None else len(self.int4) if self.int4 is not None else 0
        if parts:
            return "int4" if parts == 1 else f"int4x{parts}"
        return "int8" if self.q is not None else "dense"

    def __call__(self, x: Tensor, decode: bool = False) -> Tensor:
        if decode and self.tiles is not None and self.int4_matmul is not None:
            y = self.int4_matmul(x, self.tiles)
            return y if self.bias is None else y + self.bias
        if decode and self.int4 is not None and self.scale_zero is not None:
            parts = [
                torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, INT4_GROUP, sz)
                for w, sz in zip(self.int4, self.scale_zero, strict=True)
            ]
            y = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
            return y if self.bias is None else y + self.bias
        if decode and self.q is not None and self.scale is not None:
            y = torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
            return y if self.bias is None else y + self.bias
        if not decode and 0 < x.shape[0] < self.min_rows:
            return self(torch.cat([x, x.new_zeros(self.min_rows - x.shape[0], x.shape[1])]))[: x.shape[0]]
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        return torch.mm(x, self.weight) if self.bias is None else torch.addmm(self.bias, x, self.weight)


def pack_linears(linears: Sequence[Linear], rows: int) -> str:
    """Lay each dense weight out for oneDNN's inner product on inputs of about `rows` rows. Returns how the
    linears now run: "onednn" (all packed), or "matmul" where this torch build or CPU cannot pack (none is)."""
    if not torch.backends.mkldnn.is_available() or any(lin.weight.device.type != "cpu" for lin in linears):
        return "matmul"
    try:
        for lin in linears:
            w = lin.weight.T.contiguous() if lin.transposed else lin.weight  # [out, in]
            lin.packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
            torch.ops.mkldnn._linear_pointwise(w.new_zeros(1, w.shape[1]), lin.packed, lin.bias, "none", [], "")
    except RuntimeError as e:
        log.info("oneDNN cannot pack the weights here (%s); plain matmuls run", e)
        for lin in linears:
            lin.packed = None
        return "matmul"
    return "onednn"


@dataclass
class LayerWeights:
    attn_norm: Tensor  # [D]
    wqkv: Linear  # [(H + 2 Hkv) * hd, D]; q, k and v fused so decode runs one GEMV
    q_norm: Tensor | None  # [hd], qwen3 only
    k_norm: Tensor | None
    wo: Linear  # [D, H * hd]
    ffn_norm: Tensor  # [D]
    w13: Linear  # [2 * F, D]; gate and up fused
    w2: Linear  # [D, F]


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        smooth = ((old_ctx / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    return inv


class StageModel:
    """Layers [first, last) of the model, plus the embedding on the first stage and the head on the last.

    The KV of this stage lives outside it, in tensors k, v: [n_layers, Hkv, ctx, hd].
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layers: list[LayerWeights],
        layer_range: range,
        embed: Tensor | None,
        final_norm: Tensor | None,
        lm_head: Linear | None,
        kernels: Kernels | None = None,
    ) -> None:
        self.cfg = cfg
        k = kernels or Kernels()  # each part an attribute of its own: benchmarks and tests swap them one by one
        self.softmax, self.prefill_attention, self.decode_attention = k.softmax, k.prefill_attention, k.decode_attention
        self.elementwise = k.elementwise
        self.layers = layers
        self.layer_range = layer_range
        self.embed = embed
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.decode_sdpa_keys = DECODE_SDPA_KEYS
        self.batch_rows = True  # a decode step's linears take all rows at once (else one row at a time)
        positions = torch.arange(cfg.max_ctx, dtype=torch.float64)
        angles = torch.outer(positions, rope_inv_freq(cfg))
        device = (embed if embed is not None else layers[0].wqkv.weight).device
        self.cos = angles.cos().float().to(device)  # [max_ctx, hd/2]
        self.sin = angles.sin().float().to(device)

    @property
    def linears(self) -> list[Linear]:
        lins = [lin for w in self.layers for lin in (w.wqkv, w.wo, w.w13, w.w2)]
        return lins if self.lm_head is None else [*lins, self.lm_head]

    def forward(
        self,
        x: Tensor,
        rows: Sequence[Rows],
        logits: Logits = "last",
        decode: bool = False,
        interrupt: Callable[[], bool] | None = None,
    ) -> Tensor:
        """Run each sequence's positions: one Rows for a prefill piece, one Rows of length 1 per sequence
        for a decode step. With `interrupt`, it is asked before each layer and, when it answers True, the
        forward raises Interrupted.

        x is token ids [T] on the first stage, else hidden states [T, D]. Returns hidden states [T, D],
        or on the last stage the logits: of the last position [vocab] for a prefill piece with "last"
        ([T, vocab] with "all"), of every row [B, vocab] for a decode step. Writes this stage's KV for
        those positions into each Rows' caches.
        """
        if not decode and len(rows) != 1:
            raise ValueError("a prefill forward takes one sequence")
        if self.embed is not None:
            x = F.embedding(x, self.embed)
        if decode:
            positions = torch.tensor([r.start for r in rows], device=x.device)
        else:
            positions = torch.arange(rows[0].start, rows[0].end, device=x.device)
        bias = None
        if x.shape[0] > 1 and not decode and self.softmax.needs_bias:
            # query i sits at absolute position start + i and sees keys [0, start + i]: only keys of this
            # chunk can be hidden, so the bias covers the last T keys
            pos = torch.arange(x.shape[0], device=x.device)
            hidden = pos[None, :] > pos[:, None]
            groups = self.cfg.n_heads // self.cfg.n_kv_heads
            bias = torch.zeros(hidden.shape, dtype=x.dtype, device=x.device).masked_fill_(hidden, float("-inf"))
            bias = bias.repeat(groups, 1)  # [G * T, T], rows ordered (group, query)
        for i, layer in enumerate(self.layers):
            if interrupt is not None and interrupt():
                raise Interrupted
            x = self._layer(layer, i, x, rows, positions, bias, decode)
        if self.lm_head is None or logits == "none":
            return x
        assert self.final_norm is not None
        h = x if logits == "all" or decode else x[-1:]
        out = self._linear(
            self.lm_head, self.elementwise.rms_norm(h, self.final_norm, self.cfg.rms_eps), decode
        ).float()
        return out if logits == "all" or decode else out[0]

    def _linear(self, lin: Linear, x: Tensor, decode: bool) -> Tensor:
        """lin on every row; a decode step's rows one at a time where the kernel's rows depend on how many
        there are (batch_rows False, see Engine's self-check), so a row never depends on the others."""
        if decode and not self.batch_rows and x.shape[0] > 1:
            return torch.cat([lin(x[i : i + 1], decode) for i in range(x.shape[0])])
        return lin(x, decode)

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, decode: bool) -> Tensor:
        """q: [H, T, hd]; k, v: [Hkv, L, hd] views into the cache; bias: [G * T, T] for the last T keys, or
        None for a single query. Returns [T, H * hd].

        The G = H / Hkv query heads that share a KV head are stacked into the rows of one matmul, so GQA
        needs no repeated KV (faster here than the flash SDPA kernel). Rows go in blocks of at most
        SCORE_BLOCK scores, which bounds the score buffer at long context while keeping the matmuls big
        (a 128-token piece is one block per KV head up to about 4k keys). Per KV head, plain mm on the cache view
        (bmm would first copy the strided view). Blocks depend on T and L only, so a position is always
        computed the same way. A decode step over at most decode_sdpa_keys keys goes through SDPA instead.
        """
        H, T, hd = q.shape
        Hkv, L = k.shape[0], k.shape[1]
        if decode and L <= self.decode_sdpa_keys:  # T == 1; the G query heads of a KV head are its G query rows
            return F.scaled_dot_product_attention(q.view(1, Hkv, H // Hkv, hd), k[None], v[None]).view(1, H * hd)
        rows = (H // Hkv) * T
        qg = torch.mul(q, hd**-0.5, out=q.new_empty(H, T, hd)).view(Hkv, rows, hd)
        block = max(1, min(rows, SCORE_BLOCK // L))
        scores = q.new_empty(block, L)
        out = q.new_empty(Hkv, rows, hd)
        for h in range(Hkv):
            for r in range(0, rows, block):
                n = min(block, rows - r)
                s = torch.mm(qg[h, r : r + n], k[h].T, out=scores[:n])
                torch.mm(self.softmax(s, bias, r, T), v[h], out=out[h, r : r + n])
        return out.view(H, T, hd).transpose(0, 1).reshape(T, H * hd)

    def _layer(
        self,
        w: LayerWeights,
        layer: int,
        x: Tensor,
        rows: Sequence[Rows],
        positions: Tensor,
        bias: Tensor | None,
        decode: bool,
    ) -> Tensor:
        cfg = self.cfg
        T, hd, H, Hkv = x.shape[0], cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        ops = self.elementwise
        qkv = self._linear(w.wqkv, ops.rms_norm(x, w.attn_norm, cfg.rms_eps), decode)
        qk, v = qkv.view(T, H + 2 * Hkv, hd).split([H + Hkv, Hkv], dim=1)
        if w.q_norm is not None and w.k_norm is not None:
            qk = torch.cat([rms_norm(qk[:, :H], w.q_norm, cfg.rms_eps), rms_norm(qk[:, H:], w.k_norm, cfg.rms_eps)], 1)
        qk = ops.rope(qk, positions, self.cos, self.sin)  # q and k in one pass: [T, H + Hkv, hd]
        caches = [(r.k[layer], r.v[layer]) for r in rows]
        attn = None
        if decode:  # one row a sequence: KV written and attended for all rows in one call
            attn = self.decode_attention.step(
                qk[:, :H], qk[:, H:], v, caches, [r.end for r in rows], [r.same for r in rows]
            )
        if attn is None:
            outs = []
            r0 = 0
            for r, (k_cache, v_cache) in zip(rows, caches, strict=True):
                mine = slice(r0, r0 + r.length)
                k_cache[:, r.start : r.end] = qk[mine, H:].transpose(0, 1)
                v_cache[:, r.start : r.end] = v[mine].transpose(0, 1)
                out = None if decode else self.prefill_attention(qk[mine, :H], k_cache, v_cache, r.end)
                if out is None:
                    q = qk[mine, :H].transpose(0, 1)
                    out = self._attention(q, k_cache[:, : r.end], v_cache[:, : r.end], bias, decode)
                outs.append(out)
                r0 += r.length
            attn = outs[0] if len(outs) == 1 else torch.cat(outs)
        x = x + self._linear(w.wo, attn, decode)
        gate_up = self._linear(w.w13, ops.rms_norm(x, w.ffn_norm, cfg.rms_eps), decode)
        return x + self._linear(w.w2, ops.silu_mul(gate_up), decode)

"""The prefill attention kernel, on AMX's tiles and on vector instructions, is causal attention over the cache
to bfloat16's precision; a query row's bits depend on nothing but its query and its keys (not the piece it came
in, nor the thread count); and a prefill through it gives the model's logits."""

from __future__ import annotations

import pytest
import torch

from anchorkv.engine.engine import Engine
from anchorkv.model.kernels import load_kernel
from anchorkv.model.loader import default_cache_home
from anchorkv.model.prefill_attention import PrefillAttention
from anchorkv.model.softmax import AttentionSoftmax
from anchorkv.model.transformer import StageModel
from tests.conftest import assert_close_logits, logits_two_ways

KERNEL = load_kernel(default_cache_home() / "kernels")
pytestmark = pytest.mark.skipif(KERNEL is None, reason="this CPU lacks AVX-512 with bfloat16, or gcc is missing")
H, HKV, HD = 9, 3, 64
HAS_AMX = KERNEL is not None and PrefillAttention(KERNEL).kind == "amx"
WAYS = [
    pytest.param(True, id="amx", marks=pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX")),
    pytest.param(False, id="vector"),
]


def _case(T: int, L: int, ctx: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries [T, 9, 64] as a strided view (3 KV heads of 3, q beside k and v as the model lays them out), and
    caches [3, ctx, 64]."""
    g = torch.Generator().manual_seed(T + 7919 * L)
    qkv = (torch.randn(T, H + 2 * HKV, HD, generator=g) * 3).to(torch.bfloat16)
    k_cache, v_cache = (torch.randn(HKV, ctx, HD, generator=g).to(torch.bfloat16) for _ in range(2))
    return qkv[:, :H], k_cache, v_cache


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int, amx: bool = True) -> torch.Tensor:
    out = PrefillAttention(KERNEL, amx=amx)(q, k, v, end)
    assert out is not None
    return out


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int) -> torch.Tensor:
    T = q.shape[0]
    qh = q.double().transpose(0, 1)  # [H, T, hd]
    kh, vh = (c[:, :end].double().repeat_interleave(H // HKV, 0) for c in (k, v))
    s = qh @ kh.transpose(1, 2) / HD**0.5
    hidden = torch.arange(end)[None, :] > (torch.arange(T)[:, None] + end - T)
    return (torch.softmax(s.masked_fill(hidden, float("-inf")), -1) @ vh).transpose(0, 1).reshape(T, -1)


@pytest.mark.parametrize("amx", WAYS)
@pytest.mark.parametrize(("T", "L"), [(1, 1), (5, 5), (7, 300), (17, 40), (128, 128), (159, 2100), (64, 4000)])
def test_the_kernel_is_causal_attention_to_bfloat16_precision(T: int, L: int, amx: bool) -> None:
    q, k, v = _case(T, L)
    out = _attend(q, k, v, L, amx)
    assert out.shape == (T, H * HD)
    torch_path = StageModel.__new__(StageModel)
    torch_path.softmax, torch_path.decode_sdpa_keys = AttentionSoftmax(), 0
    pos = torch.arange(T)
    bias = torch.zeros(T, T, dtype=torch.bfloat16).masked_fill_(pos[None, :] > pos[:, None], float("-inf"))
    matmuls = torch_path._attention(q.transpose(0, 1), k[:, :L], v[:, :L], bias.repeat(H // HKV, 1), False)
    exact = _exact(q, k, v, L)
    err = (out.double() - exact).abs().max()
    assert err <= 1.25 * (matmuls.double() - exact).abs().max() + 1e-3
    assert err < 0.02


@pytest.mark.parametrize("amx", WAYS)
def test_a_rows_bits_depend_only_on_its_query_and_keys(amx: bool) -> None:
    q, k, v = _case(159, 2100)
    whole = _attend(q, k, v, 2100, amx)
    for start, stop in ((158, 159), (0, 1), (40, 47), (3, 131)):  # the same positions, in pieces of other lengths
        piece = _attend(q[start:stop], k, v, 2100 - 159 + stop, amx)
        assert torch.equal(piece, whole[start:stop])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _attend(q, k, v, 2100, amx)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, whole)


def test_a_prefill_through_the_kernel_gives_the_models_logits(engine: Engine) -> None:
    assert engine.prefill_attention_kind == ("amx" if HAS_AMX else "kernel")
    text = "Summarize: the quick brown fox jumps over the lazy dog. " * 20
    prompt = engine.render_chat([{"role": "user", "content": text}]).token_ids
    (kernel,), (torch_path,) = logits_two_ways(engine, prompt, "prefill_attention", PrefillAttention())
    assert_close_logits(kernel, torch_path)


def test_shapes_the_kernel_cannot_serve_say_torch_computes_them() -> None:
    assert PrefillAttention(KERNEL, torch.bfloat16, head_dim=64, amx=False).kind == "kernel"
    assert PrefillAttention(KERNEL, torch.float32).kind == "torch"  # on a CPU with AMX too
    assert PrefillAttention(KERNEL, torch.bfloat16, head_dim=128).kind == "torch"
    assert PrefillAttention(None).kind == "torch"
    q, k, v = _case(4, 10)
    assert PrefillAttention(KERNEL)(q, k, v, 3) is None  # fewer keys than queries
    assert PrefillAttention(KERNEL)(q.float(), k, v, 10) is None

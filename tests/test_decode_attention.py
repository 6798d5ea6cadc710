"""The decode attention kernel is attention over the cache to bfloat16's precision, its bits do not depend on
the thread count, and decode steps through it give the model's logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anchorkv.engine.engine import Engine
from anchorkv.model.decode_attention import DecodeAttention
from anchorkv.model.kernels import load_kernel
from anchorkv.model.loader import default_cache_home
from tests.conftest import assert_close_logits, logits_two_ways

KERNEL = load_kernel(default_cache_home() / "kernels")
pytestmark = pytest.mark.skipif(KERNEL is None, reason="this CPU lacks AVX-512 with bfloat16, or gcc is missing")


def _case(L: int, ctx: int = 2048, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A query [1, 9, 64] (3 KV heads of 3), its new key and value [1, 3, 64], and caches [3, ctx, 64]."""
    g = torch.Generator().manual_seed(L + 7919 * seed)
    k_cache = torch.randn(3, ctx, 64, generator=g).to(torch.bfloat16)
    v_cache = torch.randn(3, ctx, 64, generator=g).to(torch.bfloat16)
    q = (torch.randn(1, 9, 64, generator=g) * 3).to(torch.bfloat16)
    k_new, v_new = (torch.randn(1, 3, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    return q, k_new, v_new, k_cache, v_cache


def _step(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, caches: list, ends: list[int]) -> torch.Tensor:
    out = DecodeAttention(KERNEL).step(q, k_new, v_new, caches, ends)
    assert out is not None
    return out


@pytest.mark.parametrize("L", [1, 17, 256, 257, 1369])
def test_the_kernel_writes_the_new_kv_and_is_attention_to_bfloat16_precision(L: int) -> None:
    q, k_new, v_new, k_cache, v_cache = _case(L)
    out = _step(q, k_new, v_new, [(k_cache, v_cache)], [L])
    assert out.shape == (1, 9 * 64)
    assert torch.equal(k_cache[:, L - 1], k_new[0]) and torch.equal(v_cache[:, L - 1], v_new[0])
    k, v = k_cache[:, :L], v_cache[:, :L]
    qg = q.double().view(3, 3, 64)
    exact = (torch.softmax(qg @ k.double().transpose(1, 2) / 8, dim=-1) @ v.double()).reshape(1, -1)
    sdpa = F.scaled_dot_product_attention(q.view(1, 3, 3, 64), k[None], v[None]).reshape(1, -1).double()
    err = (out.double() - exact).abs().max()
    assert err <= 1.25 * (sdpa - exact).abs().max() + 1e-3
    assert err < 0.02


def test_its_bits_do_not_depend_on_the_thread_count() -> None:
    q, k_new, v_new, k_cache, v_cache = _case(1000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _step(q, k_new, v_new, [(k_cache, v_cache)], [1000])
    finally:
        torch.set_num_threads(threads)
    two = _step(q, k_new, v_new, [(k_cache, v_cache)], [1000])
    assert torch.equal(one, two)


def test_each_row_of_a_batch_gets_the_bits_it_gets_alone() -> None:
    lengths = [1000, 1, 257, 3000]
    cases = [_case(L, ctx=4096, seed=b) for b, L in enumerate(lengths)]
    alone = [_step(q, kn, vn, [(kc.clone(), vc.clone())], [L]) for (q, kn, vn, kc, vc), L in zip(cases, lengths)]
    q, k_new, v_new = (torch.cat([c[i] for c in cases]) for i in range(3))
    batch = _step(q, k_new, v_new, [(c[3], c[4]) for c in cases], lengths)
    for b, (L, c) in enumerate(zip(lengths, cases, strict=True)):
        assert torch.equal(batch[b : b + 1], alone[b])
        assert torch.equal(c[3][:, L - 1], k_new[b])


def test_a_row_reads_a_shared_prefix_from_another_rows_caches_with_the_same_bits() -> None:
    """Rows 1 and 2 share row 0's first 700 (and 600) keys and values: read from row 0's caches, every row gets
    the bits it gets alone. Where row 0's caches hold other values, row 1's output changes: it reads them."""
    lengths, shared = [1000, 1500, 900], [0, 700, 600]
    cases = [_case(L, ctx=2048, seed=b) for b, L in enumerate(lengths)]
    for (_, _, _, kc, vc), n in zip(cases[1:], shared[1:], strict=True):
        kc[:, :n], vc[:, :n] = cases[0][3][:, :n], cases[0][4][:, :n]
    alone = [_step(q, kn, vn, [(kc.clone(), vc.clone())], [L]) for (q, kn, vn, kc, vc), L in zip(cases, lengths)]
    q, k_new, v_new = (torch.cat([c[i] for c in cases]) for i in range(3))
    same = [(-1, 0), (0, 700), (0, 600)]

    def batch(caches: list) -> torch.Tensor:
        out = DecodeAttention(KERNEL).step(q, k_new, v_new, caches, lengths, same)
        assert out is not None
        return out

    out = batch([(c[3], c[4]) for c in cases])
    for b in range(3):
        assert torch.equal(out[b : b + 1], alone[b])
    other = [(cases[0][3].clone(), cases[0][4].clone()), *[(c[3], c[4]) for c in cases[1:]]]
    other[0][0][:, :256] += 1  # row 0's first block, which row 1 reads from there
    assert not torch.equal(batch(other)[1:2], alone[1])
    assert (
        DecodeAttention(KERNEL).step(
            q, k_new, v_new, [(c[3], c[4]) for c in cases], lengths, [(-1, 0), (0, 1000), (-1, 0)]
        )
        is None
    )


def test_decode_steps_through_the_kernel_give_the_models_logits(engine: Engine) -> None:
    assert engine.decode_attention_kind == "kernel"
    prompt = engine.render_chat([{"role": "user", "content": "Name three colors of the rainbow."}]).token_ids
    kernel, torch_path = logits_two_ways(engine, prompt, "decode_attention", DecodeAttention(), steps=8)
    for a, b in zip(kernel[1:], torch_path[1:], strict=True):  # the decode steps
        assert_close_logits(a, b)


def test_models_the_kernel_cannot_serve_say_torch_computes_it() -> None:
    assert DecodeAttention(KERNEL, torch.bfloat16, head_dim=64, group=3).kind == "kernel"
    assert DecodeAttention(KERNEL, torch.float32, head_dim=64, group=3).kind == "torch"
    assert DecodeAttention(KERNEL, torch.bfloat16, head_dim=128, group=3).kind == "torch"
    assert DecodeAttention(None).kind == "torch"

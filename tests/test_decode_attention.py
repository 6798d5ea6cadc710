"""The decode attention kernel is attention over the cache to bfloat16's precision, its bits do not depend on
the thread count, and decode steps through it give the model's logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anchorkv.engine.engine import Engine
from anchorkv.engine.plan import RequestPlan
from anchorkv.model.decode_attention import DecodeAttention
from anchorkv.model.kernels import load_kernel
from anchorkv.model.loader import default_cache_home

KERNEL = load_kernel(default_cache_home() / "kernels")
pytestmark = pytest.mark.skipif(KERNEL is None, reason="this CPU lacks AVX-512 with bfloat16, or gcc is missing")


def _case(L: int, ctx: int = 2048) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(L)
    k_cache = torch.randn(3, ctx, 64, generator=g).to(torch.bfloat16)
    v_cache = torch.randn(3, ctx, 64, generator=g).to(torch.bfloat16)
    q = (torch.randn(9, 1, 64, generator=g) * 3).to(torch.bfloat16)
    return q, k_cache[:, :L], v_cache[:, :L]  # views of a longer cache, as a layer's KV is


@pytest.mark.parametrize("L", [1, 17, 256, 257, 1369])
def test_the_kernel_is_attention_to_bfloat16_precision(L: int) -> None:
    q, k, v = _case(L)
    out = DecodeAttention(KERNEL)(q, k, v)
    assert out is not None
    assert out.shape == (1, 9 * 64)
    qg = q.double().view(3, 3, 64)
    exact = (torch.softmax(qg @ k.double().transpose(1, 2) / 8, dim=-1) @ v.double()).reshape(1, -1)
    sdpa = F.scaled_dot_product_attention(q.view(1, 3, 3, 64), k[None], v[None]).reshape(1, -1).double()
    err = (out.double() - exact).abs().max()
    assert err <= 1.25 * (sdpa - exact).abs().max() + 1e-3
    assert err < 0.02


def test_its_bits_do_not_depend_on_the_thread_count() -> None:
    q, k, v = _case(1000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = DecodeAttention(KERNEL)(q, k, v)
    finally:
        torch.set_num_threads(threads)
    two = DecodeAttention(KERNEL)(q, k, v)
    assert one is not None
    assert two is not None
    assert torch.equal(one, two)


def test_decode_steps_through_the_kernel_give_the_models_logits(engine: Engine) -> None:
    assert engine.decode_attention_kind == "kernel"
    prompt = engine.render_chat([{"role": "user", "content": "Name three colors of the rainbow."}]).token_ids
    models = [s.model for s in engine.pipeline.stages]
    kernel = models[0].decode_attention
    steps: dict[str, list[torch.Tensor]] = {}
    with engine.lock, torch.inference_mode():
        for kind, attention in (("kernel", kernel), ("torch", DecodeAttention())):
            for m in models:
                m.decode_attention = attention
            plan = RequestPlan("t", len(prompt))
            engine.pipeline.truncate(0)
            logits = engine.pipeline.prefill(prompt, 0, plan)
            steps[kind] = []
            for i in range(8):  # greedy, each path on its own tokens
                token = int(logits.argmax())
                logits = engine.pipeline.decode(token, len(prompt) + i, plan)
                steps[kind].append(logits)
        for m in models:
            m.decode_attention = kernel
        engine.slots[0].clear()
    for a, b in zip(steps["kernel"], steps["torch"], strict=True):
        assert int(a.argmax()) == int(b.argmax())
        assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_models_the_kernel_cannot_serve_say_torch_computes_it() -> None:
    assert DecodeAttention(KERNEL, torch.bfloat16, head_dim=64, group=3).kind == "kernel"
    assert DecodeAttention(KERNEL, torch.float32, head_dim=64, group=3).kind == "torch"
    assert DecodeAttention(KERNEL, torch.bfloat16, head_dim=128, group=3).kind == "torch"
    assert DecodeAttention(None).kind == "torch"

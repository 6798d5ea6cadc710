"""The elementwise kernel's RMS norm, rotary embedding and SiLU(gate) * up agree with torch's ops to the last
bit or within it, each row's bits are its own whatever rows run beside it, and the model runs through it."""

from __future__ import annotations

import pytest
import torch

from anchorkv.engine.engine import Engine
from anchorkv.model.elementwise import Elementwise
from anchorkv.model.kernels import load_kernel
from anchorkv.model.loader import default_cache_home
from tests.conftest import assert_close_logits, logits_two_ways

KERNEL = load_kernel(default_cache_home() / "kernels")
pytestmark = pytest.mark.skipif(KERNEL is None, reason="this CPU lacks AVX-512 with bfloat16, or gcc is missing")
KERNEL_OPS, TORCH_OPS = Elementwise(KERNEL), Elementwise()


def _within_a_bf16_step(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal but for the last bit of a few values: bfloat16 keeps 8 bits, so one step is 2^-7 of the value."""
    assert a.shape == b.shape and a.dtype == b.dtype == torch.bfloat16
    step = b.float().abs() * 2**-7 + 1e-30
    assert bool(((a.float() - b.float()).abs() <= step).all())
    assert (a != b).float().mean() < 0.01


def _rows(n: int, width: int, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, width, generator=g) * scale).to(torch.bfloat16)


def test_rms_norm_matches_torch_and_each_row_is_its_own() -> None:
    x, w = _rows(37, 576), _rows(1, 576, seed=1)[0]
    out = KERNEL_OPS.rms_norm(x, w, 1e-5)
    _within_a_bf16_step(out, TORCH_OPS.rms_norm(x, w, 1e-5))
    assert torch.equal(KERNEL_OPS.rms_norm(x[5:6], w, 1e-5), out[5:6])


def test_silu_mul_matches_torch_across_the_range_of_gates() -> None:
    gu = _rows(19, 2 * 1536, scale=8.0)
    gu[0, :8] = torch.tensor([0.0, -0.0, 88.0, -88.0, 1e-3, -1e-3, 30.0, -30.0])
    out = KERNEL_OPS.silu_mul(gu)
    assert out.shape == (19, 1536)
    _within_a_bf16_step(out, TORCH_OPS.silu_mul(gu))
    assert torch.equal(KERNEL_OPS.silu_mul(gu[3:4]), out[3:4])


def test_rope_rotates_q_and_k_in_place_and_leaves_v() -> None:
    qkv = _rows(23, 15 * 64).view(23, 15, 64)
    v_before = qkv[:, 12:].clone()
    positions = torch.arange(1000, 1023)
    model_cos = torch.randn(4096, 32).cos()
    model_sin = torch.randn(4096, 32).sin()
    expected = TORCH_OPS.rope(qkv[:, :12].clone(), positions, model_cos, model_sin)
    out = KERNEL_OPS.rope(qkv[:, :12], positions, model_cos, model_sin)
    assert out.data_ptr() == qkv.data_ptr()
    _within_a_bf16_step(out, expected)
    assert torch.equal(qkv[:, 12:], v_before)


def test_a_prefill_and_decode_through_the_kernel_give_the_models_logits(engine: Engine) -> None:
    assert engine.elementwise_kind == "kernel"
    prompt = engine.render_chat([{"role": "user", "content": "Name three colors of the rainbow."}]).token_ids
    kernel, torch_path = logits_two_ways(engine, prompt, "elementwise", TORCH_OPS, steps=4)
    for a, b in zip(kernel, torch_path, strict=True):
        assert_close_logits(a, b)

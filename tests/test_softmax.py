"""The compiled attention softmax agrees with torch's to bfloat16's last bit and masks the chunk's future."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anchorkv.model.loader import default_cache_home
from anchorkv.model.kernels import load_kernel
from anchorkv.model.softmax import AttentionSoftmax

KERNEL = load_kernel(default_cache_home() / "kernels")


@pytest.mark.skipif(KERNEL is None, reason="this CPU lacks AVX-512 with bfloat16, or gcc is missing")
@pytest.mark.parametrize(
    ("n", "L", "T", "row0"), [(7, 5, 5, 0), (40, 300, 20, 13), (33, 1000, 1, 4), (96, 129, 32, 64)]
)
def test_the_kernel_is_torchs_softmax_within_a_bfloat16_step_and_hides_later_keys(
    n: int, L: int, T: int, row0: int
) -> None:
    g = torch.Generator().manual_seed(L)
    scores = (torch.randn(n, L, generator=g) * 4).to(torch.bfloat16)
    q = torch.arange(row0, row0 + n) % T  # each row's query within the chunk
    hidden = torch.arange(L)[None, :] > (L - T + q)[:, None]
    causal = torch.zeros(T, T).masked_fill_(torch.arange(T)[None, :] > torch.arange(T)[:, None], float("-inf"))
    # rows cycle through the chunk's queries; a single query (T = 1) sees every key and gets no bias
    bias = causal.repeat((row0 + n) // T + 1, 1).to(torch.bfloat16) if T > 1 else None
    torch_probs = AttentionSoftmax()(scores.clone(), bias, row0, T).float()
    kernel_probs = AttentionSoftmax(KERNEL)(scores.clone(), bias, row0, T).float()
    assert torch.equal(kernel_probs[hidden], torch.zeros(int(hidden.sum())))
    exact = torch.softmax(scores.double().masked_fill(hidden, float("-inf")), dim=-1)
    # bfloat16 keeps 8 significant bits: both are the exact value rounded, give or take one step
    step = exact.abs() * 2**-7 + 1e-30
    assert ((kernel_probs - exact).abs() <= step).all()
    assert ((torch_probs - exact).abs() <= step).all()
    assert (kernel_probs == torch_probs).float().mean() > 0.99


def test_without_the_kernel_or_in_float32_torch_computes_it() -> None:
    assert AttentionSoftmax().kind == "torch"
    assert AttentionSoftmax(KERNEL, torch.float32).kind == "torch"


def test_a_machine_without_gcc_gets_torchs_softmax(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc to be found
    assert load_kernel(tmp_path / "kernels") is None
    assert not any((tmp_path / "kernels").glob("*"))  # no half-built file left behind
    if KERNEL is not None:  # this CPU could run it: the server says why it does not
        assert "could not build the C kernels" in caplog.text


def test_a_cache_home_that_cannot_be_written_gets_torchs_softmax(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert load_kernel(blocked / "kernels") is None

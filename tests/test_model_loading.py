"""Every architecture loads from a tiny GGUF and a tiny HF folder, both give the same model, and its
forward agrees with a plain, unfused reference written from the Hugging Face definitions."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from anchorkv.config import EngineConfig
from anchorkv.engine.engine import Engine, Finished
from anchorkv.engine.plan import RequestPlan
from anchorkv.engine.sampling import SamplingParams
from anchorkv.model import transformer
from anchorkv.model.loader import resolve_model
from conftest import stages_of
from tests.factories import make_gguf, make_hf_folder

ARCHS = ["llama", "qwen2", "qwen3"]


def _logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        engine.pipeline.truncate(0)
        return engine.pipeline.prefill(ids, 0, RequestPlan("t", len(ids)), all_logits=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_and_hf_folder_give_the_same_model(tmp_path: Path, arch: str) -> None:
    hf = Engine(EngineConfig(model=make_hf_folder(tmp_path, arch), dtype="float32", threads=2, cache_home=tmp_path))
    path, _ = make_gguf(tmp_path, arch)
    gg = Engine(EngineConfig(model=path, dtype="float32", threads=2, cache_home=tmp_path))
    assert gg.model_cfg.arch == arch
    assert gg.model_cfg.tie_embeddings == hf.model_cfg.tie_embeddings
    prompt = gg.render_chat([{"role": "user", "content": "hello world, how are you?"}]).token_ids
    assert prompt == hf.render_chat([{"role": "user", "content": "hello world, how are you?"}]).token_ids
    a, b = _logits(hf, prompt), _logits(gg, prompt)
    assert a.shape == (len(prompt), hf.model_cfg.vocab_size)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    events = list(gg.generate(prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)))
    done = events[-1]
    assert isinstance(done, Finished)
    assert done.completion_tokens == 5


def _reference_logits(folder: Path, engine: Engine, ids: list[int]) -> torch.Tensor:
    """The HF forward, spelled out: no fused weights, no KV cache, no chunks, SDPA with repeated KV heads."""
    cfg, w = engine.model_cfg, load_file(folder / "model.safetensors")
    H, Hkv, hd, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rms_eps

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rope(x: torch.Tensor) -> torch.Tensor:  # [heads, T, hd], half-split
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).double() / hd))
        ang = torch.outer(torch.arange(x.shape[1]).double(), inv).float()
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        return x * cos + torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * sin

    def proj(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))

    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    T = len(ids)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = proj(h, p + "self_attn.q_proj").view(T, H, hd).transpose(0, 1)
        k = proj(h, p + "self_attn.k_proj").view(T, Hkv, hd).transpose(0, 1)
        v = proj(h, p + "self_attn.v_proj").view(T, Hkv, hd).transpose(0, 1)
        if cfg.qk_norm:
            q, k = norm(q, w[p + "self_attn.q_norm.weight"]), norm(k, w[p + "self_attn.k_norm.weight"])
        k, v = rope(k).repeat_interleave(H // Hkv, 0), v.repeat_interleave(H // Hkv, 0)
        a = F.scaled_dot_product_attention(rope(q), k, v, is_causal=True).transpose(0, 1).reshape(T, H * hd)
        x = x + proj(a, p + "self_attn.o_proj")
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        x = x + proj(F.silu(proj(h, p + "mlp.gate_proj")) * proj(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    head = w["model.embed_tokens.weight"] if cfg.tie_embeddings else w["lm_head.weight"]
    return F.linear(norm(x, w["model.norm.weight"]), head)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_a_plain_reference(tmp_path: Path, arch: str) -> None:
    folder = make_hf_folder(tmp_path, arch)
    # chunk 16 so the prompt spans several aligned chunks and the last one is partial
    engine = Engine(EngineConfig(model=folder, dtype="float32", threads=2, cache_home=tmp_path, chunk_size=16))
    text = "the quick brown fox jumps over the lazy dog, and then it runs back home to sleep"
    ids = engine.render_chat([{"role": "user", "content": text}]).token_ids
    assert len(ids) > 32
    assert len(ids) % 16
    torch.testing.assert_close(_logits(engine, ids), _reference_logits(folder, engine, ids), rtol=1e-4, atol=1e-4)
    assert engine.linear_kind == ("onednn" if torch.backends.mkldnn.is_available() else "matmul")


def test_where_onednn_cannot_pack_the_weights_plain_matmuls_give_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_hf_folder(tmp_path, "qwen2")  # with q, k, v biases
    packed = Engine(EngineConfig(model=folder, dtype="float32", threads=2, cache_home=tmp_path, chunk_size=16))

    def unsupported(*args: object) -> None:
        raise RuntimeError("unsupported platform")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", unsupported)
    plain = Engine(EngineConfig(model=folder, dtype="float32", threads=2, cache_home=tmp_path, chunk_size=16))
    assert plain.linear_kind == "matmul"
    assert all(lin.packed is None for s in stages_of(plain) for lin in s.model.linears)
    ids = plain.render_chat([{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]).token_ids
    torch.testing.assert_close(_logits(plain, ids), _reference_logits(folder, plain, ids), rtol=1e-4, atol=1e-4)
    # their KV may differ in the last bits, so an exact cache keeps them apart
    assert plain.cache.namespaces != packed.cache.namespaces


@pytest.mark.parametrize("sdpa_keys", [0, transformer.DECODE_SDPA_KEYS])
def test_decode_steps_match_the_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sdpa_keys: int) -> None:
    """Each decode step's logits are those the reference gives that position, through both decode attentions."""
    monkeypatch.setattr(transformer, "DECODE_SDPA_KEYS", sdpa_keys)
    folder = make_hf_folder(tmp_path, "qwen3")
    engine = Engine(EngineConfig(model=folder, dtype="float32", threads=2, cache_home=tmp_path, chunk_size=16))
    ids = engine.render_chat([{"role": "user", "content": "count the sheep jumping over the fence tonight"}]).token_ids
    m, plan = len(ids) - 6, RequestPlan("t", len(ids))
    with torch.inference_mode():
        engine.pipeline.truncate(0)
        engine.pipeline.prefill(ids[:m], 0, plan)
        steps = torch.stack([engine.pipeline.decode(ids[p], p, plan) for p in range(m, len(ids))])
    torch.testing.assert_close(steps, _reference_logits(folder, engine, ids)[m:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "quant",
    [
        gguf.GGMLQuantizationType.F16,
        gguf.GGMLQuantizationType.BF16,
        gguf.GGMLQuantizationType.Q8_0,
        gguf.GGMLQuantizationType.Q4_0,
        gguf.GGMLQuantizationType.Q4_1,
        gguf.GGMLQuantizationType.Q5_0,
    ],
)
def test_quantized_gguf_dequantizes_close_to_the_original(tmp_path: Path, quant: gguf.GGMLQuantizationType) -> None:
    from safetensors.torch import load_file

    path, weights = make_gguf(tmp_path, "qwen3", quant)
    loaded = load_file(resolve_model(path, tmp_path).folder / "model.safetensors")
    assert loaded.keys() == weights.keys()
    for name, w in weights.items():
        # 4-bit quants step by about range/15 per block of 32
        tol = 0.02 if quant in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16) else 0.2
        assert (loaded[name] - w).abs().max() <= tol * w.abs().max(), name


@pytest.mark.parametrize(
    "quant, kind",
    [
        (gguf.GGMLQuantizationType.Q4_1, "int4"),
        (gguf.GGMLQuantizationType.Q4_0, "int4"),
        (gguf.GGMLQuantizationType.Q8_0, "int4x2"),
        (gguf.GGMLQuantizationType.F32, "int8"),
    ],
)
def test_decode_reads_int4_exactly_where_the_weights_allow(
    tmp_path: Path, quant: gguf.GGMLQuantizationType, kind: str
) -> None:
    """Decode reads a Q4_1 or Q4_0 model's linears as int4 and a Q8_0 model's as two int4 parts, each holding
    its very weights; other weights fall back to int8."""
    path, _ = make_gguf(tmp_path, "llama", quant)
    engine = Engine(EngineConfig(model=path, threads=2, cache_home=tmp_path))
    n_layers, vocab = engine.model_cfg.n_layers, engine.model_cfg.vocab_size
    assert vocab % 16  # so the head stays int8 either way: torch's int4 kernel takes rows in sixteens
    assert engine.decode_weights == ({kind: 4 * n_layers, "int8": 1} if kind != "int8" else {"int8": 4 * n_layers + 1})
    dense = load_file(engine.files.folder / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    w2 = stages_of(engine)[0].model.layers[1].w2
    x = torch.randn(16, dense.shape[1], generator=torch.Generator().manual_seed(0)).bfloat16()
    want = x.float() @ dense.T  # the imported float32 weights
    got = torch.cat([w2(row[None], decode=True) for row in x]).float()
    # int4: within bfloat16 rounding of the scales and the output (0.3% here; int8's own error is 0.7%, a
    # zero off by one step 2.2%)
    assert (got - want).norm() / want.norm() < (0.005 if kind != "int8" else 0.02)


@pytest.mark.parametrize(
    "quant, f16_offsets",
    [
        (gguf.GGMLQuantizationType.Q4_K, (0, 2)),  # d, dmin lead the block
        (gguf.GGMLQuantizationType.Q5_K, (0, 2)),
        (gguf.GGMLQuantizationType.Q6_K, (208,)),  # d ends the block
    ],
)
def test_k_quants_import_as_gguf_dequantizes_them(
    tmp_path: Path, quant: gguf.GGMLQuantizationType, f16_offsets: tuple[int, ...]
) -> None:
    """K-quant blocks (256 weights) of random bytes with sane scales: the import keeps layout and values."""
    from safetensors.torch import load_file

    from anchorkv.model.gguf_import import import_gguf

    rows, cols = 8, 512
    block, nbytes = gguf.GGML_QUANT_SIZES[quant]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    for off in f16_offsets:
        raw[:, :, off : off + 2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    raw = raw.reshape(rows, -1)
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in [("block_count", 1), ("embedding_length", cols), ("attention.head_count", 1)]:
        w.add_uint32(f"llama.{key}", value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b"])
    w.add_token_types([1, 1])
    w.add_token_merges([])
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=quant)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    import_gguf(path, tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    expected = gguf.quants.dequantize(raw, quant)
    assert got.shape == (rows, cols)
    assert np.array_equal(got.numpy(), expected)


def test_bundled_model_is_found_through_its_package() -> None:
    from anchorkv.model.loader import bundled_model_path

    p = bundled_model_path()
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert p.is_file()


def test_second_load_reuses_the_imported_weights(tmp_path: Path) -> None:
    path, _ = make_gguf(tmp_path, "llama")
    first = resolve_model(path, tmp_path)
    marker = first.folder / "model.safetensors"
    mtime = marker.stat().st_mtime_ns
    second = resolve_model(path, tmp_path)
    assert second == first
    assert marker.stat().st_mtime_ns == mtime

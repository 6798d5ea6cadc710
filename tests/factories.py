"""Tiny random models of each architecture, written as an HF folder and as a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from anchorkv.model.chat_template import CHATML
from anchorkv.model.config import ModelConfig

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "Agents call tools, read results and answer the user with short, useful replies.",
    "system user assistant tool 0123456789 hello world how are you",
] * 20


def tiny_config(arch: str) -> ModelConfig:
    return ModelConfig(
        arch=arch,
        vocab_size=0,  # set from the tokenizer
        hidden_size=64,
        intermediate_size=96,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        rms_eps=1e-6,
        rope_theta=10000.0,
        max_ctx=512,
        tie_embeddings=arch != "qwen2",
        bos_token_id=0,
        eos_token_ids=(2,),
    )


def tiny_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def tiny_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    w = {"model.embed_tokens.weight": rnd(cfg.vocab_size, D, scale=0.5), "model.norm.weight": 1 + rnd(D)}
    if not cfg.tie_embeddings:
        w["lm_head.weight"] = rnd(cfg.vocab_size, D)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + rnd(D)
        w[p + "post_attention_layernorm.weight"] = 1 + rnd(D)
        w[p + "self_attn.q_proj.weight"] = rnd(cfg.n_heads * hd, D)
        w[p + "self_attn.k_proj.weight"] = rnd(cfg.n_kv_heads * hd, D)
        w[p + "self_attn.v_proj.weight"] = rnd(cfg.n_kv_heads * hd, D)
        w[p + "self_attn.o_proj.weight"] = rnd(D, cfg.n_heads * hd)
        w[p + "mlp.gate_proj.weight"] = rnd(F, D)
        w[p + "mlp.up_proj.weight"] = rnd(F, D)
        w[p + "mlp.down_proj.weight"] = rnd(D, F)
        if cfg.qkv_bias:
            for x, n in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)):
                w[p + f"self_attn.{x}_proj.bias"] = rnd(n * hd)
        if cfg.qk_norm:
            w[p + "self_attn.q_norm.weight"] = 1 + rnd(hd)
            w[p + "self_attn.k_norm.weight"] = 1 + rnd(hd)
    return w


def make_hf_folder(root: Path, arch: str) -> Path:
    """An HF folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json."""
    tok = tiny_tokenizer()
    cfg = _with_vocab(tiny_config(arch), tok)
    folder = root / f"tiny-{arch}-hf"
    folder.mkdir(parents=True)
    save_file(tiny_weights(cfg), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(cfg.to_hf()))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHATML, "bos_token": SPECIALS[0], "eos_token": SPECIALS[2]})
    )
    return folder


def make_gguf(
    root: Path, arch: str, quant: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32
) -> tuple[Path, dict[str, torch.Tensor]]:
    """The same tiny model as make_hf_folder, as llama.cpp's converter writes it (llama q/k permuted).

    Returns the path and the HF-named weights it was made from. 2-D weights are stored as `quant`.
    """
    tok = tiny_tokenizer()
    cfg = _with_vocab(tiny_config(arch), tok)
    weights = tiny_weights(cfg)
    path = root / f"tiny-{arch}-{quant.name}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_ctx)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    vocab = json.loads(tok.to_str())["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    for name, t in weights.items():
        arr = _to_gguf_layout(name, t, cfg).numpy().astype(np.float32)
        if arr.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            w.add_tensor(_gguf_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, weights


def _with_vocab(cfg: ModelConfig, tok: Tokenizer) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, vocab_size=tok.get_vocab_size())


def _to_gguf_layout(name: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf permutes llama q/k rows for its interleaved rope."""
    if cfg.arch != "llama" or not name.endswith(("q_proj.weight", "k_proj.weight")):
        return t
    n = cfg.n_heads if "q_proj" in name else cfg.n_kv_heads
    return t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf in top:
        return top[hf]
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf.split(".", 3)
    if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
        x = rest.split(".")[1][0]
        return f"blk.{i}.attn_{x}.{rest.split('.')[-1]}"
    return f"blk.{i}.{_GGUF_NAMES[rest]}"

"""Convert a GGUF file into a Hugging Face style folder (config.json, model.safetensors, tokenizer.json).

The loader only ever reads such folders; a GGUF is imported once into the weights cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

from anchorkv.model.config import ARCHITECTURES, ModelConfig

SUPPORTED_QUANTS = {
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q2_K,
    GGMLQuantizationType.Q3_K, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K,
}  # fmt: skip

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Pre-tokenizer split patterns, by `tokenizer.ggml.pre` (as in llama.cpp's llama-vocab.cpp).
_LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_config(reader: GGUFReader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")

    def a(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    n_heads = a("attention.head_count")
    hidden = a("embedding_length")
    vocab = a("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    rope_scaling = None
    if a("rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": a("rope.scaling.factor")}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = tuple(dict.fromkeys(i for i in (eos, eot) if i is not None))
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=a("feed_forward_length"),
        n_layers=a("block_count"),
        n_heads=n_heads,
        n_kv_heads=a("attention.head_count_kv", n_heads),
        head_dim=a("attention.key_length") or hidden // n_heads,
        rms_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        max_ctx=a("context_length", 2048),
        tie_embeddings="output.weight" not in {t.name for t in reader.tensors},
        rope_scaling=rope_scaling,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
    )


def read_tokenizer(reader: GGUFReader) -> Tokenizer:
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported; only byte-level BPE ('gpt2') is")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("smollm", "gpt-2", "default", "starcoder"):
        split: list[pre_tokenizers.PreTokenizer] = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre == "smollm" or pre == "starcoder":
            split.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(split)
    else:
        pattern = _QWEN2_PATTERN if pre.startswith("qwen") else _LLAMA3_PATTERN
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level]
        )
    tok.decoder = decoders.ByteLevel()
    # token_type 3 = control, 4 = user-defined: matched whole, before BPE
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=False) if ty in (3, 4)]
    )
    return tok


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's llama q/k permutation (interleaved rope -> HF half-split rope)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def import_gguf(gguf_path: Path, out_dir: Path) -> ModelConfig:
    """Write gguf_path as an HF folder into out_dir (the caller renames it into place)."""
    reader = GGUFReader(gguf_path)
    cfg = read_config(reader)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"importing {gguf_path.name}", unit="tensor", leave=False):
        if t.tensor_type not in SUPPORTED_QUANTS:
            raise ValueError(f"tensor {t.name}: GGUF type {t.tensor_type.name} is not supported")
        name = _GLOBAL_NAMES.get(t.name)
        if name is None:
            _, layer, rest = t.name.split(".", 2)
            if rest not in _LAYER_NAMES:
                continue  # e.g. rope_freqs: derived from the config instead
            name = f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
        w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        if cfg.arch == "llama" and rest_is(t.name, "attn_q.weight"):
            w = _unpermute(w, cfg.n_heads)
        elif cfg.arch == "llama" and rest_is(t.name, "attn_k.weight"):
            w = _unpermute(w, cfg.n_kv_heads)
        tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
    save_file(tensors, out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf(), indent=1))
    read_tokenizer(reader).save(str(out_dir / "tokenizer.json"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    tok_cfg = {
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "bos_token": tokens[cfg.bos_token_id] if cfg.bos_token_id is not None else None,
        "eos_token": tokens[cfg.eos_token_ids[0]] if cfg.eos_token_ids else None,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
    return cfg


def rest_is(gguf_name: str, suffix: str) -> bool:
    return gguf_name.startswith("blk.") and gguf_name.split(".", 2)[2] == suffix

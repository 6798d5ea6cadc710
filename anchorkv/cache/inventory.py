"""`anchorkv cache ls|stats|clear|verify`: look into a disk cache folder without loading a model."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from anchorkv.cache.disk_tier import SUFFIX, read_verified
from anchorkv.cache.history import FILE_NAME as HISTORY_FILE
from anchorkv.cache.history import History, parse_file


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


def verify(cache_dir: Path, repair: bool = False) -> tuple[str, int]:
    """Check every chunk file in full (header, key, tokens, checksum, positions) and the history file.
    Returns a report and the number of bad files; with `repair`, the bad ones are removed (the history set
    aside as history.bin.bad)."""
    bad: list[tuple[Path, str]] = []
    good = 0
    for ns in namespaces(cache_dir):
        for p in sorted(ns.glob(f"*{SUFFIX}")):
            try:
                read_verified(p, ns.name, bytes.fromhex(p.stem))
                good += 1
            except Exception as e:  # noqa: BLE001 - any failure is a bad file
                bad.append((p, str(e) or type(e).__name__))
    history = cache_dir / HISTORY_FILE
    if history.exists() or history.is_symlink():
        try:
            parse_file(history)
        except Exception as e:  # noqa: BLE001
            bad.append((history, str(e) or type(e).__name__))
    lines = [f"{good} chunk files verified, {len(bad)} bad"]
    for p, why in bad:
        lines.append(f"  bad: {p.relative_to(cache_dir)}: {why}")
        if repair:
            if p.name == HISTORY_FILE:
                History(p)  # sets it aside
            else:
                p.unlink(missing_ok=True)
    if repair and bad:
        lines.append(f"removed {len(bad)}")
    return "\n".join(lines), len(bad)

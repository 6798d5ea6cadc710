"""A pipeline stage: a contiguous layer range, its KV pool (one StageKV per sequence slot) and its own
prefix cache. The same object runs in the head's process or in a stage worker elsewhere; what reaches
it is a message (`StageInput`, or a cache order), never another stage's state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anchorkv.cache.keys import Namespace
from anchorkv.cache.policy import step_budget
from anchorkv.cache.prefix_cache import CacheConfig, stage_cache
from anchorkv.cache.stage_cache import CacheStats, Coverage, Fetch, Lookup, Record, Restored, StageCache
from anchorkv.config import EngineConfig
from anchorkv.engine.allocator import available_memory
from anchorkv.engine.kv import StageKV
from anchorkv.engine.plan import StageInput
from anchorkv.model import int4_matmul
from anchorkv.model.kernels import Kernels, cpu_kind, cpu_name, load_kernel
from anchorkv.model.loader import default_cache_home, load_config, load_stages, prepared_weights, resolve_model
from anchorkv.model.transformer import FORWARD_VERSION, Linear, Rows, StageModel, pack_linears

log = logging.getLogger("anchorkv.engine")

MAX_DEFAULT_CTX = 8192


@dataclass(frozen=True)
class StageInfo:
    index: int
    layers: tuple[int, int]  # [start, stop)
    namespace: Namespace
    kv_bytes: int
    decode_kinds: tuple[str, ...]  # each linear's decode weights: int4, int8 or dense
    batch_rows: bool
    linear_kind: str
    softmax: str
    prefill_attention: str
    elementwise: str
    decode_attention: str
    decode_int4: str  # kernel: the int4 linears read through the C kernel; torch: through torch's
    node: str  # host name and process id
    threads: int  # this stage's CPU threads
    ray_node: str | None = None  # the Ray node's id, on Ray
    prefill_rows: int = 0  # a sequence's prefill pieces may run as one forward of up to this many rows
    row_floor: int = 0  # shorter prefill inputs are padded to this many rows (see prefill_row_floor)


@dataclass(frozen=True)
class StageCacheUse:
    ram_bytes: int
    disk_bytes: int
    entries: int


@dataclass(frozen=True)
class StageReport:
    """A stage as /props shows it: where it runs, its layers, whether it is alive, its threads, its KV pool
    (whole and written) and its cache's bytes."""

    index: int
    node: str
    layers: list[int]
    state: str  # alive | restarting | dead
    threads: int
    prefill_rows: int
    row_floor: int
    kv_bytes: int
    kv_touched_bytes: int
    cache: StageCacheUse


def rows_invariant(
    linears: Sequence[Linear],
    rows: int,
    dtype: torch.dtype,
    device: torch.device,
    decode: bool = True,
    windows: int = 0,
) -> bool:
    """Whether every linear (its decode path, else its prefill path) gives each row the same bits whatever
    the number of rows (1 to `rows`) beside it, and, over `windows` random runs, wherever the row sits.
    Kernels pick their blocking by M, so this is measured, not assumed."""
    gen, where = torch.Generator().manual_seed(0), random.Random(0)
    seen: set[tuple[Any, ...]] = set()
    for lin in linears:
        n_in = lin.weight.shape[0] if lin.transposed else lin.weight.shape[1]
        key = (tuple(lin.weight.shape), lin.transposed, lin.decode_kind, lin.bias is not None)
        if key in seen:
            continue
        seen.add(key)
        x = torch.randn(rows, n_in, generator=gen).to(dtype=dtype, device=device)
        full = lin(x, decode)
        spans = [(0, m) for m in range(1, rows)] + [
            tuple(sorted(where.sample(range(rows + 1), 2))) for _ in range(windows)
        ]
        if not all(torch.equal(lin(x[a:b], decode), full[a:b]) for a, b in spans):
            return False
    return True


ROW_FLOORS = (0, 16, 32, 48, 64)  # tried in turn: the fewest rows a prefill linear is given (0: no padding)


def prefill_row_floor(
    linears: Sequence[Linear], rows: int, dtype: torch.dtype, device: torch.device, linear_kind: str, folder: Path
) -> int | None:
    """The smallest of ROW_FLOORS that, padding shorter prefill inputs to it, makes the prefill linears (but the
    LM head, which takes one row) give each row the same bits in any run of 1 to `rows` rows wherever it
    sits; the linears keep it. Then a sequence's prefill pieces can run as one forward and still give a cold
    run's bits. None where no floor does. Measured (1-5 s here), then remembered under folder for this CPU,
    torch, threads and shapes."""
    shapes = sorted({(tuple(lin.weight.shape), lin.transposed) for lin in linears})
    facts = [torch.__version__, cpu_name(), torch.get_num_threads(), str(dtype), str(device), linear_kind, rows, shapes]
    path = folder / f"prefill-rows-{hashlib.sha256(json.dumps([*facts, ROW_FLOORS]).encode()).hexdigest()[:16]}.json"
    try:
        found = json.loads(path.read_text())["floor"]
        if found is not None and found not in ROW_FLOORS:
            raise ValueError(f"not a floor: {found!r}")
        floor = None if found is None else int(found)
    except (OSError, ValueError, KeyError, TypeError):
        floor = next((f for f in ROW_FLOORS if _invariant_at(linears, f, rows, dtype, device)), None)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"floor": floor, "facts": facts}))
        except OSError as e:
            log.warning("could not remember the prefill linears' check in %s: %s", folder, e)
    for lin in linears:
        lin.min_rows = floor or 0
    return floor


def _invariant_at(linears: Sequence[Linear], floor: int, rows: int, dtype: torch.dtype, device: torch.device) -> bool:
    for lin in linears:
        lin.min_rows = floor
    return rows_invariant(linears, rows, dtype, device, decode=False, windows=100)


class Stage:
    def __init__(
        self,
        index: int,
        model: StageModel,
        kvs: list[StageKV],
        cache: StageCache,
        linear_kind: str,
        prefill_rows: int = 0,
        stages: int = 1,
    ) -> None:
        self.index = index
        self.model = model
        self.kvs = kvs
        self.cache = cache
        self.linear_kind = linear_kind
        self.prefill_rows = prefill_rows  # see StageInfo
        self.stages = stages  # in the whole pipeline: all of them may share this host
        self._pools_fit: bool | None = None  # for prefault: checked when the first slot starts

    @property
    def kv(self) -> StageKV:
        """Slot 0's KV: what a lone sequence uses."""
        return self.kvs[0]

    @property
    def layer_range(self) -> range:
        return self.model.layer_range

    @property
    def kv_bytes(self) -> int:
        return sum(kv.k.nbytes + kv.v.nbytes for kv in self.kvs)

    @property
    def kv_touched_bytes(self) -> int:
        return sum(kv.touched_bytes for kv in self.kvs)

    def info(self) -> StageInfo:
        r = self.layer_range
        return StageInfo(
            self.index, (r.start, r.stop), self.cache.namespace, self.kv_bytes,
            tuple(lin.decode_kind for lin in self.model.linears), self.model.batch_rows, self.linear_kind,
            self.model.softmax.kind, self.model.prefill_attention.kind, self.model.elementwise.kind,
            self.model.decode_attention.kind,
            "kernel" if any(lin.tiles is not None for lin in self.model.linears) else "torch",
            f"{socket.gethostname()}:{os.getpid()}", torch.get_num_threads(), prefill_rows=self.prefill_rows,
            row_floor=max(lin.min_rows for lin in self.model.linears),
        )  # fmt: skip

    def forward(self, inp: StageInput, interrupt: Callable[[], bool] | None = None) -> Tensor:
        """Hidden states [T, D] out, or logits on the last stage. Each span's KV is written (and counted
        as filled only when the forward completes)."""
        rows = []
        row_of = {sp.slot: i for i, sp in enumerate(inp.spans)}
        for sp in inp.spans:
            kv = self.kvs[sp.slot]
            if sp.start + sp.length > kv.ctx:
                raise ValueError(f"position {sp.start + sp.length} is past the context size {kv.ctx}")
            if sp.start > kv.filled:
                raise ValueError(f"stage {self.index}: forward at {sp.start} but KV is filled only to {kv.filled}")
            slot, n = sp.same
            same = (row_of[slot], n) if inp.decode and slot in row_of and n <= self.kvs[slot].filled else (-1, 0)
            rows.append(Rows(sp.start, sp.length, kv.k, kv.v, same))
        out = self.model.forward(inp.x, rows, inp.logits, inp.decode, interrupt)
        for sp in inp.spans:
            kv = self.kvs[sp.slot]
            kv.filled = sp.start + sp.length
            kv.high = max(kv.high, kv.filled)
        return out

    def truncate(self, n: int, slot: int) -> None:
        self.kvs[slot].truncate(n)

    def prefault(self, slot: int) -> bool:
        """About PREFAULT_BYTES more of the slot's KV made resident; whether any is left. Nothing, with a
        warning, where every stage's pool (as if all shared this host) would take more than half the memory
        this host has available."""
        if self._pools_fit is None:
            available, pools = available_memory(), self.kv_bytes * self.stages
            self._pools_fit = True
            if available is not None and pools > available // 2:
                self._pools_fit = False
                log.warning(
                    "the KV pools (%.1f GiB) are more than half the memory available (%.1f GiB): they become "
                    "resident only as written; a smaller --ctx or --parallel makes them smaller", pools / 2**30,
                    available / 2**30,
                )  # fmt: skip
        return self._pools_fit and self.kvs[slot].prefault()

    # -- the cache's orders ----------------------------------------------------------------------------
    def lookup(self, q: Lookup) -> Coverage:
        return self.cache.lookup(q)

    def restore(self, slot: int, f: Fetch) -> Restored:
        return self.cache.restore(f, self.kvs[slot])

    def record(self, slot: int, r: Record) -> None:
        self.cache.record(r, self.kvs[slot])

    def cache_stats(self) -> CacheStats:
        return self.cache.stats()


def build_stages(cfg: EngineConfig, cache_cfg: CacheConfig, only: int | None = None) -> list[Stage]:
    """Load the model's stages (or only stage `only`), each with its KV pool and prefix cache. The
    namespace is computed here, where the stage runs: everything that changes its KV values, and in exact
    mode their bits (this host's CPU, torch, kernels and threads)."""
    torch.set_num_threads(cfg.threads)
    files = resolve_model(cfg.model, cfg.cache_home)
    mc = load_config(files.folder)
    dtype, device = getattr(torch, cfg.dtype), torch.device(cfg.device)
    ctx = cfg.ctx or min(mc.max_ctx, MAX_DEFAULT_CTX)
    weights = prepared_weights(files, mc, dtype, cfg.decode_quant, cfg.cache_home)
    kernels_dir = (cfg.cache_home or default_cache_home()) / "kernels"
    lib = load_kernel(kernels_dir) if device.type == "cpu" else None
    k = Kernels.of(lib, dtype, mc)
    models = load_stages(weights, mc, cfg.stages, device, k)
    indices = range(len(models)) if only is None else [only]
    linears = [lin for i in indices for lin in models[i].linears]
    linear_kind = pack_linears(linears, cfg.chunk_size)
    batch_rows = cfg.parallel == 1 or rows_invariant(linears, cfg.parallel, dtype, device)
    if not batch_rows:
        log.info("the decode linears' rows depend on the batch here: a decode step runs them a row at a time")
    budget = step_budget(cfg.chunk_size)  # the most rows a step merges
    per_row = k.prefill_attention.kind != "torch" and k.elementwise.kind == "kernel"
    body = [lin for i in indices for lin in models[i].linears if lin is not models[i].lm_head]
    floor = prefill_row_floor(body, budget, dtype, device, linear_kind, kernels_dir) if per_row else None
    base: dict[str, Any] = {
        "model": files.fingerprint,
        "dtype": cfg.dtype,
        "kv": mc.kv_params(),
        "exact": cache_cfg.exact,
    }
    if cache_cfg.exact:
        base |= {"chunk": cfg.chunk_size, "threads": cfg.threads, "device": cfg.device}
        base |= {"torch": torch.__version__, "forward": FORWARD_VERSION, "softmax": k.softmax.kind}
        base |= {"prefill_attention": k.prefill_attention.kind, "elementwise": k.elementwise.kind}
        base |= {"linear": linear_kind, "cpu": cpu_kind() if device.type == "cpu" else "", "row_floor": floor or 0}
    else:  # decoded KV is reused too, so the decode weights matter
        base |= {"decode_weights": list(cfg.decode_quant), "decode_attention": k.decode_attention.kind}
        base |= {"decode_int4": [k.int4_matmul.kind, int4_matmul.ARITHMETIC], "elementwise": k.elementwise.kind}
    out = []
    for i in indices:
        m = models[i]
        m.batch_rows = batch_rows
        ns = Namespace.of(**base, layers=[m.layer_range.start, m.layer_range.stop])
        kvs = [StageKV(len(m.layer_range), mc.n_kv_heads, ctx, mc.head_dim, dtype, device) for _ in range(cfg.parallel)]
        cache = stage_cache(cache_cfg, ns, cfg.chunk_size, cfg.stages)
        out.append(Stage(i, m, kvs, cache, linear_kind, 0 if floor is None else budget, cfg.stages))
    return out

"""Stages as Ray actors, on this host or across a cluster: the same `Stage` behind a Ray transport.

The head holds an actor handle per stage. A forward is a chain of actor calls, each taking the previous
call's result by reference, so hidden states go from stage to stage through Ray's object store and only
the last stage's output comes back to the head. Cache orders (lookup, restore, record) go to every
stage at once. An actor that dies fails the work in flight with `StageFailed` (a 503 naming the stage);
Ray restarts it (`max_restarts`), it finds its disk tier again, and later calls reach the new one.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import replace
from collections.abc import Callable, Sequence
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayError, RayTaskError
from torch import Tensor

from anchorkv.cache.prefix_cache import CacheConfig
from anchorkv.cache.stage_cache import CacheStats, Chain, Coverage, Fetch, Lookup, Record, Restored
from anchorkv.config import EngineConfig
from anchorkv.engine.allocator import freeze_loaded_objects, keep_freed_memory
from anchorkv.engine.pipeline import Pipeline, StageFailed, StageHealth
from anchorkv.engine.plan import Span, StageInput
from anchorkv.engine.stage import Stage, StageInfo, build_stages
from anchorkv.model.transformer import Interrupted, Logits

log = logging.getLogger("anchorkv.engine")

MAX_RESTARTS = 8
# a prefill piece's hidden states (C + 63 rows) go inline in the call's reply, not through the object store
INLINE_BYTES = 2**20
PING_S = 2.0  # how long /health waits for a stage
RAY_BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}
# stages sharing one host's cores: idle OpenMP threads sleep at once instead of spinning, or each stage's
# spinning threads steal the cores the next stage computes on; a stage alone on its host computes faster
# spinning (docs/distributed.md has both measurements)
SHARED_HOST_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def shared_host_threads(threads: int, stages: int) -> int:
    """Threads for each of `stages` stages on one host of `threads` cores: a share each, at least one. Three
    stages on two cores compute faster one thread each than two each, waking each other's sleeping teams
    (docs/distributed.md); the kernels give the same bits whatever the thread count."""
    return max(1, threads // stages)


class StageWorker:
    """One stage in its own process. Each method is one message from the head."""

    def __init__(self, cfg: EngineConfig, cache_cfg: CacheConfig, index: int) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        keep_freed_memory()
        self.stage: Stage = build_stages(cfg, cache_cfg, only=index)[0]
        freeze_loaded_objects()

    def info(self) -> StageInfo:
        return replace(self.stage.info(), ray_node=ray.get_runtime_context().get_node_id())

    def ping(self) -> int:
        return os.getpid()

    def actor_id(self) -> str:
        return ray.get_runtime_context().get_actor_id() or ""

    def echo(self, x: Tensor) -> Tensor:
        """x back: the transport without the compute (`bench stages`)."""
        return x

    @torch.inference_mode()
    def forward(self, x: Tensor, spans: tuple[Span, ...], decode: bool, logits: Logits) -> Tensor:
        out = self.stage.forward(StageInput(x, spans, decode, logits))
        # logits are computed in the model's dtype and widened to float32: narrowed back for the trip, they
        # lose nothing and take half the bytes (a decode step's fit in Ray's inline replies)
        return out.to(self.stage.kv.k.dtype) if out.dtype == torch.float32 else out

    def truncate(self, n: int, slot: int) -> None:
        self.stage.truncate(n, slot)

    def kv_touched(self) -> int:
        return self.stage.kv_touched_bytes

    def prefault(self, slot: int) -> bool:
        return self.stage.prefault(slot)

    def lookup(self, q: Lookup) -> Coverage:
        return self.stage.lookup(q)

    def restore(self, slot: int, f: Fetch) -> Restored:
        return self.stage.restore(slot, f)

    def record(self, slot: int, r: Record) -> None:
        self.stage.record(slot, r)

    def latest_chain(self) -> Chain:
        return self.stage.cache.latest_chain()

    def cache_stats(self) -> CacheStats:
        return self.stage.cache_stats()

    def flush(self) -> None:
        self.stage.cache.flush()

    def clear_cache(self) -> None:
        """Forget every chunk this stage holds, in RAM and on disk."""
        self.stage.cache.clear()


def unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing answers at a Ray address (HOST:PORT, or ray://HOST:PORT), or None: Ray itself retries
    for minutes. Other forms ("auto") are Ray's to resolve."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        return f"nothing answers at {host}:{port} ({e.strerror or e}); is its head node up (`ray start --head`)?"
    return None


def missing_resources(wanted: Sequence[str | None]) -> str | None:
    """Why the cluster cannot place stages on the nodes that `wanted` names, or None: an actor waiting for a
    resource no node offers would wait for ever."""
    offered = ray.cluster_resources()
    missing = [r for r in wanted if r and r not in offered]
    if not missing:
        return None
    custom = sorted(r for r in offered if r not in RAY_BUILTIN_RESOURCES and ":" not in r)
    return f"no node of the Ray cluster offers {', '.join(missing)} (custom resources offered: {', '.join(custom) or 'none'})"


def connect(address: str | None) -> None:
    """Join the cluster at `address`, or start a local Ray instance whose listeners stay on loopback."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local": a new instance of its own, even where `ray start` left a cluster running on this host
        ray.init(
            address="local", include_dashboard=False, num_cpus=os.cpu_count() or 1, log_to_driver=True,
            _system_config={"max_direct_call_object_size": INLINE_BYTES},
        )  # fmt: skip


class RayPipeline(Pipeline):
    kind = "ray"

    def __init__(
        self,
        cfg: EngineConfig,
        cache_cfg: CacheConfig,
        address: str | None = None,
        resources: Sequence[str | None] = (),
    ) -> None:
        """`resources[i]`: a custom resource that stage i's node offers (one unit is taken), or None."""
        connect(address)
        if (error := missing_resources(resources)) is not None:
            raise ValueError(f"--stage-resources: {error}")
        self.chunk_size = cfg.chunk_size
        self.device = torch.device("cpu")  # where the head keeps token ids and logits
        actor = ray.remote(StageWorker)
        if address is None:
            cfg = replace(cfg, threads=shared_host_threads(cfg.threads, cfg.stages))
        self.workers: list[Any] = []  # ActorHandles: ray types their methods as plain functions, without .remote
        self._actor_ids: list[str] = []
        for i in range(cfg.stages):
            res = resources[i] if i < len(resources) else None
            opts: dict[str, Any] = {
                "num_cpus": 0,
                "max_restarts": MAX_RESTARTS,
                "max_task_retries": 0,
                "runtime_env": {"env_vars": SHARED_HOST_ENV if address is None else {}},
                "name": None,
            }
            if res:
                opts["resources"] = {res: 1}
            self.workers.append(actor.options(**opts).remote(cfg, cache_cfg, i))
        self._infos = self._get([w.info.remote() for w in self.workers])
        self._actor_ids = self._get([w.actor_id.remote() for w in self.workers])
        self.cache_stages = RayCacheStages(self)

    def _get(self, refs: Any, timeout: float | None = None) -> Any:
        """ray.get, with a dead or unreachable stage turned into StageFailed naming it."""
        try:
            return ray.get(refs, timeout=timeout)
        except (RayError, GetTimeoutError) as e:
            raise StageFailed(self._named(e) or self._down(), e) from e

    def _named(self, e: BaseException) -> list[int]:
        """The stage whose actor failed, from the error: a restart can be over before a ping would see it."""
        while isinstance(e, RayTaskError) and e.cause is not None:
            e = e.cause  # a task error names the stage that ran it; its cause names the one that failed
        actor = getattr(e, "actor_id", None)
        return [self._actor_ids.index(actor)] if actor in self._actor_ids else []

    def _down(self) -> list[int]:
        out = []
        for i, w in enumerate(self.workers):
            try:
                ray.get(w.ping.remote(), timeout=PING_S)
            except (RayError, GetTimeoutError):
                out.append(i)
        return out

    def _run(self, inp: StageInput, interrupt: Callable[[], bool] | None = None) -> Tensor:
        """The stages chained: each passes its output to the next without the head. With `interrupt` (the
        background prefill's), the head waits for each stage and asks before starting the next, so a request
        waits for one stage's share of a piece, not the whole piece: a running actor call cannot be stopped."""
        x: Any = inp.x
        for w in self.workers:
            if interrupt is not None:
                if x is not inp.x:
                    ray.wait([x], fetch_local=False)
                if interrupt():
                    raise Interrupted
            x = w.forward.remote(x, inp.spans, inp.decode, inp.logits)
        out: Tensor = self._get(x)
        return out.float() if inp.logits != "none" else out

    def truncate(self, n: int, slot: int = 0) -> None:
        self._get([w.truncate.remote(n, slot) for w in self.workers])

    def echo_chain(self, x: Tensor) -> Tensor:
        """x through every stage and back, computing nothing: what the messages alone cost."""
        ref: Any = x
        for w in self.workers:
            ref = w.echo.remote(ref)
        out: Tensor = self._get(ref)
        return out

    def infos(self) -> list[StageInfo]:
        return list(self._infos)

    def prefault(self, slot: int) -> bool:
        return any(self._get([w.prefault.remote(slot) for w in self.workers]))

    def kv_touched(self) -> list[int]:
        refs = [w.kv_touched.remote() for w in self.workers]
        out = []
        for ref in refs:
            try:
                out.append(int(ray.get(ref, timeout=PING_S)))
            except (RayError, GetTimeoutError):
                out.append(0)  # restarting: nothing written yet
        return out

    def health(self) -> list[StageHealth]:
        refs = [w.ping.remote() for w in self.workers]
        out = []
        for info, ref in zip(self._infos, refs, strict=True):
            try:
                ray.get(ref, timeout=PING_S)
                state = "alive"
            except (RayError, GetTimeoutError):
                state = "restarting"
            out.append(StageHealth(info.index, info.node, list(info.layers), state))
        return out

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []


class RayCacheStages:
    """The stages' caches, each order sent to every actor at once."""

    def __init__(self, pipe: RayPipeline) -> None:
        self.pipe = pipe

    def lookup(self, q: Lookup) -> list[Coverage]:
        out: list[Coverage] = self.pipe._get([w.lookup.remote(q) for w in self.pipe.workers])
        return out

    def restore(self, slot: int, f: Fetch) -> list[Restored]:
        out: list[Restored] = self.pipe._get([w.restore.remote(slot, f) for w in self.pipe.workers])
        return out

    def record(self, slot: int, r: Record) -> None:
        ws = self.pipe.workers
        no_logits = replace(r, logits={})  # only the last stage keeps logits
        self.pipe._get([w.record.remote(slot, r if i == len(ws) - 1 else no_logits) for i, w in enumerate(ws)])

    def latest_chain(self) -> Chain:
        out: Chain = self.pipe._get(self.pipe.workers[0].latest_chain.remote())
        return out

    def cache_stats(self) -> list[CacheStats]:
        refs = [w.cache_stats.remote() for w in self.pipe.workers]
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=PING_S))
            except (RayError, GetTimeoutError):
                out.append(CacheStats())  # a stage that is restarting reports nothing
        return out

    def flush(self) -> None:
        self.pipe._get([w.flush.remote() for w in self.pipe.workers])

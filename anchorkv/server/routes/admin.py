"""The server's own pages: /health, /v1/models, /props (what runs and what the cache holds), /metrics."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from anchorkv import __version__
from anchorkv.engine.stage import StageReport
from anchorkv.server.errors import APIError
from anchorkv.server.service import Service


def router(svc: Service) -> APIRouter:
    r = APIRouter()
    engine, worker = svc.engine, svc.worker
    keyed = [Depends(svc.auth)]

    @r.get("/health")
    @r.head("/health", include_in_schema=False)  # for load balancers; one operation in the API schema
    async def health() -> dict[str, Any]:
        stages = [asdict(h) for h in await asyncio.to_thread(engine.pipeline.health)]
        status = "ok" if all(h["state"] == "alive" for h in stages) else "degraded"
        return {"status": status, "queue": worker.waiting, "running": worker.running, "busy": worker.busy,
                "stages": stages}  # fmt: skip

    @r.get("/v1/models", dependencies=keyed)
    @r.get("/models", dependencies=keyed)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model(svc)]}

    @r.get("/v1/models/{name}", dependencies=keyed)
    async def model(name: str) -> dict[str, Any]:
        if name != svc.model_id:
            raise APIError(404, f"model {name!r} is not served here; this server serves {svc.model_id!r}", "model")
        return _model(svc)

    @r.get("/props", dependencies=keyed)
    async def props() -> dict[str, Any]:
        stages = await asyncio.to_thread(engine.stages_report)
        return _props(svc, stages, asdict(await asyncio.to_thread(engine.cache.stats)))

    @r.get("/metrics")
    async def prometheus() -> Response:
        svc.metrics.queue_depth.set(worker.waiting)
        svc.metrics.observe_cache(await asyncio.to_thread(engine.cache.stats))
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return r


def _model(svc: Service) -> dict[str, Any]:
    return {"id": svc.model_id, "object": "model", "created": svc.started, "owned_by": "anchorkv"}


def _props(svc: Service, stages: list[StageReport], cache: dict[str, Any]) -> dict[str, Any]:
    engine = svc.engine
    mc, ecfg = engine.model_cfg, engine.cfg
    return {
        "model": svc.model_id,
        "model_path": str(engine.files.source),
        "model_fingerprint": engine.files.fingerprint,
        "architecture": mc.arch,
        "n_layers": mc.n_layers,
        "n_ctx": engine.ctx,
        "dtype": ecfg.dtype,
        "device": ecfg.device,
        "threads": ecfg.threads,
        "chunk_size": ecfg.chunk_size,
        "decode_weights": engine.decode_weights,
        "attention_softmax": engine.softmax_kind,
        "prefill_attention": engine.prefill_attention_kind,
        "elementwise": engine.elementwise_kind,
        "decode_attention": engine.decode_attention_kind,
        "decode_int4": engine.decode_int4_kind,
        "linear_kernel": engine.linear_kind,
        "distributed": engine.pipeline.kind,
        "stages": [asdict(s) for s in stages],
        "parallel": ecfg.parallel,
        "decode_rows": "batched" if engine.batch_rows else "one at a time",
        "kv_pool": {
            "slots": ecfg.parallel,
            "positions_per_slot": engine.ctx,
            "bytes": engine.kv_bytes,
            "touched_bytes": sum(s.kv_touched_bytes for s in stages),
        },
        "chat_template": engine.template.source,
        "default_generation_settings": {"n_ctx": engine.ctx},
        "total_slots": ecfg.parallel,
        "max_queue": svc.cfg.max_queue,
        "prefix_cache": cache,
        "full_cache": cache,  # the name lucebox's clients read
        "version": __version__,
    }

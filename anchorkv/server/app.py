"""The HTTP server: OpenAI's chat completions, completions and Responses APIs, Anthropic's Messages API,
the tokenizer's endpoints and the server's own pages, one router each (server/routes/), over one engine
worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from anchorkv import __version__
from anchorkv.config import ServerConfig
from anchorkv.engine.engine import Engine
from anchorkv.server import errors
from anchorkv.server.limits import BodyLimit, KeyedPages
from anchorkv.server.metrics import Metrics
from anchorkv.server.routes import admin, completions, messages, responses, tokens
from anchorkv.server.service import Service
from anchorkv.server.worker import EngineWorker

PRIVATE_PAGES = {"/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def create_app(engine: Engine, cfg: ServerConfig, start_worker: bool = True) -> FastAPI:
    """The app; its engine worker runs on a thread of its own unless start_worker is False, in which case the
    caller runs `app.state.worker.run()` (see serve_on_main_thread)."""
    metrics = Metrics()
    worker = EngineWorker(engine, cfg.max_queue, cfg.turn_grace_ms / 1000, on_cancel=metrics.cancelled.inc)
    svc = Service(engine, cfg, worker, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if start_worker:
            worker.start()
        yield
        worker.stop()
        engine.cache.flush()  # a clean shutdown loses no queued save

    app = FastAPI(title="anchorkv", version=__version__, lifespan=lifespan)
    app.state.worker = worker
    app.state.metrics = metrics
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=int(cfg.max_body_mb * 2**20))
    if not cfg.pages_public:
        app.add_middleware(KeyedPages, paths=PRIVATE_PAGES, key=cfg.api_key or "")
    if cfg.allowed_origins:  # outermost: a browser's preflight needs no key and carries no body
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])  # fmt: skip
    for api in (admin, tokens, completions, messages, responses):
        app.include_router(api.router(svc))
    return app

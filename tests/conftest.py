from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from anchorkv.cache.prefix_cache import CacheConfig
from anchorkv.config import EngineConfig, ServerConfig
from anchorkv.engine.engine import Engine
from anchorkv.server.app import create_app

THREADS = 2


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The bundled SmolLM2-135M-Instruct, one stage."""
    return Engine(EngineConfig(threads=THREADS))


@pytest.fixture(scope="session")
def engine3() -> Engine:
    return Engine(EngineConfig(threads=THREADS, stages=3))


@pytest.fixture(scope="session")
def app(engine: Engine) -> FastAPI:
    return create_app(engine, ServerConfig())


@pytest.fixture(scope="session")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@dataclass
class LiveServer:
    url: str
    app: FastAPI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_in_thread(app: FastAPI) -> Iterator[LiveServer]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    yield LiveServer(f"http://127.0.0.1:{port}", app)
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def live(engine: Engine) -> Iterator[LiveServer]:
    yield from serve_in_thread(create_app(engine, ServerConfig(max_queue=1)))


def cached_server(tmp_path_factory: pytest.TempPathFactory, cfg: ServerConfig) -> Iterator[LiveServer]:
    """A live server on an engine of its own with RAM and disk tiers, for the API tests that read cache usage."""
    engine = Engine(EngineConfig(threads=THREADS), CacheConfig(ram_mb=256, cache_dir=tmp_path_factory.mktemp("kv")))
    yield from serve_in_thread(create_app(engine, cfg))

from __future__ import annotations

import gc
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import uvicorn

# Ray's head turns token auth on by default; a node or driver that joins must say so to send the token, and
# `ray start` needs one to exist: the test cluster's own, not ~/.ray's (a fresh machine has none). Set before
# Ray is imported: it reads both once.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

import fastapi.dependencies.models
import fastapi.dependencies.utils
from fastapi import FastAPI
from fastapi.testclient import TestClient

from anchorkv.bench import stages as stages_bench
from anchorkv.cache.prefix_cache import CacheConfig
from anchorkv.config import EngineConfig, ServerConfig
from anchorkv.engine.engine import Engine
from anchorkv.engine.pipeline import in_process
from anchorkv.engine.plan import RequestPlan
from anchorkv.engine.stage import Stage
from anchorkv.server.app import create_app

THREADS = 2


@pytest.fixture(autouse=True)
def free_engines() -> Iterator[None]:
    """Free each test's engines when it ends. FastAPI keeps facts about every endpoint function it has seen
    in caches keyed by the function (up to 4096), and our endpoints close over their engine; and an engine
    is garbage in cycles, which Python collects by object counts, not bytes. Left alone, each test's
    engine, model and KV pool stayed in memory until late in the run (21 GB of this machine's 24 by its
    end, where Ray kills workers past 95%)."""
    yield
    for module in (fastapi.dependencies.models, fastapi.dependencies.utils):
        for cached in [f for f in vars(module).values() if hasattr(f, "cache_clear")]:
            cached.cache_clear()
    gc.collect()


def forget_slots(e: Engine) -> None:
    """Forget what the KV slots hold: a prefix then comes from the cache's tiers, or is prefilled."""
    for slot in e.slots:
        slot.clear()


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


def assert_close_logits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Logits of one position by two paths whose last bits differ (kernels against torch's ops): close, and
    each path's top token a top token of the other within a near tie."""
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert b[int(a.argmax())] >= b.max() - 0.5 and a[int(b.argmax())] >= a.max() - 0.5


def logits_two_ways(
    engine: Engine, prompt: list[int], part: str, other: object, steps: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The prompt's logits, then those of `steps` greedy decode steps, through the engine's own `part` of every
    stage model (`prefill_attention`, `elementwise`, ...) and then through `other`, which decodes the same
    tokens. The engine's own is put back."""
    models = [s.model for s in stages_of(engine)]
    own = getattr(models[0], part)
    runs: list[list[torch.Tensor]] = []
    tokens: list[int] = []
    with engine.lock, torch.inference_mode():
        for impl in (own, other):
            for m in models:
                setattr(m, part, impl)
            plan = RequestPlan("t", len(prompt))
            engine.pipeline.truncate(0)
            logits = [engine.pipeline.prefill(prompt, 0, plan)]
            for i in range(steps):
                if impl is own:
                    tokens.append(int(logits[-1].argmax()))
                logits.append(engine.pipeline.decode(tokens[i], len(prompt) + i, plan))
            runs.append(logits)
        for m in models:
            setattr(m, part, own)
        engine.slots[0].clear()
    return runs[0], runs[1]


def stages_of(engine: Engine) -> list[Stage]:
    """The engine's stages, built in this process: what tests of one process reach into."""
    return in_process(engine.pipeline).stages


class Arrivals:
    """An `interrupt`: says a request has arrived from its (after + 1)th question on; counts the questions."""

    def __init__(self, after: int) -> None:
        self.after, self.asked = after, 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.asked > self.after


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


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    """A real redis-server on a free loopback port."""
    port = free_port()
    return stages_bench.start_redis(port, "512mb"), f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """One Redis for every test that shares it."""
    proc, url = start_redis()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@dataclass
class RayCluster:
    address: str
    resources: tuple[str, str]  # one custom resource per node


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """Two Ray nodes on this machine (`ray start --head` and `ray start --address`), each offering its own
    custom resource. Shared by every test that needs Ray. (On Linux Ray resolves 127.0.0.1 to the host's
    address and its gRPC servers listen on every interface; token auth guards them.)"""
    import ray

    ray_bin = str(Path(sys.executable).parent / "ray")
    port = free_port()

    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    subprocess.run(
        [ray_bin, "start", "--head", "--port", str(port), "--include-dashboard", "false",
         "--resources", json.dumps({"node_a": 4}), *common],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run(
            [ray_bin, "start", "--address", address, "--resources", json.dumps({"node_b": 4}), *common],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        ray.init(address=address, log_to_driver=False, _node_ip_address="127.0.0.1")
        yield RayCluster(address, ("node_a", "node_b"))
    finally:
        ray.shutdown()
        subprocess.run([ray_bin, "stop", "--force"], stdout=subprocess.DEVNULL, check=False)

"""Stages as Ray actors on a two-node Ray cluster on this machine: exact logits against one stage in one
process (cold, restored, batched), each stage recording its own chunks, the veto, /health and /props,
and a stage killed mid-run."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import ray
import torch
from fastapi.testclient import TestClient

from anchorkv.bench import stages as stages_bench
from anchorkv.cache.prefix_cache import CacheConfig, CacheRequest
from anchorkv.config import EngineConfig, ServerConfig
from anchorkv.engine.engine import Engine
from anchorkv.engine.plan import RequestPlan
from anchorkv.engine.ray_pipeline import RayPipeline
from anchorkv.engine.sampling import SamplingParams
from anchorkv.model.transformer import Interrupted
from anchorkv.server.app import create_app
from conftest import Arrivals, LiveServer, RayCluster, forget_slots, free_port, serve_in_thread
from test_prefix_cache import C, chat


@pytest.fixture(scope="module")
def ray_engine(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """3 stages: stage 0 on one node, stages 1 and 2 on the other."""
    a, b = ray_cluster.resources
    ecfg = EngineConfig(threads=2, stages=3, parallel=2)
    ccfg = CacheConfig(ram_mb=256, cache_dir=tmp_path_factory.mktemp("kv"))
    pipe = RayPipeline(ecfg, ccfg, ray_cluster.address, [a, b, b])
    yield Engine(ecfg, ccfg, pipe)
    pipe.close()


def test_stages_run_where_their_resources_are(ray_engine: Engine) -> None:
    nodes = [i.node for i in ray_engine.stage_infos]
    assert len({n.split(":")[1] for n in nodes}) == 3  # three processes
    offering = {
        res: n["NodeID"] for n in ray.nodes() if n["Alive"] for res in n["Resources"] if res.startswith("node_")
    }
    assert [i.ray_node for i in ray_engine.stage_infos] == [offering["node_a"], offering["node_b"], offering["node_b"]]
    assert [i.layers for i in ray_engine.stage_infos] == [(0, 10), (10, 20), (20, 30)]


def test_logits_equal_one_stage_in_one_process_cold_and_restored(
    ray_engine: Engine, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt, req = chat(ray_engine, "Which code goes with shipment class 4?")
    cold, _ = engine.prompt_logits(prompt, req)
    first, plan1 = ray_engine.prompt_logits(prompt, req)
    assert plan1.restored_tokens == 0
    assert torch.equal(first, cold)
    p2, r2 = chat(ray_engine, "Which code goes with shipment class 5?")
    forget_slots(ray_engine)  # every stage copies the prefix from its RAM tier
    warm, plan2 = ray_engine.prompt_logits(p2, r2)
    assert plan2.restored_tokens > 0
    assert plan2.tier == "ram"
    assert torch.equal(warm, engine.prompt_logits(p2, r2)[0])
    orders: list[object] = []
    restore = ray_engine.pipeline.cache_stages.restore

    def counted(*a: Any) -> Any:
        orders.append(a)
        return restore(*a)

    monkeypatch.setattr(ray_engine.pipeline.cache_stages, "restore", counted)
    p3, r3 = chat(ray_engine, "Which code goes with shipment class 6?")
    held, plan3 = ray_engine.prompt_logits(p3, r3)
    assert plan3.restored_tokens == plan2.restored_tokens and plan3.tier == "slot" and plan3.kind == plan2.kind
    assert not orders  # the slot held the prefix: no restore order crossed to the stages
    assert torch.equal(held, engine.prompt_logits(p3, r3)[0])


def test_a_batch_of_two_across_processes_equals_lone_runs(ray_engine: Engine, engine: Engine) -> None:
    prompts = [chat(ray_engine, f"List {n} colours.")[0] for n in ("three", "five")]
    params = SamplingParams(max_tokens=8, temperature=0)
    lone = [[e.token_ids for e in engine.generate(p, params) if hasattr(e, "token_ids")][-1] for p in prompts]
    got: list[list[int]] = [[], []]
    with ray_engine.lock:
        seqs = [ray_engine.submit(p, params, lambda _: None, keep_reply=False) for p in prompts]
        while not all(s.done for s in seqs):
            ray_engine.step()
    got = [s.out for s in seqs]
    assert got == lone


def test_an_anchor_is_recorded_by_every_stage(ray_engine: Engine) -> None:
    tokens = ray_engine.tokenizer.encode("Section 9 of the operating manual. " * 90)
    anchor = 3 * C
    before = [s.cache.entries for s in ray_engine.stages_report()]
    ray_engine.prompt_logits(tokens, CacheRequest(anchors=[anchor], has_key=True, scope=None))
    after = [s.cache.entries for s in ray_engine.stages_report()]
    assert all(b > a for a, b in zip(before, after, strict=True))
    _, plan = ray_engine.prompt_logits(tokens[:anchor] + ray_engine.tokenizer.encode(" A different ending."))
    assert plan.restored_tokens == anchor
    assert plan.kind == "anchor"


def test_a_stage_that_lost_chunks_vetoes_longer_restores(ray_engine: Engine, engine: Engine) -> None:
    """Stage 2 forgets everything, then sees only a shorter prompt: the longer one restores only as far
    as that one reaches, in every stage."""
    long_p, long_r = chat(ray_engine, "Which code goes with shipment class 7, and why?")
    ray_engine.prompt_logits(long_p, long_r)
    pipe = ray_engine.pipeline
    assert isinstance(pipe, RayPipeline)
    ray.get(pipe.workers[2].clear_cache.remote())
    short = long_p[: 2 * C]
    ray_engine.prompt_logits(short, CacheRequest(anchors=[2 * C], has_key=True))
    logits, plan = ray_engine.prompt_logits(long_p, long_r)
    assert plan.restored_tokens == 2 * C
    assert torch.equal(logits, engine.prompt_logits(long_p, long_r)[0])


def test_health_and_props_show_each_stage(ray_engine: Engine) -> None:
    while ray_engine.idle_work():  # every stage makes its KV pool resident while the head is idle
        pass
    with TestClient(create_app(ray_engine, ServerConfig())) as client:
        health = client.get("/health").json()
        props = client.get("/props").json()
    assert health["status"] == "ok"
    assert [s["state"] for s in health["stages"]] == ["alive"] * 3
    assert props["distributed"] == "ray"
    for s in props["stages"]:
        assert s["node"]
        assert s["layers"]
        assert s["kv_touched_bytes"] == s["kv_bytes"] > 0
        assert s["prefill_rows"] == ray_engine.prefill_rows  # this host's check, found by every stage alike
        assert "ram_bytes" in s["cache"]


def test_a_killed_stage_fails_requests_in_flight_with_503_and_comes_back(ray_engine: Engine) -> None:
    pipe = ray_engine.pipeline
    assert isinstance(pipe, RayPipeline)
    live: LiveServer
    gen = serve_in_thread(create_app(ray_engine, ServerConfig()))
    live = next(gen)
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "Write a long story about a lighthouse."}]
        errors: list[Exception] = []

        def slow() -> None:
            try:
                client.chat.completions.create(model="m", messages=messages, max_tokens=400, temperature=0)  # type: ignore[arg-type]
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(3)  # decoding by now
        ray.kill(pipe.workers[1], no_restart=False)
        t.join(timeout=60)
        assert not t.is_alive()
        assert len(errors) == 1
        assert isinstance(errors[0], openai.APIStatusError)
        assert errors[0].status_code == 503
        assert "stage 1" in str(errors[0])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(s.state == "alive" for s in pipe.health()):
                break
            time.sleep(1)
        done = client.chat.completions.create(model="m", messages=messages, max_tokens=4, temperature=0)  # type: ignore[arg-type]
        assert done.choices[0].message.content
    finally:
        next(gen, None)


def test_the_cli_refuses_stage_flags_that_do_not_fit(
    ray_cluster: RayCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each at once, with a message naming the flag: a cluster that is not there, or a resource no node
    offers, would otherwise keep `serve` waiting for minutes or for ever."""
    from anchorkv.cli import _cache_config, _engine_config, _pipeline, build_parser

    p = build_parser()
    ray_flags = ["serve", "--stages", "2", "--distributed", "ray", "--ray-address"]
    for argv, named in (
        (["serve", "--stages", "3", "--distributed", "ray", "--stage-resources", "node_a,node_b"], "names 2"),
        (["serve", "--stages", "3", "--ray-address", "127.0.0.1:1"], "--ray-address needs --distributed ray"),
        (["serve", "--cache-redis", "localhost:6379"], "--cache-redis"),
        ([*ray_flags, f"127.0.0.1:{free_port()}"], "nothing answers at"),
        ([*ray_flags, ray_cluster.address, "--stage-resources", "node_a,node_c"], "offers node_c (custom resources"),
    ):
        t = time.monotonic()
        with pytest.raises(SystemExit):
            args = p.parse_args(argv)
            _pipeline(p, args, _engine_config(p, args), _cache_config(p, args))
        assert named in capsys.readouterr().err
        assert time.monotonic() - t < 10


def test_serve_with_stages_on_a_local_ray_instance(tmp_path: Path, client: TestClient) -> None:
    """`anchorkv serve --distributed ray` without an address starts Ray itself; its replies are the
    in-process server's."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "anchorkv", "serve", "--threads", "2", "--port", str(port), "--cache-dir",
         str(tmp_path), "--stages", "2", "--parallel", "1", "--distributed", "ray"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "serve --distributed ray did not start"
            assert time.monotonic() < deadline, "serve --distributed ray did not start"
            time.sleep(0.5)
        body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0}
        got = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        want = client.post("/v1/chat/completions", json=body).json()
        assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
        props = httpx.get(f"{url}/props", timeout=10).json()
        assert props["distributed"] == "ray"
        assert [s["threads"] for s in props["stages"]] == [1, 1]  # two stages on two cores: one each
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_bench_stages_measures_a_cold_and_a_restored_prompt_on_ray(ray_engine: Engine) -> None:
    system = " ".join(f"Rule {i}: refunds for case {i} take {i} days." for i in range(40))
    (r,) = stages_bench.measure({"ray": ray_engine}, system, repeats=1, decode_steps=4)  # asserts the warm one restored
    assert r.cold_ttft_ms > 0
    assert r.decode_step_ms > 0


def test_a_background_forward_on_ray_gives_way_between_stages_and_runs_again_exactly(
    ray_engine: Engine, engine: Engine
) -> None:
    tokens = ray_engine.tokenizer.encode(" ".join(f"Note {i} is filed under tag {i}." for i in range(12)))
    plan = RequestPlan("background", len(tokens))
    arrivals = Arrivals(after=1)
    try:
        with pytest.raises(Interrupted):
            ray_engine.pipeline.forward(tokens, 0, plan, "last", interrupt=arrivals, slot=1)
        assert arrivals.asked == 2  # before stage 0, then before stage 1, which never ran
        ray_engine.pipeline.truncate(0, 1)
        again = ray_engine.pipeline.forward(tokens, 0, plan, "last", slot=1)
        assert torch.equal(again, engine.prompt_logits(tokens)[0])
    finally:
        ray_engine.slots[1].clear()  # its KV was written behind the scheduler's back
        ray_engine.pipeline.truncate(0, 1)

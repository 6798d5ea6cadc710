"""What an adversarial client sends: each gets a clean 4xx naming the field, never a 5xx or a dropped connection."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import httpx
import httpx2  # what starlette's TestClient answers with
import pytest
from fastapi.testclient import TestClient

from anchorkv.config import ServerConfig
from anchorkv.engine.engine import Engine
from anchorkv.server.app import create_app
from conftest import LiveServer

M = [{"role": "user", "content": "hi"}]


def post(client: TestClient, path: str, body: dict[str, Any]) -> httpx2.Response:
    # json.dumps keeps lone surrogates as \\ud800 escapes, as a client's JSON would carry them
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    "body",
    [
        {"messages": M, "temperature": 1e-300, "max_tokens": 3, "ignore_eos": True},
        {"messages": M, "temperature": 0.7, "top_p": 1e-300, "max_tokens": 3, "ignore_eos": True},
        {"messages": M, "repetition_penalty": 1e-300, "max_tokens": 3, "ignore_eos": True},
        {"messages": M, "repetition_penalty": 1e300, "temperature": 0.5, "max_tokens": 3, "ignore_eos": True},
    ],
)
def test_extreme_sampling_values_the_schema_accepts_still_generate(client: TestClient, body: dict[str, Any]) -> None:
    r = post(client, "/v1/chat/completions", body)
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 3


def test_extreme_penalty_on_completions_generates(client: TestClient) -> None:
    r = post(
        client, "/v1/completions", {"prompt": "hi", "repetition_penalty": 1e-300, "max_tokens": 3, "ignore_eos": True}
    )
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/v1/chat/completions", {"messages": M, "seed": 2**64}, "seed"),
        (
            "/v1/chat/completions",
            {"messages": M, "tools": [{"type": "function", "function": "x"}], "tool_choice": "required"},
            "tools[0].function",
        ),  # fmt: skip
        (
            "/v1/chat/completions",
            {"messages": M, "tools": [{"type": "function", "function": {"name": "f", "parameters": -1}}]},
            "tools[0].function.parameters",
        ),
        (
            "/v1/chat/completions",
            {"messages": M, "tools": [{"type": "custom", "custom": {"name": "f"}}]},
            "tools[0]: type must be function",
        ),
        (
            "/apply-template",
            {"messages": M, "tools": [{"function": {"description": "no name"}}]},
            "tools[0].function.name",
        ),
        (
            "/tokenize",
            {"messages": M, "tools": [{"function": {"name": "f", "description": 5}}]},
            "tools[0].function.description",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
        ("/tokenize", {"content": "a\ud800b"}, "content"),
        ("/apply-template", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
        ("/v1/chat/completions", {"messages": M, "grammar": 'root ::= "a"{1000000}', "max_tokens": 8}, "grammar"),
    ],
)
def test_bad_values_are_a_400_naming_the_field(client: TestClient, path: str, body: dict[str, Any], named: str) -> None:
    r = post(client, path, body)
    assert r.status_code == 400
    assert named in r.json()["error"]["message"]


def test_a_400_keeps_the_connection_alive(live: LiveServer) -> None:
    with httpx.Client() as http:
        bad = http.post(
            f"{live.url}/v1/chat/completions",
            content=json.dumps({"messages": [{"role": "user", "content": "a\ud800b"}]}),
            headers={"content-type": "application/json"},
        )
        assert bad.status_code == 400
        good = http.post(f"{live.url}/v1/chat/completions", json={"messages": M, "max_tokens": 2})
        assert good.status_code == 200


def test_a_body_over_the_limit_is_a_413_before_parsing(engine: Engine) -> None:
    with TestClient(create_app(engine, ServerConfig(max_body_mb=0.5))) as c:
        big = {"messages": [{"role": "user", "content": "word " * 200_000}]}
        r = post(c, "/v1/chat/completions", big)
        assert r.status_code == 413
        assert "--max-body-mb" in r.json()["error"]["message"]

        def chunks() -> Any:  # no Content-Length: counted as it streams in
            data = json.dumps(big).encode()
            for i in range(0, len(data), 65536):
                yield data[i : i + 65536]

        r = c.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert post(c, "/v1/chat/completions", {"messages": M, "max_tokens": 2}).status_code == 200


def test_text_longer_than_the_context_could_hold_is_refused_before_tokenizing(
    client: TestClient, engine: Engine
) -> None:
    n = engine.ctx * engine.tokenizer.longest_token_chars + 1
    r = post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * n}]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages"
    r = post(client, "/v1/completions", {"prompt": "a" * n})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt"


def test_with_a_key_metrics_and_api_docs_need_it_unless_made_public(engine: Engine) -> None:
    with TestClient(create_app(engine, ServerConfig(api_key="sekret"))) as c:
        for page in ("/metrics", "/docs", "/redoc", "/openapi.json"):
            assert c.get(page).status_code == 401
            assert c.get(page, headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert c.get("/health").status_code == 200
        assert c.get("/v1/models", headers={"x-api-key": "sekret"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekre"}).status_code == 401
    with TestClient(create_app(engine, ServerConfig(api_key="sekret", metrics_public=True))) as c:
        assert c.get("/metrics").status_code == 200


def test_an_image_part_is_a_400_naming_it(client: TestClient) -> None:
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    r = post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages[0].content[1].type"


def test_models_retrieve_and_the_paths_without_v1(client: TestClient, engine: Engine) -> None:
    name = client.get("/v1/models").json()["data"][0]["id"]
    assert client.get(f"/v1/models/{name}").json()["id"] == name
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/models").json()["data"][0]["id"] == name
    r = post(client, "/chat/completions", {"messages": M, "max_tokens": 2})
    assert r.status_code == 200
    assert r.json()["object"] == "chat.completion"
    assert post(client, "/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_stop_string_past_1024_characters_is_a_400(client: TestClient) -> None:
    r = post(client, "/v1/chat/completions", {"messages": M, "stop": ["x" * 100_000] * 16})
    assert r.status_code == 400
    assert r.json()["error"]["param"].startswith("stop")
    r = post(client, "/v1/messages", {"max_tokens": 4, "messages": M, "stop_sequences": ["x" * 2000]})
    assert r.status_code == 400
    assert r.json()["type"] == "error"


def test_a_loaded_server_leaves_its_objects_out_of_garbage_collection() -> None:
    """A full collection scanned every object the process had loaded (the engine thread stopped 170-180 ms);
    once frozen, it scans only what came after. Run apart: freezing would keep this session's engines."""
    code = (
        "import gc\n"
        "from anchorkv.config import EngineConfig\n"
        "from anchorkv.engine.allocator import freeze_loaded_objects\n"
        "from anchorkv.engine.engine import Engine\n"
        "engine = Engine(EngineConfig(threads=1, kv_prefault=False))\n"
        "freeze_loaded_objects()\n"
        "print(gc.get_freeze_count(), len(gc.get_objects()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    frozen, tracked = map(int, out.stdout.split())
    assert frozen > 100_000
    assert tracked < frozen // 100

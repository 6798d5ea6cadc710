"""schemathesis against the live app: whatever the schema accepts, the server never answers 5xx."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok

from anchorkv.config import EngineConfig, ServerConfig
from anchorkv.engine.engine import Engine
from anchorkv.server.app import create_app
from conftest import LiveServer, serve_in_thread

EXAMPLES = int(os.environ.get("ANCHORKV_FUZZ_EXAMPLES", "12"))  # per operation; more, and random, when set


@pytest.fixture(scope="module")
def small_live() -> Iterator[LiveServer]:
    """A server whose context is 64 tokens, so a generated max_tokens never runs long."""
    yield from serve_in_thread(create_app(Engine(EngineConfig(threads=2, ctx=64, parallel=2)), ServerConfig()))


def test_no_input_the_schema_accepts_gets_a_server_error(small_live: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(small_live.url + "/openapi.json")
    errors: list[str] = []
    found = list(schema.get_all_operations())
    operations = [op.ok() for op in found if isinstance(op, Ok)]
    assert len(operations) == len(found) > 10

    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize="ANCHORKV_FUZZ_EXAMPLES" not in os.environ,
        )
        def fuzz(case: schemathesis.Case) -> None:
            r = case.call(base_url=small_live.url, timeout=60)
            if r.status_code >= 500:
                errors.append(f"{case.method} {case.path} {case.body!r:.300} -> {r.status_code} {r.text[:200]}")

        fuzz()
    assert not errors, "\n".join(errors)

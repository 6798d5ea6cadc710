"""The OpenAI Agents SDK (`openai-agents`) runs an agent with one function tool against anchorkv, two
turns each, through /v1/responses and through chat completions; the second turn restores the first."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.models.interface import Model
from openai import AsyncOpenAI

from anchorkv.config import ServerConfig
from conftest import LiveServer, cached_server

set_tracing_disabled(True)  # traces would go to OpenAI's servers

CITIES: list[str] = []


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    CITIES.append(city)
    return f"It is sunny in {city}."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from cached_server(tmp_path_factory, ServerConfig())


def _model(kind: str, url: str) -> Model:
    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    if kind == "responses":
        return OpenAIResponsesModel(model="anchorkv", openai_client=client)
    return OpenAIChatCompletionsModel(model="anchorkv", openai_client=client)


@pytest.mark.parametrize("kind", ["responses", "chat"])
def test_an_agent_with_a_tool_runs_two_turns_and_the_second_hits_the_cache(server: LiveServer, kind: str) -> None:
    agent = Agent(
        name="weather",
        instructions="You answer questions about the weather. Always call get_weather.",
        tools=[get_weather],
        model=_model(kind, server.url),
        model_settings=ModelSettings(temperature=0, max_tokens=160, tool_choice="required", parallel_tool_calls=False),
        tool_use_behavior="stop_on_first_tool",  # the tool's answer ends the turn: the model is too small to
    )
    CITIES.clear()
    first = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=2)
    assert CITIES
    assert first.final_output == f"It is sunny in {CITIES[0]}."
    follow_up = [*first.to_input_list(), {"role": "user", "content": "And in Rome?"}]
    second = Runner.run_sync(agent, follow_up, max_turns=2)  # type: ignore[arg-type]
    assert len(CITIES) == 2
    assert second.final_output == f"It is sunny in {CITIES[1]}."
    usage = second.raw_responses[0].usage
    assert usage.input_tokens > 0
    assert usage.input_tokens_details.cached_tokens > 0  # the first turn's prefix, restored

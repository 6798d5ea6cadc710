"""Request schemas for the OpenAI endpoints. Fields we do not use are accepted and ignored, as OpenAI's are."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from openai.types.chat import ChatCompletionFunctionTool
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from anchorkv.cache.policy import MAX_ANCHORS, PolicyError, Scope, parse_scope
from anchorkv.engine.sampling import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS
from anchorkv.model.chat_template import TEXT_PARTS

Role = Literal["system", "developer", "user", "assistant", "tool"]
MAX_CHOICES = 8  # n: each choice after the first restores the whole prompt, so it costs its decode only
MAX_PROMPTS = 16  # a /v1/completions batch: its prompts wait for slots as that many requests would


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string in value holding a lone UTF-16 surrogate (JSON allows "\\ud800"; no
    tokenizer can read it), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = lone_surrogate(v, f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}" if path else str(k))
        if found is not None:
            return found
    return None


class RequestBody(BaseModel):
    """A request's top level: text must be text."""

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data: Any) -> Any:
        if (path := lone_surrogate(data)) is not None:
            raise ValueError(f"{path} holds a lone UTF-16 surrogate, which is not text")
        return data


class CacheControl(BaseModel):
    type: Literal["ephemeral"]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    cache_control: CacheControl | None = None  # anchors at the end of this part (rounded down to a prefill cut)

    @field_validator("type")
    @classmethod
    def _text_only(cls, kind: str) -> str:
        if kind not in TEXT_PARTS:
            raise ValueError(f"this model reads text only, not {kind!r} parts")
        return kind


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Role
    cache_control: CacheControl | None = None  # anchor the cache at the end of this message
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @property
    def marked(self) -> bool:
        """cache_control on the message or on its last text part: an anchor at the message's end."""
        texts = [p for p in self.content if p.type in TEXT_PARTS] if isinstance(self.content, list) else []
        return self.cache_control is not None or bool(texts and texts[-1].cache_control is not None)

    @property
    def marked_parts(self) -> list[int]:
        """The text parts before the last that carry cache_control: anchors at their own ends."""
        parts = self.content if isinstance(self.content, list) else []
        texts = [j for j, p in enumerate(parts) if p.type in TEXT_PARTS]
        return [j for j in texts[:-1] if parts[j].cache_control is not None]

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


class PrefixCacheOptions(BaseModel):
    scope: str | None = None  # off | full | auto | auto:N | N
    window: Annotated[int, Field(ge=1)] | None = None

    @field_validator("scope")
    @classmethod
    def _valid_scope(cls, scope: str | None) -> str | None:
        if scope is not None:
            try:
                parse_scope(scope)
            except PolicyError as e:
                raise ValueError(str(e)) from None
        return scope

    def resolve(self, default: Scope) -> Scope:
        if self.scope is None:
            return parse_scope(str(default), self.window) if self.window is not None else default
        return parse_scope(self.scope, self.window)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # llama.cpp: json_object with a schema

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs json_schema: {"name": ..., "schema": {...}}')
        return self


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


AnchorCount = Annotated[int, Field(ge=0, strict=True)]
# every generated token is checked against each stop string's prefixes: a bound keeps that cheap
StopString = Annotated[str, Field(max_length=1024)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS, strict=True)]
TokenId = Annotated[int, Field(ge=0)]  # logit_bias's keys: JSON keys are strings, "123" reads as 123
Bias = Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]
MAX_BIASED = 1024  # logit_bias entries a request may carry (OpenAI's limit is lower)


class FunctionTool(ChatCompletionFunctionTool):
    """A chat tool, checked as the SDK's type (a string name; an object of parameters); `type` may be left out."""

    type: Literal["function"] = "function"

    @model_validator(mode="before")
    @classmethod
    def _function_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type", "function") != "function":
            raise ValueError(f"type must be function (the only kind of tool a reply can call), not {data['type']!r}")
        return data


def offered_tool(chat_param: str, offered: Sequence[int]) -> int | None:
    """For `tools[i].function.parameters` of a chat request translated from an agent API's: where that tool
    is in the agent API's request, whose tools `offered` lists by place; else None."""
    m = re.fullmatch(r"tools\[(\d+)\]\.function\.parameters", chat_param)
    return None if m is None else offered[int(m[1])]


def tool_dicts(tools: list[FunctionTool] | None) -> list[dict[str, Any]] | None:
    """The tools for the chat template, as OpenAI's clients send them: `type` first, then `function` with
    the fields the client set."""
    return None if tools is None else [{"type": "function", **t.model_dump(exclude_unset=True)} for t in tools]


class SamplingFields(RequestBody):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0  # vLLM extension, over prompt and reply tokens
    logit_bias: Annotated[dict[TokenId, Bias], Field(max_length=MAX_BIASED)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None  # the range torch's generator takes
    stop: StopString | Annotated[list[StopString], Field(max_length=16)] | None = None
    ignore_eos: bool = False  # llama.cpp extension: generate max_tokens even past end-of-sequence
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES, strict=True)] = 1  # choices, generated one after another
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    json_schema: dict[str, Any] | None = None  # llama.cpp extension: the output follows this JSON schema
    grammar: str | None = None  # llama.cpp extension: the output follows this GBNF (or Lark) grammar
    prompt_cache_key: str | None = None
    prompt_cache_anchor_tokens: AnchorCount | Annotated[list[AnchorCount], Field(max_length=MAX_ANCHORS)] | None = None
    prefix_cache: PrefixCacheOptions | None = None
    cache_salt: str | None = None

    @property
    def anchor_list(self) -> list[int]:
        a = self.prompt_cache_anchor_tokens
        return [] if a is None else [a] if isinstance(a, int) else list(a)

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprob_alternatives(self) -> int | None:
        """How many alternatives to report with each token's log-probability; None: no log-probabilities."""
        return None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None

    @field_validator("tool_choice")
    @classmethod
    def _choice_offered(cls, choice: str | NamedToolChoice | None, info: ValidationInfo) -> Any:
        if choice is None or choice in ("none", "auto") or "tools" not in info.data:
            return choice  # tools that failed their own check are the error to report
        names = [t.function.name for t in info.data.get("tools") or []]
        if not names:
            raise ValueError("a required or named tool choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"{choice.function.name!r} is not among the tools ({', '.join(map(str, names))})")
        return choice

    @property
    def calls_tools(self) -> bool:
        """Whether tool calls in the reply come back as tool_calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def calls_allowed(self) -> int:
        """How many tool calls a reply may carry: 0 without tools, 1 with parallel_tool_calls false."""
        return 0 if not self.calls_tools else 2**31 if self.parallel_tool_calls else 1

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    @property
    def logprob_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# strict, so that in a union ["1"] is text, not the token 1
Text = Annotated[str, Field(min_length=1, strict=True)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, strict=True)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: (
        Text
        | TokenIds
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )  # one prompt, or a batch
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: TopLogprobs | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported (prompt tokens get no log-probabilities here)")
        return echo

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("fill-in-the-middle is not supported here (send the prompt alone)")
        return suffix

    @field_validator("best_of")
    @classmethod
    def _every_choice_returned(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        if best_of is not None and best_of != info.data.get("n", 1):
            raise ValueError("only best_of equal to n is supported: every choice generated is returned (use n)")
        return best_of

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts to complete: the one sent, or each of a batch."""
        p = self.prompt
        if isinstance(p, str) or isinstance(p[0], int):
            return [p]
        return list(p)

    @property
    def logprob_alternatives(self) -> int | None:
        return self.logprobs


class TokenizeRequest(RequestBody):
    """POST /tokenize: a string as /v1/completions would read it, or messages as /v1/chat/completions would."""

    model_config = ConfigDict(extra="ignore")
    content: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    tools: list[FunctionTool] | None = None
    add_generation_prompt: bool = True  # messages only: end with the assistant's header, as a chat request does
    with_pieces: bool = False  # llama.cpp: [{"id", "piece"}] instead of bare ids

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.content is None) == (self.messages is None):
            raise ValueError("send either content (a string) or messages (a chat), not both or neither")
        return self


class DetokenizeRequest(RequestBody):
    model_config = ConfigDict(extra="ignore")
    tokens: list[Annotated[int, Field(ge=0)]]


class ApplyTemplateRequest(RequestBody):
    model_config = ConfigDict(extra="ignore")
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[FunctionTool] | None = None

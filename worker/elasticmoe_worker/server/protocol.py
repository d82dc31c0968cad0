"""OpenAI-compatible request and response bodies for the HTTP API.

Why this module exists: the HTTP layer (`api.py`) and the benchmark clients need one typed
description of what goes over the wire, apart from the code that serves it. Requests are
validated strictly (`"5"` is not an integer, `1` is not a boolean) so that a mistyped field
is a 400 naming that field rather than a silent coercion.

Policy on fields:
- unknown fields are ignored, as OpenAI does (clients send `user`, `metadata`, ...);
- known fields that would change the output but that this server cannot honour (`n > 1`,
  `echo`, `logprobs`, penalties, tools, ...) are refused with a 400 naming the field, never
  ignored: a client must not get a different answer than it asked for without knowing;
- range checks of sampling values live in `engine.types.SamplingParams`, the one place the
  engine relies on; this module only checks shapes and types.

What it does not guarantee: byte-for-byte equality with OpenAI's responses. Fields we never
produce (logprobs, tool calls, system_fingerprint) are null or absent.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Sequence

import pydantic
from pydantic import BaseModel, ConfigDict, Field

_REQUEST_CONFIG = ConfigDict(extra="ignore", strict=True)

# (field, value that means "not used") for fields that change the output and that this
# server cannot honour. A request that sets one to anything else gets a 400 naming it.
_UNSUPPORTED_COMMON: tuple[tuple[str, Any], ...] = (
    ("presence_penalty", 0),
    ("frequency_penalty", 0),
    ("logit_bias", {}),
)
_UNSUPPORTED_COMPLETION: tuple[tuple[str, Any], ...] = _UNSUPPORTED_COMMON + (
    ("echo", False),
    ("logprobs", 0),
    ("best_of", 1),
    ("suffix", ""),
)
_UNSUPPORTED_CHAT: tuple[tuple[str, Any], ...] = _UNSUPPORTED_COMMON + (
    ("logprobs", False),
    ("top_logprobs", 0),
    ("tools", []),
    ("tool_choice", "none"),
    ("functions", []),
    ("response_format", {"type": "text"}),
)


class FieldError(ValueError):
    """A request-level check failed; `param` names the field (pydantic cannot tell it)."""

    code: str | None = None

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class UnsupportedFieldError(FieldError):
    """A request sets a field this server does not implement."""

    code = "unsupported_field"

    def __init__(self, param: str, value: Any, expected: str) -> None:
        super().__init__(param, f"got {value!r}, but this server does not support it; {expected}")


def _check_unsupported(raw: dict[str, Any], table: tuple[tuple[str, Any], ...]) -> None:
    for name, unused in table:
        value = raw.get(name)
        if value is None or value == unused or (unused == {} and value == []):
            continue
        raise UnsupportedFieldError(name, value, f"leave it out or set it to {unused!r}")
    n = raw.get("n")
    if n is not None and n != 1:
        raise UnsupportedFieldError("n", n, "only n=1 (one choice per request) is supported")


class StreamOptions(BaseModel):
    model_config = _REQUEST_CONFIG

    include_usage: bool | None = False


class SamplingFields(BaseModel):
    """Fields shared by both endpoints. `None` means "use the default"."""

    model_config = _REQUEST_CONFIG

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    # NOTE: extensions (vLLM spells them the same): not in OpenAI's API.
    top_k: int | None = None
    ignore_eos: bool | None = False
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None

    @pydantic.field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value
        raise ValueError("expected a string or a list of strings")

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        if isinstance(self.stop, str):
            return (self.stop,)
        return tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    """Body of POST /v1/completions."""

    prompt: str | list[int] | list[str]

    @pydantic.model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            _check_unsupported(raw, _UNSUPPORTED_COMPLETION)
        return raw

    @pydantic.field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            if all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
                return value
            if all(isinstance(s, str) for s in value):
                if len(value) != 1:
                    raise ValueError("expected exactly one prompt per request; batched prompts are not supported")
                return value
        raise ValueError("expected a string, a list of non-negative token ids, or a list with one string")

    def prompt_text_or_ids(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return self.prompt[0]
        return self.prompt  # type: ignore[return-value]


class TextContentPart(BaseModel):
    model_config = _REQUEST_CONFIG

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _REQUEST_CONFIG

    role: Literal["system", "user", "assistant"]
    content: str | list[TextContentPart]

    @pydantic.field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        if isinstance(value, (str, list)):
            return value
        raise ValueError("expected a string or a list of {'type': 'text', 'text': ...} parts")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            _check_unsupported(raw, _UNSUPPORTED_CHAT)
        return raw

    @pydantic.model_validator(mode="after")
    def _one_token_limit(self) -> ChatCompletionRequest:
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise FieldError(
                "max_completion_tokens", f"got {b} while max_tokens is {a}; expected only one of them, or equal values"
            )
        return self

    def output_token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def messages_as_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


# ---------------------------------------------------------------- describing bad requests

_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def param_of(loc: Sequence[Any]) -> str | None:
    """`("body", "messages", 0, "content")` -> `"messages[0].content"`.

    Union member tags that pydantic adds to locations (`"str"`, `"list[int]"`) are dropped.
    """
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif (item == "body" and not parts) or "[" in str(item) or item in _UNION_TAGS:
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or None


def _short_repr(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_validation_errors(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None, str | None]:
    """pydantic/FastAPI error dicts -> (message, param, code) for an OpenAI error body.

    The message names each bad field, what was expected and the value received.
    """
    if not errors:
        return "request body is invalid", None, None
    if errors[0].get("type") == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error", "")
        return f"request body is not valid JSON: {detail}".rstrip(": "), None, None
    messages: list[str] = []
    param: str | None = None
    for err in errors:
        inner = err.get("ctx", {}).get("error")
        if isinstance(inner, FieldError):
            # Raised by a model-level check: the field is in the exception, not the location.
            return str(inner), inner.param, inner.code
        this_param = param_of(err.get("loc", ()))
        param = param or this_param
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "missing":
            messages.append(f"{this_param or 'body'}: field required")
        elif this_param is None and err.get("type") == "model_attributes_type":
            messages.append(f"request body: expected a JSON object, got {_short_repr(err.get('input'))}")
        else:
            messages.append(f"{this_param or 'body'}: {msg[:1].lower()}{msg[1:]} (got {_short_repr(err.get('input'))})")
    return "; ".join(messages), param, None


# ---------------------------------------------------------------- responses


def now_s() -> int:
    """Unix time in whole seconds, as OpenAI's `created` fields carry it."""
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, num_prompt_tokens: int, num_output_tokens: int) -> UsageInfo:
        return cls(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=num_output_tokens,
            total_tokens=num_prompt_tokens + num_output_tokens,
        )


FinishReasonStr = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReasonStr | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now_s)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class CompletionChunk(CompletionResponse):
    """One SSE event of a streamed completion (OpenAI reuses the `text_completion` object)."""


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReasonStr | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now_s)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReasonStr | None = None

    @pydantic.field_serializer("delta")
    def _delta_without_nulls(self, delta: ChatDelta) -> dict[str, Any]:
        # OpenAI sends only the keys that changed: {"role": ...} first, then {"content": ...}.
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now_s)
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now_s)
    owned_by: str = "elasticmoe"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo

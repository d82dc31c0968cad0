"""Typed values that cross the boundary between the HTTP layer and the engine.

Pure data (no torch): the HTTP layer, the benchmark and, later, the coordinator import this
module without pulling in the model code. Validation here raises `ValueError` whose message
starts with the field (`"top_p: got 2, expected ..."`), then the bad value and what is
expected, so the HTTP layer can turn it into an OpenAI-style 400 without guessing.

A request the engine refuses once it is queued (a token id outside the vocabulary, a full
queue) ends with one `refusal` output, the same from an in-process engine and from an
executor process, so both reach the client as the same 4xx.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import AsyncIterator, Protocol, Sequence

from elasticmoe_worker.contract import wire


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # client went away or the request was cancelled
    ERROR = "error"  # the engine failed while the request was in flight


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token and when to stop.

    temperature == 0 means greedy. top_k <= 0 means no top-k cut; top_p == 1 means no
    nucleus cut. A seed makes sampling reproducible for this request alone.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: got {self.max_tokens!r}, expected an integer >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature: got {self.temperature!r}, expected a number in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: got {self.top_p!r}, expected a number in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k: got {self.top_k!r}, expected an integer >= 0 (0 disables it)")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed: got {self.seed!r}, expected a non-negative integer")
        if len(self.stop) > 8 or any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise ValueError(f"stop: got {list(self.stop)!r}, expected at most 8 non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass
class RequestOutput:
    """One update for one request, as the engine streams it.

    `text` and `token_ids` are the *new* text and tokens since the previous update (deltas);
    text that might still turn into a stop string is held back until it cannot.
    `finish_reason` is set on the last update only.
    """

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    # Set with `error` when the request was refused rather than failed: "invalid_request"
    # (the caller's input; `error_param` names the field) or "overloaded" (see contract.wire.ErrorKind).
    error_kind: str | None = None
    error_param: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics, health and load balancing."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions_total: int
    healthy: bool
    error: str | None = None
    # tokens computed again that were in a KV cache before (preempted, or adopted without their KV)
    num_recomputed_tokens_total: int = 0


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: the caller should retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineDead(RuntimeError):
    """The engine loop failed; requests cannot be served until it is restarted."""


def param_of(message: str) -> str | None:
    """The field a validation message starts with (`"top_p: got 2, ..."` -> "top_p"), if any."""
    head, sep, _ = message.partition(":")
    return head if sep and head.isidentifier() else None


def refusal(request_id: str, exc: ValueError | EngineOverloaded, num_prompt_tokens: int) -> RequestOutput:
    """The first and final output of a request that `add_request` refused with `exc`:
    a `ValueError` is the caller's input, `EngineOverloaded` a full queue."""
    if isinstance(exc, EngineOverloaded):
        kind, param = wire.ErrorKind.OVERLOADED, None
    else:
        kind, param = wire.ErrorKind.INVALID_REQUEST, param_of(str(exc))
    return RequestOutput(request_id=request_id, text="", token_ids=[], finish_reason=FinishReason.ERROR,
                         num_prompt_tokens=num_prompt_tokens, error=str(exc), error_kind=kind.value,
                         error_param=param)


class EngineClient(Protocol):
    """What the HTTP layer needs from an engine (single device now, an instance later)."""

    model_name: str
    max_model_len: int

    def tokenize(self, text: str) -> list[int]: ...

    def apply_chat_template(self, messages: Sequence[dict]) -> list[int]: ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream updates; raises EngineOverloaded or EngineDead before the first one.

        A request refused once queued gets one `refusal` output instead (`error_kind` set).

        Cancelling the iteration (client disconnect) aborts the request and frees its blocks.
        """
        ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

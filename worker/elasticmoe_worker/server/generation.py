"""One generation request's run through the engine, and how it is answered: OpenAI error
bodies for refusals, the first-update wait where overload and death are reported, disconnect
detection, metrics accounting, and server-sent events.

Why apart from `api`: the endpoints (`api`) decide what to generate; this module is the one
request lifecycle they all share (see `api`'s docstring for the steps).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any, AsyncIterator

import anyio
import fastapi
import pydantic
from fastapi import responses

from elasticmoe_worker.contract import wire
from elasticmoe_worker.engine import types
from elasticmoe_worker.server import metrics as metrics_mod
from elasticmoe_worker.server import protocol

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"
# A dead engine needs a restart by the supervisor; clients should not hammer it meanwhile.
ENGINE_DEAD_RETRY_AFTER_S = 5
# A request that waited max_waiting_s for its first token may find room soon after.
QUEUE_TIMEOUT_RETRY_AFTER_S = 1
# An executor's full queue says no more than `EngineOverloaded`'s default.
RANK_OVERLOADED_RETRY_AFTER_S = 1


class ApiError(Exception):
    """A refusal to be sent as an OpenAI error body; `reject_reason` is counted if set."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        reject_reason: str | None = metrics_mod.REJECT_INVALID_REQUEST,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers
        self.reject_reason = reject_reason


class ClientDisconnected(Exception):
    """The client closed the connection; there is nobody left to answer."""


def error_response(err: ApiError) -> responses.JSONResponse:
    body = protocol.ErrorResponse(
        error=protocol.ErrorInfo(message=err.message, type=err.type, param=err.param, code=err.code)
    )
    return responses.JSONResponse(body.model_dump(), status_code=err.status_code, headers=err.headers)


def overloaded_error(reason: str, retry_after_s: int) -> ApiError:
    retry = str(max(1, int(retry_after_s)))
    return ApiError(429, f"the engine is overloaded: {reason}; retry after {retry} s", type="rate_limit_error",
                    code="engine_overloaded", headers={"Retry-After": retry},
                    reject_reason=metrics_mod.REJECT_OVERLOADED)


def engine_dead_error(exc: types.EngineDead) -> ApiError:
    return ApiError(503, f"the engine is not running: {exc}", type="server_error", code="engine_dead",
                    headers={"Retry-After": str(ENGINE_DEAD_RETRY_AFTER_S)}, reject_reason=metrics_mod.REJECT_ENGINE_DEAD)


def refusal_error(out: types.RequestOutput) -> ApiError | None:
    """The 4xx for a `types.refusal` update; None for any other update."""
    if out.finish_reason is not types.FinishReason.ERROR or out.error is None:
        return None
    if out.error_kind == wire.ErrorKind.INVALID_REQUEST:
        return ApiError(400, out.error, param=out.error_param or "prompt")
    if out.error_kind == wire.ErrorKind.OVERLOADED:
        return overloaded_error(out.error, RANK_OVERLOADED_RETRY_AFTER_S)
    return None


@dataclasses.dataclass
class AppState:
    engine: types.EngineClient
    model_name: str
    max_waiting_s: float | None
    metrics: metrics_mod.ServerMetrics


class Generation:
    """One request's run through the engine, with disconnect detection and metrics.

    `start()` waits for the first update (where overload and death are reported);
    `outputs()` yields that update and all later ones, exactly once.
    """

    def __init__(
        self,
        state: AppState,
        request: fastapi.Request,
        request_id: str,
        prompt_token_ids: list[int],
        params: types.SamplingParams,
        arrival_s: float,
    ) -> None:
        self._state = state
        self._request = request
        self.request_id = request_id
        self._prompt_token_ids = prompt_token_ids
        self._params = params
        self._arrival_s = arrival_s
        self._iterator: AsyncIterator[types.RequestOutput] | None = None
        self._step: asyncio.Future | None = None
        self._disconnect: asyncio.Task | None = None
        self._first: types.RequestOutput | None = None
        self._first_token_s: float | None = None
        self._last_token_s: float | None = None
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_output_tokens = 0
        self.finish_reason: types.FinishReason | None = None
        self._closed = False
        self._waiter: asyncio.Task | None = None  # the task awaiting the next update, while it does
        self._cancelled_waiter = False

    async def start(self) -> None:
        engine = self._state.engine
        self._state.metrics.waiting(self.request_id, self._arrival_s)
        self._disconnect = asyncio.create_task(wait_for_disconnect(self._request))
        self._disconnect.add_done_callback(self._on_disconnect)
        try:
            self._iterator = aiter(engine.generate(self.request_id, self._prompt_token_ids, self._params))
            first = await self._next(timeout_s=self._state.max_waiting_s)
        except types.EngineOverloaded as exc:
            await self.close(counted=False)
            raise overloaded_error(str(exc), exc.retry_after_s) from exc
        except types.EngineDead as exc:
            await self.close(counted=False)
            raise engine_dead_error(exc) from exc
        except TimeoutError:
            await self.close(counted=False)
            raise ApiError(
                429, f"no output within max_waiting_s={self._state.max_waiting_s} s; the server is busy",
                type="rate_limit_error", code="queue_timeout",
                headers={"Retry-After": str(QUEUE_TIMEOUT_RETRY_AFTER_S)},
                reject_reason=metrics_mod.REJECT_QUEUE_TIMEOUT,
            ) from None
        except StopAsyncIteration:
            await self.close(counted=False)
            raise ApiError(500, "the engine ended the request without any output", type="server_error",
                           reject_reason=None) from None
        except (ClientDisconnected, asyncio.CancelledError):
            await self.close()
            raise
        except Exception:
            await self.close(failed=True)
            raise
        refused = refusal_error(first)
        if refused is not None:
            self.finish_reason = first.finish_reason  # ended in the engine already: nothing to abort
            await self.close(counted=False)
            raise refused
        self._first = first
        self._account(first)

    async def outputs(self) -> AsyncIterator[types.RequestOutput]:
        """Yields every update; the caller must call `close()` (also on cancellation)."""
        assert self._first is not None, "start() first"
        out, self._first = self._first, None
        yield out
        while not out.finished:
            try:
                out = await self._next(timeout_s=None)
            except StopAsyncIteration:
                raise RuntimeError("the engine stopped streaming before the request finished") from None
            self._account(out)
            yield out

    def _on_disconnect(self, task: asyncio.Task) -> None:
        if task.cancelled():  # close() stopped listening: not a disconnect
            return
        if self._waiter is not None and not self._waiter.done():
            self._cancelled_waiter = True
            self._waiter.cancel()

    async def _next(self, timeout_s: float | None) -> types.RequestOutput:
        assert self._iterator is not None and self._disconnect is not None
        if self._disconnect.done():
            raise ClientDisconnected()
        if timeout_s is None:
            # NOTE: awaited directly, not as a task raced against the disconnect: one task and one
            # asyncio.wait per streamed token held the HTTP thread (and so the GIL the engine thread
            # steps with) long enough to cost ~10 % of bench serve's tokens/s. A disconnect cancels
            # this wait instead (`_on_disconnect`).
            self._waiter, self._cancelled_waiter = asyncio.current_task(), False
            try:
                return await anext(self._iterator)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._cancelled_waiter and task is not None and task.uncancel() == 0:
                    raise ClientDisconnected() from None
                raise
            finally:
                self._waiter = None
        self._step = asyncio.ensure_future(anext(self._iterator))
        done, _ = await asyncio.wait({self._step, self._disconnect}, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self._step in done:
            step, self._step = self._step, None
            return step.result()
        if self._disconnect in done:
            raise ClientDisconnected()
        raise TimeoutError()

    def _account(self, out: types.RequestOutput) -> None:
        m = self._state.metrics
        now_s = time.perf_counter()
        if out.num_prompt_tokens:
            self.num_prompt_tokens = out.num_prompt_tokens
        if out.token_ids:
            if self._first_token_s is None:
                self._first_token_s = now_s
                m.time_to_first_token_s.observe(now_s - self._arrival_s)
                m.not_waiting(self.request_id)
                m.prompt_tokens.inc(self.num_prompt_tokens)
            else:
                assert self._last_token_s is not None
                gap_s = (now_s - self._last_token_s) / len(out.token_ids)
                for _ in out.token_ids:
                    m.inter_token_latency_s.observe(gap_s)
            self._last_token_s = now_s
            self.num_output_tokens += len(out.token_ids)
            m.generation_tokens.inc(len(out.token_ids))
        self.num_output_tokens = max(self.num_output_tokens, out.num_output_tokens)
        if not out.finished:
            return
        self.finish_reason = out.finish_reason
        m.finish(out.finish_reason)
        if out.finish_reason in (types.FinishReason.STOP, types.FinishReason.LENGTH):
            m.e2e_request_latency_s.observe(now_s - self._arrival_s)
            if self._first_token_s is not None and self.num_output_tokens > 1:
                assert self._last_token_s is not None
                gap_s = (self._last_token_s - self._first_token_s) / (self.num_output_tokens - 1)
                m.time_per_output_token_s.observe(gap_s)

    async def close(self, *, counted: bool = True, failed: bool = False) -> None:
        """Stops the engine run if it has not finished; idempotent, safe under cancellation.

        `counted=False` for runs refused before any output (counted as rejections instead).
        """
        if self._closed:
            return
        self._closed = True
        self._state.metrics.not_waiting(self.request_id)
        if self.finish_reason is None:
            try:
                self._state.engine.abort(self.request_id)
            except Exception:
                logger.debug("engine.abort(%s) failed", self.request_id, exc_info=True)
            if counted:
                self._state.metrics.finish(types.FinishReason.ERROR if failed else types.FinishReason.ABORT)
        # NOTE: shielded so that a cancelled stream (client gone) still closes the engine's
        # generator, which is what frees its KV blocks.
        with anyio.CancelScope(shield=True):
            for task in (self._step, self._disconnect):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            aclose = getattr(self._iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    logger.debug("closing the engine stream of %s failed", self.request_id, exc_info=True)


async def wait_for_disconnect(request: fastapi.Request) -> None:
    # The body has been read already, so the next ASGI message is `http.disconnect`.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class GenerationStream(responses.StreamingResponse):
    """An SSE response that closes its generation however the response ends.

    Starlette may cancel the body before it starts (client gone between the first output
    and the response headers); the body's own `finally` would then never run.
    """

    def __init__(self, gen: Generation, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._gen = gen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._gen.close()


def engine_failure_message(out: types.RequestOutput) -> str:
    if out.finish_reason is types.FinishReason.ABORT:
        return "the request was aborted by the server"
    return f"the engine failed while generating: {out.error or 'unknown error'}"


def sse(payload: pydantic.BaseModel | dict) -> str:
    text = payload.model_dump_json() if isinstance(payload, pydantic.BaseModel) else json.dumps(payload)
    return f"data: {text}\n\n"


def sse_error(message: str, code: str) -> str:
    return sse(protocol.ErrorResponse(error=protocol.ErrorInfo(message=message, type="server_error", code=code)))

"""OpenAI-compatible HTTP API in front of one `EngineClient`.

Why this module exists: users, the benchmark and the autoscaler reach the serving plane
through HTTP. This module turns OpenAI requests into engine calls and engine updates into
OpenAI responses (JSON or server-sent events), turns every refusal into an OpenAI-style error
body (`{"error": {"message", "type", "param", "code"}}`) without taking the server down, and
records what the autoscaler needs in `metrics.ServerMetrics`.

Lifecycle of one generation request:
1. the body is validated (`protocol`), the model name checked, the prompt tokenized and its
   length checked against `engine.max_model_len`; `SamplingParams` checks the values;
2. the engine is asked to generate and the *first* update is awaited before any response
   is sent, because that is when the engine reports `EngineOverloaded` (429) or `EngineDead`
   (503), or refuses the request (a `types.refusal` update: 400 naming the field, or 429),
   streaming or not, in-process engine or executors alike; `max_waiting_s` bounds this wait
   (an engine still starting, e.g. a coordinator adopting its workers, is `EngineDead` from
   step 1 on: 503 + Retry-After);
3. updates are returned whole (non-streaming) or as SSE chunks ending with `data: [DONE]`.
A client that disconnects at any point stops the iteration: the engine's generator is
cancelled and closed, and `engine.abort` is called, so its KV blocks are freed at once.

What it does not guarantee: one choice per request (n=1), no logprobs, no tools; a request
whose engine run fails after the first streamed chunk ends with an SSE error event (the HTTP
status is already 200 by then).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

import fastapi
import jinja2
import pydantic
import uvicorn
from fastapi import exceptions as fastapi_exceptions
from fastapi import responses
from starlette import exceptions as starlette_exceptions

from elasticmoe_worker.engine import types
from elasticmoe_worker.server import generation
from elasticmoe_worker.server import metrics as metrics_mod
from elasticmoe_worker.server import protocol

logger = logging.getLogger(__name__)

class _Endpoints:
    """Request handlers; one instance per app, holding that app's engine and metrics."""

    def __init__(self, state: generation.AppState) -> None:
        self.s = state

    # ------------------------------------------------------------ shared steps

    def check_model(self, model: str) -> None:
        if model != self.s.model_name:
            raise generation.ApiError(
                404, f"model: {model!r} is not served here; the served model is {self.s.model_name!r}",
                param="model", code="model_not_found", reject_reason=metrics_mod.REJECT_MODEL_NOT_FOUND,
            )

    def sampling_params(
        self, body: protocol.SamplingFields, max_tokens: int | None, num_prompt_tokens: int, prompt_param: str,
        max_tokens_param: str,
    ) -> types.SamplingParams:
        max_len = self.s.engine.max_model_len
        if num_prompt_tokens == 0:
            raise generation.ApiError(400, f"{prompt_param}: the prompt is empty (0 tokens); expected at least one token",
                           param=prompt_param)
        if num_prompt_tokens >= max_len:
            raise generation.ApiError(
                400, f"{prompt_param}: the prompt has {num_prompt_tokens} tokens but max_model_len is {max_len}; "
                f"expected at most {max_len - 1} tokens so that at least one can be generated",
                param=prompt_param, code="context_length_exceeded", reject_reason=metrics_mod.REJECT_CONTEXT_LENGTH,
            )
        room = max_len - num_prompt_tokens
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise generation.ApiError(
                400, f"{max_tokens_param}: prompt ({num_prompt_tokens} tokens) + {max_tokens_param} ({max_tokens}) = "
                f"{num_prompt_tokens + max_tokens} exceeds max_model_len {max_len}; expected at most {room}",
                param=max_tokens_param, code="context_length_exceeded",
                reject_reason=metrics_mod.REJECT_CONTEXT_LENGTH,
            )
        try:
            return types.SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=0 if body.top_k is None else body.top_k,
                seed=body.seed,
                stop=body.stop_strings(),
                ignore_eos=bool(body.ignore_eos),
            )
        except ValueError as exc:
            raise generation.ApiError(400, str(exc), param=types.param_of(str(exc))) from exc

    async def run(
        self, request: fastapi.Request, request_id: str, prompt_token_ids: list[int], params: types.SamplingParams,
        arrival_s: float, stream: bool,
        make_events: Callable[[generation.Generation], AsyncIterator[str]],
        make_body: Callable[[generation.Generation, str, types.FinishReason], pydantic.BaseModel],
    ) -> fastapi.Response:
        gen = generation.Generation(self.s, request, request_id, prompt_token_ids, params, arrival_s)
        try:
            await gen.start()
        except generation.ClientDisconnected:
            logger.info("client went away before the first output of %s", request_id)
            return fastapi.Response(status_code=499)
        if stream:
            return generation.GenerationStream(gen, make_events(gen))
        pieces: list[str] = []
        failed = False
        try:
            async for out in gen.outputs():
                pieces.append(out.text)
                if out.finished and out.finish_reason not in (types.FinishReason.STOP, types.FinishReason.LENGTH):
                    logger.warning("request %s ended with %s: %s", request_id, out.finish_reason.value, out.error)
                    # A worker failure is the service being unavailable, not a bad request:
                    # 503 + Retry-After so clients back off and retry elsewhere or later.
                    raise generation.ApiError(503, generation.engine_failure_message(out), type="server_error",
                                   code=out.finish_reason.value, reject_reason=None,
                                   headers={"Retry-After": str(generation.ENGINE_DEAD_RETRY_AFTER_S)})
        except generation.ClientDisconnected:
            logger.info("client went away during %s; aborted", request_id)
            return fastapi.Response(status_code=499)
        except Exception:
            failed = True
            raise
        finally:
            await gen.close(failed=failed)
        assert gen.finish_reason is not None
        return responses.JSONResponse(make_body(gen, "".join(pieces), gen.finish_reason).model_dump(mode="json"))

    async def stream_events(
        self, gen: generation.Generation, include_usage: bool,
        chunk: Callable[[types.RequestOutput, bool], pydantic.BaseModel | None],
        usage_chunk: Callable[[protocol.UsageInfo], pydantic.BaseModel],
    ) -> AsyncIterator[str]:
        """SSE events; `chunk(out, is_first)` returns None for updates with nothing to say."""
        failed = False
        try:
            is_first = True
            async for out in gen.outputs():
                if out.finished and out.finish_reason not in (types.FinishReason.STOP, types.FinishReason.LENGTH):
                    logger.warning("request %s ended with %s: %s", gen.request_id, out.finish_reason.value, out.error)
                    yield generation.sse_error(generation.engine_failure_message(out), out.finish_reason.value)
                    break
                event = chunk(out, is_first)
                is_first = False
                if event is not None:
                    yield generation.sse(event)
            else:
                if include_usage:
                    yield generation.sse(usage_chunk(protocol.UsageInfo.of(gen.num_prompt_tokens, gen.num_output_tokens)))
            yield generation.SSE_DONE
        except generation.ClientDisconnected:
            logger.info("client went away during stream %s; aborted", gen.request_id)
        except Exception as exc:
            failed = True
            logger.exception("stream %s failed", gen.request_id)
            yield generation.sse_error(f"the server failed while streaming: {exc}", "error")
            yield generation.SSE_DONE
        finally:
            await gen.close(failed=failed)

    # ------------------------------------------------------------ endpoints

    async def completions(self, body: protocol.CompletionRequest, request: fastapi.Request) -> fastapi.Response:
        arrival_s = time.perf_counter()
        self.check_model(body.model)
        prompt = body.prompt_text_or_ids()
        prompt_ids = self.s.engine.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        params = self.sampling_params(body, body.max_tokens, len(prompt_ids), "prompt", "max_tokens")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        model = self.s.model_name

        def choice(text: str, reason: types.FinishReason | None) -> protocol.CompletionChoice:
            return protocol.CompletionChoice(text=text, finish_reason=reason.value if reason else None)

        def chunk(out: types.RequestOutput, is_first: bool) -> pydantic.BaseModel | None:
            if not out.text and not out.finished:
                return None
            return protocol.CompletionChunk(id=request_id, model=model, choices=[choice(out.text, out.finish_reason)])

        def usage_chunk(usage: protocol.UsageInfo) -> pydantic.BaseModel:
            return protocol.CompletionChunk(id=request_id, model=model, choices=[], usage=usage)

        def body_of(gen: generation.Generation, text: str, reason: types.FinishReason) -> pydantic.BaseModel:
            return protocol.CompletionResponse(
                id=request_id, model=model, choices=[choice(text, reason)],
                usage=protocol.UsageInfo.of(gen.num_prompt_tokens, gen.num_output_tokens),
            )

        return await self.run(
            request, request_id, prompt_ids, params, arrival_s, bool(body.stream),
            lambda gen: self.stream_events(gen, body.include_usage, chunk, usage_chunk), body_of,
        )

    async def chat_completions(
        self, body: protocol.ChatCompletionRequest, request: fastapi.Request
    ) -> fastapi.Response:
        arrival_s = time.perf_counter()
        self.check_model(body.model)
        try:
            prompt_ids = self.s.engine.apply_chat_template(body.messages_as_dicts())
        except (ValueError, TypeError, jinja2.TemplateError) as exc:
            raise generation.ApiError(400, f"messages: the chat template rejected them: {exc}", param="messages") from exc
        limit_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        params = self.sampling_params(body, body.output_token_limit(), len(prompt_ids), "messages", limit_param)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        model = self.s.model_name

        def chunk(out: types.RequestOutput, is_first: bool) -> pydantic.BaseModel | None:
            if not (is_first or out.text or out.finished):
                return None
            delta = protocol.ChatDelta(role="assistant" if is_first else None, content=out.text or None)
            if is_first and delta.content is None:
                delta.content = ""
            reason = out.finish_reason.value if out.finish_reason else None
            return protocol.ChatCompletionChunk(
                id=request_id, model=model, choices=[protocol.ChatChunkChoice(delta=delta, finish_reason=reason)]
            )

        def usage_chunk(usage: protocol.UsageInfo) -> pydantic.BaseModel:
            return protocol.ChatCompletionChunk(id=request_id, model=model, choices=[], usage=usage)

        def body_of(gen: generation.Generation, text: str, reason: types.FinishReason) -> pydantic.BaseModel:
            return protocol.ChatCompletionResponse(
                id=request_id, model=model,
                choices=[protocol.ChatChoice(message=protocol.AssistantMessage(content=text),
                                             finish_reason=reason.value)],
                usage=protocol.UsageInfo.of(gen.num_prompt_tokens, gen.num_output_tokens),
            )

        return await self.run(
            request, request_id, prompt_ids, params, arrival_s, bool(body.stream),
            lambda gen: self.stream_events(gen, body.include_usage, chunk, usage_chunk), body_of,
        )

    async def models(self) -> protocol.ModelList:
        return protocol.ModelList(
            data=[protocol.ModelCard(id=self.s.model_name, max_model_len=self.s.engine.max_model_len)]
        )

    async def health(self) -> fastapi.Response:
        try:
            stats = self.s.engine.stats()
        except Exception as exc:
            logger.exception("engine.stats() failed in /health")
            return responses.JSONResponse({"status": "unhealthy", "error": f"engine.stats() failed: {exc}"}, 503)
        if stats.healthy:
            return responses.JSONResponse({"status": "ok"})
        return responses.JSONResponse({"status": "unhealthy", "error": stats.error or "engine reports unhealthy"}, 503)

    async def metrics(self) -> fastapi.Response:
        body, content_type = self.s.metrics.render()
        return fastapi.Response(content=body, media_type=content_type)


def build_app(
    engine: types.EngineClient, *, max_waiting_s: float | None = None, served_model_name: str | None = None
) -> fastapi.FastAPI:
    """An app serving `engine` under `served_model_name` (default: `engine.model_name`).

    `max_waiting_s` bounds the wait for a request's first output token; past it the request
    is aborted and answered 429 with `Retry-After` (None: wait as long as it takes).
    """
    if max_waiting_s is not None and not max_waiting_s > 0:
        raise ValueError(f"max_waiting_s: got {max_waiting_s!r}, expected a positive number of seconds or None")
    state = generation.AppState(
        engine=engine,
        model_name=served_model_name or engine.model_name,
        max_waiting_s=max_waiting_s,
        metrics=metrics_mod.ServerMetrics(engine.stats, getattr(engine, "scaling_counters", None)),
    )
    endpoints = _Endpoints(state)
    app = fastapi.FastAPI(title="ElasticMoE OpenAI-compatible API")
    app.state.elasticmoe = state

    @app.exception_handler(generation.ApiError)
    async def _on_api_error(request: fastapi.Request, exc: generation.ApiError) -> fastapi.Response:
        if exc.reject_reason is not None:
            state.metrics.reject(exc.reject_reason)
        # debug, not info: under overload every refused request would log a line.
        logger.debug("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc.message)
        return generation.error_response(exc)

    @app.exception_handler(fastapi_exceptions.RequestValidationError)
    async def _on_validation_error(
        request: fastapi.Request, exc: fastapi_exceptions.RequestValidationError
    ) -> fastapi.Response:
        message, param, code = protocol.describe_validation_errors(list(exc.errors()))
        return await _on_api_error(request, generation.ApiError(400, message, param=param, code=code))

    @app.exception_handler(starlette_exceptions.HTTPException)
    async def _on_http_error(request: fastapi.Request, exc: starlette_exceptions.HTTPException) -> fastapi.Response:
        # Unknown paths and wrong methods: same error shape as everything else, not counted.
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return generation.error_response(generation.ApiError(exc.status_code, message, code=str(exc.detail).lower().replace(" ", "_"),
                                        headers=getattr(exc, "headers", None), reject_reason=None))

    @app.exception_handler(types.EngineDead)
    async def _on_engine_dead(request: fastapi.Request, exc: types.EngineDead) -> fastapi.Response:
        # from the engine's model facts too (tokenizer, max_model_len): a coordinator still
        # learning the model from its workers after a restart
        return await _on_api_error(request, generation.engine_dead_error(exc))

    @app.exception_handler(Exception)
    async def _on_unexpected(request: fastapi.Request, exc: Exception) -> fastapi.Response:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        message = f"internal server error: {type(exc).__name__}: {exc}"
        return generation.error_response(generation.ApiError(500, message, type="server_error", reject_reason=None))

    app.add_api_route("/v1/completions", endpoints.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", endpoints.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", endpoints.models, methods=["GET"], response_model=protocol.ModelList)
    app.add_api_route("/health", endpoints.health, methods=["GET"])
    app.add_api_route("/metrics", endpoints.metrics, methods=["GET"])
    return app


class _Server(uvicorn.Server):
    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        for server in getattr(self, "servers", []):
            for sock in server.sockets or ():
                host, port = sock.getsockname()[:2]
                logger.info("OpenAI API listening on http://%s:%d/v1 (health: /health, metrics: /metrics)", host, port)


def make_server(app: fastapi.FastAPI, host: str, port: int, *, log_level: str = "info",
                graceful_shutdown_s: float = 30.0) -> uvicorn.Server:
    """A uvicorn server for `app` that logs the address it actually bound (port 0 works)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(graceful_shutdown_s), lifespan="on")
    return _Server(config)


def run_server(app: fastapi.FastAPI, host: str, port: int, *, log_level: str = "info",
               graceful_shutdown_s: float = 30.0) -> None:
    """Serves until SIGINT/SIGTERM; then stops accepting, lets running requests finish for up
    to `graceful_shutdown_s` and returns (uvicorn installs the signal handlers)."""
    make_server(app, host, port, log_level=log_level, graceful_shutdown_s=graceful_shutdown_s).run()

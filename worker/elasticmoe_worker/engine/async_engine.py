"""Drive an `LLMEngine` from a background thread and stream its updates to asyncio callers.

The engine loop owns the engine: requests and aborts reach it through a locked inbox and
are applied between steps; updates go back to each caller's `asyncio.Queue` with
`call_soon_threadsafe`. torch releases the GIL inside kernels, so the HTTP event loop keeps
answering while a step runs.

A request `add_request` refuses (bad input, full queue) gets one `types.refusal` output.
If a step raises, the engine is marked dead: every request in flight ends with an error,
`stats().healthy` turns False and new requests get `EngineDead`. Nothing restarts it; the
process supervisor (or the coordinator, later) does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
import threading
import time
import traceback
from typing import AsyncIterator, Callable, Sequence

import torch

from elasticmoe_worker.engine import engine as engine_mod
from elasticmoe_worker.engine import types

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: types.SamplingParams
    arrival_s: float


def _put_all(items: list[tuple[asyncio.Queue, types.RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


class AsyncEngine:
    def __init__(self, make_engine: Callable[[], engine_mod.LLMEngine]) -> None:
        """`make_engine` runs on the engine-loop thread, and this returns once it has (its
        exception is raised here). NOTE: on purpose: a CPU engine built (weights loaded, torch
        ops run) on one thread and stepped on another makes two OpenMP thread teams, and its
        steps took 1.6x as long: batch-1 decode of the bench preset on 2 cores, 17 ms/step
        stepped where it was built, 28 ms/step stepped on a second thread. One thread that
        builds and steps the engine keeps torch's parallel regions on one team."""
        failed: list[BaseException] = []
        ready = threading.Event()

        def build_then_run() -> None:
            try:
                self.engine = make_engine()
                self._stats = self.engine.stats()
            except BaseException as exc:  # raised in the caller's thread below
                failed.append(exc)
                return
            finally:
                ready.set()
            self._run()

        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._adds: list[_Add] = []
        self._aborts: list[str] = []
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._error: str | None = None
        self._thread = threading.Thread(target=build_then_run, name="engine-loop", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]
        engine = self.engine
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer

    @classmethod
    def from_model_dir(cls, model_dir: str | pathlib.Path, config: engine_mod.EngineConfig | None = None,
                       model_name: str | None = None, device: torch.device | None = None) -> "AsyncEngine":
        return cls(lambda: engine_mod.LLMEngine.from_model_dir(model_dir, config, model_name,
                                                               device if device is not None else torch.device("cpu")))

    # -- EngineClient ----------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def apply_chat_template(self, messages: Sequence[dict]) -> list[int]:
        return engine_mod.chat_token_ids(self.tokenizer, messages)

    def stats(self) -> types.EngineStats:
        s = self._stats
        if self._error is not None:
            return dataclasses.replace(s, healthy=False, error=self._error)
        return s

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: types.SamplingParams) -> AsyncIterator[types.RequestOutput]:
        if self._error is not None:
            raise types.EngineDead(f"engine failed: {self._error}")
        with self._lock:
            pending = len(self._adds)
        waiting = self._stats.num_waiting + pending
        if waiting >= self.engine.config.max_waiting:
            raise types.EngineOverloaded(
                f"server busy: {waiting} requests waiting (max_waiting={self.engine.config.max_waiting})"
            )
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), queue)
        with self._lock:
            self._adds.append(_Add(request_id, list(prompt_token_ids), params, time.monotonic()))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    # -- the loop ------------------------------------------------------------------
    def _deliver(self, outs: Sequence[types.RequestOutput]) -> None:
        """Hand a step's updates to their callers: one `call_soon_threadsafe` per event loop
        and step, not one per update. NOTE: each call writes to the loop's wake-up pipe and
        must take the GIL back from the HTTP thread afterwards; at 16 streams per step that
        was ~9 % of the engine thread's time (sampled with py-spy during `bench serve`)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, types.RequestOutput]]] = {}
        for out in outs:
            target = self._queues.get(out.request_id)
            if target is None:
                continue  # caller went away; its abort is on the way
            loop, queue = target
            by_loop.setdefault(loop, []).append((queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop is closed
                pass

    def _drain_inbox(self) -> None:
        with self._lock:
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, []
        for a in adds:
            try:
                self.engine.add_request(a.request_id, a.prompt_token_ids, a.params, a.arrival_s)
            except (ValueError, types.EngineOverloaded) as exc:
                # The same refusal an executor sends: one path to the client's 4xx for both.
                self._deliver([types.refusal(a.request_id, exc, len(a.prompt_token_ids))])
        for request_id in aborts:
            self.engine.abort_request(request_id)

    def _run(self) -> None:
        while not self._stop:
            self._drain_inbox()
            if not self.engine.has_work():
                self._stats = self.engine.stats()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # the engine's state is unknown now: stop serving
                self._error = f"{type(exc).__name__}: {exc}"
                logger.error("engine step failed; failing all requests in flight\n%s", traceback.format_exc())
                self._deliver(self.engine.fail_all(self._error))
                self._stats = self.engine.stats()
                return
            self._deliver(outputs)
            self._stats = self.engine.stats()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=timeout_s)

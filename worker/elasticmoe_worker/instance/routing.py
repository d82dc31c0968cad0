"""Data-parallel routing: which rank serves each request, and the stream of its outputs back
to the caller. This is the `EngineClient` face of a multi-device instance.

Why it exists apart from the coordinator: requests are the hot path (every token passes
here), while reconfiguration is rare; keeping them apart keeps both readable. Routing obeys
three commands of the reconfiguration (`reconfig` actions): pause admission, commit a new
configuration (requests rebound to their new ranks, admission resumes) and release held
requests; and it fails requests when told their rank is gone.

NOTE: admission and pause take the same lock, so no `AddRequest` reaches an old executor after
its `PauseForSwitch`: every request either went out before the pause (and is handed over) or
is held and released to the new configuration.

Each flight keeps what its client has received (tokens, characters of text), so when the
serving configuration breaks (a lost device) its requests are suspended and later recomputed
on the configuration that replaces it: prompt + those tokens, the client sees a pause.

Not guaranteed: a recomputed request that samples (temperature > 0) continues with a fresh
random state (a seeded one does not reproduce the tokens it would have drawn); outputs an
executor sent after its request was suspended are dropped (the recompute makes them again).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import AsyncIterator, Callable

from elasticmoe_worker.contract import wire
from elasticmoe_worker.engine import types

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Flight:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    add: wire.AddRequest
    rank: int | None = None  # None: held during a pause, or suspended
    suspended: bool = False  # its configuration broke: it waits to be recomputed
    arrival_s: float = dataclasses.field(default_factory=time.monotonic)
    token_ids: list[int] = dataclasses.field(default_factory=list)  # streamed to the client so far
    emitted_chars: int = 0
    done: bool = False  # its last output arrived (the caller may not have read it yet)


class Router:
    def __init__(self, send: Callable[[str, wire.Msg], None], on_held: Callable[[str], None],
                 config_id: int, num_devices: int, max_waiting_per_rank: int) -> None:
        self._send = send
        self._on_held = on_held
        self.config_id = config_id
        self.num_devices = num_devices
        self.max_waiting_per_rank = max_waiting_per_rank
        self.flights: dict[str, _Flight] = {}
        self.rank_stats: dict[int, wire.RankStats] = {}
        self.paused = False
        self.error: str | None = None  # set: refuse new requests (the instance is unhealthy)
        self._lock = threading.Lock()
        self.handed_over_total = 0
        self.recomputed_requests_total = 0
        self.recomputed_tokens_total = 0

    # -- commands from the reconfiguration ----------------------------------------------
    def pause(self) -> None:
        with self._lock:
            self.paused = True

    def commit(self, config_id: int, num_devices: int, ranks: dict[str, int]) -> None:
        with self._lock:
            for request_id, rank in ranks.items():
                flight = self.flights.get(request_id)
                if flight is not None:
                    flight.rank = rank
            self.rank_stats = {r: s for r, s in self.rank_stats.items() if r < num_devices}
            self.config_id = config_id
            self.num_devices = num_devices
            self.paused = False
            self.handed_over_total += len(ranks)

    def rebind(self, ranks: dict[str, int]) -> None:
        with self._lock:
            for request_id, rank in ranks.items():
                if (flight := self.flights.get(request_id)) is not None:
                    flight.rank = rank

    def release(self, request_ids: tuple[str, ...]) -> None:
        with self._lock:
            for request_id in request_ids:
                flight = self.flights.get(request_id)
                if flight is not None and flight.rank is None:
                    self._route(request_id, flight)

    def suspend(self) -> int:
        """The serving configuration broke: pause admission, and take every routed request back
        to be recomputed (`resume`); -> how many."""
        with self._lock:
            self.paused = True
            n = 0
            for flight in self.flights.values():
                if flight.rank is not None and not flight.done:
                    flight.rank, flight.suspended = None, True
                    n += 1
            return n

    def resume(self) -> tuple[int, int]:
        """Recompute every suspended request on the configuration that serves now (least loaded
        rank first), and admit again; -> (requests, tokens to recompute: prompt + output)."""
        with self._lock:
            batches: dict[int, list[wire.SequenceState]] = {}
            tokens = 0
            for request_id, flight in sorted(self.flights.items(), key=lambda kv: kv[1].arrival_s):
                if not flight.suspended:
                    continue
                flight.suspended = False
                flight.rank = self._pick_rank()
                batches.setdefault(flight.rank, []).append(self._sequence(request_id, flight))
                tokens += len(flight.add.prompt_token_ids) + len(flight.token_ids)
            for rank, seqs in sorted(batches.items()):
                self._send(f"exec-{self.config_id}-{rank}",
                           wire.Adopt(config_id=self.config_id, requests=seqs, keep_kv=False))
            self.paused = False
            n = sum(map(len, batches.values()))
            self.recomputed_requests_total += n
            self.recomputed_tokens_total += tokens
            return n, tokens

    @staticmethod
    def _sequence(request_id: str, flight: _Flight) -> wire.SequenceState:
        a = flight.add
        return wire.SequenceState(
            request_id=request_id, prompt_token_ids=list(a.prompt_token_ids), output_token_ids=list(flight.token_ids),
            num_computed=0, block_ids=[], arrival_s=flight.arrival_s, emitted_chars=flight.emitted_chars,
            emitted_tokens=len(flight.token_ids),
            params=wire.SamplingOptions(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                                        top_k=a.top_k, seed=a.seed, stop=list(a.stop), ignore_eos=a.ignore_eos))

    def fail(self, ranks: tuple[int, ...] | None, error: str) -> None:
        """End with `error` the requests on these ranks (all, held and suspended ones too, and
        admission resumes, when None)."""
        if ranks is None:
            with self._lock:
                self.paused = False
                for flight in self.flights.values():
                    flight.suspended = False
        for request_id, flight in list(self.flights.items()):
            if ranks is None or flight.rank in ranks:
                self._put(flight, types.RequestOutput(request_id=request_id, text="", token_ids=[],
                                                      finish_reason=types.FinishReason.ERROR, error=error))

    def set_config(self, config_id: int) -> None:
        """A recovery: same devices, fresh executors."""
        with self._lock:
            self.config_id = config_id
            self.rank_stats = {}

    # -- from the executors -----------------------------------------------------------
    def on_output(self, msg: wire.Output) -> None:
        flight = self.flights.get(msg.request_id)
        if flight is None or flight.suspended:
            return
        flight.token_ids += msg.token_ids
        flight.emitted_chars += len(msg.text)
        flight.done = msg.finish_reason is not None
        self._put(flight, types.RequestOutput(
            request_id=msg.request_id, text=msg.text, token_ids=msg.token_ids,
            finish_reason=types.FinishReason(msg.finish_reason) if msg.finish_reason else None,
            num_prompt_tokens=msg.num_prompt_tokens, num_output_tokens=msg.num_output_tokens, error=msg.error,
            error_kind=msg.error_kind.value if msg.error_kind is not None else None, error_param=msg.error_param))

    def on_stats(self, msg: wire.RankStats) -> None:
        if msg.config_id == self.config_id:
            self.rank_stats[msg.rank] = msg

    @staticmethod
    def _put(flight: _Flight, out: types.RequestOutput) -> None:
        try:
            flight.loop.call_soon_threadsafe(flight.queue.put_nowait, out)
        except RuntimeError:
            pass  # the caller's loop is gone

    # -- the EngineClient side ----------------------------------------------------------
    def stats(self, healthy: bool, error: str | None) -> types.EngineStats:
        ranks = list(self.rank_stats.values())
        return types.EngineStats(
            num_running=sum(r.num_running for r in ranks), num_waiting=sum(r.num_waiting for r in ranks),
            kv_blocks_used=sum(r.kv_blocks_used for r in ranks), kv_blocks_total=sum(r.kv_blocks_total for r in ranks),
            num_preemptions_total=sum(r.num_preemptions_total for r in ranks), healthy=healthy, error=error,
            num_recomputed_tokens_total=sum(r.num_recomputed_tokens_total for r in ranks))

    def inflight_per_rank(self) -> list[int]:
        counts = [0] * self.num_devices
        for flight in list(self.flights.values()):
            if flight.rank is not None and flight.rank < self.num_devices:
                counts[flight.rank] += 1
        return counts

    def _pick_rank(self) -> int:
        """Least loaded: requests in flight first, then KV-cache use."""
        inflight = self.inflight_per_rank()

        def load(rank: int) -> tuple[int, float]:
            s = self.rank_stats.get(rank)
            kv = s.kv_blocks_used / s.kv_blocks_total if s and s.kv_blocks_total else 0.0
            return inflight[rank], kv
        return min(range(self.num_devices), key=load)

    def _route(self, request_id: str, flight: _Flight) -> None:
        """Under the lock: choose a rank and send."""
        flight.rank = self._pick_rank()
        self._send(f"exec-{self.config_id}-{flight.rank}", flight.add)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: types.SamplingParams) -> AsyncIterator[types.RequestOutput]:
        if self.error is not None:
            raise types.EngineDead(f"instance unhealthy: {self.error}")
        waiting = sum(r.num_waiting for r in self.rank_stats.values())
        if waiting >= self.max_waiting_per_rank * self.num_devices:
            raise types.EngineOverloaded(f"server busy: {waiting} requests waiting")
        add = wire.AddRequest(
            request_id=request_id, prompt_token_ids=list(prompt_token_ids), max_tokens=params.max_tokens,
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=params.seed,
            stop=list(params.stop), ignore_eos=params.ignore_eos)
        flight = _Flight(asyncio.get_running_loop(), asyncio.Queue(), add)
        held = False
        with self._lock:
            self.flights[request_id] = flight
            if self.paused:
                held = True
            else:
                self._route(request_id, flight)
        if held:
            self._on_held(request_id)  # the reconfiguration releases it at the commit
        finished = False
        try:
            while True:
                out = await flight.queue.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            with self._lock:
                self.flights.pop(request_id, None)
                rank, config_id = flight.rank, self.config_id
            if not finished and rank is not None:  # flight.rank: a scale may have moved the request
                self._send(f"exec-{config_id}-{rank}", wire.AbortRequest(request_id=request_id))

"""Continuous batching: which requests compute how many tokens in the next step.

Pure bookkeeping (no torch, no clock): every request carries `num_computed`, the tokens of
it already in the KV cache; a step gives each running request the tokens it still lacks
(one for a decoding request, a prompt chunk for a prefilling one) within a token budget, so
prefill and decode share steps. When the KV pool runs out, the most recently admitted
request is preempted: its blocks are freed and it goes back to the front of the queue, to
be recomputed from its prompt and the tokens it already produced (outputs are kept).

Not thread-safe: the engine loop is its only caller.
"""

from __future__ import annotations

import collections
import dataclasses
import enum

from elasticmoe_worker.engine import kv_cache, types


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: types.SamplingParams
    arrival_s: float = 0.0
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    block_ids: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    num_preemptions: int = 0
    # tokens below this position were in a KV cache once (before a preemption, or on the engine that
    # handed the request over): computing them again is recomputation, counted by the engine
    recompute_until: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    block_size: int = 16
    max_num_seqs: int = 64  # running requests at once
    max_num_batched_tokens: int = 512  # tokens computed in one step (prefill chunks + decodes)
    max_model_len: int = 2048
    max_waiting: int = 256  # queue bound: beyond it, new requests are refused (429)

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: got {value!r}, expected an integer >= 1")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting: got {self.max_waiting!r}, expected an integer >= 0")


@dataclasses.dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step computes the request's last known token: pick the next."""
        return self.request.num_computed + self.num_new_tokens == self.request.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: kv_cache.BlockAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions_total = 0
        # Keep a few blocks free when admitting, so running requests can grow a step or two
        # before anyone is preempted.
        self.watermark_blocks = max(1, allocator.num_blocks // 100)

    # -- admission -----------------------------------------------------------------
    def max_blocks_per_request(self) -> int:
        return kv_cache.blocks_for(self.config.max_model_len, self.config.block_size)

    def add(self, request: Request) -> None:
        """Queue a request; raise EngineOverloaded when the queue is full, ValueError when
        it could never fit (longer than the context or the whole KV pool)."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in flight")
        if len(self.waiting) >= self.config.max_waiting:
            raise types.EngineOverloaded(
                f"server busy: {len(self.waiting)} requests already waiting (max_waiting={self.config.max_waiting})"
            )
        if len(request.prompt_token_ids) >= self.config.max_model_len:
            raise ValueError(
                f"prompt: {len(request.prompt_token_ids)} tokens, the context holds "
                f"{self.config.max_model_len} (prompt plus at least 1 generated token)"
            )
        longest = min(len(request.prompt_token_ids) + request.params.max_tokens, self.config.max_model_len)
        if kv_cache.blocks_for(longest, self.config.block_size) > self.allocator.num_blocks:
            raise ValueError(
                f"max_tokens: prompt ({len(request.prompt_token_ids)}) + max_tokens "
                f"({request.params.max_tokens}) needs more KV blocks than the pool holds "
                f"({self.allocator.num_blocks} blocks of {self.config.block_size} tokens)"
            )
        request.status = Status.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status is Status.WAITING:
            self.waiting.remove(request)
        elif request.status is Status.RUNNING:
            self.running.remove(request)
        self._release(request)
        return request

    def finish(self, request: Request) -> None:
        if request.status is Status.RUNNING:
            self.running.remove(request)
        self._release(request)

    def _release(self, request: Request) -> None:
        self.allocator.free(request.block_ids)
        request.block_ids = []
        request.status = Status.FINISHED
        self.requests.pop(request.request_id, None)

    def _preempt(self, request: Request) -> None:
        self.allocator.free(request.block_ids)
        request.block_ids = []
        request.recompute_until = max(request.recompute_until, request.num_computed)
        request.num_computed = 0
        request.num_preemptions += 1
        request.status = Status.WAITING
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)

    # -- the step ------------------------------------------------------------------
    def _blocks_needed(self, request: Request, num_new: int) -> int:
        return kv_cache.blocks_for(request.num_computed + num_new, self.config.block_size) - len(request.block_ids)

    def schedule(self) -> list[ScheduledRequest]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed, budget)
            assert num_new > 0, "a running request always has a token to compute"
            need = self._blocks_needed(request, num_new)
            while need > self.allocator.num_free:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if request.status is not Status.RUNNING:
                break  # it was the last one and preempted itself
            request.block_ids.extend(self.allocator.allocate(need))
            scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            request = self.waiting[0]
            num_new = min(request.num_tokens - request.num_computed, budget)
            need = self._blocks_needed(request, num_new)
            reserve = self.watermark_blocks if self.running else 0
            if need > self.allocator.num_free - reserve:
                break
            self.waiting.popleft()
            request.block_ids.extend(self.allocator.allocate(need))
            request.status = Status.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        return scheduled

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

"""The coordinator's side of a multi-device instance: start the workers, spread requests
over the data-parallel ranks, stream their tokens back, notice when a worker dies.

`Instance` implements the same `EngineClient` protocol as the single-process engine, so the
OpenAI HTTP layer serves either unchanged. One I/O thread owns the ZeroMQ ROUTER socket
all HMMs and executors connect to; other threads hand it outgoing messages through an
in-process socket, and it hands updates to asyncio callers with `call_soon_threadsafe`.

Not guaranteed: a request on a rank that dies is failed, not retried elsewhere (its KV
blocks died with it). After a worker dies the instance reports itself unhealthy and refuses
new requests; restarting or replacing the worker is the operator's (or scaling's) job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hmac
import itertools
import logging
import pathlib
import threading
import time
from typing import AsyncIterator, Sequence

import torch.distributed as dist
import zmq

from elasticmoe_worker.engine import engine as engine_mod
from elasticmoe_worker.engine import kv_cache, types
from elasticmoe_worker.instance import fleet as fleet_mod
from elasticmoe_worker.contract import wire
from elasticmoe_worker.instance import procutil, scaling
from elasticmoe_worker.models import config as config_mod
from elasticmoe_worker.models import registry

logger = logging.getLogger(__name__)

_RECOVERY_GRACE_S = 0.5


@dataclasses.dataclass
class _Flight:
    rank: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class ScaleInProgress(RuntimeError):
    """Another scale runs (or the instance cannot scale now): try again later."""


class Instance:
    def __init__(self, model_dir: str | pathlib.Path, num_devices: int,
                 config: engine_mod.EngineConfig | None = None, *, model_name: str | None = None,
                 backend: str = "cpu", collective_timeout_s: float = 60.0, startup_timeout_s: float = 600.0,
                 warm_workers: int = 1, fleet: str = "local", bind_host: str = "127.0.0.1",
                 advertise_host: str | None = None, control_port: int = 0, store_port: int = 0,
                 worker_token: str = "", heartbeat_timeout_s: float = 15.0) -> None:
        """`fleet="local"` starts one HMM process per device here; `fleet="external"` waits for
        workers that others start (`elasticmoe worker`, one pod per device) to register on
        `tcp://<advertise_host>:<control_port>`, presenting `worker_token` when it is set."""
        if fleet not in ("local", "external"):
            raise ValueError(f"fleet: got {fleet!r}, expected 'local' or 'external'")
        self.model_dir = pathlib.Path(model_dir).resolve()
        self.config = config or engine_mod.EngineConfig()
        self.num_devices = num_devices
        self.backend = backend
        self.collective_timeout_s = collective_timeout_s
        self.model_name = model_name or self.model_dir.name
        self.spec = config_mod.load_spec(self.model_dir)
        self.tokenizer = engine_mod.load_tokenizer(self.model_dir)
        self.max_model_len = engine_mod.resolve_max_model_len(self.spec, self.config)
        self.placement = scaling.initial_placement(self.spec.num_experts, num_devices)
        self.expert_owner = scaling.owner_list(self.placement, self.spec.num_experts)
        # Kept in memory so devices that join later read nothing from the checkpoint directory.
        self.config_json = (self.model_dir / "config.json").read_text()
        self.tokenizer_files = {n: (self.model_dir / n).read_text() for n in engine_mod.TOKENIZER_FILES
                                if (self.model_dir / n).is_file()}
        self._scale_lock = threading.Lock()
        self.config_id = 0
        self._last_config_id = 0
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        if control_port:
            self._router.bind(f"tcp://{bind_host}:{control_port}")
            port = control_port
        else:
            port = self._router.bind_to_random_port(f"tcp://{bind_host}")
        # What workers and executors on other hosts dial (the coordinator Service in a cluster).
        self.advertise_host = advertise_host or ("127.0.0.1" if bind_host in ("0.0.0.0", "::", "*") else bind_host)
        self.address = f"tcp://{self.advertise_host}:{port}"
        self.worker_token = worker_token
        self._refused: set[int] = set()  # devices whose worker presented a wrong token
        self._wake_addr = f"inproc://coordinator-{id(self)}"
        self._wake_pull = self._ctx.socket(zmq.PULL)
        self._wake_pull.bind(self._wake_addr)
        self._wake_push = self._ctx.socket(zmq.PUSH)
        self._wake_push.connect(self._wake_addr)
        self._send_lock = threading.Lock()
        self.store_port = store_port or procutil.free_port()
        # NOTE: the master connects to itself through host_name: keep it local (a Service name
        # would route through endpoints that list this pod only once it is ready).
        self._store = dist.TCPStore("127.0.0.1", self.store_port, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=collective_timeout_s))
        self.fleet = (fleet_mod.LocalFleet(self.address, backend) if fleet == "local"
                      else fleet_mod.ExternalFleet(heartbeat_timeout_s))
        self._flights: dict[str, _Flight] = {}
        self._rank_stats: dict[int, wire.RankStats] = {}
        self._switching = False  # a scale is swapping executors: new requests wait a moment
        self._scaler = None
        self.last_scale = None
        self.history: list = []
        self.max_devices = self.spec.num_experts
        self.warm_workers = warm_workers
        self._warm: set[int] = set()  # devices whose HMM runs (and said hello) but holds nothing yet
        self._error: str | None = None
        self._hmm_lost = False  # memory gone: only scaling or the operator can repair this
        self._recovering: set[int] = set()
        self._recover_at: float | None = None
        self._stop = False
        self._ids = itertools.count()
        self.hmm_ready: dict[int, wire.HMMReady] = {}
        self.executors: dict[int, wire.ExecutorReady] = {}
        try:
            self._start(startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self._thread = threading.Thread(target=self._io_loop, name="coordinator-io", daemon=True)
        self._thread.start()
        self.prewarm()

    def prewarm(self) -> None:
        """Keep `warm_workers` workers started beyond the active ones (no model memory, a warm
        executor process each), so a scale-up does not wait for processes to start; and stop
        warm workers that are now too far beyond the active count. Only a fleet that starts
        workers keeps a pool: with pods, the operator decides which exist."""
        if not self.fleet.starts_workers:
            return
        want = set(range(self.num_devices, min(self.num_devices + self.warm_workers, self.max_devices)))
        for d in sorted(want):
            self.fleet.add(d)
        for d in [d for d in list(self.fleet.workers) if d >= self.num_devices and d not in want]:
            self._send(f"hmm-{d}", wire.Shutdown(reason="warm pool shrinks"))
            self.fleet.remove(d)
            self._warm.discard(d)

    # -- start-up (synchronous, before the I/O thread owns the socket) -------------------
    def _recv_until(self, want: type, count: int, deadline: float) -> dict[int, wire.Msg]:
        got: dict[int, wire.Msg] = {}
        while len(got) < count:
            dead = self.fleet.dead()
            if dead:
                raise RuntimeError(f"worker(s) exited during start-up: {dead} (device -> exit code); see their logs")
            if time.monotonic() > deadline:
                raise TimeoutError(f"start-up: {len(got)}/{count} {want.__name__} messages before the deadline")
            if not self._router.poll(200):
                continue
            _, data = self._router.recv_multipart()
            msg = self._admit(wire.decode(data))
            if msg is None:
                continue
            if isinstance(msg, (wire.HMMFailed, wire.ExecutorFailed)):
                raise RuntimeError(f"start-up failed: {msg.error}")
            if isinstance(msg, want):
                key = msg.device_index if hasattr(msg, "device_index") else msg.rank
                if key < count:
                    got[key] = msg
                elif isinstance(msg, wire.HMMHello):
                    self._warm.add(key)  # a worker beyond the first N (a pod created early)
            elif isinstance(msg, wire.RankStats):
                self._rank_stats[msg.rank] = msg
            else:
                logger.debug("start-up: ignoring %s", type(msg).__name__)
        return got

    def _admit(self, msg: wire.Msg) -> wire.Msg | None:
        """Check a worker's token and note that it lives."""
        if isinstance(msg, (wire.HMMHello, wire.Heartbeat)):
            if self.worker_token and not hmac.compare_digest(msg.token, self.worker_token):
                # once per device: a misconfigured worker repeats itself every second
                level = logging.DEBUG if msg.device_index in self._refused else logging.WARNING
                self._refused.add(msg.device_index)
                logger.log(level, "device %d: worker presented a wrong token; ignored", msg.device_index)
                return None
            self.fleet.seen(msg.device_index)
            if isinstance(msg, wire.Heartbeat):
                return None  # liveness only: it comes from another socket than the HMM's own
        return msg

    @property
    def registered_devices(self) -> list[int]:
        """Devices whose worker is up and registered: serving ones and idle (warm) ones."""
        return sorted(set(self.hmm_ready) | self._warm)

    def _send_now(self, identity: str, msg: wire.Msg) -> None:
        self._router.send_multipart([identity.encode(), wire.encode(msg)])

    def _kv_cache_bytes(self) -> int:
        if self.config.num_kv_blocks is None:
            return self.config.kv_cache_bytes
        dtype = registry.resolve_dtype(self.spec, self.config.dtype)
        per_block = kv_cache.KVCachePool.bytes_per_block(
            self.spec.num_layers, self.spec.num_kv_heads, self.spec.qk_head_dim, self.spec.v_head_dim,
            self.config.block_size, dtype)
        return self.config.num_kv_blocks * per_block

    def _start(self, timeout_s: float) -> None:
        started = time.monotonic()
        deadline = started + timeout_s
        for i in range(self.num_devices):
            self.fleet.add(i)
        self._recv_until(wire.HMMHello, self.num_devices, deadline)
        for i in range(self.num_devices):
            self._send_now(f"hmm-{i}", wire.LoadPlan(
                model_dir=str(self.model_dir), dtype=self.config.dtype,
                expert_ids=[e for e, d in enumerate(self.expert_owner) if d == i],
                kv_cache_bytes=self._kv_cache_bytes(), block_size=self.config.block_size))
        self.hmm_ready = self._recv_until(wire.HMMReady, self.num_devices, deadline)
        self.replicated_bytes = self.hmm_ready[0].replicated.size_bytes
        self.config_id = self.next_config_id()
        self._start_executors(deadline)
        logger.info("instance ready: %d device(s), %d experts placed contiguously, in %.1f s",
                    self.num_devices, self.spec.num_experts, time.monotonic() - started)

    def _start_message(self, rank: int) -> wire.StartExecutor:
        engine_fields = wire.EngineOptions(**{**dataclasses.asdict(self.config), "max_model_len": self.max_model_len})
        return wire.StartExecutor(
            config_id=self.config_id, rank=rank, world_size=self.num_devices, store_host=self.advertise_host,
            store_port=self.store_port, expert_owner=self.expert_owner, engine=engine_fields,
            model_name=self.model_name, collective_timeout_s=self.collective_timeout_s)

    def _start_executors(self, deadline: float) -> None:
        for i in range(self.num_devices):
            self._send_now(f"hmm-{i}", self._start_message(i))
        self.executors = self._recv_until(wire.ExecutorReady, self.num_devices, deadline)

    # -- EngineClient --------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def apply_chat_template(self, messages_: Sequence[dict]) -> list[int]:
        return engine_mod.chat_token_ids(self.tokenizer, messages_)

    def stats(self) -> types.EngineStats:
        ranks = list(self._rank_stats.values())
        return types.EngineStats(
            num_running=sum(r.num_running for r in ranks),
            num_waiting=sum(r.num_waiting for r in ranks),
            kv_blocks_used=sum(r.kv_blocks_used for r in ranks),
            kv_blocks_total=sum(r.kv_blocks_total for r in ranks),
            num_preemptions_total=sum(r.num_preemptions_total for r in ranks),
            healthy=self._error is None, error=self._error,
        )

    def _pick_rank(self) -> int:
        """Least loaded: requests in flight first, then KV-cache use."""
        inflight = self.inflight_per_rank()

        def load(rank: int) -> tuple[int, float]:
            s = self._rank_stats.get(rank)
            kv = s.kv_blocks_used / s.kv_blocks_total if s and s.kv_blocks_total else 0.0
            return inflight[rank], kv
        return min(range(self.num_devices), key=load)

    def inflight_per_rank(self) -> list[int]:
        counts = [0] * self.num_devices
        for flight in list(self._flights.values()):
            if flight.rank < self.num_devices:
                counts[flight.rank] += 1
        return counts

    def _send(self, identity: str, msg: wire.Msg) -> None:
        with self._send_lock:
            self._wake_push.send_multipart([identity.encode(), wire.encode(msg)])

    def abort(self, request_id: str) -> None:
        flight = self._flights.get(request_id)
        if flight is not None:
            self._send(f"exec-{self.config_id}-{flight.rank}", wire.AbortRequest(request_id=request_id))

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: types.SamplingParams) -> AsyncIterator[types.RequestOutput]:
        if self._error is not None:
            raise types.EngineDead(f"instance unhealthy: {self._error}")
        while self._switching:  # one step's pause while a scale swaps executors
            await asyncio.sleep(0.002)
        waiting = sum(r.num_waiting for r in self._rank_stats.values())
        if waiting >= self.config.max_waiting * self.num_devices:
            raise types.EngineOverloaded(f"server busy: {waiting} requests waiting")
        rank = self._pick_rank()
        flight = _Flight(rank, asyncio.get_running_loop(), asyncio.Queue())
        self._flights[request_id] = flight
        self._send(f"exec-{self.config_id}-{rank}", wire.AddRequest(
            request_id=request_id, prompt_token_ids=list(prompt_token_ids), max_tokens=params.max_tokens,
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=params.seed,
            stop=list(params.stop), ignore_eos=params.ignore_eos))
        finished = False
        try:
            while True:
                out = await flight.queue.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._flights.pop(request_id, None)
            if not finished:  # flight.rank: a scale may have moved the request
                self._send(f"exec-{self.config_id}-{flight.rank}", wire.AbortRequest(request_id=request_id))

    # -- the I/O thread ------------------------------------------------------------
    def _deliver(self, out: types.RequestOutput) -> None:
        flight = self._flights.get(out.request_id)
        if flight is None:
            return
        try:
            flight.loop.call_soon_threadsafe(flight.queue.put_nowait, out)
        except RuntimeError:
            pass

    def _fail(self, error: str) -> None:
        if self._stop:
            return
        if self._error is not None:
            self._error = f"{self._error}; {error}" if error not in self._error else self._error
            return
        self._error = error
        logger.error("instance unhealthy: %s; failing %d request(s) in flight", error, len(self._flights))
        for request_id in list(self._flights):
            self._deliver(types.RequestOutput(request_id=request_id, text="", token_ids=[],
                                              finish_reason=types.FinishReason.ERROR, error=error))

    def _on_message(self, msg: wire.Msg) -> None:
        if isinstance(msg, wire.Output):
            self._deliver(types.RequestOutput(
                request_id=msg.request_id, text=msg.text, token_ids=msg.token_ids,
                finish_reason=types.FinishReason(msg.finish_reason) if msg.finish_reason else None,
                num_prompt_tokens=msg.num_prompt_tokens, num_output_tokens=msg.num_output_tokens, error=msg.error))
        elif isinstance(msg, wire.RankStats):
            if msg.config_id == self.config_id:
                self._rank_stats[msg.rank] = msg
        elif isinstance(msg, wire.HMMHello) and (self._scaler is None or msg.device_index not in self._scaler.added):
            self._warm.add(msg.device_index)  # a pre-started worker, ready for the next scale-up
        elif self._scaler is not None and self._to_scaler(msg):
            pass
        elif isinstance(msg, wire.ExecutorFailed):
            if msg.config_id != self.config_id:
                return  # a straggler of the configuration we already replaced
            self._fail(f"executor rank {msg.rank} failed: {msg.error}")
            # Decide a moment later: when a whole worker died, its peers' executors report
            # broken connections before the fleet sees the death, and a dead HMM's memory
            # cannot be recovered from.
            self._recover_at = time.monotonic() + _RECOVERY_GRACE_S
        elif isinstance(msg, wire.ExecutorReady):
            if msg.config_id == self.config_id and msg.rank in self._recovering:
                self.executors[msg.rank] = msg
                self._recovering.discard(msg.rank)
                if not self._recovering and not self._hmm_lost:
                    logger.info("instance recovered: executors of configuration %d ready; serving again",
                                self.config_id)
                    self._error = None
        elif isinstance(msg, wire.HMMFailed):
            self._hmm_lost = True
            self._fail(f"HMM of device {msg.device_index} failed: {msg.error}")

    def _to_scaler(self, msg: wire.Msg) -> bool:
        """Messages of a scale in progress go to its thread; -> True when taken."""
        scaler = self._scaler
        if isinstance(msg, (wire.HMMHello, wire.TransitionReady, wire.Handover, wire.Adopted)):
            scaler.inbox.put(msg)
            return True
        if isinstance(msg, wire.ExecutorReady) and msg.config_id == scaler.new_config:
            scaler.inbox.put(msg)
            return True
        if isinstance(msg, wire.ExecutorFailed) and msg.config_id == scaler.new_config and not scaler.switched:
            scaler.inbox.put(scaling.ScaleAborted(f"standby executor rank {msg.rank} failed: {msg.error}"))
            return True
        if isinstance(msg, wire.HMMFailed) and msg.config_id == scaler.new_config and not scaler.switched:
            scaler.inbox.put(scaling.ScaleAborted(f"device {msg.device_index}: {msg.error}"))
            return True
        return False

    # -- scaling -------------------------------------------------------------------
    def start_scale(self, devices: int, reason: str = "manual", timeout_s: float = 300.0) -> threading.Thread:
        """Validate and start a scale in a background thread (ValueError for a bad target,
        ScaleInProgress while another runs or the instance is unhealthy)."""
        if not isinstance(devices, int) or isinstance(devices, bool) or not 1 <= devices <= self.max_devices:
            raise ValueError(f"devices: got {devices!r}, expected an integer in [1, {self.max_devices}] "
                             f"(at most one device per routed expert)")
        with self._scale_lock:
            if self._scaler is not None:
                raise ScaleInProgress(f"a scale {self._scaler.record.from_devices} -> "
                                      f"{self._scaler.record.to_devices} devices is in progress")
            if self._error is not None:
                raise ScaleInProgress(f"instance unhealthy, not scaling: {self._error}")
            if devices == self.num_devices:
                raise ValueError(f"devices: already {devices}; nothing to do")
            self._scaler = scaling.Scaler(self, devices, reason, timeout_s)
        thread = threading.Thread(target=self._run_scale, name="scale", daemon=True)
        thread.start()
        return thread

    def _run_scale(self) -> None:
        try:
            self._scaler.run()
        except Exception as exc:  # a bug after the switch: say so, do not kill the thread silently
            logger.exception("scale failed")
            self._scaler.record.outcome = "failed"
            self._scaler.record.error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._scale_lock:
                self.last_scale = self._scaler.record
                self.history = (self.history + [self._scaler.record])[-10:]
                self._scaler = None
            self.prewarm()

    def scale(self, devices: int, reason: str = "manual", timeout_s: float = 300.0) -> "scaling.ScaleRecord":
        """start_scale and wait for it; -> the record of what happened."""
        self.start_scale(devices, reason, timeout_s).join()
        return self.last_scale

    @property
    def phase(self) -> str:
        if self._error is not None:
            return "Degraded"
        return "Scaling" if self._scaler is not None else "Serving"

    def _commit_switch(self, config_id: int, devices: int, placement, ranks: dict[str, int]) -> None:
        """Called by the scaler once the new executors hold every sequence."""
        for request_id, rank in ranks.items():
            flight = self._flights.get(request_id)
            if flight is not None:
                flight.rank = rank
        self._rank_stats = {r: s for r, s in self._rank_stats.items() if r < devices}
        self.placement = placement
        self.expert_owner = scaling.owner_list(placement, self.spec.num_experts)
        self.num_devices = devices
        self.config_id = config_id
        self._switching = False

    def next_config_id(self) -> int:
        """Configuration ids are never reused (they prefix rendezvous keys in the store)."""
        self._last_config_id = max(self._last_config_id, self.config_id) + 1
        return self._last_config_id

    def _recover(self) -> None:
        """An executor died but every HMM still holds its memory: start a fresh set of
        executors (new configuration id, new collective group) on the same memory. Nothing
        is read from the checkpoint; requests in flight were already failed."""
        if self._hmm_lost or self._stop:
            return
        self.config_id = self.next_config_id()
        self._recovering = set(range(self.num_devices))
        logger.warning("restarting the executors on the HMMs' memory as configuration %d", self.config_id)
        for i in range(self.num_devices):
            self._send_now(f"hmm-{i}", self._start_message(i))

    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_pull, zmq.POLLIN)
        last_check = 0.0
        while not self._stop:
            events = dict(poller.poll(100))
            if self._wake_pull in events:
                while True:
                    try:
                        frames = self._wake_pull.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._router.send_multipart(frames)
            if self._router in events:
                while True:
                    try:
                        _, data = self._router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    msg = self._admit(wire.decode(data))
                    if msg is not None:
                        self._on_message(msg)
            now = time.monotonic()
            if now - last_check > 0.1:
                last_check = now
                dead = self.fleet.dead()
                scaler = self._scaler
                if dead and scaler is not None and not scaler.switched:
                    joining = {d: c for d, c in dead.items() if d >= self.num_devices}
                    if joining:
                        scaler.inbox.put(scaling.ScaleAborted(f"new worker(s) died: {joining} (device -> exit code)"))
                        for d in joining:
                            dead.pop(d)
                for d in [d for d in dead if d >= self.num_devices and (scaler is None or d not in scaler.added)]:
                    logger.warning("warm worker %d exited (code %s); it will be started again", d, dead.pop(d))
                    self.fleet.workers.pop(d, None)
                    self._warm.discard(d)
                if dead and not self._hmm_lost:
                    self._hmm_lost = True
                    self._fail(f"worker process(es) died: {dead} (device -> exit code)")
                if self._recover_at is not None and now >= self._recover_at:
                    self._recover_at = None
                    self._recover()

    def shutdown(self, timeout_s: float = 15.0) -> None:
        """Stop every process this instance started; idempotent."""
        if self._stop:
            return
        # Nobody waits forever on a stopped instance: requests still in flight end with an error.
        if self._flights:
            logger.info("stopping with %d request(s) in flight; ending them", len(self._flights))
        self._error = self._error or "the instance is shutting down"
        for request_id in list(self._flights):
            self._deliver(types.RequestOutput(request_id=request_id, text="", token_ids=[],
                                              finish_reason=types.FinishReason.ERROR, error=self._error))
        self._stop = True
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(timeout=2)
        for rank in range(self.num_devices):
            try:
                self._send_now(f"exec-{self.config_id}-{rank}", wire.Shutdown(reason="instance stopping"))
            except zmq.ZMQError:
                pass
        for i in list(self.fleet.workers):
            try:
                self._send_now(f"hmm-{i}", wire.Shutdown(reason="instance stopping"))
            except zmq.ZMQError:
                pass
        self.fleet.wait_stopped(time.monotonic() + timeout_s)
        self.fleet.close()
        for s in (self._router, self._wake_pull, self._wake_push):
            s.close(linger=0)
        self._ctx.term()
        logger.info("instance stopped")

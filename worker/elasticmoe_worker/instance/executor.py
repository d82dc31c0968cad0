"""The executor process: computes on one device's memory, owned by its HMM.

Started by the HMM with an `ExecutorSpec` on stdin. It attaches to the HMM's regions
(zero-copy: it reads no checkpoint file; the tokenizer arrives in the spec), joins the
instance's collective group, and runs one data-parallel rank: its own continuous-batching
engine for the requests the coordinator sends it, expert-parallel MoE across all ranks.

NOTE: every step, all ranks agree (an all-reduce) on whether anyone has work; if so, all
run a forward pass, idle ranks over zero tokens, so every rank enters every MoE collective.
A peer that stops answering makes the collective time out after `collective_timeout_s`:
the executor then reports the error and exits rather than hang.
"""

from __future__ import annotations

import os

from elasticmoe_worker.instance import procutil  # stdlib only: before torch's import

if __name__ == "__main__" and os.environ.get(procutil.SPARE_NICE_ENV) is not None:
    # a spare (procutil.spare_nice): its imports start here, so its priority drops here
    os.setpriority(os.PRIO_PROCESS, 0, procutil.SPARE_NICE)

import dataclasses
import importlib
import logging
import struct
import sys
import time

import msgspec
import torch
import torch.distributed as dist
import zmq

from elasticmoe_worker import backends
from elasticmoe_worker.engine import engine as engine_mod
from elasticmoe_worker.engine import types
from elasticmoe_worker.contract import wire
from elasticmoe_worker.instance import cgroup, ep, memory, rendezvous, transport
from elasticmoe_worker.models import config as config_mod
from elasticmoe_worker.models import registry

logger = logging.getLogger("elasticmoe.executor")

_STATS_INTERVAL_S = 0.05
# How often the routed-token counts go along (reading them back is a host sync on an accelerator).
_LOAD_INTERVAL_S = 1.0
_IDLE_POLL_MS = 2


def _weight_tensors(obj, seen: set[int]):
    """Every floating-point tensor reachable through the model's dataclasses, once."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.data_ptr() not in seen:
            seen.add(obj.data_ptr())
            yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _weight_tensors(item, seen)
    elif dataclasses.is_dataclass(obj):
        for field in dataclasses.fields(obj):
            yield from _weight_tensors(getattr(obj, field.name), seen)


def _touch_weights(model) -> int:
    """Read every weight page once, so the memory measurement covers them; -> bytes seen."""
    total = 0
    for t in _weight_tensors(model, set()):
        total += t.numel() * t.element_size()
        for chunk in t.reshape(-1).split(1 << 20):
            chunk.sum()
    return total


def _params(msg: wire.AddRequest) -> types.SamplingParams:
    return types.SamplingParams(max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=msg.top_p,
                                top_k=msg.top_k, seed=msg.seed, stop=tuple(msg.stop), ignore_eos=msg.ignore_eos)


def _to_wire(out: types.RequestOutput) -> wire.Output:
    return wire.Output(
        request_id=out.request_id, text=out.text, token_ids=out.token_ids,
        finish_reason=out.finish_reason.value if out.finish_reason else None,
        num_prompt_tokens=out.num_prompt_tokens, num_output_tokens=out.num_output_tokens, error=out.error,
        error_kind=wire.ErrorKind(out.error_kind) if out.error_kind else None, error_param=out.error_param)


class Executor:
    def __init__(self, spec: wire.ExecutorSpec, preloaded: Preloaded | None = None) -> None:
        """`preloaded`: the tokenizer sent (and loaded) while this process waited as a spare."""
        started, started_cpu = time.perf_counter(), time.process_time()
        self.spec = spec
        start = spec.start
        self.rank, self.world_size = start.rank, start.world_size
        backend = backends.get_backend(spec.backend)
        model_spec = config_mod.spec_from_json(spec.config_json)
        cfg = engine_mod.EngineConfig(**msgspec.structs.asdict(start.engine))
        dtype = registry.resolve_dtype(model_spec, cfg.dtype)
        before = procutil.anon_resident_bytes()
        # (wall, CPU) seconds per part of the start, in order (logged: where a standby's start
        # goes; wall far above CPU is waiting: for the cores, the quota, or the group's slowest rank)
        self.phases: dict[str, tuple[float, float]] = {}
        mark = [started, started_cpu]

        def phase(name: str) -> None:
            t, cpu = time.perf_counter(), time.process_time()
            self.phases[name] = (t - mark[0], cpu - mark[1])
            mark[0], mark[1] = t, cpu

        phase("setup")
        self.device = memory.attach_device(backend, model_spec, spec.ready, dtype, cfg.block_size)
        phase("attach")
        self.attach_seconds = self.phases["attach"][0]
        fam = registry.family(model_spec.model_type)
        # NOTE: one code path on every backend: the model, the engine and the expert exchange make
        # their tensors on this device, and the groups use this backend's collective library.
        self.torch_device = backend.torch_device()
        model = fam.build(model_spec, self.device.weights, self.device.expert_ids, self.torch_device)
        phase("build")
        self.weight_bytes = _touch_weights(model)
        phase("touch")
        # token copies routed to each expert, every MoE layer together (which experts are hot)
        self.routed = torch.zeros(model_spec.num_experts, dtype=torch.int64, device=self.torch_device)
        for block in model.moe_blocks():
            block.routed = self.routed
        self.attach_private_bytes = procutil.anon_resident_bytes() - before

        self.group = None
        self.store = None
        secret = os.environ.get(transport.SECRET_ENV, "")
        if self.world_size > 1:
            self.store = rendezvous.ChannelStore(spec.coordinator, secret, f"config-{start.config_id}",
                                                 start.collective_timeout_s)
            self.group = rendezvous.process_group(backend.collective_backend, self.store, self.rank, self.world_size,
                                                  start.collective_timeout_s, self.torch_device, spec.host)
            owner = torch.tensor(start.expert_owner, dtype=torch.int64, device=self.torch_device)
            local_map = torch.full((model_spec.num_experts,), -1, dtype=torch.int64, device=self.torch_device)
            local_map[torch.tensor(self.device.expert_ids, dtype=torch.int64, device=self.torch_device)] = \
                torch.arange(len(self.device.expert_ids), device=self.torch_device)
            assert all(start.expert_owner[e] == self.rank for e in self.device.expert_ids), \
                "the HMM holds experts the plan gives to another rank"
            for block in model.moe_blocks():
                block.experts_fn = ep.ExpertParallel(self.group, self.world_size, owner, local_map,
                                                     block.w13, block.w2, self.torch_device)
            phase("group")

        tokenizer = _tokenizer(spec, preloaded)
        phase("tokenizer")
        self.engine = engine_mod.LLMEngine(model, tokenizer, cfg, spec.model_name, pool=self.device.pool)
        phase("engine")
        if self.group is not None:  # the first collective of the new group: same model, same placement
            ep.check_group(self.group, ep.fingerprint(start.config_id, self.world_size, spec.config_json,
                                                      list(start.expert_owner), len(model.moe_blocks()), dtype),
                           self.torch_device)
            phase("check")
        self.ctx = zmq.Context()
        self.sock = transport.connect(self.ctx, spec.coordinator, f"exec-{start.config_id}-{self.rank}", secret)
        self.stop = False
        self.pausing = False
        self._last_stats = 0.0
        self._last_load = 0.0
        phase("connect")
        self.startup_seconds = time.perf_counter() - started

    def send(self, msg: wire.Msg) -> None:
        self.sock.send(wire.encode(msg))

    def _handle(self, msg: wire.Msg) -> None:
        if isinstance(msg, wire.AddRequest):
            try:
                self.engine.add_request(msg.request_id, msg.prompt_token_ids, _params(msg))
            except (ValueError, types.EngineOverloaded) as exc:
                # Typed, so the HTTP layer answers 400/429 as it does for an in-process engine.
                self.send(_to_wire(types.refusal(msg.request_id, exc, len(msg.prompt_token_ids))))
        elif isinstance(msg, wire.AbortRequest):
            self.engine.abort_request(msg.request_id)
        elif isinstance(msg, wire.Shutdown):
            self.stop = True
        elif isinstance(msg, wire.PauseForSwitch):
            self.pausing = True
        elif isinstance(msg, wire.Adopt):
            if msg.config_id != self.spec.start.config_id:
                logger.warning("rank %d: Adopt for configuration %d ignored (this is %d)", self.rank, msg.config_id,
                               self.spec.start.config_id)
                return
            self.engine.adopt_requests(msg.requests, keep_kv=msg.keep_kv)
            self.send(wire.Adopted(rank=self.rank, config_id=self.spec.start.config_id,
                                       num_requests=len(msg.requests)))
        else:
            logger.warning("rank %d: unexpected message %s", self.rank, type(msg).__name__)

    def _drain(self, timeout_ms: int) -> None:
        if self.sock.poll(timeout_ms):
            while True:
                try:
                    self._handle(wire.decode(self.sock.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    break

    def _send_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_stats < _STATS_INTERVAL_S:
            return
        self._last_stats = now
        s = self.engine.stats()
        tokens: list[int] = []
        if now - self._last_load >= _LOAD_INTERVAL_S:
            tokens = self.routed.tolist()
            if any(tokens):  # NOTE: the interval starts at a report that carried counts, so the first goes at once
                self._last_load = now
                self.routed.zero_()
        self.send(wire.RankStats(rank=self.rank, config_id=self.spec.start.config_id, num_running=s.num_running, num_waiting=s.num_waiting,
                                     kv_blocks_used=s.kv_blocks_used, kv_blocks_total=s.kv_blocks_total,
                                     num_preemptions_total=s.num_preemptions_total,
                                     num_recomputed_tokens_total=s.num_recomputed_tokens_total,
                                     expert_tokens=tokens if any(tokens) else []))

    def _agree(self) -> tuple[bool, bool, bool]:
        """-> (anyone has work, anyone is stopping, anyone is pausing), the same on every rank."""
        flags = torch.tensor([int(self.engine.has_work()), int(self.stop), int(self.pausing)], dtype=torch.int64,
                             device=self.torch_device)
        if self.group is not None:
            opts = dist.AllreduceOptions()
            opts.reduceOp = dist.ReduceOp.MAX
            self.group.allreduce([flags], opts).wait()
        return bool(flags[0]), bool(flags[1]), bool(flags[2])

    def _hand_over(self) -> None:
        """Stopped for a switch: give every request (and where its KV is) to the coordinator,
        then only wait to be told to exit. No collective runs after this point."""
        self._drain(0)
        requests = self.engine.export_requests()
        self.send(wire.Handover(rank=self.rank, config_id=self.spec.start.config_id, requests=requests))
        logger.info("rank %d: paused for a switch, handed over %d request(s)", self.rank, len(requests))
        while not self.stop:
            self._drain(100)
            if self.engine.has_work():  # requests that raced the pause: hand them over too
                self.send(wire.Handover(rank=self.rank, config_id=self.spec.start.config_id,
                                            requests=self.engine.export_requests()))

    def run(self) -> None:
        if self.spec.wait_for_weights:  # pre-initialised: ready only once the HMM has every byte
            waited = time.perf_counter()
            if sys.stdin.buffer.read(1) != b"1":
                logger.info("rank %d: its configuration's transfer ended without it; leaving", self.rank)
                return
            logger.info("rank %d: pre-initialised in %.2f s while its bytes arrived (%s), then waited %.2f s for "
                        "the last of them", self.rank, self.startup_seconds, self._phases_text(),
                        time.perf_counter() - waited)
        else:
            logger.info("rank %d: started in %.2f s (%s)", self.rank, self.startup_seconds, self._phases_text())
        self.send(wire.ExecutorReady(rank=self.rank, config_id=self.spec.start.config_id, pid=os.getpid(),
                                         bytes_read_from_checkpoint=0, startup_seconds=self.startup_seconds,
                                         attach_seconds=self.attach_seconds,
                                         weight_bytes=self.weight_bytes,
                                         attach_private_bytes=self.attach_private_bytes))
        self._send_stats(force=True)
        idle = False
        while True:
            self._drain(_IDLE_POLL_MS if idle else 0)
            busy, stopping, pausing = self._agree()
            if stopping:
                break
            if pausing:
                self._hand_over()
                break
            idle = not busy
            if idle:
                self._send_stats()
                continue
            for out in self.engine.step(always_forward=self.group is not None):
                self.send(_to_wire(out))
            self._send_stats()
        logger.info("rank %d: stopping", self.rank)

    def _phases_text(self) -> str:
        """'0.04 CPU-s; ms wall/CPU: setup 14/0, attach 5/3, ...'"""
        cpu = sum(c for _, c in self.phases.values())
        return f"{cpu:.2f} CPU-s; ms wall/CPU: " + ", ".join(
            f"{name} {wall * 1000:.0f}/{c * 1000:.0f}" for name, (wall, c) in self.phases.items())

    def close(self) -> None:
        self.group = None
        if self.store is not None:
            self.store.close()
        self.sock.close()
        self.ctx.term()


def _read_exactly(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise SystemExit(f"executor: stdin closed after {len(data)} of {n} bytes (the HMM went away)")
    return data


def set_compute_threads(world_size: int = 1) -> int:
    """torch's intra-op threads from the cores this process can actually use: its affinity mask
    capped by its CPU quota (a pod's `limits.cpu`, `serve --cpu-per-device`), where torch's
    default counts every core of the machine, divided among the configuration's `world_size`
    executors when they all run here ($ELASTICMOE_DEVICES_SHARE_HOST); OMP_NUM_THREADS, when
    set, wins.

    NOTE: called once at start (a spare executor warms up before it knows its configuration)
    and again with the configuration's size. Executors that together ask for no more threads
    than there are cores can let OpenMP spin between ops (its default) instead of sleeping:
    `serve --devices 1` decoded 16 streams at ~24 ms/step with OMP_WAIT_POLICY=PASSIVE and ~12 ms
    with the default spin (2 cores, small preset), as fast as the one-process server."""
    if os.environ.get("OMP_NUM_THREADS"):
        n, why = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        n, why = cgroup.available_cpus()
        if world_size > 1 and os.environ.get(cgroup.SHARED_HOST_ENV) == "1":
            n, why = max(1, n // world_size), f"{why}, shared by the {world_size} devices on this machine"
        torch.set_num_threads(n)
    logger.info("torch threads: %d (%s)", n, why)
    return n


def import_ahead() -> None:
    """What a spare executor can do before it knows its model: imports, and the configuration
    classes of every supported model type (transformers resolves them lazily: 0.28 s at a full
    core on the first `spec_from_json`, about 1 s of a 0.3-core device, inside a standby's start);
    the fd-passing client and the CPU backend, which `backends.get_backend` imports on first use
    (10 ms of CPU here, ~40 ms of a standby's start at 0.225 cores)."""
    import transformers

    for module in ("elasticmoe_worker.backends.fdpass", "elasticmoe_worker.backends.cpu"):
        importlib.import_module(module)

    for model_type in config_mod.SUPPORTED_MODEL_TYPES:
        transformers.CONFIG_MAPPING[model_type]
    transformers.AutoTokenizer  # noqa: B018  (a lazy module: this imports it)


@dataclasses.dataclass
class Preloaded:
    """The tokenizer files a spare was sent ahead (`wire.ExecutorPreload`), and the tokenizer
    loaded from them (None where that failed)."""

    files: dict[str, str]
    digest: str
    tokenizer: object | None


def _preload(msg: wire.ExecutorPreload) -> Preloaded:
    """A spare loads what it can before its spec (a failure is said; the executor tries again from
    the same files once it is given work, and fails there if they are bad)."""
    t0 = time.perf_counter()
    try:
        tokenizer = engine_mod.tokenizer_from_files(msg.tokenizer_files)
    except Exception as exc:  # noqa: BLE001 - the executor loads it again
        logger.warning("spare: could not load the tokenizer ahead: %s: %s", type(exc).__name__, exc)
        tokenizer = None
    else:
        logger.debug("spare: tokenizer loaded ahead in %.0f ms", 1000 * (time.perf_counter() - t0))
    return Preloaded(msg.tokenizer_files, msg.digest, tokenizer)


def _tokenizer(spec: wire.ExecutorSpec, preloaded: Preloaded | None):
    """The spec's tokenizer: the one loaded ahead when the files are the same (by digest where both
    have one: a spec whose spare was sent them ahead carries none), else from the spec's files."""
    rank = spec.start.rank
    if preloaded is not None and (spec.tokenizer_digest == preloaded.digest if spec.tokenizer_digest and preloaded.digest
                                  else spec.tokenizer_files == preloaded.files):
        if preloaded.tokenizer is not None:
            logger.info("rank %d: tokenizer loaded ahead, while this process waited as a spare", rank)
            return preloaded.tokenizer
        return engine_mod.tokenizer_from_files(preloaded.files)  # it failed ahead (said then): once more
    if not spec.tokenizer_files:
        raise RuntimeError(f"rank {rank}: the spec names its tokenizer files by digest {spec.tokenizer_digest[:12]!r} "
                           f"but this process was sent "
                           f"{'none ahead' if preloaded is None else f'others ahead ({preloaded.digest[:12]!r})'}")
    return engine_mod.tokenizer_from_files(spec.tokenizer_files)


def main() -> int:
    logging.basicConfig(level=os.environ.get("ELASTICMOE_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    procutil.die_with_parent()
    base_nice = os.environ.get(procutil.SPARE_NICE_ENV)  # a spare: at SPARE_NICE since the top of this module
    set_compute_threads()
    import_ahead()
    ready_fd = os.environ.pop(procutil.SPARE_READY_FD_ENV, None)
    if ready_fd is not None:  # the HMM counts this spare as ready from now on
        try:
            os.write(int(ready_fd), b"1")
            os.close(int(ready_fd))
        except (OSError, ValueError) as exc:
            logger.warning("could not say the spare is ready on fd %s: %s", ready_fd, exc)

    preloaded = None
    while True:  # frames: a length (8 bytes), then the message; wire.PRELOAD_FLAG in the length: a preload
        (length,) = struct.unpack("<Q", _read_exactly(sys.stdin.buffer, 8))
        if not length & wire.PRELOAD_FLAG:
            break
        preload = wire.decode(_read_exactly(sys.stdin.buffer, length & ~wire.PRELOAD_FLAG))
        assert isinstance(preload, wire.ExecutorPreload), "a preload frame holds an ExecutorPreload"
        preloaded = _preload(preload)
    if base_nice is not None:
        procutil.renice_threads(int(base_nice))
        logger.info("given work: back from nice %d to %s", procutil.SPARE_NICE, base_nice)
    spec = wire.decode(_read_exactly(sys.stdin.buffer, length))
    assert isinstance(spec, wire.ExecutorSpec), "an executor starts from an ExecutorSpec"
    if spec.start.world_size > 1:
        set_compute_threads(spec.start.world_size)
    rank = spec.start.rank
    executor = None
    try:
        executor = Executor(spec, preloaded)
        executor.run()
    except Exception as exc:  # report, then exit: the coordinator decides what happens next
        logger.exception("rank %d failed", rank)
        ctx = zmq.Context.instance()
        sock = transport.connect(ctx, spec.coordinator, f"exec-{spec.start.config_id}-{rank}-failed",
                                 os.environ.get(transport.SECRET_ENV, ""), linger_ms=2000)
        sock.send(wire.encode(wire.ExecutorFailed(rank=rank, error=f"{type(exc).__name__}: {exc}",
                                                          config_id=spec.start.config_id)))
        sock.close()
        return 1
    finally:
        if executor is not None:
            executor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The coordinator of a multi-device instance: wires the control channel, membership, routing
and the reconfiguration state machine together, and executes the machine's actions.

`Instance` implements the same `EngineClient` protocol as the single-process engine (through
`routing.Router`), so the OpenAI HTTP layer serves either unchanged, and it answers the admin
API (`status()`, `start_scale()`) with the typed models of `contract.admin`.

Constructing an `Instance` reads the checkpoint's small text files and starts nothing;
`start()` (its steps in `startup`) binds the control channel, starts (or waits for) the workers,
loads the model and hands the channel to its I/O thread. From then on every message and clock tick becomes a
`reconfig` event; `step` runs under one lock, and its actions run in order under that lock
(none of them blocks: sends are queued, worker removals run in the background).

A worker that dies (or whose memory fails) while serving starts a recovery (`reconfig`): the
instance goes on with the surviving devices, its requests in flight are recomputed there
(`routing`), and new ones wait meanwhile. With `expert_copies=2` every expert has a copy on a
second device, so the survivors need nothing from the checkpoint; with a `redundant_expert_bytes`
budget only the hottest experts have one (`hotcopies`), and the others are read from the checkpoint.

A coordinator that is killed leaves its workers holding their memory (a local fleet's only when
started with `orphan_timeout_s`, on a fixed control port, with a given worker secret; a pod's
always). A new one started with the same arguments binds the same address; the workers connect
again and send what they hold (`wire.HMMRejoin`); `start()` adopts them (`startup`, `reconfig_rejoin`)
and starts fresh executors on their memory, reading nothing from the checkpoint (which may be
gone: the model's config and tokenizer come from the workers too). Requests that were in
flight died with the old coordinator's HTTP connections.

Not guaranteed: a device lost during a switch's pause, or a recovery that fails (no survivor,
an expert in no copy and no readable checkpoint), leaves the instance Degraded; replacing the
lost worker (back to the desired device count) is the operator's (or a scale's) job.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import secrets
import threading
import time
import uuid
from typing import AsyncIterator, Sequence

import msgspec

from elasticmoe_worker.contract import admin, wire
from elasticmoe_worker.engine import engine as engine_mod
from elasticmoe_worker.engine import types
from elasticmoe_worker.instance import membership, rayfleet, reconfig, routing, startup, transport
from elasticmoe_worker.models import config as config_mod

logger = logging.getLogger(__name__)

_HISTORY_LIMIT = 10
_LEARNING_MODEL = "starting: the model is learned from the workers that hold it"


class ScaleInProgress(RuntimeError):
    """Another scale runs (or the instance cannot scale now): try again later."""


class Instance(startup.StartUp):
    def __init__(self, model_dir: str | pathlib.Path, num_devices: int,
                 config: engine_mod.EngineConfig | None = None, *, model_name: str | None = None,
                 backend: str = "cpu", collective_timeout_s: float = 60.0, startup_timeout_s: float = 600.0,
                 warm_workers: int = 1, fleet: str = "local", bind_host: str | None = "127.0.0.1",
                 advertise_host: str | None = None, control_port: int = 0, worker_secret: str = "",
                 heartbeat_timeout_s: float = 15.0, cpu_per_device: float | None = None,
                 ray_options: rayfleet.Options | None = None, expert_copies: int = 1,
                 redundant_expert_bytes: int | None = None, orphan_timeout_s: float | None = None,
                 warm_reserve: bool = True, scale_down_reserve_bytes: int = 0) -> None:
        """`fleet="local"` starts one HMM process per device here (a worker secret is generated
        when none is given), each in a cgroup with a quota of `cpu_per_device` cores if given;
        `fleet="external"` waits for workers that others start (`elasticmoe worker`, one pod
        per device) to connect to `tcp://<advertise_host>:<control_port>` with the same
        `worker_secret`; `fleet="ray"` starts one Ray actor per device (`rayfleet`), and the
        control channel binds and is advertised, where not given (None), on the address Ray
        reports for this process's node. `expert_copies`: copies of each routed expert, on
        distinct devices (fewer while there are fewer devices); 2 lets a lost device's experts
        come from a peer instead of the checkpoint. `redundant_expert_bytes` (with `expert_copies=2`):
        memory per device for the second copies; only the hottest experts get one, as many as fit
        (`hotcopies.redundant_within`; None: every expert). `orphan_timeout_s` (local fleet, with a fixed
        `control_port` and a given `worker_secret`): the workers outlive this coordinator that
        long, and a new one started with the same arguments adopts them. An instance that can
        adopt workers (that, or an external fleet) starts without `model_dir` when the workers
        hold the model. `warm_reserve`: a worker that registers without memory (a warm one) reserves
        what it would receive at the next scale-up by one (`reserve`), so the scale copies into
        memory that exists; False: it holds nothing until a scale allocates.
        `scale_down_reserve_bytes`: each serving device keeps up to this much memory allocated for
        experts a scale-down would bring it (`reserve`; whole experts, at most those a scale to one
        device would; 0: none)."""
        if not isinstance(expert_copies, int) or isinstance(expert_copies, bool) or not 1 <= expert_copies <= 2:
            raise ValueError(f"expert_copies: got {expert_copies!r}, expected 1 or 2")
        if redundant_expert_bytes is not None and (
                not isinstance(redundant_expert_bytes, int) or isinstance(redundant_expert_bytes, bool)
                or redundant_expert_bytes < 0 or expert_copies != 2):
            raise ValueError(f"redundant_expert_bytes: got {redundant_expert_bytes!r} with expert_copies "
                             f"{expert_copies}; expected None, or an int >= 0 with expert_copies 2")
        if not isinstance(scale_down_reserve_bytes, int) or isinstance(scale_down_reserve_bytes, bool) \
                or scale_down_reserve_bytes < 0:
            raise ValueError(f"scale_down_reserve_bytes: got {scale_down_reserve_bytes!r}, expected an int >= 0")
        if fleet not in ("local", "external", "ray"):
            raise ValueError(f"fleet: got {fleet!r}, expected 'local', 'external' or 'ray'")
        if fleet != "local" and cpu_per_device is not None:
            raise ValueError(f"cpu_per_device: only a local fleet puts its workers under a CPU quota (fleet "
                             f"{fleet!r}: pods get a CPU limit, Ray actors ask for CPUs)")
        if fleet != "ray" and (ray_options is not None or bind_host is None):
            raise ValueError(f"ray_options, bind_host=None: only for fleet 'ray' (got fleet {fleet!r})")
        if fleet == "external" and not worker_secret:
            raise ValueError(f"worker_secret: empty; an external fleet's workers must prove they hold it "
                             f"(set {transport.SECRET_ENV})")
        if orphan_timeout_s is not None and (fleet != "local" or not control_port or not worker_secret):
            raise ValueError(f"orphan_timeout_s: only for a local fleet on a fixed control_port with a given "
                             f"worker_secret (a restarted coordinator must bind the workers' address and prove the "
                             f"same secret); got fleet {fleet!r}, control_port {control_port}, worker_secret "
                             f"{'given' if worker_secret else 'empty'}")
        self._orphan_timeout_s = orphan_timeout_s
        # whether start() looks for the workers of a coordinator that died, to adopt them
        self._adopts = fleet == "external" or orphan_timeout_s is not None
        self.model_dir = pathlib.Path(model_dir).resolve()
        self.config = config or engine_mod.EngineConfig()
        self.backend = backend
        self.collective_timeout_s = collective_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.model_name = model_name or self.model_dir.name
        self._initial_devices = num_devices
        self.expert_copies = expert_copies
        self.redundant_expert_bytes = redundant_expert_bytes
        self.scale_down_reserve_bytes = scale_down_reserve_bytes
        self.spec: config_mod.ModelSpec | None = None
        self.tokenizer = None
        self.config_json, self.tokenizer_files, self.tokenizer_digest = "", {}, ""  # until `_set_model`
        self._max_model_len: int | None = None
        self.max_devices = num_devices
        if self._adopts and not (self.model_dir / "config.json").is_file():
            logger.warning("%s: no checkpoint; this coordinator can only serve a model its workers hold already",
                           self.model_dir)
        else:
            config_mod.load_spec(self.model_dir)  # a missing or unsupported checkpoint fails here, named
            # Kept in memory so devices that join later read nothing from the checkpoint directory.
            self._set_model((self.model_dir / "config.json").read_text(),
                            {n: (self.model_dir / n).read_text() for n in engine_mod.TOKENIZER_FILES
                             if (self.model_dir / n).is_file()})
        self._check_devices(num_devices)
        self.worker_secret = worker_secret or secrets.token_urlsafe(32)
        self._fleet_kind = fleet
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._warm_workers = warm_workers
        self.warm_reserve = warm_reserve
        self._cpu_per_device = cpu_per_device
        self._ray_options = ray_options or rayfleet.Options()
        self.transport = transport.Server(self.worker_secret, self._on_message, self._on_tick, bind_host=bind_host,
                                          port=control_port, advertise_host=advertise_host)
        self._lock = threading.RLock()
        self._scale_done = threading.Condition(self._lock)
        self.state: reconfig.State | None = None
        self.router: routing.Router | None = None
        self.members: membership.Membership | None = None
        # (message type, configuration) of the last transition told its peers, and what it was told
        self._locality_sent: tuple[tuple[str, int], dict] = (("", -1), {})
        self.executors: dict[int, wire.ExecutorReady] = {}
        self.last_scale: admin.ScaleRecord | None = None
        self.history: list[admin.ScaleRecord] = []
        self.outcomes: dict[str, int] = {o.value: 0 for o in admin.TERMINAL_OUTCOMES}
        self.phase_seconds: list[tuple[str, float]] = []  # (phase, seconds) of every finished scale, for metrics
        # why the requests in flight wait to be recomputed (broken executors, a lost device); None: they don't
        self.suspension: str | None = None
        self._resumed: tuple[int, int] | None = None  # (requests, tokens) the last Resume recomputed
        self._adopted_at: float | None = None  # start() of a coordinator that adopted workers, until a request ends
        self._started = False
        self._stopped = False

    def _set_model(self, config_json: str, tokenizer_files: dict[str, str], load_tokenizer: bool = True) -> None:
        """The model's facts, from the checkpoint's files or from the workers that hold it
        (`load_tokenizer=False`: later, `tokenizer_from_files` takes seconds)."""
        self.spec = config_mod.spec_from_json(config_json, origin=str(self.model_dir / "config.json"))
        self.max_devices = self.spec.num_experts
        if load_tokenizer:
            self.tokenizer = engine_mod.tokenizer_from_files(tokenizer_files)
        self._max_model_len = engine_mod.resolve_max_model_len(self.spec, self.config)
        self.config_json = config_json
        self.tokenizer_files = dict(tokenizer_files)
        self.tokenizer_digest = engine_mod.tokenizer_digest(self.tokenizer_files) if tokenizer_files else ""

    def _check_devices(self, num_devices: object) -> None:
        top = self.spec.num_experts if self.spec is not None else None
        if not isinstance(num_devices, int) or isinstance(num_devices, bool) or num_devices < 1 \
                or (top is not None and num_devices > top):
            raise ValueError(f"devices: got {num_devices!r}, expected an integer in [1, {top}] (one routed expert "
                             f"per device at least)" if top is not None
                             else f"devices: got {num_devices!r}, expected an integer >= 1")

    @property
    def max_model_len(self) -> int:
        if self._max_model_len is None:
            raise types.EngineDead(_LEARNING_MODEL)
        return self._max_model_len

    # -- start-up --------------------------------------------------------------------
    def start(self) -> "Instance":
        """Start the workers and load the model; -> self. Raises (after cleaning up) on failure."""
        assert not self._started, "start() once"
        self._started = True
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise
        return self

    def prewarm(self) -> None:
        """Keep the warm pool at its size (workers started ahead of a scale-up, holding nothing).
        Decided under the instance's lock, started outside it.
        NOTE: starting a worker is a process spawn, 10-140 ms on the busy bench machine per start.
        Under the lock (before), the control loop and a caller waiting for the scale that had just
        ended (`wait_scale`) waited for it: 4 -> 2's two starts added up to 0.14 s to that scale's
        time to new capacity whenever this thread took the lock first. A worker started from a
        stale decision (a scale began meanwhile) is harmless: starts are idempotent, and the next
        refill stops one the pool does not want."""
        with self._lock:
            if self.state is None or self._stopped:
                return
            sc = self.state.scale
            busy = set(sc.added) if sc is not None else set()
            start, stop = self.members.pool_changes(set(self.state.devices), set(self.state.warm), busy)
            for d in stop:
                self.transport.send(reconfig.hmm_dest(d), wire.Shutdown(reason="warm pool shrinks"))
                self.state = dataclasses.replace(self.state, warm=self.state.warm - {d})
            if stop:
                self.members.remove(stop)
        if start:
            self.members.add(start)

    # -- properties the HTTP layer and tests read ------------------------------------------
    @property
    def num_devices(self) -> int:
        return self.state.num_devices if self.state is not None else self._initial_devices

    @property
    def config_id(self) -> int:
        return self.state.config_id if self.state is not None else 0

    @property
    def fleet(self):
        return self.members.fleet

    @property
    def registered_devices(self) -> list[int]:
        """Devices whose worker is up and registered: serving ones and idle (warm) ones."""
        s = self.state
        return sorted(set(s.devices) | set(s.warm)) if s is not None else []

    @property
    def spares_ready(self) -> frozenset[int]:
        """Registered devices whose spare executor has finished importing, as of their last
        heartbeat (a second old at most): a scale that takes their spare starts a standby
        without interpreter start-up."""
        return self.members.spares_ready(self.registered_devices) if self.members is not None else frozenset()

    @property
    def phase(self) -> admin.Phase:
        if self.state is None:
            return admin.Phase.STARTING
        if not self.transport.alive:
            return admin.Phase.DEGRADED
        return self.state.phase

    def _health(self) -> tuple[bool, str | None]:
        if self.state is None:
            return False, "starting"
        if not self.transport.alive:
            return False, self.transport.error or "control channel stopped"
        return self.state.error is None, self.state.error

    # -- EngineClient ------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise types.EngineDead(_LEARNING_MODEL)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def apply_chat_template(self, messages_: Sequence[dict]) -> list[int]:
        if self.tokenizer is None:
            raise types.EngineDead(_LEARNING_MODEL)
        return engine_mod.chat_token_ids(self.tokenizer, messages_)

    def stats(self) -> types.EngineStats:
        healthy, error = self._health()
        if self.router is None:
            return types.EngineStats(0, 0, 0, 0, 0, healthy=healthy, error=error)
        return self.router.stats(healthy, error)

    def inflight_per_rank(self) -> list[int]:
        return self.router.inflight_per_rank()

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: types.SamplingParams) -> AsyncIterator[types.RequestOutput]:
        healthy, error = self._health()
        if not healthy:
            raise types.EngineDead(f"instance unhealthy: {error}")
        async for out in self.router.generate(request_id, prompt_token_ids, params):
            yield out

    def abort(self, request_id: str) -> None:
        flight = self.router.flights.get(request_id)
        if flight is not None and flight.rank is not None:
            self.transport.send(reconfig.exec_dest(self.router.config_id, flight.rank),
                                wire.AbortRequest(request_id=request_id))

    # -- the reconfiguration shell -------------------------------------------------------
    def _step(self, event: reconfig.Event) -> None:
        with self._lock:
            if self.state is None or self._stopped:
                return
            self.state, actions = reconfig.step(self.state, event)
            for action in actions:
                self._execute(action)

    def _delivery(self, msg: wire.TransitionReady) -> float:
        """Seconds from the HMM sending `msg` until now, when its clock is this one (same host); else -1."""
        if not msg.sent_at or not self.members.on_this_host(msg.device_index):
            return -1.0
        return max(0.0, time.time() - msg.sent_at)

    def _execute(self, action: reconfig.Action) -> None:
        if isinstance(action, reconfig.Send) and isinstance(action.msg, (wire.PrepareTransition, wire.MoveKV)):
            # The HMMs' locality keys, when every rank's is known: they need not exchange them; and their
            # mailboxes, when every rank has one: they tell each other what they copy without the store.
            # Taken once per transition, so that every rank is told the same (a heartbeat may teach a key
            # meanwhile).
            msg = action.msg
            sent = (type(msg).__name__, msg.config_id)
            if self._locality_sent[0] != sent:  # (a transition's messages are sent one after another)
                known = [self.members.locality(d) for d in msg.group_ranks]
                told = {}
                if None not in known:
                    told["locality"] = [k for k, _ in known]
                    if all(box for _, box in known):
                        told["mailboxes"] = [box for _, box in known]
                self._locality_sent = (sent, told)
            told = self._locality_sent[1]
            if isinstance(msg, wire.PrepareTransition):
                told = {**told, "sent_at": time.time()}  # (the HMM reports how long it took to arrive)
            if told:
                action = dataclasses.replace(action, msg=msgspec.structs.replace(msg, **told))
        if isinstance(action, reconfig.Send):
            if isinstance(action.msg, wire.MoveKV) and action.msg.rank == 0:  # (one line per copy, not per device)
                logger.info("switch to configuration %d: copying the KV of departing devices' sequences peer to "
                            "peer: %s", action.msg.config_id, ", ".join(
                                f"{len(c.src_blocks)} block(s) {c.src} -> {c.dst}" for c in action.msg.copies))
            self.transport.send(action.dest, action.msg)
        elif isinstance(action, reconfig.AddWorkers):
            self.members.add(action.devices)
        elif isinstance(action, reconfig.RemoveWorkers):
            self.members.remove(action.devices)
        elif isinstance(action, reconfig.PauseAdmission):
            self.router.pause()
        elif isinstance(action, reconfig.Commit):
            self.router.commit(action.config_id, action.num_devices, dict(action.ranks))
        elif isinstance(action, reconfig.Release):
            self.router.release(action.request_ids)
        elif isinstance(action, reconfig.Rebind):
            self.router.rebind(dict(action.ranks))
        elif isinstance(action, reconfig.FailRequests):
            if action.config_id == self.router.config_id:
                self.router.fail(action.ranks, action.error)
        elif isinstance(action, reconfig.SetHealth):
            self.router.error = action.error
            self.suspension = None
            if action.error is None:
                logger.info("instance recovered: executors of configuration %d ready; serving again", self.config_id)
            else:
                logger.error("instance unhealthy: %s", action.error)
        elif isinstance(action, reconfig.Recovering):
            self.router.set_config(action.config_id)
            logger.warning("restarting the executors on the HMMs' memory as configuration %d", action.config_id)
        elif isinstance(action, reconfig.Suspend):
            self.suspension = action.reason
            n = self.router.suspend()
            logger.warning("configuration %d is broken (%s): %d request(s) in flight wait to be recomputed, new ones "
                           "wait for the next configuration", action.config_id, action.reason, n)
        elif isinstance(action, reconfig.Resume):
            self.suspension = None
            self._resumed = self.router.resume()
            logger.info("configuration %d recomputes %d suspended request(s) (%d prompt + output tokens)",
                        self.router.config_id, *self._resumed)
        elif isinstance(action, reconfig.Finished):
            self._finished(action.record)
            self.transport.store.drop_scale(action.config_id, self.router.config_id)
        else:
            raise AssertionError(f"unknown action {action!r}")

    def _finished(self, record: admin.ScaleRecord) -> None:
        if self._resumed is not None:  # a recovery: the router knows what it recomputed
            record = msgspec.structs.replace(record, requests_handed_over=self._resumed[0],
                                             tokens_recomputed=self._resumed[1])
            self._resumed = None
        self.last_scale = record
        self.history = (self.history + [record])[-_HISTORY_LIMIT:]
        self.outcomes[record.outcome.value] = self.outcomes.get(record.outcome.value, 0) + 1
        self.phase_seconds += [(p, ms / 1000) for p, ms in record.phases_ms.items()]
        self._log_outcome(record)
        self._scale_done.notify_all()
        threading.Thread(target=self.prewarm, name="prewarm", daemon=True).start()

    def _log_outcome(self, record: admin.ScaleRecord) -> None:
        """One line for a finished scale (a recovery's a warning, a failure an error), and one for the
        KV its departing sequences kept. A coordinator restart's record is logged by `_adopt`."""
        if record.scale_id.startswith("restart-"):
            return
        if record.outcome == admin.Outcome.SUCCEEDED and record.scale_id.startswith("recovery-"):
            logger.warning("recovered on %d surviving device(s) in %.2f s (%s): %d request(s) recomputed, %d tokens; "
                           "phases, ms: %s", record.to_devices, record.duration_ms / 1000, record.reason,
                           record.requests_handed_over, record.tokens_recomputed, record.phases_ms)
        elif record.outcome == admin.Outcome.SUCCEEDED:
            logger.info("scaled %d -> %d devices in %.2f s (phases, ms: %s)%s", record.from_devices, record.to_devices,
                        record.duration_ms / 1000, record.phases_ms, reconfig.transfer_summary(record))
        else:
            logger.error("scale %d -> %d %s: %s; configuration %d serves", record.from_devices, record.to_devices,
                         record.outcome.value.lower(), record.message, self.config_id)
        if not record.scale_id.startswith("recovery-") and (
                record.sequences_kv_moved or record.kv_fallback or record.tokens_recomputed):
            (logger.warning if record.kv_fallback else logger.info)(
                "scale %d -> %d: %d departing sequence(s) kept their KV (%.2f MB copied peer to peer), %d token(s) "
                "recomputed%s", record.from_devices, record.to_devices, record.sequences_kv_moved,
                record.kv_bytes_moved / 1e6, record.tokens_recomputed,
                f"; the copy failed, so they were recomputed: {record.kv_fallback}" if record.kv_fallback else "")

    def _on_held(self, request_id: str) -> None:
        self._step(reconfig.RequestArrived(request_id, time.monotonic()))

    def _on_message(self, identity: str, msg: wire.Msg) -> None:
        now = time.monotonic()
        router = self.router
        if isinstance(msg, wire.Output):
            # logged before the output is handed on, so no client sees the completion first
            if self._adopted_at is not None and msg.finish_reason is not None and msg.request_id in router.flights:
                logger.warning("coordinator restart: first request completed %.2f s after start-up began",
                               now - self._adopted_at)
                self._adopted_at = None
            router.on_output(msg)
        elif isinstance(msg, wire.RankStats):
            router.on_stats(msg)
            if msg.expert_tokens:
                self._step(reconfig.ExpertLoadReported(tuple(msg.expert_tokens), now))
        elif isinstance(msg, wire.Heartbeat):
            self.members.heartbeat(msg, self.tokenizer_digest)
        elif isinstance(msg, wire.HMMHello):
            self.members.hello(msg)
            state = self.state
            # its spare can load the tokenizer now, and it can reserve memory for the scale that takes it
            # (what it would receive into is known once the instance serves; it says hello every second)
            if not msg.knows_model and self.tokenizer_files and state is not None:
                self.transport.send(reconfig.hmm_dest(msg.device_index), wire.ModelFiles(
                    config_json=self.config_json, tokenizer_files=self.tokenizer_files,
                    reserve_bytes=reconfig.warm_reserve_bytes(state) if self.warm_reserve else []))
            self._step(reconfig.WorkerRegistered(msg.device_index, now))
        elif isinstance(msg, wire.HMMRejoin):
            self._on_rejoin(msg, now)
        elif isinstance(msg, wire.TransitionReady):
            with self._lock:  # (reentrant: `_step` takes it again) the delivery and the phase count the wait for it
                self._step(reconfig.TransferReady(msg, time.monotonic(), self._delivery(msg)))
        elif isinstance(msg, wire.ExecutorReady):
            if msg.config_id >= self.config_id:
                self.executors[msg.rank] = msg
            self._step(reconfig.ExecutorReady(msg.rank, msg.config_id, now))
        elif isinstance(msg, wire.ExecutorFailed):
            self._step(reconfig.ExecutorFailed(msg.rank, msg.config_id, msg.error, now))
        elif isinstance(msg, wire.HMMFailed):
            self._step(reconfig.HMMFailed(msg.device_index, msg.config_id, msg.error, now))
        elif isinstance(msg, wire.Handover):
            self._step(reconfig.HandedOver(msg.rank, msg.config_id, tuple(msg.requests), now))
        elif isinstance(msg, wire.KVMoved):
            self._step(reconfig.KVMoved(msg, now))
        elif isinstance(msg, wire.Adopted):
            logger.debug("rank %d of configuration %d adopted %d request(s)", msg.rank, msg.config_id,
                         msg.num_requests)
        else:
            logger.warning("control channel: unexpected %s from %s; ignored", type(msg).__name__, identity)

    def _on_rejoin(self, msg: wire.HMMRejoin, now: float) -> None:
        """A worker of this running instance whose connection dropped and came back: it stopped
        its executors meanwhile, so its configuration is broken (handled as a failed executor:
        fresh executors on the same memory once it is one of the serving devices)."""
        if msg.config_id == 0:
            self._release_stray(msg)
            return
        self.members.seen(msg.device_index)
        state = self.state
        if state is not None and msg.device_index in state.devices:
            rank = state.devices.index(msg.device_index)
            logger.warning("device %d reconnected to this coordinator; its executor was stopped meanwhile",
                           msg.device_index)
            self._step(reconfig.ExecutorFailed(rank, state.config_id, f"device {msg.device_index}'s control "
                                               f"connection dropped and its HMM stopped its executor", now))
        else:
            logger.warning("device %d rejoined holding configuration %d, which this coordinator does not serve; "
                           "ignored", msg.device_index, msg.config_id)

    def _on_tick(self) -> None:
        now = time.monotonic()
        for device, code in self.members.new_deaths().items():
            self._step(reconfig.WorkerDied(device, self.members.death_reason(device, code), now))
        self._step(reconfig.Tick(now))

    # -- scaling (the admin API) ---------------------------------------------------------
    def start_scale(self, devices: int, reason: str = "manual", timeout_s: float = 300.0, scale_id: str = "") -> str:
        """Validate and start a scale; -> its scale_id (the caller's, or a new one). Raises
        ValueError for a bad target, ScaleInProgress while another runs or when unhealthy."""
        with self._lock:
            if self.state is None:
                raise ScaleInProgress("the instance is still starting")
            refused = reconfig.refuse_scale(self.state, devices)
            if refused is None and not self.transport.alive:
                refused = ("busy", f"instance unhealthy, not scaling: {self.transport.error}")
            if refused is not None:
                kind, message = refused
                raise (ValueError if kind == "invalid" else ScaleInProgress)(message)
            scale_id = scale_id or uuid.uuid4().hex[:12]
            ready, warm = self.spares_ready, self.state.warm
            informed = self.members.informed(self.registered_devices)
            self._step(reconfig.ScaleRequested(devices, scale_id, reason, timeout_s, startup.now_rfc3339(), time.monotonic(),
                                               ready=ready, informed=informed))
            sc = self.state.scale
            if sc is not None and sc.added:
                logger.info("scale %d -> %d adds device(s) %s: warm with a spare ready %s, warm %s, started now %s "
                            "(warm before: %s, ready: %s)", len(sc.old_devices), devices, list(sc.added),
                            sorted(ready & warm & set(sc.added)), sorted((warm - ready) & set(sc.added)),
                            sorted(set(sc.added) - warm), sorted(warm), sorted(ready & warm))
        return scale_id

    def find_scale(self, scale_id: str) -> admin.ScaleRecord | None:
        with self._lock:
            sc = self.state.scale if self.state is not None else None
            if sc is not None and sc.scale_id == scale_id:
                return sc.record
            return next((r for r in reversed(self.history) if r.scale_id == scale_id), None)

    def wait_scale(self, scale_id: str, timeout_s: float | None = None) -> admin.ScaleRecord:
        """Block until that scale has ended; -> its record."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._scale_done:
            while True:
                rec = self.find_scale(scale_id)
                if rec is not None and rec.outcome in admin.TERMINAL_OUTCOMES:
                    return rec
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"scale {scale_id} still running after {timeout_s:g} s")
                self._scale_done.wait(timeout=0.5 if remaining is None else min(0.5, remaining))

    def scale(self, devices: int, reason: str = "manual", timeout_s: float = 300.0) -> admin.ScaleRecord:
        """start_scale and wait for it; -> the record of what happened."""
        return self.wait_scale(self.start_scale(devices, reason, timeout_s))

    def status(self) -> admin.AdminStatus:
        with self._lock:
            stats = self.stats()
            s = self.state
            sc = s.scale if s is not None else None
            active = self.num_devices
            return admin.AdminStatus(
                phase=self.phase, healthy=stats.healthy, error=stats.error, configuration=self.config_id,
                devices=admin.DeviceCounts(desired=sc.target if sc else active, active=active,
                                           warming=len(sc.added) if sc else 0, registered=self.registered_devices,
                                           active_ids=list(s.devices) if s is not None else []),
                parallelism=admin.Parallelism(dp=active, ep=active, tp=1),
                requests=admin.RequestCounts(running=stats.num_running, waiting=stats.num_waiting),
                kv_blocks=admin.KVBlocks(used=stats.kv_blocks_used, total=stats.kv_blocks_total),
                scaling=True, current_scale=sc.record if sc else None, last_scale=self.last_scale,
                history=list(self.history), experts=self._expert_copies() if s is not None else None)

    def _expert_copies(self) -> admin.ExpertCopies:
        return reconfig.expert_copies_status(self.state)

    def scaling_counters(self) -> admin.ScalingCounters:
        status = self.status()
        with self._lock:
            return admin.ScalingCounters(
                devices=status.devices, scales_by_outcome=dict(self.outcomes), phase_seconds=list(self.phase_seconds),
                requests_handed_over=self.router.handed_over_total if self.router is not None else 0)

    # -- shutdown ------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 15.0) -> None:
        """Stop every process this instance started; idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        router = self.router
        if router is not None:
            if router.flights:
                logger.info("stopping with %d request(s) in flight; ending them", len(router.flights))
            router.error = "the instance is shutting down"
            router.fail(None, "the instance is shutting down")
        if self.members is not None:
            self.members.stop_adding()  # (a warm-pool start under way ends first: its worker is stopped below)
        if self.members is not None and self.transport.address:
            if self.state is not None:
                for rank in range(self.state.num_devices):
                    self.transport.send(reconfig.exec_dest(self.state.config_id, rank),
                                        wire.Shutdown(reason="instance stopping"))
            for i in list(self.members.fleet.workers):
                self.transport.send(reconfig.hmm_dest(i), wire.Shutdown(reason="instance stopping"))
            time.sleep(0.2)  # let the I/O thread flush them
        self.transport.stop()
        if self.members is not None:
            self.members.fleet.wait_stopped(time.monotonic() + timeout_s)
            self.members.fleet.close()
        logger.info("instance stopped")

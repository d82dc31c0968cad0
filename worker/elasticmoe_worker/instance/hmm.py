"""The HBM manager (HMM): the long-lived process of one device.

It owns the device's memory (weights, expert pages, KV pool), loads it once, hands
zero-copy handles to the executors it starts as child processes (the fds behind CPU and CUDA
handles reach them over this process's Unix socket, `backends.fdpass`, which serves its own
children only: no ptrace access, no capability), and outlives them: an
executor can be killed and restarted, or replaced by one for another configuration,
without the HMM reading the checkpoint again. Executors start as the device's spare, forked
ahead of need from the HMM's zygote, a process that did the imports once (`spares`, `zygote`).

Talks to the coordinator over one ZeroMQ DEALER socket (typed messages, see `messages`).
Exits when the coordinator says so. When the coordinator goes away (its connection drops), the
HMM stops its executors (their requests' clients were the coordinator's) and keeps its memory:
a coordinator that connects again (a restart on the same address with the same secret) gets an
`HMMRejoin` saying what it holds, and adopts it without the checkpoint. With an orphan timeout,
an HMM that no coordinator reaches for that long exits and frees its memory; a local fleet that
cannot be restarted (no fixed control address) has its HMMs die with the coordinator instead
(parent-death signal).
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import msgspec
import zmq
import zmq.utils.monitor

from elasticmoe_worker import backends, cliargs
from elasticmoe_worker.engine import engine as engine_mod
from elasticmoe_worker.contract import wire
from elasticmoe_worker.instance import kv_transfer, mailbox, memory, peer_copy, procutil, reserve, spares, transition, transport

logger = logging.getLogger("elasticmoe.hmm")

# A fleet of pods declares a worker dead after ~15 silent seconds (fleet.ExternalFleet).
HEARTBEAT_INTERVAL_S = 1.0


class HMM:
    def __init__(self, device_index: int, coordinator: str, backend_name: str, host: str = "",
                 orphan_timeout_s: float | None = None) -> None:
        self.device_index = device_index
        self.orphan_timeout_s = orphan_timeout_s  # None: wait for a coordinator as long as it takes
        self.coordinator = coordinator
        self.host = host  # where this device's collectives listen (see rendezvous.gloo_group)
        self.backend_name = backend_name
        self.backend = backends.get_backend(backend_name)
        self.locality = peer_copy.locality_key(self.backend)  # told the coordinator with each hello and heartbeat
        # as is its mailbox: what the HMMs of one host tell each other during a transition (only where they copy)
        self.mailbox = mailbox.server().name if self.locality else ""
        self.secret = os.environ.get(transport.SECRET_ENV, "")
        self.ctx = zmq.Context()
        self.sock = transport.connect(self.ctx, coordinator, f"hmm-{device_index}", self.secret,
                                      heartbeat_s=HEARTBEAT_INTERVAL_S)
        # How the HMM learns that its coordinator went away (the connection dropped, or its
        # ZeroMQ heartbeats went unanswered) and that one is back (a handshake succeeded).
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        # NOTE: counted from the start too: a worker whose coordinator died before it connected
        # (a warm one started just then) must not wait forever.
        self.orphaned_since: float | None = time.monotonic() if orphan_timeout_s is not None else None
        self.send_lock = threading.Lock()
        self.expert_ids: list[int] = []
        self.pending_expert_ids: list[int] | None = None
        self.memory: memory.DeviceMemory | None = None
        self.plan: wire.LoadPlan | None = None
        self.config_json = ""
        self.tokenizer_files: dict[str, str] = {}
        self.tokenizer_digest = ""  # engine.tokenizer_digest(tokenizer_files); "" while they are unknown
        # config id -> (process, rank): the serving executor, and a standby during a scale
        self.executors: dict[int, tuple[subprocess.Popen, int]] = {}
        # config id -> a pre-initialised standby waiting for its bytes (its stdin still open)
        self.gated: dict[int, spares.StdinFeeder] = {}
        self.exec_lock = threading.RLock()  # the transition thread starts standbys too
        self.spares = spares.Spares(device_index, lambda: (self.tokenizer_files, self.tokenizer_digest),
                                    lambda: self.stop)
        self.transition: threading.Thread | None = None
        self.reserve = reserve.Reserve(self.backend, device_index)  # a warm worker's memory for its first scale
        self.cancels: dict[int, transition.Cancel] = {}  # config id -> its transition's cancel switch
        # for HMMRejoin: the configuration whose memory this device holds, each started
        # configuration's (rank, world size), and the highest id seen
        self.held_config_id = 0
        self.config_ranks: dict[int, tuple[int, int]] = {}
        self.last_config_id = 0
        self.stop = False

    def send(self, msg: wire.Msg) -> None:
        with self.send_lock:  # the transition thread sends too
            self.sock.send(wire.encode(msg))

    def load(self, plan: wire.LoadPlan) -> None:
        self.plan = plan
        model_dir = pathlib.Path(plan.model_dir)
        # Read the small text files once, now: executors get them from us, not from disk.
        self.config_json = (model_dir / "config.json").read_text()
        self._know_tokenizer({n: (model_dir / n).read_text() for n in engine_mod.TOKENIZER_FILES
                              if (model_dir / n).is_file()})
        self.memory = memory.load_device(self.backend, self.device_index, plan)
        self.expert_ids = list(plan.expert_ids)
        self.send(self.memory.ready)

    def _know_tokenizer(self, files: dict[str, str]) -> None:
        self.tokenizer_files, self.tokenizer_digest = files, engine_mod.tokenizer_digest(files) if files else ""

    def learn_model(self, msg: wire.ModelFiles) -> None:
        """A warm worker learns the model before a scale takes it: the spares it has (and those it
        forks from now on) load the tokenizer while they wait."""
        if self.tokenizer_files:
            return  # it knows the model already (its checkpoint, a scale)
        self.config_json = msg.config_json
        self._know_tokenizer(dict(msg.tokenizer_files))
        waiting = self.spares.preload(self.tokenizer_files, self.tokenizer_digest)
        logger.info("device %d: told the model's files: its spares load the tokenizer while they wait (%d waiting "
                    "now); reserving %.1f MB in %d regions for the scale that takes it", self.device_index, waiting,
                    sum(msg.reserve_bytes) / 1e6, len(msg.reserve_bytes))
        self.reserve.fill(list(msg.reserve_bytes))

    def start_executor(self, start: wire.StartExecutor, held: list[int] | None = None,
                       wait_for_weights: bool = False) -> None:
        """Start an executor of `start.config_id` on this device's memory. `wait_for_weights`: a
        pre-initialised standby, started by the transition thread once the new regions exist;
        it says ready only after `release_standby` (every byte received)."""
        assert self.memory is not None, "StartExecutor before the device has memory"
        with self.exec_lock:
            if start.replace:
                self.stop_executors()
            # a standby (or a recovery's executor) serves the configuration being prepared, with the
            # experts this device will hold; of those it maps only the ones it computes (the others
            # are redundant copies, kept for a peer's loss)
            if held is None:
                held = self.pending_expert_ids if self.pending_expert_ids is not None else self.expert_ids
            computed = [e for e in held if start.expert_owner[e] == start.rank]
            proc = self.spares.take()
            if proc is None:
                proc = self.spares.spawn_now()
            # files the spare was sent ahead are named by their digest, not sent again
            ahead = self.spares.preloaded(proc.pid) == self.tokenizer_digest != ""
            spec = wire.ExecutorSpec(
                device_index=self.device_index, backend=self.backend_name, coordinator=self.coordinator,
                config_json=self.config_json, tokenizer_files={} if ahead else self.tokenizer_files,
                model_name=start.model_name, ready=self.memory.ready_for(computed), start=start, host=self.host,
                wait_for_weights=wait_for_weights, tokenizer_digest=self.tokenizer_digest,
            )
            feeder = self.spares.give_work(proc, join_device=not wait_for_weights)
            feeder.write(spares.frame(spec))
            if wait_for_weights:
                self.gated[start.config_id] = feeder
            else:
                feeder.close()
            if not wait_for_weights:
                self.spares.order()  # the next standby is warm before it is needed
            # NOTE: a scale's standby takes the spare; the next one is spawned when the scale ends
            # (`commit`, `abort`): spawned now, its imports (~150 MB, ~2.5 CPU-s) ran beside the old
            # executor and the standby, the peak of the device's memory during the scale
            self.executors[start.config_id] = (proc, start.rank)
        self.config_ranks[start.config_id] = (start.rank, start.world_size)
        self.last_config_id = max(self.last_config_id, start.config_id)
        if self.pending_expert_ids is None and not wait_for_weights:
            # an executor of the memory held now (not a scale's standby, whose memory is still arriving
            # or not yet committed: a coordinator restart must not adopt that configuration)
            self.held_config_id = start.config_id
        logger.info("device %d: executor rank %d of %d started (pid %d, configuration %d%s%s)", self.device_index,
                    start.rank, start.world_size, proc.pid, start.config_id,
                    ", pre-initialised while its bytes arrive" if wait_for_weights else "",
                    ", its tokenizer sent ahead" if ahead else "")

    def release_standby(self, config_id: int) -> None:
        """Every byte of `config_id` is here: its pre-initialised standby may say ready."""
        with self.exec_lock:
            feeder = self.gated.pop(config_id, None)
        if feeder is not None:
            feeder.write(b"1")
            feeder.close()

    def stop_executors(self, keep: int | None = None, timeout_s: float = 10.0) -> None:
        with self.exec_lock:
            stopping = [(c, self.executors.pop(c)[0]) for c in [c for c in self.executors if c != keep]]
            for config_id, _ in stopping:
                gate = self.gated.pop(config_id, None)
                if gate is not None:
                    gate.close()  # EOF: a waiting standby leaves without saying ready
        for config_id, proc in stopping:
            if proc.poll() is None:
                proc.terminate()
                proc.send_signal(signal.SIGCONT)  # a stopped one acts on the SIGTERM only once it runs
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def _check_executors(self) -> None:
        with self.exec_lock:
            items = list(self.executors.items())
        for config_id, (proc, rank) in items:
            if proc.poll() is None:
                continue
            with self.exec_lock:
                if self.executors.get(config_id, (None,))[0] is not proc:
                    continue  # replaced or stopped meanwhile
                del self.executors[config_id]
                self.gated.pop(config_id, None)
            if proc.returncode != 0 and not self.stop:
                self.send(wire.ExecutorFailed(
                    rank=rank, config_id=config_id,
                    error=f"executor on device {self.device_index} exited with code {proc.returncode}"))

    def prepare_transition(self, msg: wire.PrepareTransition) -> None:
        """Allocate and receive in a thread; the control loop (and the serving executor) go on."""
        told = time.time() - msg.sent_at if msg.sent_at else -1.0
        if self.memory is None:
            if not msg.tokenizer_files and not self.tokenizer_files:
                raise ValueError(f"transition {msg.config_id} makes device {self.device_index} join, but neither it "
                                 f"nor a ModelFiles message gave this HMM the model's tokenizer files")
            self.config_json = msg.config_json
            if msg.tokenizer_files:  # (one that stays, or said in its heartbeats it holds them, is sent none)
                self._know_tokenizer(dict(msg.tokenizer_files))
            logger.info("device %d: joins configuration %d; the model's tokenizer files %s", self.device_index,
                        msg.config_id, "came with it" if msg.tokenizer_files else "were told before, not sent again")
            self.memory = transition.allocate_new_device(self.backend, self.device_index, msg, self.reserve.take)

        cancel = self.cancels[msg.config_id] = transition.Cancel()
        self.last_config_id = max(self.last_config_id, msg.config_id)

        def work() -> None:
            def standby() -> None:  # the regions exist: prepare the next executor while the bytes move
                if msg.standby is not None and cancel.reason is None:
                    self.start_executor(msg.standby, held=list(msg.expert_ids), wait_for_weights=True)

            try:
                result = transition.run(self.backend, self.device_index, self.memory, msg, self.coordinator,
                                        self.secret, cancel, self.host, on_allocated=standby,
                                        allocate=self.reserve.take)
                self.pending_expert_ids = list(msg.expert_ids)
                self.release_standby(msg.config_id)
                self.send(wire.TransitionReady(
                    device_index=self.device_index, config_id=msg.config_id,
                    ready=result.memory.ready_for(msg.expert_ids), transfer_seconds=result.seconds,
                    bytes_received=result.bytes_received, bytes_sent=result.bytes_sent,
                    data_seconds=result.data_seconds, transport=result.transport, setup_seconds=result.setup_seconds,
                    cpu_seconds=result.cpu_seconds, throttled_seconds=result.throttled_seconds,
                    told_seconds=told, sent_at=time.time()))
            except Exception as exc:
                if cancel.reason is not None:  # aborted: nobody waits for this one any more
                    logger.info("device %d: transition %d stopped (%s)", self.device_index, msg.config_id,
                                cancel.reason)
                    return
                logger.exception("device %d: transition %d failed", self.device_index, msg.config_id)
                self.send(wire.HMMFailed(device_index=self.device_index, config_id=msg.config_id,
                                             error=f"transition {msg.config_id}: {type(exc).__name__}: {exc}"))

        self.transition = threading.Thread(target=work, name=f"transition-{msg.config_id}", daemon=True)
        self.transition.start()

    def move_kv(self, msg: wire.MoveKV) -> None:
        """Copy KV blocks to or from peers in a thread (see kv_transfer); answer KVMoved either way."""
        assert self.memory is not None, "MoveKV before the device has memory"

        def work() -> None:
            try:
                result = kv_transfer.run(self.backend, self.device_index, self.memory, msg,
                                         self.coordinator, self.secret, transition.Cancel(), self.host)
                reply = wire.KVMoved(device_index=self.device_index, config_id=msg.config_id, ok=True,
                                     bytes_sent=result.bytes_sent, bytes_received=result.bytes_received,
                                     seconds=result.seconds)
            except Exception as exc:
                logger.exception("device %d: KV copy for configuration %d failed", self.device_index, msg.config_id)
                reply = wire.KVMoved(device_index=self.device_index, config_id=msg.config_id, ok=False,
                                     error=f"{type(exc).__name__}: {exc}")
            self.send(reply)

        threading.Thread(target=work, name=f"kv-{msg.config_id}", daemon=True).start()

    def commit(self, msg: wire.CommitTransition) -> None:
        self.cancels.pop(msg.config_id, None)
        if self.pending_expert_ids is not None:
            self.expert_ids = self.pending_expert_ids
            self.pending_expert_ids = None
        freed = self.memory.drop_experts_except(self.expert_ids) if self.memory else 0
        self.held_config_id = msg.config_id
        self.stop_executors(keep=msg.config_id)
        serving = self.executors.get(msg.config_id)
        if serving is not None:
            self.spares.join_device(serving[0])  # the standby serves now: the device's quota from here on
        self._replace_spare()
        taken = self.reserve.taken
        # keep_reserve: a `Reserve` follows and says what of the rest to keep; else it was for this
        # device's first scale (a warm worker's) and serving devices keep none
        unused = 0 if msg.keep_reserve else self.reserve.release()
        parts = ([f"{taken} region(s) came from its reserve"] if taken else []) + (
            [f"{unused / 1e6:.1f} MB of it unused and released"] if unused else [])
        logger.info("device %d: configuration %d committed; %.1f MB of experts released%s", self.device_index,
                    msg.config_id, freed / 1e6, "; " + ", ".join(parts) if parts else "")

    def keep_reserve(self, msg: wire.Reserve) -> None:
        """Hold regions for experts a scale-down would bring this device (`wire.Reserve`)."""
        freed, missing = self.reserve.resize(list(msg.reserve_bytes), why=f"a scale-down from configuration "
                                             f"{msg.config_id}")
        logger.info("device %d: reserve for a scale-down: %.1f MB in %d region(s) (%.1f MB freed, %d "
                    "region(s) to allocate)", self.device_index, sum(msg.reserve_bytes) / 1e6, len(msg.reserve_bytes),
                    freed / 1e6, missing)

    def _replace_spare(self) -> None:
        """A spare again after a scale took it (its old executor has exited by now)."""
        with self.exec_lock:
            self.spares.forget_except({proc.pid for proc, _ in self.executors.values()})
            self.spares.order_unless_alive()

    def abort(self, msg: wire.AbortTransition) -> None:
        cancel = self.cancels.pop(msg.config_id, None)
        if cancel is not None:
            cancel.set(msg.reason)
        if self.transition is not None:
            # NOTE: its receives write into regions about to be released: let it leave first.
            self.transition.join(timeout=5.0)
            if self.transition.is_alive():
                logger.error("device %d: transition %d did not stop within 5 s", self.device_index, msg.config_id)
        self.pending_expert_ids = None
        freed = self.memory.drop_experts_except(self.expert_ids) if self.memory else 0
        self.stop_executors(keep=max((c for c in self.executors if c < msg.config_id), default=None))
        self._replace_spare()
        logger.warning("device %d: transition %d aborted (%s); %.1f MB released", self.device_index,
                       msg.config_id, msg.reason, freed / 1e6)

    def _on_connection_event(self) -> None:
        event = zmq.utils.monitor.recv_monitor_message(self.monitor)
        if event["event"] == zmq.EVENT_DISCONNECTED and self.orphaned_since is None:
            self.orphaned_since = time.monotonic()
            logger.warning("device %d: the coordinator went away; stopping %d executor(s) (their requests came "
                           "from it), keeping this device's memory and waiting %s for a coordinator", self.device_index,
                           len(self.executors), "indefinitely" if self.orphan_timeout_s is None
                           else f"up to {self.orphan_timeout_s:g} s")
            for config_id in list(self.cancels):  # a scale that was under way will not be finished by anyone
                self.abort(wire.AbortTransition(config_id=config_id, reason="the coordinator went away"))
            self.stop_executors()
        elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED and self.orphaned_since is not None:
            away_s = time.monotonic() - self.orphaned_since
            self.orphaned_since = None
            if self.memory is not None:
                logger.info("device %d: a coordinator is back after %.1f s; rejoining with configuration %d's memory",
                            self.device_index, away_s, self.held_config_id)
                self.send(self.rejoin())

    def rejoin(self) -> wire.HMMRejoin:
        rank, world_size = self.config_ranks.get(self.held_config_id, (-1, 0))
        return wire.HMMRejoin(
            device_index=self.device_index, pid=os.getpid(), config_id=self.held_config_id,
            last_config_id=self.last_config_id, rank=rank, world_size=world_size, expert_ids=list(self.expert_ids),
            ready=self.memory.ready_for(self.expert_ids), config_json=self.config_json,
            tokenizer_files=dict(self.tokenizer_files))

    def run(self) -> None:
        threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True).start()
        self.spares.order()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        next_hello = 0.0
        while not self.stop:
            if (self.orphaned_since is not None and self.orphan_timeout_s is not None
                    and time.monotonic() - self.orphaned_since > self.orphan_timeout_s):
                logger.warning("device %d: no coordinator for %.0f s (--orphan-timeout-s); exiting, freeing this "
                               "device's memory", self.device_index, self.orphan_timeout_s)
                break
            # Until told what to hold, say hello every second: a coordinator that starts (or
            # restarts) after us still learns of us.
            if self.memory is None and self.pending_expert_ids is None and time.monotonic() >= next_hello:
                next_hello = time.monotonic() + HEARTBEAT_INTERVAL_S
                self.send(wire.HMMHello(device_index=self.device_index, pid=os.getpid(),
                                        knows_model=bool(self.tokenizer_files), locality=self.locality,
                                        mailbox=self.mailbox))
            events = dict(poller.poll(200))
            if self.monitor in events:
                self._on_connection_event()
            if self.sock in events:
                try:
                    msg = wire.decode(self.sock.recv())
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    logger.warning("device %d: dropped a malformed message: %s", self.device_index, exc)
                    continue
                try:
                    if isinstance(msg, wire.LoadPlan):
                        self.load(msg)
                    elif isinstance(msg, wire.StartExecutor):
                        self.start_executor(msg)
                    elif isinstance(msg, wire.PrepareTransition):
                        self.prepare_transition(msg)
                    elif isinstance(msg, wire.CommitTransition):
                        self.commit(msg)
                    elif isinstance(msg, wire.Reserve):
                        self.keep_reserve(msg)
                    elif isinstance(msg, wire.MoveKV):
                        self.move_kv(msg)
                    elif isinstance(msg, wire.ModelFiles):
                        self.learn_model(msg)
                    elif isinstance(msg, wire.AbortTransition):
                        self.abort(msg)
                    elif isinstance(msg, wire.Shutdown):
                        self.stop = True
                    else:
                        logger.warning("device %d: unexpected message %s", self.device_index, type(msg).__name__)
                except Exception as exc:
                    logger.exception("device %d: %s failed", self.device_index, type(msg).__name__)
                    self.send(wire.HMMFailed(device_index=self.device_index, error=f"{type(exc).__name__}: {exc}"))
            self._check_executors()

    def _heartbeats(self) -> None:
        """From a thread with its own socket: loading weights can hold the main loop for long."""
        sock = transport.connect(self.ctx, self.coordinator, f"hb-{self.device_index}", self.secret, linger_ms=0)
        try:
            while not self.stop:
                sock.send(wire.encode(wire.Heartbeat(device_index=self.device_index, loaded=self.memory is not None,
                                                     spare_ready=self.spares.ready, locality=self.locality,
                                                     mailbox=self.mailbox, tokenizer_digest=self.tokenizer_digest)))
                time.sleep(HEARTBEAT_INTERVAL_S)
        finally:
            sock.close()

    def close(self) -> None:
        self.stop = True
        # The coordinator told the executors to stop too; give them a moment to leave their
        # collective group together, so no peer sees a reset connection.
        deadline = time.monotonic() + 3.0
        while any(p.poll() is None for p, _ in self.executors.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.stop_executors()
        self.spares.close()
        self.reserve.release()
        if self.memory is not None:
            self.memory.close()
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close()
        self.ctx.term()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m elasticmoe_worker.instance.hmm",
                                description="The HBM manager of one device (started by a fleet, not by hand).")
    cliargs.add_worker_arguments(p)
    args = p.parse_args(argv)
    # NOTE: with an orphan timeout the coordinator can be restarted and adopt us: we must outlive it.
    return run_worker(args, die_with_parent=args.orphan_timeout_s is None)


def run_worker(args: argparse.Namespace, die_with_parent: bool = False) -> int:
    """Run the HMM of one device until the coordinator stops it or a signal arrives. The
    worker proves it holds $ELASTICMOE_WORKER_SECRET (the control channel's CURVE keys derive
    from it). A local fleet's workers die with the coordinator that forked them unless they
    have an orphan timeout (the coordinator can be restarted); a pod's worker lives on its own."""
    if args.device_index < 0:
        raise ValueError(f"--device-index: got {args.device_index}, expected an integer >= 0")
    if not os.environ.get(transport.SECRET_ENV, ""):
        raise ValueError(f"{transport.SECRET_ENV}: not set; a worker needs the worker secret its coordinator has "
                         f"(in Kubernetes, from the instance's Secret)")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=os.environ.get("ELASTICMOE_LOG_LEVEL", "INFO").upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if die_with_parent:
        procutil.die_with_parent()
    procutil.raise_fd_limit()
    hmm = HMM(args.device_index, args.coordinator, args.backend, args.host, args.orphan_timeout_s)
    signal.signal(signal.SIGTERM, lambda *_: setattr(hmm, "stop", True))
    signal.signal(signal.SIGINT, lambda *_: setattr(hmm, "stop", True))  # the coordinator stops us
    try:
        hmm.run()
    finally:
        hmm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

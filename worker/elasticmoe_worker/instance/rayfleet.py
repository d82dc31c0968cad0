"""The Ray fleet (`--fleet ray`): one Ray actor per device, on whichever node of a Ray cluster
has that device's resources, each supervising the worker process a `fleet.LocalFleet` would
start on this machine (the HMM, which starts the device's executors).

Why it exists: users who outgrow one machine but run no Kubernetes run inference on a Ray
cluster. Ray places the workers and reports where they run; everything else is the instance's
own: workers dial the coordinator's CURVE-authenticated control channel at the address Ray
reports for the coordinator's node, form their collective groups on their own node's address
(`--host`), and weights move peer-to-peer between workers as on one machine. Nothing goes
through Ray's object store: the only Ray calls carry the worker's command line, its
environment (the worker secret, never on a command line) and, back, its node and pid.

Each device gets a placement group of one bundle (its resources: `resources()`), created when
the device is added and removed with it, so the fleet's reservations grow and shrink with the
instance, device by device (a Ray placement group cannot change its bundles once made). A
device whose bundle no node can hold within `placement_timeout_s` is reported dead, like any
worker that never came up.

A worker is lost when its process exits or its actor dies (`ray.kill`, its node removed from
the cluster): `dead()` reports it and `death_reason()` says which. The actors belong to the
coordinator's Ray job: if the coordinator's process ends, Ray ends them, and their worker
processes end with them (parent-death signal).

Not guaranteed / not done: the first devices read the checkpoint from the same path on their
node (later ones get the weights from peers); Ray does not restart a lost worker (the instance
handles the loss like any other); a worker whose actor Ray cannot reach (a network split) is
lost at once, even if it still runs; nothing is installed on the nodes (each needs elasticmoe in
the Python that runs Ray); a coordinator that cannot reach Ray any more cannot start workers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from elasticmoe_worker.instance import fleet as fleet_mod

logger = logging.getLogger(__name__)

RAY_REQUIREMENT = "ray>=2.40"
# The actors are named (`elasticmoe-<fleet id>-device-<index>-<n>`, in the logs) in this Ray
# namespace: `ray.get_actor(name, namespace=RAY_NAMESPACE)` finds one from any driver.
RAY_NAMESPACE = "elasticmoe"
_WATCH_INTERVAL_S = 0.5


def import_ray():
    """-> the `ray` module; RuntimeError naming the package when it is not installed."""
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError(f"--fleet ray: the `ray` package is not installed; install it with "
                           f"pip install 'elasticmoe[ray]' (or pip install '{RAY_REQUIREMENT}')") from exc
    return ray


@dataclasses.dataclass(frozen=True)
class Options:
    address: str | None = None  # None: ray.init's own search ($RAY_ADDRESS, the cluster `ray start` made here)
    cpus_per_device: float = 1.0
    placement_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not self.cpus_per_device > 0:
            raise ValueError(f"ray cpus_per_device: got {self.cpus_per_device!r}, expected a number of CPUs > 0")
        if not self.placement_timeout_s > 0:
            raise ValueError(f"ray placement_timeout_s: got {self.placement_timeout_s!r}, expected seconds > 0")


def resources(backend: str, cpus_per_device: float) -> dict[str, float]:
    """The Ray resources of one device (its bundle and its actor's demand): its CPUs, plus one
    GPU (`cuda`) or one `NPU` (`ascend`, the name Ray gives Ascend devices)."""
    accelerator = {"cpu": {}, "cuda": {"GPU": 1.0}, "ascend": {"NPU": 1.0}}
    if backend not in accelerator:
        raise ValueError(f"backend: got {backend!r}, expected one of {', '.join(accelerator)}")
    return {"CPU": float(cpus_per_device), **accelerator[backend]}


class WorkerActor:
    """Lives in a Ray worker process on the device's node (made an actor by `ray.remote` in
    `RayFleet`; a plain class here so that importing this module needs no Ray)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._exited = threading.Event()

    def start(self, argv: list[str], env: dict[str, str]) -> tuple[str, str, int]:
        """Start the worker process: `python -m elasticmoe_worker.instance.hmm ARGV --host <this
        node's address>`, with `env` over this process's environment (which holds what Ray set
        for the device, e.g. CUDA_VISIBLE_DEVICES); -> (node address, Ray node id, pid)."""
        import ray

        host = ray.util.get_node_ip_address()
        cmd = [sys.executable, "-m", "elasticmoe_worker.instance.hmm", *argv, "--host", host]
        started: list = []
        ready = threading.Event()
        threading.Thread(target=self._supervise, args=(cmd, {**os.environ, **env}, started, ready),
                         name="worker-supervisor", daemon=True).start()
        ready.wait()
        if isinstance(started[0], BaseException):
            raise started[0]
        return host, ray.get_runtime_context().get_node_id(), started[0].pid

    def _supervise(self, cmd: list[str], env: dict[str, str], started: list, ready: threading.Event) -> None:
        # NOTE: the worker's parent-death signal fires when the *thread* that forked it exits
        # (see fleet.LocalFleet); this thread forks it and lives exactly as long as it.
        try:
            self._proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        except BaseException as exc:
            started.append(exc)
            ready.set()
            raise
        started.append(self._proc)
        ready.set()
        self._proc.wait()
        self._exited.set()

    def wait_exit(self) -> int:
        """Block until the worker process has exited; -> its exit code."""
        self._exited.wait()
        return self._proc.returncode

    def stop(self, timeout_s: float) -> int:
        """SIGTERM the worker, SIGKILL it after `timeout_s`; -> its exit code."""
        proc = self._proc
        if proc.poll() is None:
            proc.terminate()
        if not self._exited.wait(timeout_s):
            proc.kill()
            self._exited.wait()
        return proc.returncode


@dataclasses.dataclass(eq=False)
class _Worker:
    device_index: int
    name: str
    pg: Any = None
    actor: Any = None
    exit_ref: Any = None  # WorkerActor.wait_exit's result: ready when the worker is gone
    node_ip: str = ""
    node_id: str = ""
    pid: int = 0
    started: bool = False  # the start thread is done with it (successfully or not)
    removed: bool = False
    torn_down: bool = False
    code: int | None = None  # set when it is gone unasked
    reason: str = ""


class RayFleet:
    starts_workers = True

    def __init__(self, backend: str = "cpu", env: dict[str, str] | None = None, options: Options = Options()) -> None:
        """Connect to the Ray cluster (unless this process already is). Workers are started by
        `add` once `coordinator_address` is set (the control channel binds after this, on
        `node_ip`, the address Ray reports for this process's node)."""
        self.backend = backend
        self.options = options
        self.bundle = resources(backend, options.cpus_per_device)
        self.env = dict(env or {})  # the worker secret travels here (a Ray task argument), never on a command line
        self.coordinator_address = ""
        self._ray = ray = import_ray()
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:
            # NOTE: log_to_driver: the workers' logs (and their executors') show in the coordinator's.
            ray.init(address=options.address, log_to_driver=True, logging_level=logging.WARNING)
        self.node_ip: str = ray.util.get_node_ip_address()
        self._actor_class = ray.remote(WorkerActor)
        self._fleet_id = uuid.uuid4().hex[:8]
        self._generation = 0
        self.workers: dict[int, _Worker] = {}
        self._lock = threading.Lock()
        # Every thread that calls Ray (start, remove, watch) is joined before `ray.shutdown()`:
        # a Ray call after it re-initialises Ray in this process (a new local cluster, a new
        # auth token) and the driver exits with an error.
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self._watcher = threading.Thread(target=self._watch, name="ray-fleet-watch", daemon=True)
        self._watcher.start()
        logger.info("ray fleet %s: connected to the Ray cluster as node %s; each device asks for %s", self._fleet_id,
                    self.node_ip, self.bundle)

    # -- the fleet interface -------------------------------------------------------------
    def add(self, device_index: int) -> None:
        """Reserve the device's bundle and start its actor, in the background (placement can
        take long; the coordinator's loop must not wait). A failure shows in `dead()`."""
        assert self.coordinator_address, "set coordinator_address before adding workers"
        with self._lock:
            if self._closed:
                logger.info("device %d: not started: the Ray fleet is closing", device_index)
                return
            current = self.workers.get(device_index)
            if current is not None and current.code is None:
                return  # idempotent
            self._generation += 1
            worker = _Worker(device_index, f"elasticmoe-{self._fleet_id}-device-{device_index}-{self._generation}")
            self.workers[device_index] = worker
            if current is not None:  # a dead one in its place: its actor and bundle still go
                current.removed = True
        if current is not None and current.started:
            self._background(self._teardown, current, name="ray-remove")
        self._background(self._start, worker, name=f"ray-add-{device_index}", starts=True)

    def remove(self, device_index: int, timeout_s: float = 10.0, wait: bool = True) -> None:
        """Stop that worker (SIGTERM, SIGKILL after `timeout_s`), end its actor and release its
        bundle. The index is free again at once; with wait=False this runs in the background."""
        with self._lock:
            worker = self.workers.pop(device_index, None)
            if worker is None:
                return  # idempotent
            worker.removed = True
            if not worker.started:
                return  # its start thread sees `removed` and tears it down
        if wait:
            self._teardown(worker, timeout_s)
        else:
            self._background(self._teardown, worker, timeout_s, name="ray-remove")

    def dead(self) -> dict[int, int]:
        with self._lock:
            return {i: w.code for i, w in self.workers.items() if w.code is not None}

    def death_reason(self, device_index: int, code: int) -> str:
        worker = self.workers.get(device_index)
        return worker.reason if worker is not None and worker.reason else fleet_mod.exit_reason(code)

    def pids(self) -> dict[int, int]:
        """Device index -> worker pid (on its node, see `nodes`)."""
        return {i: w.pid for i, w in list(self.workers.items()) if w.pid}

    def nodes(self) -> dict[int, str]:
        """Device index -> the address of the node its worker runs on."""
        return {i: w.node_ip for i, w in list(self.workers.items()) if w.node_ip}

    def seen(self, device_index: int) -> None:
        """Liveness comes from Ray (the actor) and the process's exit, not from messages."""

    def wait_stopped(self, deadline: float) -> None:
        refs = [w.exit_ref for w in list(self.workers.values()) if w.exit_ref is not None]
        if refs:
            self._ray.wait(refs, num_returns=len(refs), timeout=max(0.1, deadline - time.monotonic()))

    def close(self, timeout_s: float = 20.0) -> None:
        """Stop every worker, wait for the threads that still call Ray, then disconnect (only
        if this fleet connected). Nothing is started after this began."""
        with self._lock:
            self._closed = True
            workers = list(self.workers.values())
            self.workers.clear()
            for w in workers:
                w.removed = True
        for w in workers:
            if w.started:
                self._background(self._teardown, w, name="ray-close")
        deadline = time.monotonic() + timeout_s
        with self._lock:
            pending = list(self._threads)
        for t in [*pending, self._watcher]:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        late = sorted(t.name for t in [*pending, self._watcher] if t.is_alive())
        if late:
            logger.warning("ray fleet %s: %s still calling Ray after %.0f s; disconnecting anyway", self._fleet_id,
                           ", ".join(late), timeout_s)
        if self._owns_connection:
            self._ray.shutdown()
        logger.info("ray fleet %s: %d worker(s) stopped", self._fleet_id, len(workers))

    def _background(self, target, *args, name: str, starts: bool = False) -> None:
        """Run `target(*args)` on a daemon thread that `close` waits for; one that `starts` a
        worker is not run once the fleet is closing (a teardown always is)."""
        def run() -> None:
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(thread)

        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:
            if self._closed and starts:
                return
            self._threads.add(thread)
        thread.start()

    # -- starting, stopping, watching ------------------------------------------------------
    def _start(self, worker: _Worker) -> None:
        from ray.util import scheduling_strategies

        ray = self._ray
        i = worker.device_index
        deadline = time.monotonic() + self.options.placement_timeout_s
        try:
            worker.pg = ray.util.placement_group([self.bundle], name=worker.name)
            while not ray.wait([worker.pg.ready()], timeout=_WATCH_INTERVAL_S)[0]:
                if worker.removed:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no node of the Ray cluster had {self.bundle} free for "
                                       f"{self.options.placement_timeout_s:g} s (`ray status` shows what it has)")
            if not worker.removed:
                extra = {k: v for k, v in self.bundle.items() if k not in ("CPU", "GPU")}
                worker.actor = self._actor_class.options(
                    name=worker.name, namespace=RAY_NAMESPACE, num_cpus=self.bundle["CPU"],
                    num_gpus=self.bundle.get("GPU", 0), resources=extra,
                    max_concurrency=4,  # wait_exit blocks while stop and others run
                    scheduling_strategy=scheduling_strategies.PlacementGroupSchedulingStrategy(
                        worker.pg, placement_group_bundle_index=0)).remote()
                argv = ["--device-index", str(i), "--coordinator", self.coordinator_address, "--backend",
                        self.backend]
                started = worker.actor.start.remote(argv, self.env)
                worker.node_ip, worker.node_id, worker.pid = ray.get(started,
                                                                     timeout=max(10.0, deadline - time.monotonic()))
                worker.exit_ref = worker.actor.wait_exit.remote()
                logger.info("device %d: worker started by Ray actor %s on node %s (pid %d, Ray node %s)", i,
                            worker.name, worker.node_ip, worker.pid, worker.node_id[:12])
        except Exception as exc:  # noqa: BLE001 - whatever it was, the device never came up
            worker.code, worker.reason = -1, f"its Ray worker did not start: {_first_line(exc)}"
            logger.error("device %d: %s", i, worker.reason)
        with self._lock:
            worker.started = True
            removed = worker.removed
        if removed or worker.code is not None:
            self._teardown(worker)

    def _teardown(self, worker: _Worker, timeout_s: float = 10.0) -> None:
        ray = self._ray
        with self._lock:
            if worker.torn_down:
                return
            worker.torn_down = True
        try:
            if worker.actor is not None:
                if worker.exit_ref is not None:
                    try:
                        ray.get(worker.actor.stop.remote(timeout_s), timeout=timeout_s + 5)
                    except Exception as exc:  # noqa: BLE001 - the actor may be gone already
                        logger.debug("device %d: stop: %s", worker.device_index, _first_line(exc))
                ray.kill(worker.actor)
            if worker.pg is not None:
                ray.util.remove_placement_group(worker.pg)
        except Exception as exc:  # noqa: BLE001 - Ray may be shutting down with us
            logger.warning("device %d: releasing its Ray actor: %s", worker.device_index, _first_line(exc))

    def _watch(self) -> None:
        """Turn a worker's end (its process exited, its actor died) into `dead()`."""
        ray = self._ray
        while not self._closed:
            with self._lock:
                watched = {w.exit_ref: w for w in self.workers.values() if w.exit_ref is not None and w.code is None}
            if not watched:
                time.sleep(_WATCH_INTERVAL_S)
                continue
            try:
                ready, _ = ray.wait(list(watched), num_returns=1, timeout=_WATCH_INTERVAL_S)
            except Exception as exc:  # noqa: BLE001 - Ray is going away (shutdown)
                logger.debug("ray fleet: watch: %s", _first_line(exc))
                time.sleep(_WATCH_INTERVAL_S)
                continue
            for ref in ready:
                worker = watched[ref]
                try:
                    code = ray.get(ref)
                    reason = f"its worker process ended: {fleet_mod.exit_reason(code)}"
                except ray.exceptions.ActorUnavailableError:
                    # NOTE: Ray cannot reach it (its node died, or the network between): treated as
                    # lost, as a pod that stops sending heartbeats is (it is not restartable anyway).
                    code, reason = -1, "its Ray actor became unreachable (its node died or cannot be reached)"
                except ray.exceptions.RayActorError as exc:
                    code, reason = -1, f"its Ray actor died: {_actor_death(exc)}"
                except Exception as exc:  # noqa: BLE001 - any other way of not answering
                    code, reason = -1, f"its Ray actor failed: {_first_line(exc)}"
                with self._lock:
                    if self.workers.get(worker.device_index) is worker and not worker.removed:
                        worker.code, worker.reason = code, reason
                        logger.error("device %d (node %s): %s", worker.device_index, worker.node_ip, reason)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _actor_death(exc: BaseException) -> str:
    """The line of Ray's ActorDiedError that says why (killed, node died, ...)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    why = [line for line in lines if "because" in line]
    return (why[-1] if why else lines[0] if lines else type(exc).__name__)[:200]

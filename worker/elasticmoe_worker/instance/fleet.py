"""Fleets: who starts and stops the worker (HMM) of each device index.

A fleet only creates and deletes workers by device index; what runs on them is the
coordinator's business. Every fleet has the interface of `Fleet`. Three kinds:

- `LocalFleet` (`elasticmoe serve --devices N`): one HMM child process per device on this
  machine. Workers start in their own session so a Ctrl-C in the terminal reaches the
  coordinator alone, which then stops them in order; a parent-death signal takes them down
  if the coordinator is killed outright, unless they have an orphan timeout: then they keep
  their memory for that long, and a coordinator restarted on the same control address adopts
  them (`adopt`: watched by pid, as they are not its children). With `heartbeat_timeout_s`, a worker that is still a
  process but has fallen silent that long (stopped, hung) is killed and declared dead too. With
  `cpu_per_device`, each worker goes into its own
  cgroup with that CPU quota right after it starts (its executors, started later by it,
  inherit it): the device gets fixed capacity, like a pod with a CPU limit (`cgroup`).
- `ExternalFleet` (`elasticmoe coordinator`, in Kubernetes): someone else (the operator,
  one pod per device) starts and deletes workers; the fleet only learns of them from their
  messages and declares one dead when its heartbeats stop. It cannot start a worker, so the
  coordinator keeps no warm pool of its own with it.
- `rayfleet.RayFleet` (`--fleet ray`): one Ray actor per device, each supervising the same
  worker process a `LocalFleet` starts, on whichever node of a Ray cluster has the device.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Protocol

from elasticmoe_worker.instance import cgroup, procutil

logger = logging.getLogger(__name__)


class Fleet(Protocol):
    """What the coordinator (through `membership.Membership`) asks of a fleet."""

    starts_workers: bool  # whether `add` starts a worker (False: it only expects one)
    workers: dict  # device index -> whatever the fleet tracks for it; the keys are the live devices

    def add(self, device_index: int) -> None:
        """Start (or expect) the worker of that device; idempotent; never blocks for long."""

    def remove(self, device_index: int, timeout_s: float = 10.0, wait: bool = True) -> None:
        """Stop that worker; the index is free again at once; idempotent."""

    def dead(self) -> dict[int, int]:
        """Device index -> exit code (-1: none known) of workers that are gone unasked."""

    def death_reason(self, device_index: int, code: int) -> str:
        """Why that worker is gone, in words, for logs and the scale's record."""

    def pids(self) -> dict[int, int]: ...

    def seen(self, device_index: int) -> None:
        """A message from this device's worker arrived."""

    def wait_stopped(self, deadline: float) -> None: ...

    def close(self) -> None: ...


def exit_reason(code: int) -> str:
    """A process's exit status in words (Popen's negative codes are signals)."""
    return f"exit code {code}" if code >= 0 else f"killed by signal {-code}"


class LocalFleet:
    starts_workers = True

    def __init__(self, coordinator_address: str, backend: str = "cpu", env: dict[str, str] | None = None,
                 cpu_per_device: float | None = None, worker_host: str = "127.0.0.1",
                 heartbeat_timeout_s: float | None = None, orphan_timeout_s: float | None = None) -> None:
        """`worker_host`: the address every worker's collectives listen on (all run here, so
        loopback by default). `orphan_timeout_s`: workers outlive this coordinator that long
        (None: they die with it)."""
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.orphan_timeout_s = orphan_timeout_s
        self._last_seen: dict[int, float] = {}  # from its first message on: a worker still starting is not silent
        self._silenced: dict[int, float] = {}  # device -> how long it was silent when we killed it
        # First: an unusable quota fails before any thread or process is started.
        self.quotas = cgroup.CpuQuotas(cpu_per_device) if cpu_per_device is not None else None
        self.coordinator_address = coordinator_address
        self.backend = backend
        self.worker_host = worker_host
        self.env = {**os.environ, **(env or {})}  # the worker secret travels here, never on a command line
        self.env[cgroup.SHARED_HOST_ENV] = "1"  # every worker runs here: executors divide the cores among them
        if cpu_per_device is not None:
            # NOTE: as many torch threads as the quota has cores, waiting passively (unless the user
            # said otherwise): two spinning OpenMP threads on 0.5 cores burn the quota in spin-waits
            # and the device sits throttled for the rest of each period, with its peers waiting on it
            # in every collective (measured: 10x slower decode steps on 2 devices).
            self.env.setdefault("OMP_NUM_THREADS", str(max(1, math.ceil(cpu_per_device))))
            self.env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.workers: dict[int, subprocess.Popen | procutil.AdoptedProcess] = {}
        # NOTE: Linux sends the parent-death signal when the *thread* that forked a child
        # exits, not the process. Workers are forked by this one long-lived thread, so a
        # worker started from a short-lived thread (a scale) is not killed when it ends.
        self._requests: queue.Queue = queue.Queue()
        self._spawner = threading.Thread(target=self._spawn_loop, name="fleet-spawner", daemon=True)
        self._spawner.start()

    def _spawn_loop(self) -> None:
        while True:
            cmd, done = self._requests.get()
            try:
                done.put(subprocess.Popen(cmd, start_new_session=True, env=self.env))
            except BaseException as exc:
                done.put(exc)

    def add(self, device_index: int) -> None:
        if device_index in self.workers and self.workers[device_index].poll() is None:
            return  # idempotent
        cmd = [sys.executable, "-m", "elasticmoe_worker.instance.hmm", "--device-index", str(device_index),
               "--coordinator", self.coordinator_address, "--backend", self.backend, "--host", self.worker_host]
        if self.orphan_timeout_s is not None:
            cmd += ["--orphan-timeout-s", str(self.orphan_timeout_s)]
        done: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put((cmd, done))
        proc = done.get()
        if isinstance(proc, BaseException):
            raise proc
        self.workers[device_index] = proc
        if self.quotas is not None:
            try:
                group = self.quotas.place(device_index, proc.pid)
            except OSError as exc:
                proc.kill()
                self.workers.pop(device_index)
                raise RuntimeError(f"device {device_index}: cannot put its worker into a CPU-quota cgroup: {exc}") from exc
            logger.info("device %d: HMM started (pid %d) in %s%s, its executors in %s, %.3g cores each",
                        device_index, proc.pid, group, cgroup.HMM_SUFFIX, group.name, self.quotas.cores)
        else:
            logger.info("device %d: HMM started (pid %d)", device_index, proc.pid)

    def adopt(self, device_index: int, pid: int) -> None:
        """Take over the worker a killed coordinator left running (it rejoined on our address)."""
        if device_index in self.workers and self.workers[device_index].poll() is None:
            return
        self.workers[device_index] = procutil.AdoptedProcess(pid)
        self._last_seen[device_index] = time.monotonic()
        logger.info("device %d: adopted the HMM a previous coordinator started (pid %d)", device_index, pid)

    def dead(self) -> dict[int, int]:
        """Device index -> exit code, for workers that exited (or were killed for their silence)."""
        if self.heartbeat_timeout_s is not None:
            now = time.monotonic()
            for i, p in list(self.workers.items()):
                silent_s = now - self._last_seen.get(i, now)
                if silent_s > self.heartbeat_timeout_s and i not in self._silenced and p.poll() is None:
                    logger.error("device %d: no heartbeat for %.1f s; killing its worker (pid %d)", i, silent_s, p.pid)
                    self._silenced[i] = silent_s
                    p.kill()
                    p.wait()
        return {i: p.returncode for i, p in list(self.workers.items()) if p.poll() is not None}

    def death_reason(self, device_index: int, code: int) -> str:
        if device_index in self._silenced:
            return f"no heartbeat for {self._silenced[device_index]:.1f} s (stopped or hung); killed"
        if isinstance(self.workers.get(device_index), procutil.AdoptedProcess):
            return "exited (a worker adopted from a previous coordinator: its exit status is not known here)"
        return exit_reason(code)

    def remove(self, device_index: int, timeout_s: float = 10.0, wait: bool = True) -> None:
        """Stop that worker. The device index is free again at once; with wait=False the
        process is reaped (and killed after `timeout_s`) in the background."""
        proc = self.workers.pop(device_index, None)
        self._last_seen.pop(device_index, None)
        self._silenced.pop(device_index, None)
        if proc is None:
            return  # idempotent
        if proc.poll() is None:
            proc.terminate()
        group = self.quotas.group(device_index) if self.quotas is not None else None
        if wait:
            self._reap(device_index, proc, timeout_s, group)
        else:
            threading.Thread(target=self._reap, args=(device_index, proc, timeout_s, group), name="fleet-reap",
                             daemon=True).start()

    def _reap(self, device_index: int, proc: subprocess.Popen, timeout_s: float, group=None) -> None:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("device %d: HMM did not stop in %.0f s, killing it", device_index, timeout_s)
            proc.kill()
            proc.wait()
        if group is not None:
            self.quotas.release(device_index, group)

    def pids(self) -> dict[int, int]:
        return {i: p.pid for i, p in list(self.workers.items())}

    def seen(self, device_index: int) -> None:
        """A message from this device's worker."""
        if device_index in self.workers:
            self._last_seen[device_index] = time.monotonic()

    def wait_stopped(self, deadline: float) -> None:
        """Waits for the workers told to stop; a worker never heard from (still starting: not
        connected, so no Shutdown reached it) is sent SIGTERM now instead of being waited for.
        NOTE: before, stopping `serve` a second after its start waited the whole deadline
        (15 s) for the warm pool's starting worker, then killed it."""
        for i, proc in list(self.workers.items()):
            if i not in self._last_seen and proc.poll() is None:
                logger.info("device %d: its worker (pid %d) is still starting; stopping it with SIGTERM", i, proc.pid)
                proc.terminate()
        for proc in list(self.workers.values()):
            with contextlib.suppress(subprocess.TimeoutExpired):  # close() kills what is left
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        for i in list(self.workers):
            self.remove(i)
        if self.quotas is not None:
            self.quotas.close()


class ExternalFleet:
    """Workers that others start (pods); known from their messages, dead when silent.

    Not guaranteed: a worker that is alive but cut off from the coordinator for longer than
    `heartbeat_timeout_s` is declared dead (the coordinator then stops using its device).
    """

    starts_workers = False

    def __init__(self, heartbeat_timeout_s: float = 15.0) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        # device index -> monotonic time of its last message (None: expected, not heard yet)
        self.workers: dict[int, float | None] = {}
        # Released devices may still send a heartbeat or two on their way out: not a new worker.
        self.released: set[int] = set()

    def add(self, device_index: int) -> None:
        self.released.discard(device_index)
        self.workers.setdefault(device_index, None)

    def seen(self, device_index: int) -> None:
        if device_index not in self.released:
            self.workers[device_index] = time.monotonic()

    def dead(self) -> dict[int, int]:
        now = time.monotonic()
        return {i: -1 for i, t in self.workers.items() if t is not None and now - t > self.heartbeat_timeout_s}

    def death_reason(self, device_index: int, code: int) -> str:
        return f"heartbeats stopped for {self.heartbeat_timeout_s:g} s"

    def remove(self, device_index: int, timeout_s: float = 10.0, wait: bool = True) -> None:
        # The coordinator has told the HMM to shut down; its pod is the operator's to delete.
        self.workers.pop(device_index, None)
        self.released.add(device_index)

    def pids(self) -> dict[int, int]:
        return {}

    def wait_stopped(self, deadline: float) -> None:
        pass

    def close(self) -> None:
        self.workers.clear()

"""Local fleet: one HMM process per device on this machine (the embedded default).

A fleet only creates and deletes workers by device index; what runs on them is the
coordinator's business. Workers start in their own session so a Ctrl-C in the terminal
reaches the coordinator alone, which then stops them in order; a parent-death signal takes
them down if the coordinator is killed outright.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
import time

logger = logging.getLogger(__name__)


class LocalFleet:
    def __init__(self, coordinator_address: str, backend: str = "cpu") -> None:
        self.coordinator_address = coordinator_address
        self.backend = backend
        self.workers: dict[int, subprocess.Popen] = {}
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
                done.append(subprocess.Popen(cmd, start_new_session=True, env={**os.environ}))
            except BaseException as exc:
                done.append(exc)

    def add(self, device_index: int) -> None:
        if device_index in self.workers and self.workers[device_index].poll() is None:
            return  # idempotent
        cmd = [sys.executable, "-m", "elasticmoe_worker.instance.hmm", "--device-index", str(device_index),
               "--coordinator", self.coordinator_address, "--backend", self.backend]
        done: list = []
        self._requests.put((cmd, done))
        while not done:
            time.sleep(0.001)
        if isinstance(done[0], BaseException):
            raise done[0]
        self.workers[device_index] = done[0]
        logger.info("device %d: HMM started (pid %d)", device_index, self.workers[device_index].pid)

    def dead(self) -> dict[int, int]:
        """Device index -> exit code, for workers that exited."""
        return {i: p.returncode for i, p in self.workers.items() if p.poll() is not None}

    def remove(self, device_index: int, timeout_s: float = 10.0) -> None:
        proc = self.workers.pop(device_index, None)
        if proc is None:
            return  # idempotent
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("device %d: HMM did not stop in %.0f s, killing it", device_index, timeout_s)
                proc.kill()
                proc.wait()

    def pids(self) -> dict[int, int]:
        return {i: p.pid for i, p in self.workers.items()}

    def close(self) -> None:
        for i in list(self.workers):
            self.remove(i)

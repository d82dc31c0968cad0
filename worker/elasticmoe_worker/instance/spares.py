"""A device's spare executor: one process that has imported everything and waits for its spec.

The HMM keeps one spare ahead of need, so that starting an executor (a scale's standby, a
replacement) costs attach + group join, not interpreter start-up. Spares are forked from the
device's zygote (`zygote`; ELASTICMOE_ZYGOTE=0 or a zygote that failed: each spare is a process
of its own that imports, ~2.5 CPU-s), always on one long-lived spawner thread, and wait niced in
the device's spare CPU group (`cgroup.SpareSlot`). A spare whose device knows the model loads its
tokenizer while it waits (`wire.ExecutorPreload` on its stdin); its spec then names those files by
their digest instead of carrying them again (`preloaded`).

Owned here: the spare's future, which spares said they finished importing, the CPU slot each
waits in, each executor's stdin writer from its fork until it is given its spec, and the digest of
the tokenizer files each was sent ahead.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import struct
import subprocess
import sys
import threading
import time
from typing import Callable

from elasticmoe_worker.contract import wire
from elasticmoe_worker.instance import cgroup, procutil, zygote

logger = logging.getLogger("elasticmoe.hmm")

# How long an executor needed now waits for a zygote still importing (it would import as long itself).
ZYGOTE_WAIT_S = 120.0
# ELASTICMOE_ZYGOTE=0: every spare starts as a process of its own and imports (see `zygote`)
ZYGOTE_ENV = "ELASTICMOE_ZYGOTE"


class StdinFeeder:
    """Writes to an executor's stdin in order, on a thread of its own, then closes it. Why: the
    spec can exceed a pipe's buffer (it carries tokenizer.json: 0.55 MB for the small preset,
    ~11 MB for Qwen3's), and a spare still importing reads it only when done; the transition
    thread, which starts a standby before the bytes move, waited for that (2 -> 3 right after
    1 -> 2 at 0.3 cores: the transfer started 6-7 s late on the staying devices)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, name=f"stdin-{proc.pid}", daemon=True).start()

    def write(self, data: bytes) -> None:
        self.queue.put(data)

    def close(self) -> None:
        self.queue.put(None)

    def _run(self) -> None:
        try:
            while (data := self.queue.get()) is not None:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # it exited (it failed, and said so, or was stopped)
        finally:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass


def frame(msg: wire.Msg) -> bytes:
    """A message on an executor's stdin: its length (8 bytes, little-endian; with
    `wire.PRELOAD_FLAG` for a preload), then it."""
    data = wire.encode(msg)
    flag = wire.PRELOAD_FLAG if isinstance(msg, wire.ExecutorPreload) else 0
    return struct.pack("<Q", len(data) | flag) + data


class Spares:
    """The spare executor of device `device_index`. `tokenizer()`: the model's tokenizer files as
    the HMM knows them now and their digest (({}, "") while it does not); `stopping()`: whether
    the HMM stops."""

    def __init__(self, device_index: int, tokenizer: Callable[[], tuple[dict[str, str], str]],
                 stopping: Callable[[], bool]) -> None:
        self.device_index = device_index
        self._tokenizer = tokenizer
        self._stopping = stopping
        self._spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="spawn")
        # the next spare: forked (or started) on the spawner thread, so that a zygote still
        # importing holds up nobody who does not need an executor now
        self._spare: concurrent.futures.Future | None = None
        self._env = procutil.spare_nice()
        self._zygote: zygote.Zygote | None = None
        self._said_no_zygote = False
        self._slots: dict[int, cgroup.SpareSlot] = {}  # spare pid -> the CPU group it waits in
        self._feeders: dict[int, StdinFeeder] = {}  # executor pid -> its stdin, until it is given its spec
        self._ready: set[int] = set()  # pids of spares that said they finished importing
        self._preloaded: dict[int, str] = {}  # pid -> digest of the tokenizer files it was sent last

    # -- the spare ---------------------------------------------------------------------------

    def order(self) -> None:
        """Fork (or start) the next spare on the spawner thread."""
        self._spare = self._spawner.submit(self._start_process)

    def order_unless_alive(self) -> None:
        """A spare again after a scale took it, unless one is alive or on its way."""
        future = self._spare
        if future is None or (future.done() and (future.exception() is not None
                                                 or future.result().poll() is not None)):
            self.order()

    def spawn_now(self):
        """An executor process for immediate use, when there is no spare.

        NOTE: always forked from one long-lived thread: an executor's parent-death signal fires
        when the *thread* that forked it ends, and a transition thread (which starts
        pre-initialised standbys) ends with its transition."""
        return self._spawner.submit(self._start_process).result()

    def take(self):
        """The spare (waiting for it if it is still being forked), or None where there is none alive."""
        future, self._spare = self._spare, None
        if future is None:
            return None
        try:
            proc = future.result()
        except Exception:
            if not self._stopping():
                logger.exception("device %d: the spare executor could not be started", self.device_index)
            return None
        self._ready.discard(proc.pid)  # no longer a spare (a later one may get its pid)
        if proc.poll() is None:
            return proc
        feeder = self._feeders.pop(proc.pid, None)
        if feeder is not None:
            feeder.close()
        return None

    @property
    def spare(self):
        """The spare executor if it has started (it may still be importing)."""
        future = self._spare
        if future is None or not future.done() or future.exception() is not None:
            return None
        return future.result()

    @property
    def ready(self) -> bool:
        """A spare is alive and has finished importing."""
        spare = self.spare
        return spare is not None and spare.pid in self._ready and spare.poll() is None

    # -- from spare to executor --------------------------------------------------------------

    def give_work(self, proc: subprocess.Popen, join_device: bool = True) -> StdinFeeder:
        """A spare (or `spawn_now`'s process) becomes an executor: back at the HMM's priority (it
        may still be importing), and into the device's CPU group now, or (`join_device=False`: a
        scale's standby) once it serves (`join_device` at the commit). -> its stdin, for its spec.

        NOTE: a standby prepares (attach, model, engine, group, its first collective) while the device's old
        executor serves; in the device's group it shares that executor's quota, which a loaded
        device spends in full. The quota stands for the accelerator, which a standby does not use
        before it serves; its preparation is host work. (The slow scale-ups that prompted this,
        standby_start 2.9-3.7 s at 0.225 cores under load, turned out to be a new device's spare
        still importing, which the staying standby waited for in its group set-up; this change
        alone was not measured apart.)"""
        if join_device:
            self.join_device(proc)
        if self._env:
            procutil.renice_threads(int(self._env[procutil.SPARE_NICE_ENV]), proc.pid)
        return self._feeders.pop(proc.pid)

    def join_device(self, proc: subprocess.Popen) -> None:
        """Move an executor out of the spare group into the device's (it serves now)."""
        # NOTE: found again when it was spawned before the fleet moved this HMM into its group (it
        # stayed where the HMM was, without the device's quota)
        slot = self._slots.pop(proc.pid, None) or cgroup.SpareSlot.find()
        if slot is not None:
            try:
                slot.join_device(proc.pid)
            except OSError as exc:  # it exited, or the group went away: it fails on its own
                logger.warning("device %d: could not move executor %d into %s: %s", self.device_index, proc.pid,
                               slot.device_group, exc.strerror)

    def forget_except(self, pids: set[int]) -> None:
        """Drop the CPU slots of executors gone (an aborted standby's), keeping `pids`' and the spare's."""
        spare = self.spare
        for pid in [p for p in list(self._slots) if p not in pids and (spare is None or p != spare.pid)]:
            del self._slots[pid]

    def preload(self, tokenizer_files: dict[str, str], digest: str) -> int:
        """Every waiting spare loads the tokenizer now. -> how many were told."""
        data = frame(wire.ExecutorPreload(tokenizer_files=tokenizer_files, digest=digest))
        feeders = list(self._feeders.items())
        for pid, feeder in feeders:
            feeder.write(data)
            self._preloaded[pid] = digest
        return len(feeders)

    def preloaded(self, pid: int) -> str:
        """The digest of the tokenizer files executor `pid` was sent ahead, while it was a spare
        ("" if none): its spec need not carry them. Asked once, when it is given its spec."""
        return self._preloaded.pop(pid, "")

    # -- making spares (on the spawner thread) -----------------------------------------------

    def _start_process(self):
        """A spare from the zygote, else a process of its own."""
        if self._stopping():
            raise RuntimeError("the HMM is stopping")
        if self._zygote is None and os.environ.get(ZYGOTE_ENV, "1") != "0":
            self._zygote = zygote.Zygote(self._env)
            self._wait_in_spare_group(self._zygote.proc.pid, "the zygote")  # it imports as a spare would
        ready_r, ready_w = os.pipe()
        try:
            proc = self._fork_from_zygote(ready_w)
            if proc is None:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "elasticmoe_worker.instance.executor"], stdin=subprocess.PIPE,
                    pass_fds=(ready_w,),
                    env={**os.environ, **self._env, procutil.SPARE_READY_FD_ENV: str(ready_w)})
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)
        threading.Thread(target=self._await_ready, args=(proc, ready_r, time.monotonic()), name="spare-ready",
                         daemon=True).start()
        feeder = self._feeders[proc.pid] = StdinFeeder(proc)
        self._preloaded.pop(proc.pid, None)  # a process gone before had this pid
        tokenizer_files, digest = self._tokenizer()
        if tokenizer_files:  # the model is known: loaded while it waits
            feeder.write(frame(wire.ExecutorPreload(tokenizer_files=tokenizer_files, digest=digest)))
            self._preloaded[proc.pid] = digest
        slot = self._wait_in_spare_group(proc.pid, "the spare executor")
        if slot is not None:
            self._slots[proc.pid] = slot
        return proc

    def _wait_in_spare_group(self, pid: int, what: str) -> cgroup.SpareSlot | None:
        """Move `pid` into the device's spare CPU group (not the device's quota); -> the slot, or
        None where there is none or the move failed (said)."""
        slot = cgroup.SpareSlot.find()
        if slot is None:
            return None
        try:
            slot.wait_here(pid)
            return slot
        except OSError as exc:
            logger.warning("device %d: %s waits in the device's own CPU group (%s: %s)", self.device_index, what,
                           slot.spare_group, exc.strerror)
            return None

    def _fork_from_zygote(self, ready_w: int):
        z = self._zygote
        if z is None or z.failed is not None:
            return None
        stdin_r, stdin_w = os.pipe()
        try:
            pid = z.fork(self._env, stdin_r, ready_w, ZYGOTE_WAIT_S)
        finally:
            os.close(stdin_r)
        if pid is None:
            os.close(stdin_w)
            if self._stopping():
                raise RuntimeError("the HMM is stopping")
            if not self._said_no_zygote:
                self._said_no_zygote = True
                logger.warning("device %d: spare executors start as processes of their own, each importing: the "
                               "zygote %s", self.device_index, z.failed or f"was not ready within {ZYGOTE_WAIT_S:g} s")
            return None
        return procutil.ForkedChild(pid, os.fdopen(stdin_w, "wb"))

    def _await_ready(self, proc: subprocess.Popen, ready_r: int, spawned: float) -> None:
        """The spare says it finished importing (one byte; EOF: it exited or was given work first)."""
        try:
            said = os.read(ready_r, 1)
        finally:
            os.close(ready_r)
        if said == b"1":
            self._ready.add(proc.pid)
            logger.info("device %d: spare executor %d ready %.2f s after it was %s", self.device_index, proc.pid,
                        time.monotonic() - spawned, "forked from the zygote" if isinstance(proc, procutil.ForkedChild)
                        else "started (its imports)")

    def close(self) -> None:
        """Stop the zygote and the spare; close every stdin still open (the HMM stops)."""
        if self._zygote is not None:
            self._zygote.close()  # a spare being forked from it gives up now
        spare = self.take()
        if spare is not None:
            spare.kill()  # it only waits on stdin
            spare.wait()
        for feeder in list(self._feeders.values()):  # the spawner thread may still add one
            feeder.close()
        self._spawner.shutdown()

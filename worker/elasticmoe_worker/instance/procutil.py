"""Process plumbing shared by the coordinator, HMMs and executors."""

from __future__ import annotations

import ctypes
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def set_name(name: str) -> None:
    """This thread's name (/proc/<pid>/comm, what `ps -o comm` and `top` show; threads started
    later inherit it); at most 15 bytes are kept."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to signal us when our parent dies, so no worker outlives the process that
    started it (a killed coordinator takes its HMMs, a killed HMM its executor)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() == 1:  # the parent died before prctl: nobody will signal us
            os.kill(os.getpid(), sig)


def raise_fd_limit() -> None:
    """An HMM keeps one descriptor per expert region (layers x experts x 2)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# An executor started as a spare waits at this nice value while it imports (see `spare_nice`).
SPARE_NICE = 19
SPARE_NICE_ENV = "ELASTICMOE_SPARE_BASE_NICE"
# the pipe (fd number) on which a spare executor says it finished importing (one byte)
SPARE_READY_FD_ENV = "ELASTICMOE_SPARE_READY_FD"
_CAP_SYS_NICE = 23


def may_lower_nice(to: int) -> bool:
    """Whether this process (and the children it starts as itself) may set a nice value as low
    as `to` after raising it: CAP_SYS_NICE, or an RLIMIT_NICE that allows it (20 - nice)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    if soft == resource.RLIM_INFINITY or 20 - to <= soft:
        return True
    try:
        with open("/proc/self/status") as f:
            caps = next((line.split()[1] for line in f if line.startswith("CapEff:")), "0")
    except OSError:
        return False
    return bool(int(caps, 16) >> _CAP_SYS_NICE & 1)


def spare_nice() -> dict[str, str]:
    """The environment for a spare executor: asks it to import at `SPARE_NICE` and to come back
    to this process's nice value once it is given work, where that is allowed. Why: a spare is
    started right after a scale took the last one, inside the same device's CPU quota as the
    serving executor; its imports (~2.5 CPU-s) at equal priority took 8 s of a 0.3-core
    device's quota from serving. Where the way back is not allowed, it imports at equal
    priority: a spare stuck at 19 would starve as the next standby. Under a local fleet's quota
    the spare also waits in a group of its own (`cgroup.SpareSlot`): nice does not keep a spare
    from spending the device's quota while the executor waits on its peers."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    return {SPARE_NICE_ENV: str(base)} if base < SPARE_NICE and may_lower_nice(base) else {}


def renice_threads(value: int, pid: int | str = "self") -> None:
    """Set every thread of process `pid` to nice `value` (Linux nice values are per thread)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return  # it exited
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), value)
        except ProcessLookupError:
            pass  # a thread that ended meanwhile


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def anon_resident_bytes(pid: int | str = "self") -> int:
    """Anonymous resident memory (RssAnon, /proc/<pid>/status): where a copy lands; pages of the
    HMM's regions this process maps are shared memory, not counted. A counter the kernel keeps:
    ~0.1 ms, against 10-12 ms for the USS of a torch process from smaps_rollup (a page-table walk,
    twice in every executor's start, at the device's quota)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no RssAnon line (Linux 4.5 or later needed)")


class AdoptedProcess:
    """A process this one did not start (a worker a killed coordinator left behind), watched and
    signalled through a pidfd so a reused pid is never mistaken for it. The part of
    `subprocess.Popen` a fleet uses; the exit code of a process that is not our child is not
    known: `returncode` is -1 once it is gone."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = os.pidfd_open(pid)  # ProcessLookupError when it is gone already
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode if self.returncode is not None else self._wait(0)

    def _wait(self, timeout_s: float) -> int | None:
        if self.returncode is None and select.select([self._fd], [], [], timeout_s)[0]:
            self.returncode = -1
            os.close(self._fd)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self._wait(10**9 if timeout is None else max(0.0, timeout)) is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self._fd, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkedChild(AdoptedProcess):
    """A child of this process that `subprocess` did not start (a spare the zygote forked and
    that was reparented to us, see `zygote`): its exit code is known, as for a `Popen`, and it is
    reaped here. `stdin`: the write end of its stdin pipe."""

    def __init__(self, pid: int, stdin) -> None:
        super().__init__(pid)
        self.stdin = stdin
        self._lock = threading.Lock()  # the HMM polls from its loop and its heartbeat thread

    def _wait(self, timeout_s: float) -> int | None:
        if self.returncode is None and select.select([self._fd], [], [], timeout_s)[0]:
            with self._lock:
                if self.returncode is None:
                    info = os.waitid(os.P_PIDFD, self._fd, os.WEXITED | os.WNOHANG)
                    if info is None:  # readable before it can be reaped: not yet
                        return None
                    self.returncode = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
                    os.close(self._fd)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        with self._lock:  # not on a pidfd another thread's wait has just closed
            super().send_signal(sig)

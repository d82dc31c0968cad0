"""Helpers for tests that start real processes: free loopback ports, the `elasticmoe` command
line, a health probe, a parent-death signal so a killed test run takes its processes along,
and (from `elasticmoe_worker.reference`) `transformers`' greedy outputs and streaming clients
of a running server; the size of a model's routed expert, for redundancy budgets; two ranks of a
real gloo group in one process; this process's open fds of named memfds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from elasticmoe_worker import reference
from elasticmoe_worker.instance import procutil
from elasticmoe_worker.models import config as config_mod


def float32_expert_bytes(model_dir) -> int:
    """One routed expert of the checkpoint over every MoE layer in float32 (w1 + w3 + w2): what an
    HMM allocates for it where those are whole pages (the tiny preset's are)."""
    spec = config_mod.load_spec(model_dir)
    return 3 * spec.moe_intermediate_size * spec.hidden_size * 4 * spec.num_moe_layers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(base_url: str) -> bool:
    """Whether the server at `base_url` answers /health with 200 (False while it is not up)."""
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def elasticmoe(*args: str) -> list[str]:
    return [sys.executable, "-m", "elasticmoe_worker.cli", *args]


def until(what: str, pred, timeout_s: float, proc: subprocess.Popen, log=None):
    """Poll `pred` until it returns something true (-> that); fail if `proc` exits first or
    `timeout_s` passes, with the tail of its `log` file (a pathlib.Path) if given."""
    def tail() -> str:
        return f":\n{log.read_text()[-3000:]}" if log is not None else ""

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) while waiting for {what}{tail()}")
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}{tail()}")
        time.sleep(0.3)


def die_with_test() -> None:
    """preexec_fn: workers outlive their parent by design (pods), so nothing else would stop
    them when a test run is killed (a timeout)."""
    procutil.die_with_parent(signal.SIGKILL)


def interrupt(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """Ctrl-C a server and wait for its clean stop; kill it if it takes longer than `timeout_s`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# The references live in the package: the device check uses the same ones.
hf_greedy = reference.hf_greedy
StreamingLoad = reference.StreamingLoad


def gloo_pair():
    """Ranks 0 and 1 of one gloo group, both in this process (over a HashStore): real send/recv."""
    import torch.distributed as dist

    store, groups = dist.HashStore(), [None, None]

    def make(rank):
        groups[rank] = dist.ProcessGroupGloo(store, rank, 2)
    threads = [threading.Thread(target=make, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return groups


def reserve_regions(pid: int, device: int) -> int:
    """How many regions of `device`'s reserve (memfds named dev<d>.reserve<n>) process `pid` holds
    open: distinct files, as one region may be open under more than one descriptor."""
    files = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"/memfd:dev{device}.reserve"):
                files.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
        except OSError:
            pass
    return len(files)


def open_memfds(prefix: str) -> int:
    """This process's open fds of memfds named `prefix`* (other tests' threads may open other fds)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{prefix}")
        except OSError:
            pass
    return n


def settled_memfds(prefix: str, expected: int, timeout_s: float = 10.0) -> int:
    """`open_memfds` once it equals `expected`, or as it is after `timeout_s`. Why wait: an fd server
    or mailbox in this process closes the duplicates it sent just after sending them, in its own
    thread (a CI run counted 7 of them still open)."""
    deadline = time.monotonic() + timeout_s
    while (n := open_memfds(prefix)) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return n

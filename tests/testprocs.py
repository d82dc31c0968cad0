"""Helpers for tests that start real processes: free loopback ports, the `elasticmoe` command
line, a health probe, and a parent-death signal so a killed test run takes its processes along."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import httpx

from elasticmoe_worker.instance import procutil


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

"""Spare executors forked from a zygote: ready at once, children of the process that asked (its
fd server serves them, it reads their exit codes), and a zygote that is gone makes the HMM start
spares itself."""

from __future__ import annotations

import os
import struct
import time

import pytest

from elasticmoe_worker.instance import procutil, zygote

pytestmark = pytest.mark.skipif(not zygote.become_subreaper(), reason="no PR_SET_CHILD_SUBREAPER here")


@pytest.fixture
def zyg(tmp_path):
    """A zygote whose stderr (and its spares') is `z.stderr_path`."""
    path = tmp_path / "zygote.stderr"
    saved = os.dup(2)
    with open(path, "wb") as err:
        os.dup2(err.fileno(), 2)
        try:
            z = zygote.Zygote({})
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    z.stderr_path = path
    yield z
    z.close()


def _fork(z: zygote.Zygote) -> tuple[procutil.ForkedChild, int]:
    stdin_r, stdin_w = os.pipe()
    ready_r, ready_w = os.pipe()
    try:
        pid = z.fork({}, stdin_r, ready_w, wait_s=120)
    finally:
        os.close(stdin_r)
        os.close(ready_w)
    assert pid is not None, z.failed
    return procutil.ForkedChild(pid, os.fdopen(stdin_w, "wb")), ready_r


def test_a_forked_spare_is_our_child_ready_at_once_and_its_exit_code_is_known(zyg) -> None:
    t0 = time.monotonic()
    spare, ready_r = _fork(zyg)  # waits for the zygote's imports
    forked = time.monotonic()
    try:
        assert os.read(ready_r, 1) == b"1", "it says it is ready (nothing left to import)"
        # NOTE: no bound on the time: timings are not asserted; it is reported for the reader
        print(f"zygote ready + fork: {forked - t0:.2f} s; fork to ready: {time.monotonic() - forked:.3f} s")
        with open(f"/proc/{spare.pid}/status") as f:
            assert f"PPid:\t{os.getpid()}" in f.read(), "reparented to the process that asked"
        with open(f"/proc/{spare.pid}/comm") as f:
            assert f.read().strip() == zygote.SPARE_NAME
        spare.stdin.write(struct.pack("<Q", 10))  # a header; then EOF: it leaves, saying why
        spare.stdin.close()
        assert spare.wait(timeout=60) == 1
        assert "stdin closed after 0 of 10 bytes" in zyg.stderr_path.read_text()
    finally:
        os.close(ready_r)
        spare.kill()


def test_two_spares_are_two_processes_and_a_killed_one_reads_as_killed(zyg) -> None:
    a, ra = _fork(zyg)
    b, rb = _fork(zyg)
    try:
        assert a.pid != b.pid
        assert os.read(ra, 1) == os.read(rb, 1) == b"1"
        a.kill()
        assert a.wait(timeout=30) == -9
        assert b.poll() is None, "the other one waits on"
    finally:
        for fd in (ra, rb):
            os.close(fd)
        b.kill()
        b.wait(timeout=30)


def test_a_zygote_that_died_says_so_and_forks_nothing(zyg) -> None:
    spare, ready_r = _fork(zyg)  # it was ready
    os.close(ready_r)
    spare.kill()
    spare.wait(timeout=30)
    zyg.proc.kill()
    zyg.proc.wait()
    stdin_r, stdin_w = os.pipe()
    try:
        assert zyg.fork({}, stdin_r, stdin_w, wait_s=5) is None
    finally:
        os.close(stdin_r)
        os.close(stdin_w)
    assert zyg.failed and ("exited" in zyg.failed or "socket failed" in zyg.failed), zyg.failed


def test_closing_a_zygote_still_importing_releases_a_waiting_fork() -> None:
    import threading

    z = zygote.Zygote({})
    out: list = []
    stdin_r, stdin_w = os.pipe()
    try:
        t = threading.Thread(target=lambda: out.append(z.fork({}, stdin_r, stdin_w, wait_s=120)))
        t.start()
        time.sleep(0.05)
        z.close()
        t.join(timeout=30)
        assert not t.is_alive() and out == [None], out
        assert z.failed == "it was stopped"
    finally:
        os.close(stdin_r)
        os.close(stdin_w)


def test_a_spare_imports_ahead_what_a_standby_would_import_on_its_first_calls() -> None:
    """The zygote's imports (`executor.import_ahead`) include the modules `backends.get_backend`
    and an attach import lazily: none is left for a standby's start to import."""
    import subprocess
    import sys

    code = ("import sys; from elasticmoe_worker.instance import executor; executor.import_ahead(); "
            "before = set(sys.modules); from elasticmoe_worker import backends; backends.get_backend('cpu'); "
            "print(sorted(m for m in set(sys.modules) - before if m.startswith('elasticmoe_worker')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]", out

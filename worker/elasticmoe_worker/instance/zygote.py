"""Spare executors forked from a process that has done the imports once (a zygote).

Why: a spare executor is an interpreter that imported torch, transformers and the engine and
waits for its spec. Every scale takes a device's spare, and the next one imported again: ~2.5
CPU-s, ~10-14 s at a 0.225-0.3-core device quota, during which a second scale of that device
waited for the imports (bench: 1 -> 2 -> 1 -> 2 twelve seconds apart, the third scale's standby
joined its group 6 s late), and the imports took CPU from the devices serving right after the
scale. A fork of an imported process is ready in milliseconds and shares its pages.

How: the HMM starts one zygote (`python -m elasticmoe_worker.instance.zygote`, with a
SOCK_SEQPACKET socket on fd $ELASTICMOE_ZYGOTE_FD), which imports everything a spare does and says
"ready". For each spare the HMM sends the spare's environment and two fds (the read end of its
stdin pipe, the write end of its readiness pipe); the zygote forks an intermediate that forks the
spare and exits, so the spare is reparented to the HMM (a child subreaper,
PR_SET_CHILD_SUBREAPER): the HMM waits for it and reads its exit code as for a child it started,
the spare's parent-death signal follows the HMM, and the HMM's fd server (`backends.fdpass`,
which serves its own children only) serves it. The spare then runs `executor.main()`.

Fork safety: the zygote runs no Python thread and no torch op before forking (checked before
each fork: a Python thread refuses the fork); native pools started by imports (OpenBLAS's, via
numpy) re-create themselves in the child through their fork handlers, as under multiprocessing's
fork start method. Where the zygote cannot start or dies, the HMM starts spares as processes of
their own (`Zygote.fork` returns None, the HMM falls back and says why once).
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import msgspec

from elasticmoe_worker.instance import procutil

logger = logging.getLogger("elasticmoe.zygote")

ZYGOTE_FD_ENV = "ELASTICMOE_ZYGOTE_FD"
_PR_SET_CHILD_SUBREAPER = 36
_READY, _PID, _ERR = b"R", b"P", b"E"
_REPARENT_TIMEOUT_S = 10.0
NAME, SPARE_NAME = "emoe-zygote", "emoe-executor"  # their /proc/<pid>/comm (argv stays the zygote's)


class _Request(msgspec.Struct, frozen=True):
    env: dict[str, str]  # set in the spare before it runs (its readiness fd's number, ...)
    subreaper: int  # the HMM's pid: the spare waits until it is its parent


def become_subreaper() -> bool:
    """Orphaned descendants (the zygote's spares) are reparented to this process."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


class Zygote:
    """The HMM's side: start it, fork spares from it (from one thread), stop it (from any)."""

    def __init__(self, env: dict[str, str]) -> None:
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.failed: str | None = None
        self._ready = threading.Event()
        self.subreaper = become_subreaper()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "elasticmoe_worker.instance.zygote"], stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),), env={**os.environ, **env, ZYGOTE_FD_ENV: str(theirs.fileno())})
        finally:
            theirs.close()
        self.started = time.monotonic()
        threading.Thread(target=self._await_ready, name="zygote-ready", daemon=True).start()

    def _await_ready(self) -> None:
        try:
            said = self._sock.recv(16)
        except OSError as exc:
            said = b""
            self.failed = f"its socket failed: {exc}"
        if said == _READY:
            logger.info("zygote %d ready: spares are forked from it (imports took %.1f s)", self.proc.pid,
                        time.monotonic() - self.started)
        elif self.failed is None:
            self.failed = f"it exited while importing (code {self.proc.poll()})"
        self._ready.set()

    def fork(self, env: dict[str, str], stdin_r: int, ready_w: int, wait_s: float) -> int | None:
        """A spare forked from the zygote (its pid; our child), or None where the zygote is not
        ready within `wait_s` or cannot fork (`failed` says why)."""
        if not self.subreaper:
            self.failed = "this process cannot become a child subreaper (PR_SET_CHILD_SUBREAPER)"
        if not self._ready.wait(wait_s) or self.failed is not None:
            return None
        try:
            socket.send_fds(self._sock, [msgspec.msgpack.encode(_Request(env, os.getpid()))], [stdin_r, ready_w])
            reply = self._sock.recv(4096)
        except OSError as exc:
            self.failed = f"its socket failed: {exc}"
            return None
        if reply[:1] == _PID:
            return int(reply[1:])
        self.failed = reply[1:].decode(errors="replace") if reply[:1] == _ERR else f"it exited (code {self.proc.poll()})"
        return None

    def close(self) -> None:
        """Stop it; a `fork` waiting for it (another thread) returns None."""
        self.failed = self.failed or "it was stopped"
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on it; EOF: the zygote exits
        except OSError:
            pass
        importing = not self._ready.is_set()
        self._ready.set()
        self._sock.close()
        try:
            # NOTE: one still importing reads no socket until done (~10 s at 0.3 cores) and holds
            # nothing: killed at once, so that the HMM's shutdown does not wait for it
            self.proc.wait(timeout=0 if importing else 2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _serve(sock: socket.socket) -> None:
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 2)
        except OSError:
            return
        if not msg:
            return  # the HMM closed its end
        try:
            req = msgspec.msgpack.decode(msg, type=_Request)
            if len(fds) != 2:
                raise ValueError(f"a fork request carries 2 fds (stdin, readiness), got {len(fds)}")
            if threading.active_count() != 1:
                raise RuntimeError(f"the zygote runs {threading.active_count()} Python threads; it forks only "
                                   f"with one")
            pid = _fork(sock, req, fds[0], fds[1])
        except Exception as exc:  # said to the HMM, which starts its spares itself from then on
            reply = _ERR + f"{type(exc).__name__}: {exc}".encode()
        else:
            reply = _PID + str(pid).encode()
        try:
            sock.send(reply)
        except OSError:
            return  # the HMM stopped while we forked (its spare ends with it: parent-death signal)
        finally:
            for fd in fds:
                os.close(fd)


def _fork(sock: socket.socket, req: _Request, stdin_r: int, ready_w: int) -> int:
    """Fork an intermediate that forks the spare and exits; -> the spare's pid."""
    pid_r, pid_w = os.pipe()
    middle = os.fork()
    if middle == 0:  # the intermediate
        try:
            os.close(pid_r)
            spare = os.fork()
            if spare == 0:
                os.close(pid_w)
                _become_spare(sock, req, stdin_r, ready_w)  # never returns
            os.write(pid_w, str(spare).encode())
        finally:
            os._exit(0)
    os.close(pid_w)
    with os.fdopen(pid_r, "rb") as f:
        said = f.read()
    os.waitpid(middle, 0)  # the spare is an orphan from here: reparented to the HMM
    if not said:
        raise RuntimeError("the intermediate process exited before forking the spare")
    return int(said)


def _become_spare(sock: socket.socket, req: _Request, stdin_r: int, ready_w: int) -> None:
    code = 1
    try:
        procutil.set_name(SPARE_NAME)
        sock.close()
        os.dup2(stdin_r, 0)
        os.close(stdin_r)
        os.environ.update(req.env)
        os.environ[procutil.SPARE_READY_FD_ENV] = str(ready_w)
        deadline = time.monotonic() + _REPARENT_TIMEOUT_S
        while os.getppid() != req.subreaper:  # parent-death signal and fd server: the HMM's
            if time.monotonic() > deadline:
                raise RuntimeError(f"not reparented to the HMM (pid {req.subreaper}) within {_REPARENT_TIMEOUT_S} s")
            time.sleep(0.001)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115  (the executor reads its spec from fd 0)
        from elasticmoe_worker.instance import executor

        code = executor.main()
    except SystemExit as exc:  # as the interpreter would: a message goes to stderr, exit code 1
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:
        logging.getLogger("elasticmoe.executor").exception("a spare forked from the zygote failed")
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def main() -> int:
    sock = socket.socket(fileno=int(os.environ.pop(ZYGOTE_FD_ENV)))
    procutil.set_name(NAME)
    procutil.die_with_parent()
    if os.environ.get(procutil.SPARE_NICE_ENV) is not None:
        os.setpriority(os.PRIO_PROCESS, 0, procutil.SPARE_NICE)  # it imports as a spare would
    logging.basicConfig(level=os.environ.get("ELASTICMOE_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from elasticmoe_worker.instance import executor

    executor.import_ahead()
    try:
        sock.send(_READY)
    except OSError:
        return 0  # the HMM stopped while we imported: nobody to fork for
    _serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())

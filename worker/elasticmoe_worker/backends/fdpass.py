"""Memory-handle file descriptors passed between processes over a Unix socket (SCM_RIGHTS).

Why it exists: a region's memory is a file descriptor in its owner (CPU: a memfd; CUDA: the
POSIX fd `cuMemExportToShareableHandle` gives). Another process can get such an fd only if the
owner sends it. Reopening `/proc/<pid>/fd/<n>` or pulling it with `pidfd_getfd` needs
ptrace-level access (CAP_SYS_PTRACE under the RuntimeDefault seccomp profile, or a tracer no
more privileged than the owner), which pods that drop all capabilities do not have. Passing the
fd over a Unix socket needs no capability at all.

How: each owning process serves its regions' fds on one abstract-namespace Unix socket
(`server()`, started on first use; SOCK_SEQPACKET, so every request and reply is one message;
one accept thread, one thread per connection). `register`
gives a region a random 16-byte token; the handle carries the socket name and the token.
`receive(handle)` connects (one connection per owner, kept for the process's life), sends the
token and gets a duplicate of the fd back in an SCM_RIGHTS message.

Who may receive (checked on every connection, from the kernel's SO_PEERCRED, then per
request): a process of the owner's effective uid that is the owner itself or one of its direct
children (the HMM starts its executors), and that presents the token of a region still
registered (the token comes only in the handle, which the owner hands out). Other processes of
the owner's uid (a peer HMM on the same host, copying a region during a transition) may receive
only regions the owner `grant`ed to peers, until it `revoke`s them; the owner hands those
handles out over the authenticated control channel only. A refusal is an error message back to
the client (`AttachError` there) and a warning in the owner's log.

What it does not guarantee:
- abstract Unix sockets live in the network namespace: owner and receivers must share it (an
  HMM and its executors do: one container, or one pod);
- reading the peer's parent pid goes through `/proc/<peer>/status` (world-readable for a
  process of the same user; no capability), so a hidepid /proc that hides the peer refuses it;
- no rate limiting: a local process of the same uid can open connections (it learns nothing
  without a token);
- Linux only.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import threading

from elasticmoe_worker.backends import base

logger = logging.getLogger(__name__)

_MAGIC = b"EMFD"
TOKEN_BYTES = 16
_OK, _ERR = b"\x00", b"\x01"
_CONNECTION_TIMEOUT_S = 30.0
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class FdServer:
    """The fds of this process's regions, served to its children. Use `server()`."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.name = f"elasticmoe-fds-{self.pid}-{secrets.token_hex(8)}"
        self._fds: dict[bytes, int] = {}  # token -> fd (owned by the region, not by us)
        self._granted: dict[bytes, int] = {}  # tokens peers (not only children) may receive -> grants held
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.bind("\0" + self.name)
        self._sock.listen(64)
        threading.Thread(target=self._accept, name="fd-server", daemon=True).start()
        logger.info("serving memory handles on abstract unix socket @%s", self.name)

    def register(self, fd: int) -> bytes:
        """-> the token a receiver presents for `fd`. The caller keeps `fd` open until `unregister`."""
        token = secrets.token_bytes(TOKEN_BYTES)
        with self._lock:
            self._fds[token] = fd
        return token

    def unregister(self, token: bytes) -> None:
        """No more receives of the token's fd; call before closing the fd. Idempotent."""
        with self._lock:
            self._fds.pop(token, None)
            self._granted.pop(token, None)

    def grant(self, token: bytes) -> None:
        """Let processes of the owner's uid that are not its children receive the token's fd too,
        until as many `revoke`s as grants. KeyError for a token that is not registered."""
        with self._lock:
            if token not in self._fds:
                raise KeyError("grant: no region is registered under this token")
            self._granted[token] = self._granted.get(token, 0) + 1

    def revoke(self, token: bytes) -> None:
        """Undo one `grant`; the owner and its children keep their access. Idempotent past zero."""
        with self._lock:
            held = self._granted.get(token, 0) - 1
            if held > 0:
                self._granted[token] = held
            else:
                self._granted.pop(token, None)

    def granted(self, token: bytes) -> bool:
        with self._lock:
            return token in self._granted

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # the socket was closed: this process is shutting down
            threading.Thread(target=self._serve, args=(conn,), name="fd-server-conn", daemon=True).start()

    def _refusal(self, conn: socket.socket) -> tuple[str | None, str | None]:
        """-> (why the connection is refused, why a token not granted to peers would be)."""
        pid, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid != os.geteuid():
            return f"peer pid {pid} runs as uid {uid}, not the owner's uid {os.geteuid()}", None
        if pid != self.pid:
            parent = _parent_pid(pid)
            if parent != self.pid:
                return None, (f"peer pid {pid} is not a child of the owner pid {self.pid} "
                              f"(its parent: {parent if parent is not None else 'unknown'}), and the region is "
                              f"not granted to peers")
        return None, None

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(_CONNECTION_TIMEOUT_S)
            try:
                refusal, peers_only = self._refusal(conn)
                while True:
                    request = conn.recv(256)  # one request per packet
                    if not request:
                        return  # the receiver closed its connection (it exited)
                    if refusal is not None:  # said in reply to a request, so the client reads it
                        logger.warning("refused a memory-handle connection: %s", refusal)
                        conn.sendall(_ERR + f"refused by the owner: {refusal}".encode())
                        return
                    if len(request) != len(_MAGIC) + TOKEN_BYTES or not request.startswith(_MAGIC):
                        logger.warning("dropped a malformed memory-handle request (%d bytes)", len(request))
                        return
                    token = request[len(_MAGIC):]
                    with self._lock:
                        fd = self._fds.get(token)
                        allowed = peers_only is None or token in self._granted
                        dup = os.dup(fd) if fd is not None and allowed else -1
                    if fd is not None and not allowed:
                        logger.warning("refused a memory-handle request: %s", peers_only)
                        conn.sendall(_ERR + f"refused by the owner: {peers_only}".encode())
                        continue
                    if dup < 0:
                        conn.sendall(_ERR + b"no such region: the owner closed the region")
                        continue
                    try:
                        socket.send_fds(conn, [_OK], [dup])
                    finally:
                        os.close(dup)
            except OSError as exc:
                logger.debug("memory-handle connection ended: %s", exc)


_server: FdServer | None = None
_server_lock = threading.Lock()
_clients: dict[tuple[int, str], socket.socket] = {}  # (our pid, server name) -> connection
_clients_lock = threading.Lock()


def server() -> FdServer:
    """This process's server, started on first use (again in a forked child)."""
    global _server
    with _server_lock:
        if _server is None or _server.pid != os.getpid():
            _server = FdServer()
        return _server


def _connection(name: str, handle: base.MemoryHandle) -> socket.socket:
    key = (os.getpid(), name)
    conn = _clients.get(key)
    if conn is None:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        conn.settimeout(_CONNECTION_TIMEOUT_S)
        try:
            conn.connect("\0" + name)
        except OSError as exc:
            conn.close()
            raise base.AttachError(
                f"cannot attach {handle.name!r}: nobody serves memory handles at @{name} ({exc.strerror}; "
                f"owner pid {handle.owner_pid} exited, or runs in another network namespace)") from None
        _clients[key] = conn
    return conn


def receive(handle: base.MemoryHandle) -> int:
    """A new fd of the memory behind `handle`, sent by its owner; the caller closes it.

    Raises AttachError when the owner is gone, refuses us, or closed the region.
    """
    if not handle.fd_socket or len(handle.fd_token) != TOKEN_BYTES:
        raise base.AttachError(f"cannot attach {handle.name!r}: the handle names no fd server and token "
                               f"(fd_socket={handle.fd_socket!r}, a {len(handle.fd_token)}-byte token)")
    with _clients_lock:  # NOTE: one request in flight per connection: replies carry no request id
        conn = _connection(handle.fd_socket, handle)
        try:
            conn.sendall(_MAGIC + handle.fd_token)
            msg, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        except OSError as exc:
            _clients.pop((os.getpid(), handle.fd_socket), None)
            conn.close()
            raise base.AttachError(f"cannot attach {handle.name!r}: the fd server @{handle.fd_socket} of pid "
                                   f"{handle.owner_pid} failed: {exc}") from None
    if msg[:1] == _OK and len(fds) == 1:
        return fds[0]
    for fd in fds:
        os.close(fd)
    if not msg:  # the owner hung up: it refused us at connect time and said so, or it exited
        _forget(handle.fd_socket)
        raise base.AttachError(f"cannot attach {handle.name!r}: the owner pid {handle.owner_pid} closed "
                               f"the connection")
    if msg.startswith(_ERR + b"refused"):
        _forget(handle.fd_socket)
    raise base.AttachError(f"cannot attach {handle.name!r}: {msg[1:].decode(errors='replace')}")


def _forget(name: str) -> None:
    with _clients_lock:
        conn = _clients.pop((os.getpid(), name), None)
    if conn is not None:
        conn.close()

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
token and gets a duplicate of the fd back in an SCM_RIGHTS message. One request may carry up to
`MAX_BATCH` tokens and gets every fd back in one message: `prefetched(handles)` fetches a whole
set of regions in one round trip per owner and lends them to `receive` until the block ends.
NOTE: one round trip per region cost a scale ~0.5 s (bench scaling at 0.225 cores per device:
~130 regions, each request waiting for the owner's CPU quota, which its loaded executor spends).

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

import contextlib
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
MAX_BATCH = 128  # tokens per request; the kernel passes at most 253 fds in one message (SCM_MAX_FD)
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

    def duplicates(self, tokens: list[bytes]) -> list[int]:
        """New fds of the regions registered under `tokens`, for this process to hand on itself
        (`mailbox`: with the message that names them); the caller closes them. KeyError for a token
        that is not registered."""
        with self._lock:
            missing = [i for i, token in enumerate(tokens) if token not in self._fds]
            if missing:
                raise KeyError(f"duplicates: no region is registered under token(s) {missing} of {len(tokens)}")
            return [os.dup(self._fds[token]) for token in tokens]

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
                    request = conn.recv(len(_MAGIC) + TOKEN_BYTES * MAX_BATCH)  # one request per packet
                    if not request:
                        return  # the receiver closed its connection (it exited)
                    if refusal is not None:  # said in reply to a request, so the client reads it
                        logger.warning("refused a memory-handle connection: %s", refusal)
                        conn.sendall(_ERR + f"refused by the owner: {refusal}".encode())
                        return
                    count, rest = divmod(len(request) - len(_MAGIC), TOKEN_BYTES)
                    if not request.startswith(_MAGIC) or rest or not 1 <= count <= MAX_BATCH:
                        logger.warning("dropped a malformed memory-handle request (%d bytes)", len(request))
                        return
                    tokens = [request[len(_MAGIC) + i * TOKEN_BYTES:len(_MAGIC) + (i + 1) * TOKEN_BYTES]
                              for i in range(count)]
                    dups: list[int] = []
                    error = b""
                    with self._lock:
                        for i, token in enumerate(tokens):
                            fd = self._fds.get(token)
                            if fd is None:
                                error = f"no such region (token {i + 1} of {count}): the owner closed the region"
                                break
                            if peers_only is not None and token not in self._granted:
                                logger.warning("refused a memory-handle request: %s", peers_only)
                                error = f"refused by the owner: {peers_only}"
                                break
                            dups.append(os.dup(fd))
                    try:
                        if error:
                            conn.sendall(_ERR + error.encode())
                        else:
                            socket.send_fds(conn, [_OK], dups)
                    finally:
                        for dup in dups:
                            os.close(dup)
            except OSError as exc:
                logger.debug("memory-handle connection ended: %s", exc)


_server: FdServer | None = None
_server_lock = threading.Lock()
_clients: dict[tuple[int, str], socket.socket] = {}  # (our pid, server name) -> connection
# (our pid, server name) -> held while a request to that owner is in flight (its replies carry no request
# id); requests to different owners run in parallel. NOTE: one lock for all of them made a device that pulls
# from two peers at once (4 -> 2) wait for the slower peer's reply before asking the other.
_owner_locks: dict[tuple[int, str], threading.Lock] = {}
_clients_lock = threading.Lock()  # the two dicts


def server() -> FdServer:
    """This process's server, started on first use (again in a forked child)."""
    global _server
    with _server_lock:
        if _server is None or _server.pid != os.getpid():
            _server = FdServer()
        return _server


def _connection(name: str, handle: base.MemoryHandle) -> socket.socket:
    """The connection to the owner serving at `name` (made on first use); the caller holds its lock."""
    key = (os.getpid(), name)
    with _clients_lock:
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
        with _clients_lock:
            _clients[key] = conn
    return conn


def _check(handle: base.MemoryHandle) -> None:
    if not handle.fd_socket or len(handle.fd_token) != TOKEN_BYTES:
        raise base.AttachError(f"cannot attach {handle.name!r}: the handle names no fd server and token "
                               f"(fd_socket={handle.fd_socket!r}, a {len(handle.fd_token)}-byte token)")


def _request(handles: list[base.MemoryHandle]) -> list[int]:
    """New fds of `handles` (one owner, at most MAX_BATCH) in one round trip."""
    first = handles[0]
    key = (os.getpid(), first.fd_socket)
    with _clients_lock:
        lock = _owner_locks.setdefault(key, threading.Lock())
    with lock:
        for attempt in (1, 2):
            with _clients_lock:
                reused = key in _clients
            conn = _connection(first.fd_socket, first)
            try:
                conn.sendall(_MAGIC + b"".join(h.fd_token for h in handles))
                msg, fds, _, _ = socket.recv_fds(conn, 4096, len(handles))
            except OSError as exc:
                with _clients_lock:
                    _clients.pop(key, None)
                conn.close()
                if reused and attempt == 1:
                    continue  # the owner closed an idle connection (_CONNECTION_TIMEOUT_S): a new one
                raise base.AttachError(f"cannot attach {first.name!r}: the fd server @{first.fd_socket} of pid "
                                       f"{first.owner_pid} failed: {exc}") from None
            if not msg and reused and attempt == 1:
                with _clients_lock:
                    _clients.pop(key, None)
                conn.close()
                continue  # as above, seen as end of file
            break
    if msg[:1] == _OK and len(fds) == len(handles):
        return fds
    for fd in fds:
        os.close(fd)
    what = repr(first.name) if len(handles) == 1 else f"{len(handles)} regions of pid {first.owner_pid}"
    if not msg:  # the owner hung up: it refused us at connect time and said so, or it exited
        _forget(first.fd_socket)
        raise base.AttachError(f"cannot attach {what}: the owner pid {first.owner_pid} closed the connection")
    if msg[:1] == _OK:
        raise base.AttachError(f"cannot attach {what}: the owner sent {len(fds)} fds for {len(handles)} regions")
    if msg.startswith(_ERR + b"refused"):
        _forget(first.fd_socket)
    raise base.AttachError(f"cannot attach {what}: {msg[1:].decode(errors='replace')}")


_lent: dict[tuple[str, bytes], list[int]] = {}  # (socket, token) -> [fd, holders]: `prefetched` blocks
_lent_lock = threading.Lock()


def receive(handle: base.MemoryHandle) -> int:
    """A new fd of the memory behind `handle`, sent by its owner (or a duplicate of one a
    `prefetched` block holds); the caller closes it.

    Raises AttachError when the owner is gone, refuses us, or closed the region.
    """
    _check(handle)
    with _lent_lock:
        held = _lent.get((handle.fd_socket, handle.fd_token))
        if held is not None and held[0] >= 0:
            return os.dup(held[0])
    return _request([handle])[0]


@contextlib.contextmanager
def prefetched(handles, given: dict[bytes, int] | None = None):
    """Inside the block, `receive` of any of `handles` costs no round trip: their fds are fetched
    here, in one request per owner (per MAX_BATCH regions), and closed when the block ends
    (nested and concurrent blocks share them). `given`: fds by token that came another way (the
    owner sent them with a mailbox message); the block owns and closes them, and fetches only the
    others. Raises AttachError as `receive` does."""
    keys: list[tuple[str, bytes]] = []
    given = dict(given or {})
    try:
        wanted: dict[str, dict[bytes, base.MemoryHandle]] = {}
        with _lent_lock:
            for h in handles:
                _check(h)
                key = (h.fd_socket, h.fd_token)
                if key in keys:
                    continue
                keys.append(key)
                if key in _lent:
                    _lent[key][1] += 1
                elif h.fd_token in given:
                    _lent[key] = [given.pop(h.fd_token), 1]
                else:
                    _lent[key] = [-1, 1]  # fetched below; `receive` asks the owner until then
                    wanted.setdefault(h.fd_socket, {})[h.fd_token] = h
        _close_given(given)  # not needed: held already, or of no handle of the block's
        for owner in wanted.values():
            batch = list(owner.values())
            for i in range(0, len(batch), MAX_BATCH):
                chunk = batch[i:i + MAX_BATCH]
                fds = _request(chunk)
                with _lent_lock:
                    for h, fd in zip(chunk, fds):
                        _lent[(h.fd_socket, h.fd_token)][0] = fd
        yield
    finally:
        _close_given(given)
        with _lent_lock:
            for key in keys:
                held = _lent[key]
                held[1] -= 1
                if held[1] == 0:
                    del _lent[key]
                    if held[0] >= 0:
                        os.close(held[0])


def close_all(fds) -> None:
    """Close every fd of `fds` (fds handed on with a message and not used)."""
    for fd in fds:
        os.close(fd)


def _close_given(given: dict[bytes, int]) -> None:
    close_all(given.values())
    given.clear()


def _forget(name: str) -> None:
    with _clients_lock:
        conn = _clients.pop((os.getpid(), name), None)
    if conn is not None:
        conn.close()

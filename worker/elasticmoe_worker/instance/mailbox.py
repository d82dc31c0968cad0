"""Peer mailboxes: what the HMMs of one host tell each other during a transition (which regions
each side copies, that its copies are done) goes straight from one HMM to the other over an
abstract Unix socket, not through the coordinator's rendezvous store.

Why it exists: a store call is a round trip through the coordinator, whose process also routes
every request's tokens (in `bench scaling`, it also runs the load). Under load a store call took
5-110 ms (session 21, 4 -> 2 at 0.225 cores per device: a destination waited 107-123 ms for a
source's handles that the source had published at once), and the copies of a peer copy took
10-20 ms. A mailbox round trip is one local socket between two HMMs.

How: each HMM serves one mailbox (`server()`, started on first use) and tells the coordinator its
address with its hello and heartbeats (`wire.HMMHello.mailbox`); the coordinator tells a
transition's HMMs each other's (`wire.PrepareTransition.mailboxes`). A transition's messages go
into a box named by `box_id` (an HMAC of the instance's worker secret and the configuration id:
only the instance's workers can name it). An HMM `post`s only into its own mailbox; a peer `take`s
from it over the socket, and waits until the message is there (or the box opens: peers get the
transition's message at different moments). A mailbox keeps the last `KEEP` boxes it opened
(a peer may still take from a box its owner has finished with); a take from an older box fails.
A message may carry file descriptors (`post(..., fds)`: `peer_copy` posts the fds of the regions
its handles name): a take that asks for them (`take_with_fds`) gets duplicates in the reply
(SCM_RIGHTS, with its length header), which saves the round trip to the owner's fd server
(`fdpass`) that the handles alone would need. The mailbox holds its own copies until the message
is `withdraw`n, replaced, or its box expires. A message with one reader can instead go straight
into that reader's inbox (`inbox`, bound beside the mailbox): no round trip to this process.

Who may take: a process of the owner's effective uid (the kernel's SO_PEERCRED) that names the
box. Not guaranteed: as `fdpass`, abstract sockets live in the network namespace (peers that are
local by `peer_copy.locality_key` share it); a local process of the same uid can open
connections (at most `MAX_CONNECTIONS` at once; it learns nothing without the box's name).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import os
import secrets
import socket
import struct
import threading
import time
from typing import Callable

import msgspec

from elasticmoe_worker.backends import fdpass
from elasticmoe_worker.instance import inbox

logger = logging.getLogger(__name__)

KEEP = 4  # boxes a mailbox keeps (the transition now running, and a few finished ones)
MAX_FDS = 253  # fds in one reply (the kernel's SCM_MAX_FD); a message with more sends none (fdpass then)
MAX_CONNECTIONS = 256
MAX_REQUEST_BYTES = 4096
MAX_REPLY_BYTES = 256 << 20
_POLL_S = 0.5  # a waiting take checks its cancel this often
_LEN = struct.Struct("!I")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class MailboxError(RuntimeError):
    """A take that failed: nobody serves the address, the box expired, the owner refused us, or
    the message did not come in time."""


class _Take(msgspec.Struct, array_like=True):
    box: bytes
    key: str
    timeout_s: float
    fds: bool = False  # send the message's fds, if it has any


class _Reply(msgspec.Struct, array_like=True):
    ok: bool
    value: bytes = b""
    error: str = ""
    fds: int = 0  # how many came with the reply's length header


class _Message(msgspec.Struct):
    value: bytes
    fds: list[int]  # owned by the mailbox


def box_id(secret: str, config_id: int, what: str = "transition") -> bytes:
    """The box of one configuration's messages: only a holder of the worker secret can name it."""
    return hmac.new(secret.encode(), f"elasticmoe-mailbox/{what}/{config_id}".encode(), hashlib.sha256).digest()[:16]


def _send(conn: socket.socket, payload: bytes, fds: list[int] = ()) -> None:
    if fds:  # with the first byte of the header: the receiver's recvmsg of it collects them
        header = _LEN.pack(len(payload))
        sent = socket.send_fds(conn, [header], fds)
        conn.sendall(header[sent:] + payload)
        return
    conn.sendall(_LEN.pack(len(payload)) + payload)


def _recv_exactly(conn: socket.socket, n: int, poll: Callable[[], None] | None) -> bytes:
    chunks, got = [], 0
    while got < n:
        try:
            chunk = conn.recv(min(n - got, 1 << 20))
        except socket.timeout:
            if poll is None:
                raise
            poll()  # raises to give up (a cancel, the deadline)
            continue
        if not chunk:
            raise ConnectionError(f"the peer closed the connection after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(conn: socket.socket, limit: int, poll: Callable[[], None] | None = None) -> bytes:
    (n,) = _LEN.unpack(_recv_exactly(conn, _LEN.size, poll))
    if n > limit:
        raise ConnectionError(f"a {n}-byte message, more than the {limit} expected")
    return _recv_exactly(conn, n, poll)


def _recv_with_fds(conn: socket.socket, limit: int, poll: Callable[[], None]) -> tuple[bytes, list[int]]:
    """`_recv`, collecting the fds that came with the header's first byte; the caller closes them."""
    while True:
        try:
            first, fds, flags, _ = socket.recv_fds(conn, _LEN.size, MAX_FDS)
            break
        except socket.timeout:
            poll()
    try:
        if flags & socket.MSG_CTRUNC:
            raise ConnectionError("the reply's file descriptors did not fit (truncated)")
        if not first:
            raise ConnectionError("the peer closed the connection before its reply")
        (n,) = _LEN.unpack(first + _recv_exactly(conn, _LEN.size - len(first), poll))
        if n > limit:
            raise ConnectionError(f"a {n}-byte message, more than the {limit} expected")
        return _recv_exactly(conn, n, poll), fds
    except BaseException:
        fdpass.close_all(fds)
        raise


class Mailbox:
    """This process's mailbox. Use `server()`."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.name = f"elasticmoe-mbox-{self.pid}-{secrets.token_hex(8)}"
        self._boxes: collections.OrderedDict[bytes, dict[str, _Message]] = collections.OrderedDict()
        self._expired: collections.deque[bytes] = collections.deque(maxlen=64)
        self._cond = threading.Condition()
        self._connections = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.bind("\0" + self.name)
        self._sock.listen(64)
        self.inbox = inbox.Inbox(inbox.address(self.name))  # (bound before anyone can learn the name)
        threading.Thread(target=self._accept, name="mailbox", daemon=True).start()
        logger.info("peer mailbox on abstract unix socket @%s (its inbox @%s)", self.name, self.inbox.name)

    def open(self, box: bytes) -> None:
        """Accept posts (and answer takes) for `box`; the oldest box past `KEEP` expires."""
        with self._cond:
            if box not in self._boxes:
                self._boxes[box] = {}
                while len(self._boxes) > KEEP:
                    old, messages = self._boxes.popitem(last=False)
                    self._expired.append(old)
                    self.inbox.expire(old)
                    for message in messages.values():
                        fdpass.close_all(message.fds)
            self._cond.notify_all()

    def post(self, box: bytes, key: str, value: bytes, fds: list[int] = ()) -> None:
        """`value` under `key` in `box` (opened first), for peers to take; `fds` go with it to a take
        that asks for them (the mailbox owns them from here, even on an error). KeyError: `box` not
        open."""
        with self._cond:
            if box not in self._boxes:
                fdpass.close_all(fds)
                raise KeyError(f"mailbox {self.name}: post of {key!r} into a box that is not open (or expired)")
            old = self._boxes[box].get(key)
            self._boxes[box][key] = _Message(value, list(fds))
            self._cond.notify_all()
        if old is not None:
            fdpass.close_all(old.fds)

    def withdraw(self, box: bytes, key: str) -> None:
        """Nothing under `key` in `box` any more (a take waits again); its fds are closed. Idempotent."""
        with self._cond:
            message = self._boxes.get(box, {}).pop(key, None)
        if message is not None:
            fdpass.close_all(message.fds)

    def wait(self, box: bytes, key: str, timeout_s: float) -> bytes:
        """What is (or will be, within `timeout_s`) posted under `key` in `box`. MailboxError if not."""
        return self._wait(box, key, timeout_s, False)[0]

    def _wait(self, box: bytes, key: str, timeout_s: float, fds: bool) -> tuple[bytes, list[int]]:
        """`wait`, and with `fds` new duplicates of the message's fds (the caller closes them; none
        when it has more than MAX_FDS)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if box in self._expired:
                    raise MailboxError(f"{key!r}: the box expired (its owner opened {KEEP} newer ones)")
                message = self._boxes.get(box, {}).get(key)
                if message is not None:
                    send = fds and 0 < len(message.fds) <= MAX_FDS
                    return message.value, [os.dup(fd) for fd in message.fds] if send else []
                left = deadline - time.monotonic()
                if left <= 0:
                    state = "open" if box in self._boxes else "not opened by its owner yet"
                    raise MailboxError(f"{key!r}: nothing posted within {timeout_s:.3g} s (the box is {state})")
                self._cond.wait(left)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed: the process is shutting down
            with self._cond:
                full = self._connections >= MAX_CONNECTIONS
                if not full:
                    self._connections += 1
            if full:
                logger.warning("mailbox: refused a connection: %d open already", MAX_CONNECTIONS)
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="mailbox-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(30.0)
                pid, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
                try:
                    take = msgspec.msgpack.decode(_recv(conn, MAX_REQUEST_BYTES), type=_Take)
                except (msgspec.DecodeError, ConnectionError, OSError) as exc:
                    logger.warning("mailbox: dropped a malformed request from pid %d: %s", pid, exc)
                    return
                if uid != os.geteuid():
                    logger.warning("mailbox: refused pid %d (uid %d, not the owner's %d)", pid, uid, os.geteuid())
                    reply = _Reply(False, error=f"refused: pid {pid} runs as uid {uid}, not the owner's uid "
                                                f"{os.geteuid()}")
                    fds: list[int] = []
                else:
                    try:
                        value, fds = self._wait(take.box, take.key, min(max(take.timeout_s, 0.0), 3600.0), take.fds)
                        reply = _Reply(True, value, fds=len(fds))
                    except MailboxError as exc:
                        reply, fds = _Reply(False, error=str(exc)), []
                try:
                    _send(conn, msgspec.msgpack.encode(reply), fds)
                finally:
                    fdpass.close_all(fds)
        except OSError as exc:
            logger.debug("mailbox connection ended: %s", exc)
        finally:
            with self._cond:
                self._connections -= 1


_server: Mailbox | None = None
_server_lock = threading.Lock()


def server() -> Mailbox:
    """This process's mailbox, started on first use (again in a forked child)."""
    global _server
    with _server_lock:
        if _server is None or _server.pid != os.getpid():
            _server = Mailbox()
        return _server


def take(address: str, box: bytes, key: str, timeout_s: float, check: Callable[[], None] | None = None) -> bytes:
    """What the owner of the mailbox at `address` posted (or will post) under `key` in `box`; waits
    up to `timeout_s`, calling `check` (which raises to give up) about every half second.

    A mailbox nobody serves (yet, or any more: its HMM exited) or a connection that breaks is asked
    again until `timeout_s`: as with the store, the coordinator, which knows who is missing, decides
    when a transition gives up (and cancels it through `check`)."""
    return take_with_fds(address, box, key, timeout_s, check, fds=False)[0]


def take_with_fds(address: str, box: bytes, key: str, timeout_s: float, check: Callable[[], None] | None = None,
                  fds: bool = True) -> tuple[bytes, list[int]]:
    """`take`, and the fds posted with the message (none if it has none, or more than MAX_FDS);
    the caller closes them."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return _take_once(address, box, key, timeout_s, deadline, check, fds)
        except _Unreachable as exc:
            if check is not None:
                check()
            if time.monotonic() > deadline:
                raise MailboxError(f"{key!r}: the mailbox @{address} stayed unreachable for {timeout_s:g} s ({exc})")
            time.sleep(_POLL_S / 5)


class _Unreachable(Exception):
    pass


def _take_once(address: str, box: bytes, key: str, timeout_s: float, deadline: float,
               check: Callable[[], None] | None, fds: bool) -> tuple[bytes, list[int]]:
    def poll() -> None:
        if check is not None:
            check()
        if time.monotonic() > deadline + 5.0:  # the owner answers at its own deadline; this is a safety net
            raise MailboxError(f"{key!r}: no answer from the mailbox @{address} within {timeout_s:g} s")

    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        conn.settimeout(_POLL_S)
        try:
            conn.connect("\0" + address)
        except OSError as exc:
            raise _Unreachable(f"nobody serves a mailbox there: {exc.strerror or exc}; its HMM exited, or runs "
                               f"in another network namespace") from None
        try:
            _send(conn, msgspec.msgpack.encode(_Take(box, key, max(deadline - time.monotonic(), 0.0), fds)))
            payload, got = _recv_with_fds(conn, MAX_REPLY_BYTES, poll) if fds else (_recv(conn, MAX_REPLY_BYTES, poll), [])
        except (ConnectionError, OSError) as exc:
            raise _Unreachable(f"the connection broke: {exc}") from None
    finally:
        conn.close()
    try:
        reply = msgspec.msgpack.decode(payload, type=_Reply)
        if not reply.ok:
            raise MailboxError(f"mailbox @{address}: {reply.error}")
        if reply.fds != len(got):
            raise MailboxError(f"{key!r}: the mailbox @{address} said {reply.fds} fds came with its reply, "
                               f"{len(got)} did")
    except msgspec.DecodeError as exc:
        fdpass.close_all(got)
        raise MailboxError(f"{key!r}: the mailbox @{address} answered something unreadable: {exc}") from None
    except BaseException:
        fdpass.close_all(got)
        raise
    return reply.value, got

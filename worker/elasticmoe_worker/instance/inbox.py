"""Peer inboxes: a message one HMM sends straight into another's socket, for the messages of a
transition that have exactly one reader (a pair of devices' handles, each side's completion).

Why it exists: a mailbox take (`mailbox`) is a round trip whose answer needs the owner's process
to run — its accept thread, a thread for the connection, that thread woken by the post, each
waiting for that process's GIL and a core. Measured in session 27 (1 -> 2 under load, 2 cores,
each HMM's log stamped): 6-16 ms per take whose message was already posted, the owner's threads
mostly waiting for its GIL (1 ms of their CPU, 0-4 ms in the run queue), while the copy it waited
for took 6-10 ms. A message sent into the reader's inbox needs nothing of the sender's process
once sent, and a reader that comes after it finds it queued in its socket.

How: each process's mailbox (`mailbox.server()`) binds an abstract Unix datagram socket beside
its own, named `address(mailbox name)`; the coordinator tells a transition's HMMs each other's
mailbox names (`wire.PrepareTransition.mailboxes`), so they know each other's inboxes too.
`send(address, box, key, value, fds)` is one datagram: the box (an HMAC of the worker secret:
`mailbox.box_id`), the key, the value, and the fds as SCM_RIGHTS. `Inbox.receive(box, key)` reads
the socket until that message comes; the messages of other keys that arrive meanwhile are kept for
their readers (one thread reads the socket at a time and hands the others theirs). The kernel
stamps each datagram with its sender's credentials (SO_PASSCRED): one from another uid, or that
is not a message, is dropped and its fds closed. Kept messages of a box that expires (`expire`:
the mailbox keeps `mailbox.KEEP` boxes) are dropped and their fds closed, and at most `MAX_KEPT`
are kept (the oldest dropped first).

Limits: a datagram carries at most `MAX_DATAGRAM` bytes and `MAX_FDS` fds (`send` raises
ValueError beyond: the caller posts the message into its mailbox and sends a notice instead); a
receiver's queue holds `/proc/sys/net/unix/max_dgram_qlen` datagrams (10 by default), and a `send`
to a full one waits for the reader up to its timeout, reading its own process's inbox meanwhile
(`drain`: two HMMs sending each other more than that would otherwise wait for each other). Not
guaranteed: as with the mailbox, any process of the owner's uid in the same network namespace can
send (it cannot name a box without the worker secret; what it sends is kept until evicted).
"""

from __future__ import annotations

import array
import collections
import logging
import os
import socket
import struct
import threading
import time
from typing import Callable

import msgspec

from elasticmoe_worker.backends import fdpass

logger = logging.getLogger(__name__)

MAX_DATAGRAM = 64 << 10
MAX_FDS = 253  # the kernel's SCM_MAX_FD
MAX_KEPT = 256  # messages kept for readers that have not come yet
_POLL_S = 0.5  # a waiting receive checks its cancel this often
_UCRED = struct.Struct("3i")  # pid, uid, gid
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS * 4) + socket.CMSG_SPACE(_UCRED.size)


class InboxError(RuntimeError):
    """A send or receive that failed: nobody reads at the address, the reader's queue stayed full,
    the box expired, or nothing came in time."""


class _Datagram(msgspec.Struct, array_like=True):
    box: bytes
    key: str
    value: bytes
    posted: bool = False  # a notice: the message is in the sender's mailbox (too large to send)


def address(mailbox_name: str) -> str:
    """The inbox beside the mailbox named `mailbox_name`."""
    return mailbox_name + "-in"


class Inbox:
    """This process's inbox (one per mailbox: `mailbox.server().inbox`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.bind("\0" + name)
        self._cond = threading.Condition()
        self._kept: collections.OrderedDict[tuple[bytes, str], tuple[_Datagram, list[int]]] = collections.OrderedDict()
        self._expired: collections.deque[bytes] = collections.deque(maxlen=64)
        self._reading = False

    def receive(self, box: bytes, key: str, timeout_s: float,
                check: Callable[[], None] | None = None) -> tuple[bytes, list[int], bool]:
        """The message sent under `key` in `box` (waits up to `timeout_s`, calling `check`, which
        raises to give up, about every half second) -> (value, its fds: the caller closes them,
        whether it is a notice that the sender posted it into its mailbox). InboxError if it does not come."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._cond:
                while True:
                    if box in self._expired:
                        raise InboxError(f"{key!r}: the box expired (this mailbox opened newer ones)")
                    got = self._kept.pop((box, key), None)
                    if got is not None:
                        return got[0].value, got[1], got[0].posted
                    if not self._reading:
                        self._reading = True  # this thread reads the socket now
                        break
                    self._wait_turn(deadline, key, timeout_s, check)
            try:
                got = self._read_until(box, key, deadline)
            finally:
                with self._cond:
                    self._reading = False
                    self._cond.notify_all()  # another waiting reader takes over
            if got is not None:
                return got[0].value, got[1], got[0].posted
            self._give_up_past(deadline, key, timeout_s, check)

    def _wait_turn(self, deadline: float, key: str, timeout_s: float, check) -> None:
        """(Under the condition) wait for the reading thread to hand over a message or its turn."""
        self._give_up_past(deadline, key, timeout_s, check)
        self._cond.wait(min(_POLL_S, max(deadline - time.monotonic(), 0.0)))

    @staticmethod
    def _give_up_past(deadline: float, key: str, timeout_s: float, check) -> None:
        if check is not None:
            check()
        if time.monotonic() >= deadline:
            raise InboxError(f"{key!r}: nothing came within {timeout_s:.3g} s")

    def _read_until(self, box: bytes, key: str, deadline: float) -> tuple[_Datagram, list[int]] | None:
        """Read datagrams until `(box, key)`'s comes (-> it) or half a second passed (-> None),
        keeping the others'."""
        until = min(deadline, time.monotonic() + _POLL_S)
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return None
            self._sock.settimeout(left)
            try:
                data, ancillary, flags, _ = self._sock.recvmsg(MAX_DATAGRAM, _ANCILLARY)
            except socket.timeout:
                return None
            message = self._accept(data, ancillary, flags)
            if message is None:
                continue
            if (message[0].box, message[0].key) == (box, key):
                return message
            self._keep(message)

    def _accept(self, data: bytes, ancillary, flags: int) -> tuple[_Datagram, list[int]] | None:
        """A datagram -> (message, fds), or None (dropped, its fds closed, and why logged)."""
        fds: list[int] = []
        pid = uid = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds += array.array("i", payload[:usable]).tolist()
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, uid, _ = _UCRED.unpack(payload[:_UCRED.size])
        why = ""
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            why = "truncated (more than this inbox reads)"
        elif uid != os.geteuid():
            why = f"from pid {pid}, uid {uid}, not the owner's uid {os.geteuid()}"
        else:
            try:
                return msgspec.msgpack.decode(data, type=_Datagram), fds
            except msgspec.DecodeError as exc:
                why = f"not a message ({exc})"
        fdpass.close_all(fds)
        logger.warning("inbox @%s: dropped a datagram: %s", self.name, why)
        return None

    def _keep(self, message: tuple[_Datagram, list[int]]) -> None:
        dropped: list[int] = []
        with self._cond:
            if message[0].box in self._expired:
                dropped = message[1]
            else:
                old = self._kept.pop((message[0].box, message[0].key), None)
                self._kept[(message[0].box, message[0].key)] = message
                if old is not None:
                    dropped += old[1]
                while len(self._kept) > MAX_KEPT:
                    dropped += self._kept.popitem(last=False)[1][1]
            self._cond.notify_all()
        fdpass.close_all(dropped)

    def drain(self) -> None:
        """Keep what is queued in the socket now for its readers (unless another thread reads it)."""
        with self._cond:
            if self._reading:
                return
            self._reading = True
        try:
            self._sock.settimeout(0.0)
            while True:
                try:
                    data, ancillary, flags, _ = self._sock.recvmsg(MAX_DATAGRAM, _ANCILLARY)
                except (BlockingIOError, InterruptedError):
                    return
                message = self._accept(data, ancillary, flags)
                if message is not None:
                    self._keep(message)
        finally:
            with self._cond:
                self._reading = False
                self._cond.notify_all()

    def expire(self, box: bytes) -> None:
        """`box` is over: drop what is kept for it (closing its fds), and what comes for it later."""
        with self._cond:
            self._expired.append(box)
            gone = [k for k in self._kept if k[0] == box]
            dropped = [fd for k in gone for fd in self._kept.pop(k)[1]]
            self._cond.notify_all()
        fdpass.close_all(dropped)

    def close(self) -> None:
        self._sock.close()


def _payload(box: bytes, key: str, value: bytes, posted: bool = False) -> bytes:
    return msgspec.msgpack.encode(_Datagram(box, key, value, posted))


def fits(box: bytes, key: str, value: bytes, nfds: int) -> bool:
    """Whether `send` can carry this message in one datagram (the same encoding it sends)."""
    return len(_payload(box, key, value)) <= MAX_DATAGRAM and nfds <= MAX_FDS


def send(to: str, box: bytes, key: str, value: bytes, fds: list[int] = (), timeout_s: float = 30.0,
         posted: bool = False, own: Inbox | None = None, check: Callable[[], None] | None = None) -> None:
    """Send `value` (and `fds`, which this call owns from here and closes, even on an error) under
    `key` in `box` to the inbox named `to`; while its queue is full, read `own` (this process's
    inbox) meanwhile; `check` is called while it waits (it raises to give up). ValueError: too large
    for one datagram (nothing sent); InboxError: nobody read there, or its queue stayed full, for
    `timeout_s`."""
    try:
        payload = _payload(box, key, value, posted)
        if len(payload) > MAX_DATAGRAM or len(fds) > MAX_FDS:
            raise ValueError(f"{key!r}: {len(payload)} bytes and {len(fds)} fds; one datagram carries at most "
                             f"{MAX_DATAGRAM} bytes and {MAX_FDS} fds")
        deadline = time.monotonic() + timeout_s
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            while True:
                try:
                    sock.sendmsg([payload], ancillary, 0, "\0" + to)
                    return
                except (ConnectionRefusedError, FileNotFoundError) as exc:
                    # as with a mailbox: asked again until `check` gives up (the coordinator, which
                    # knows who is missing, cancels the transition) or the timeout
                    if check is not None:
                        check()
                    if time.monotonic() > deadline:
                        raise InboxError(f"{key!r}: nobody read an inbox @{to} for {timeout_s:g} s "
                                         f"({exc.strerror or exc}); its HMM exited, or runs in another network "
                                         f"namespace") from None
                    time.sleep(_POLL_S / 5)
                    continue
                except BlockingIOError:  # the reader's queue is full
                    if check is not None:
                        check()
                    if time.monotonic() > deadline:
                        raise InboxError(f"{key!r}: the inbox @{to} stayed full for {timeout_s:g} s (its reader is "
                                         f"not reading)") from None
                # NOTE: meanwhile this process's own inbox is read: two HMMs that send each other more
                # than a queue holds would otherwise each wait for the other to read
                if own is not None:
                    own.drain()
                time.sleep(0.001)
    finally:
        fdpass.close_all(fds)

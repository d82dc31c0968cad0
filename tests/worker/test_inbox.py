"""Peer inboxes (instance.inbox): a message sent straight into its one reader's socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import testprocs

from elasticmoe_worker.instance import inbox, mailbox, peer_copy


def _inbox() -> tuple[inbox.Inbox, str]:
    own = mailbox.server()
    return own.inbox, own.inbox.name


def test_a_message_sent_before_its_reader_comes_is_read_at_once_with_its_fds() -> None:
    box, (own, to) = mailbox.box_id("s", 301), _inbox()
    fd = os.memfd_create("inbox.region")
    try:
        os.pwrite(fd, b"weights", 0)
        inbox.send(to, box, "peer-copy/0-1", b"handles", [os.dup(fd)])  # the send closes its duplicate
        t0 = time.monotonic()
        value, fds, posted = own.receive(box, "peer-copy/0-1", 5.0)
        assert time.monotonic() - t0 < 1 and value == b"handles" and not posted and len(fds) == 1
        assert os.pread(fds[0], 7, 0) == b"weights"  # the same file, another fd of it
        os.close(fds[0])
        assert testprocs.settled_memfds("inbox.", 1) == 1
        with pytest.raises(inbox.InboxError, match=r"'peer-copy/0-1': nothing came within 0.2 s"):
            own.receive(box, "peer-copy/0-1", 0.2)  # one reader: it was read once
    finally:
        os.close(fd)


def test_readers_of_other_keys_get_theirs_whoever_reads_the_socket() -> None:
    box, (own, to) = mailbox.box_id("s", 302), _inbox()
    got: dict[str, bytes] = {}

    def read(key: str) -> None:
        got[key] = own.receive(box, key, 10.0)[0]

    readers = [threading.Thread(target=read, args=(f"k{i}",)) for i in range(3)]
    for th in readers:
        th.start()
    time.sleep(0.2)
    for i in reversed(range(3)):  # the last reader's first, while another thread reads the socket
        inbox.send(to, box, f"k{i}", f"v{i}".encode())
    inbox.send(to, mailbox.box_id("s", 303), "k0", b"another box")  # kept for a reader of that box
    for th in readers:
        th.join(10)
    assert got == {"k0": b"v0", "k1": b"v1", "k2": b"v2"}
    assert own.receive(mailbox.box_id("s", 303), "k0", 5.0)[0] == b"another box"


def test_a_waiting_receive_gives_up_when_its_check_says_so() -> None:
    box, (own, _) = mailbox.box_id("s", 304), _inbox()
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()

    def check() -> None:
        if stop.is_set():
            raise RuntimeError("transition cancelled: test")

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="cancelled"):
        own.receive(box, "never", 60.0, check)
    assert time.monotonic() - t0 < 3


def test_what_cannot_be_sent_is_an_error_that_says_why_and_closes_the_fds() -> None:
    box, (_, to) = mailbox.box_id("s", 305), _inbox()
    fd = os.memfd_create("inbox.unsent")
    try:
        t0 = time.monotonic()
        with pytest.raises(inbox.InboxError, match=r"nobody read an inbox @elasticmoe-nobody-in for 0.5 s"):
            inbox.send("elasticmoe-nobody-in", box, "k", b"v", [os.dup(fd)], timeout_s=0.5)
        assert 0.5 <= time.monotonic() - t0 < 3  # asked again meanwhile, as a mailbox take does

        def gone() -> None:
            raise RuntimeError("transition cancelled: device 1 died")

        with pytest.raises(RuntimeError, match="device 1 died"):
            inbox.send("elasticmoe-nobody-in", box, "k", b"v", timeout_s=60.0, check=gone)
        with pytest.raises(ValueError, match=r"'k': 65\d\d\d bytes and 1 fds; one datagram carries at most 65536 "
                                             r"bytes and 253 fds"):
            inbox.send(to, box, "k", b"x" * 65_536, [os.dup(fd)])
        with pytest.raises(ValueError, match="254 fds"):
            inbox.send(to, box, "k", b"", [os.dup(fd) for _ in range(254)])
        assert testprocs.settled_memfds("inbox.unsent", 1) == 1  # only ours: every duplicate closed
    finally:
        os.close(fd)


def test_an_expired_boxs_messages_are_dropped_with_their_fds() -> None:
    own = mailbox.server()
    box = mailbox.box_id("s", 306)
    own.open(box)
    fd = os.memfd_create("inbox.expiring")
    try:
        inbox.send(own.inbox.name, box, "early", b"v", [os.dup(fd)])
        # another key's reader reads the socket and keeps "early" for its reader
        inbox.send(own.inbox.name, box, "other", b"w")
        assert own.inbox.receive(box, "other", 5.0)[0] == b"w"
        assert testprocs.settled_memfds("inbox.expiring", 2) == 2
        for c in range(307, 307 + mailbox.KEEP):  # newer boxes: this one expires, in the inbox too
            own.open(mailbox.box_id("s", c))
        assert testprocs.settled_memfds("inbox.expiring", 1) == 1
        with pytest.raises(inbox.InboxError, match="the box expired"):
            own.inbox.receive(box, "early", 5.0)
        inbox.send(own.inbox.name, box, "late", b"v", [os.dup(fd)])  # one that comes after: dropped when read
        inbox.send(own.inbox.name, mailbox.box_id("s", 307), "k", b"v")
        assert own.inbox.receive(mailbox.box_id("s", 307), "k", 5.0)[0] == b"v"
        assert testprocs.settled_memfds("inbox.expiring", 1) == 1
    finally:
        os.close(fd)


def test_kept_messages_are_bounded_oldest_first(monkeypatch) -> None:
    monkeypatch.setattr(inbox, "MAX_KEPT", 3)
    box, (own, to) = mailbox.box_id("s", 320), _inbox()
    for i in range(5):
        inbox.send(to, box, f"unread{i}", b"v")
    inbox.send(to, box, "mine", b"v")
    assert own.receive(box, "mine", 5.0)[0] == b"v"  # reading it kept the 5 others: the oldest 2 dropped
    with pytest.raises(inbox.InboxError, match="nothing came"):
        own.receive(box, "unread1", 0.1)
    assert [own.receive(box, f"unread{i}", 5.0)[0] for i in (2, 3, 4)] == [b"v"] * 3


def test_a_datagram_that_is_not_a_message_is_dropped_and_the_inbox_still_reads() -> None:
    box, (own, to) = mailbox.box_id("s", 321), _inbox()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"\xff\x00junk", "\0" + to)
    inbox.send(to, box, "k", b"v")
    assert own.receive(box, "k", 5.0)[0] == b"v"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to send from another uid")
def test_a_message_from_another_user_is_dropped() -> None:
    box, (own, to) = mailbox.box_id("s", 322), _inbox()
    code = ("import os,sys\n"
            "from elasticmoe_worker.instance import inbox\n"
            "os.setuid(65534)\n"
            "inbox.send(sys.argv[1], bytes.fromhex(sys.argv[2]), 'k', b'forged handles')\n")
    out = subprocess.run([sys.executable, "-c", code, to, box.hex()], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    inbox.send(to, box, "other", b"v")  # read after the forged one
    assert own.receive(box, "other", 5.0)[0] == b"v"
    with pytest.raises(inbox.InboxError, match="nothing came"):
        own.receive(box, "k", 0.2)


def test_a_message_too_large_for_a_datagram_goes_through_the_senders_mailbox() -> None:
    own = mailbox.server().name
    box = mailbox.box_id("s", 323)
    sender = peer_copy.MailboxPeers(box, 0, {0: own, 1: own}, 5.0, lambda: None)
    reader = peer_copy.MailboxPeers(box, 1, {0: own, 1: own}, 5.0, lambda: None)
    fd = os.memfd_create("inbox.large")
    try:
        sender.send(1, "peer-copy/0-1", b"h" * 100_000, [os.dup(fd)])
        value, fds = reader.receive(0, "peer-copy/0-1")
        assert value == b"h" * 100_000 and len(fds) == 1
        os.close(fds[0])
        sender.withdraw("peer-copy/0-1")  # (as `Source.close` does)
        assert testprocs.settled_memfds("inbox.large", 1) == 1
    finally:
        os.close(fd)


def test_fits_is_exactly_what_send_can_carry() -> None:
    own, name = _inbox()
    box = mailbox.box_id("s", 324)
    key = "peer-copy/0-1"
    n = max(k for k in range(inbox.MAX_DATAGRAM - 128, inbox.MAX_DATAGRAM + 1) if inbox.fits(box, key, b"x" * k, 1))
    assert not inbox.fits(box, key, b"x" * (n + 1), 1)
    assert not inbox.fits(box, key, b"x", inbox.MAX_FDS + 1)
    inbox.send(name, box, key, b"x" * n, [os.memfd_create("inbox.edge")], 5.0)  # the largest that fits goes
    value, fds, posted = own.receive(box, key, 5.0)
    assert len(value) == n and len(fds) == 1 and not posted
    os.close(fds[0])
    fd = os.memfd_create("inbox.edge")
    with pytest.raises(ValueError, match="one datagram carries at most"):
        inbox.send(name, box, key, b"x" * (n + 1), [fd], 5.0)  # one byte more does not, and its fd is closed
    with pytest.raises(OSError):
        os.fstat(fd)
    # ... so `MailboxPeers.send` posts it and sends a notice
    sender = peer_copy.MailboxPeers(box, 0, {0: mailbox.server().name, 1: mailbox.server().name}, 5.0, lambda: None)
    sender.send(1, key, b"x" * (n + 1))
    assert own.receive(box, key, 5.0) == (b"", [], True)
    sender.withdraw(key)


def test_two_processes_that_send_each_other_more_than_a_queue_holds_do_not_wait_for_each_other() -> None:
    """A reader's queue holds net.unix.max_dgram_qlen datagrams (10 by default); a sender to a full
    one reads its own inbox meanwhile, so two HMMs that send each other many messages before either
    reads (a transition with many peers) both get through."""
    a, b = inbox.Inbox(f"test-inbox-a-{os.getpid()}"), inbox.Inbox(f"test-inbox-b-{os.getpid()}")
    box, n, errors, got = mailbox.box_id("s", 330), 40, [], {}

    def flood(own: inbox.Inbox, to: inbox.Inbox) -> None:  # as an HMM: send all, then read
        try:
            for i in range(n):
                inbox.send(to.name, box, f"m{i}", b"v", timeout_s=10.0, own=own)
            got[own.name] = [own.receive(box, f"m{i}", 10.0)[0] for i in range(n)]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        senders = [threading.Thread(target=flood, args=pair) for pair in ((a, b), (b, a))]
        for th in senders:
            th.start()
        for th in senders:
            th.join(30)
        assert not errors, errors
        assert got == {a.name: [b"v"] * n, b.name: [b"v"] * n}
    finally:
        a.close()
        b.close()

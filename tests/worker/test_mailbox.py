"""Peer mailboxes (instance.mailbox): what the HMMs of one host tell each other during a transition."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import testprocs

from elasticmoe_worker.instance import mailbox


def _later(seconds: float, fn, *args) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        fn(*args)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def test_a_take_waits_for_the_post_even_before_the_owner_opened_the_box() -> None:
    own = mailbox.server()
    box = mailbox.box_id("s", 101)
    _later(0.2, own.open, box)
    _later(0.3, own.post, box, "peer-copy/0-1", b"handles")
    t0 = time.monotonic()
    assert mailbox.take(own.name, box, "peer-copy/0-1", 10.0) == b"handles"
    assert 0.2 <= time.monotonic() - t0 < 5
    assert mailbox.take(own.name, box, "peer-copy/0-1", 0.1) == b"handles"  # still there for another taker


def test_a_box_is_named_by_the_secret_and_the_configuration() -> None:
    ids = {mailbox.box_id(s, c) for s in ("a", "b") for c in (1, 2)} | {mailbox.box_id("a", 1, "kv")}
    assert len(ids) == 5 and all(len(i) == 16 for i in ids)


def test_what_cannot_be_taken_is_an_error_that_says_why() -> None:
    own = mailbox.server()
    box = mailbox.box_id("s", 102)
    with pytest.raises(KeyError, match="not open"):
        own.post(box, "k", b"v")
    own.open(box)
    with pytest.raises(mailbox.MailboxError, match=r"'k': nothing posted within 0.2 s \(the box is open\)"):
        mailbox.take(own.name, box, "k", 0.2)
    with pytest.raises(mailbox.MailboxError, match="not opened by its owner yet"):
        mailbox.take(own.name, mailbox.box_id("s", 103), "k", 0.2)
    own.post(box, "k", b"v")
    for c in range(104, 104 + mailbox.KEEP):  # newer boxes: this one expires
        own.open(mailbox.box_id("s", c))
    with pytest.raises(mailbox.MailboxError, match="expired"):
        mailbox.take(own.name, box, "k", 5.0)
    t0 = time.monotonic()
    with pytest.raises(mailbox.MailboxError, match="@elasticmoe-mbox-nobody stayed unreachable for 1 s .nobody "
                                                   "serves a mailbox there"):
        mailbox.take("elasticmoe-mbox-nobody", box, "k", 1.0)
    assert 1.0 <= time.monotonic() - t0 < 3  # asked again meanwhile: a peer's HMM may not serve yet


def test_a_take_from_a_mailbox_that_goes_away_waits_for_its_check() -> None:
    """A peer's HMM that dies while a take waits on it: the take asks again until its check (the
    coordinator's cancel) gives up, as a store wait does; it does not fail the transition itself."""
    code = ("import sys,time\n"
            "from elasticmoe_worker.instance import mailbox\n"
            "print(mailbox.server().name, flush=True);time.sleep(0.5)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    address = proc.stdout.readline().strip()
    stop = threading.Event()
    _later(1.5, stop.set)

    def check() -> None:
        if stop.is_set():
            raise RuntimeError("transition cancelled: device 1 died")

    try:
        with pytest.raises(RuntimeError, match="device 1 died"):
            mailbox.take(address, mailbox.box_id("s", 150), "k", 60.0, check)
    finally:
        proc.wait(30)


def test_a_waiting_take_gives_up_when_its_check_says_so() -> None:
    own = mailbox.server()
    box = mailbox.box_id("s", 120)
    own.open(box)
    stop = threading.Event()
    _later(0.3, stop.set)

    def check() -> None:
        if stop.is_set():
            raise RuntimeError("transition cancelled: test")

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="cancelled"):
        mailbox.take(own.name, box, "never", 60.0, check)
    assert time.monotonic() - t0 < 3


def test_a_malformed_request_is_dropped_and_the_mailbox_still_serves() -> None:
    own = mailbox.server()
    box = mailbox.box_id("s", 130)
    own.open(box)
    own.post(box, "k", b"v" * 100_000)
    for junk in (b"\xff\xff\xff\xff", b"\x00\x00\x00\x03abc", b""):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect("\0" + own.name)
            conn.sendall(junk)
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(100) == b""  # closed without an answer
    assert mailbox.take(own.name, box, "k", 5.0) == b"v" * 100_000


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to take from another uid")
def test_another_user_is_refused() -> None:
    own = mailbox.server()
    box = mailbox.box_id("s", 140)
    own.open(box)
    own.post(box, "k", b"secret handles")
    code = ("import os,sys\n"
            "from elasticmoe_worker.instance import mailbox\n"
            "os.setuid(65534)\n"
            "try:\n  mailbox.take(sys.argv[1], bytes.fromhex(sys.argv[2]), 'k', 5.0)\n"
            "except mailbox.MailboxError as e:\n  print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, own.name, box.hex()], capture_output=True, text=True,
                         timeout=60)
    assert "refused: pid" in out.stdout and "not the owner's uid 0" in out.stdout, (out.stdout, out.stderr[-2000:])


def test_a_messages_fds_go_to_a_take_that_asks_and_only_until_the_message_is_withdrawn() -> None:
    own = mailbox.server()
    box = mailbox.box_id("s", 201)
    own.open(box)
    fd = os.memfd_create("mbfds.region")
    try:
        os.pwrite(fd, b"weights", 0)
        own.post(box, "peer-copy/0-1", b"handles", [os.dup(fd)])  # the mailbox owns the duplicate
        own.post(box, "plain", b"no fds")
        value, fds = mailbox.take_with_fds(own.name, box, "peer-copy/0-1", 5.0)
        assert value == b"handles" and len(fds) == 1
        assert os.pread(fds[0], 7, 0) == b"weights"  # the same file, another fd of it
        os.close(fds[0])
        assert mailbox.take(own.name, box, "peer-copy/0-1", 5.0) == b"handles"  # a take that does not ask: none
        assert mailbox.take_with_fds(own.name, box, "plain", 5.0) == (b"no fds", [])
        assert testprocs.settled_memfds("mbfds.", 2) == 2  # ours and the mailbox's
        own.withdraw(box, "peer-copy/0-1")
        assert testprocs.settled_memfds("mbfds.", 1) == 1
        with pytest.raises(mailbox.MailboxError, match="nothing posted within 0.2 s"):
            mailbox.take_with_fds(own.name, box, "peer-copy/0-1", 0.2)
        # more than one reply can carry: the message goes without them (the taker asks the fd server)
        own.post(box, "many", b"handles", [os.dup(fd) for _ in range(mailbox.MAX_FDS + 1)])
        assert mailbox.take_with_fds(own.name, box, "many", 5.0) == (b"handles", [])
        own.post(box, "many", b"again", [os.dup(fd)])  # a replaced message's fds are closed
        assert testprocs.settled_memfds("mbfds.", 2) == 2
        for c in range(202, 202 + mailbox.KEEP):  # and an expired box's
            own.open(mailbox.box_id("s", c))
        assert testprocs.settled_memfds("mbfds.", 1) == 1
    finally:
        os.close(fd)

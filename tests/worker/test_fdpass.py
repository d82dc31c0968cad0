"""Batched memory-handle passing (`fdpass.prefetched`): one request per owner for many regions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import msgspec
import pytest
import testprocs
import torch

from elasticmoe_worker import backends
from elasticmoe_worker.backends import base, fdpass


def test_inside_a_prefetched_block_receives_ask_the_owner_nothing() -> None:
    b = backends.get_backend("cpu")
    regions = [b.allocate(4096, f"batch.{i}") for i in range(5)]
    try:
        for i, r in enumerate(regions):
            r.tensor(torch.uint8, (4096,)).fill_(i + 1)
        server = fdpass.server()
        with b.handles_prefetched([r.handle for r in regions] + [regions[0].handle]):  # a repeat is fetched once
            for r in regions:  # the owner forgets them: only the prefetched fds can serve now
                server.unregister(r.handle.fd_token)
            for i, r in enumerate(regions):
                attached = b.attach(r.handle)
                assert attached.tensor(torch.uint8, (4096,))[0].item() == i + 1
                attached.close()
        with pytest.raises(base.AttachError, match="owner closed the region"):
            b.attach(regions[2].handle)  # the block's fds are gone with it
    finally:
        for r in regions:
            r.close()


def test_fds_given_with_the_handles_are_used_and_closed_and_only_the_others_fetched() -> None:
    b = backends.get_backend("cpu")
    regions = [b.allocate(4096, f"given.{i}") for i in range(3)]
    try:
        for i, r in enumerate(regions):
            r.tensor(torch.uint8, (4096,)).fill_(i + 1)
        own = testprocs.open_memfds("given.")  # the regions' (the fd, and the mapping's own copy of it)
        server = fdpass.server()
        given = dict(zip([r.handle.fd_token for r in regions[:2]], server.duplicates([r.handle.fd_token
                                                                                     for r in regions[:2]])))
        given[b"x" * fdpass.TOKEN_BYTES] = server.duplicates([regions[2].handle.fd_token])[0]  # of no handle here
        server.unregister(regions[0].handle.fd_token)  # the owner would refuse these two now: only the
        server.unregister(regions[1].handle.fd_token)  # given fds can serve them
        with b.handles_prefetched([r.handle for r in regions], given):
            # two given, one fetched (the third given is closed)
            assert testprocs.settled_memfds("given.", own + 3) == own + 3
            for i, r in enumerate(regions):
                attached = b.attach(r.handle)
                assert attached.tensor(torch.uint8, (4096,))[0].item() == i + 1
                attached.close()
        assert testprocs.settled_memfds("given.", own) == own
        with pytest.raises(KeyError, match=r"token\(s\) \[0\] of 2"):
            server.duplicates([regions[0].handle.fd_token, regions[2].handle.fd_token])
    finally:
        for r in regions:
            r.close()


def test_a_batch_larger_than_one_request_is_split_and_nothing_leaks() -> None:
    b = backends.get_backend("cpu")
    regions = [b.allocate(4096, f"many.{i}") for i in range(fdpass.MAX_BATCH + 7)]
    try:
        own = testprocs.open_memfds("many.")  # the regions' own
        with b.handles_prefetched([r.handle for r in regions]):
            assert testprocs.settled_memfds("many.", own + len(regions)) == own + len(regions)
            fd = fdpass.receive(regions[-1].handle)
            os.close(fd)
        assert testprocs.settled_memfds("many.", own) == own
    finally:
        for r in regions:
            r.close()


def test_one_closed_region_fails_the_whole_batch_naming_it() -> None:
    b = backends.get_backend("cpu")
    regions = [b.allocate(4096, f"gone.{i}") for i in range(3)]
    try:
        fdpass.server().unregister(regions[1].handle.fd_token)
        before = testprocs.open_memfds("gone.")
        with pytest.raises(base.AttachError, match=r"token 2 of 3\): the owner closed the region"):
            with b.handles_prefetched([r.handle for r in regions]):
                pass  # pragma: no cover - the block is never entered
        assert testprocs.settled_memfds("gone.", before) == before  # no fd of the first region stays behind
        fd = fdpass.receive(regions[0].handle)  # the connection still serves single requests
        os.close(fd)
    finally:
        for r in regions:
            r.close()


def test_a_malformed_handle_is_refused_before_any_request() -> None:
    b = backends.get_backend("cpu")
    with b.allocate(4096, "ok") as region:
        bad = base.MemoryHandle(**{**{f: getattr(region.handle, f) for f in region.handle.__struct_fields__},
                                   "fd_token": b"short"})
        with pytest.raises(base.AttachError, match="a 5-byte token"):
            with b.handles_prefetched([region.handle, bad]):
                pass  # pragma: no cover


def test_a_connection_the_owner_closed_while_idle_is_replaced(monkeypatch) -> None:
    """The owner ends a connection idle for _CONNECTION_TIMEOUT_S; the next request (a scale
    minutes after the last) opens a new one instead of failing."""
    b = backends.get_backend("cpu")
    monkeypatch.setattr(fdpass, "_CONNECTION_TIMEOUT_S", 0.2)
    with b.allocate(4096, "idle") as region:
        fdpass._forget(region.handle.fd_socket)  # a connection made now gets the short timeout
        os.close(fdpass.receive(region.handle))
        time.sleep(0.6)  # the owner's side timed out and closed it
        os.close(fdpass.receive(region.handle))
        with b.handles_prefetched([region.handle]):
            pass


_OWNER = ("import sys,msgspec,torch\n"
          "from elasticmoe_worker.backends import cpu,fdpass\n"
          "r=cpu.CpuBackend().allocate(4096,'owner.'+sys.argv[1])\n"
          "r.tensor(torch.uint8,(4096,)).fill_(int(sys.argv[1]))\n"
          "fdpass.server().grant(r.handle.fd_token)\n"
          "print(msgspec.json.encode(r.handle).decode(),flush=True);sys.stdin.read()\n")


def test_a_stalled_owner_does_not_hold_up_requests_to_another() -> None:
    """Two peers' regions fetched at once (a device that pulls from two sources): while one owner
    cannot answer (stopped), the other's fds still come (each owner's connection has its own lock)."""
    owners = [subprocess.Popen([sys.executable, "-c", _OWNER, str(i)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True) for i in (1, 2)]
    got: dict[int, int] = {}
    try:
        handles = [msgspec.json.decode(p.stdout.readline().encode(), type=base.MemoryHandle) for p in owners]

        def fetch(i: int) -> None:
            got[i] = fdpass.receive(handles[i])

        for h in handles:  # both connections exist before the stall
            os.close(fdpass.receive(h))
        os.kill(owners[0].pid, signal.SIGSTOP)
        stalled = threading.Thread(target=fetch, args=(0,), daemon=True)
        stalled.start()
        time.sleep(0.2)  # its request is in flight to the stopped owner
        other = threading.Thread(target=fetch, args=(1,), daemon=True)
        other.start()
        other.join(timeout=10)
        assert not other.is_alive(), "the request to a live owner waited for the stopped one"
        assert stalled.is_alive() and 0 not in got
        os.kill(owners[0].pid, signal.SIGCONT)
        stalled.join(timeout=10)
        assert not stalled.is_alive()
        for i, fd in got.items():
            assert os.pread(fd, 1, 0) == bytes([i + 1])
    finally:
        for fd in got.values():
            os.close(fd)
        for p in owners:
            os.kill(p.pid, signal.SIGCONT)
            p.communicate(timeout=30)

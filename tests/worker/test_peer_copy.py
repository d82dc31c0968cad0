"""Transport by locality (instance.peer_copy): which transfers copy through shared memory."""

from __future__ import annotations

import threading

import pytest
import testprocs
import torch

from elasticmoe_worker.backends import cpu as cpu_backend
from elasticmoe_worker.backends import fdpass
from elasticmoe_worker.contract import wire
from elasticmoe_worker.instance import mailbox, peer_copy


def _t(src: int, dst: int) -> wire.Transfer:
    return wire.Transfer(kind="expert", src=src, dst=dst, expert_id=0)


def test_only_transfers_between_devices_with_the_same_key_are_local() -> None:
    transfers = [_t(0, 1), _t(0, 2), _t(2, 3), _t(1, 3), _t(3, 4)]
    keys = {0: "cpu/boot-a/net:[1]/uid0", 1: "cpu/boot-a/net:[1]/uid0", 2: "cpu/boot-b/net:[1]/uid0",
            3: "cpu/boot-b/net:[1]/uid0", 4: ""}
    assert peer_copy.local_transfers(transfers, keys) == {0, 2}
    # a device that publishes no key (no peer copies there) is never local, even with another such device
    assert peer_copy.local_transfers([_t(4, 5)], {4: "", 5: ""}) == set()


def test_the_key_names_backend_host_namespace_and_user(monkeypatch) -> None:
    key = peer_copy.locality_key(cpu_backend.CpuBackend())
    backend, boot, netns, uid = key.split("/")
    assert backend == "cpu" and len(boot) == 36 and netns.startswith("net:[") and uid.startswith("uid")
    monkeypatch.setenv(peer_copy.ENV, "0")
    assert peer_copy.locality_key(cpu_backend.CpuBackend()) == ""


def test_a_backend_that_cannot_copy_from_peers_is_never_local() -> None:
    class NoPeers(cpu_backend.CpuBackend):
        copies_from_peers = False

    assert peer_copy.locality_key(NoPeers()) == ""


def test_the_transfers_of_a_pair_split_into_what_the_destination_pulls_and_what_its_source_pushes() -> None:
    items = [(0, [("r0", 0, 300)]), (3, [("r1", 0, 100), ("r2", 0, 50)]), (4, [("r3", 8, 100)]), (9, [("r4", 0, 60)])]
    # 610 bytes, half is 305: the source takes whole transfers from the end while they fit (60 + 100; the
    # next, 150, no longer does)
    pulled, pushed = peer_copy.split(items, 0.5)
    assert pulled == items[:2] and pushed == items[2:]
    assert peer_copy.split(items, 0.0) == (items, [])
    assert peer_copy.split(items, 1.0) == ([], items)
    assert peer_copy.split([(0, [("r0", 0, 100)])], 0.5) == ([(0, [("r0", 0, 100)])], [])  # one transfer: pulled


def test_a_source_pushes_a_share_by_how_many_devices_it_serves(monkeypatch) -> None:
    transfers = [_t(0, 1), _t(0, 1), _t(0, 2), _t(3, 4), _t(5, 6)]
    # device 0 serves two destinations, each served by it alone: a third of each pair is its to push
    assert peer_copy.pair_shares(transfers, {0, 1, 2, 3}) == {(0, 1): 1 / 3, (0, 2): 1 / 3, (3, 4): 1 / 2}
    # 4 -> 2: two departing sources, each serving both staying destinations: half each, so that a
    # destination copies no more than a source (a fixed 1 / (1 + destinations) gave it twice as much)
    down = [_t(2, 0), _t(2, 1), _t(3, 0), _t(3, 1), _t(2, 0)]
    shares = peer_copy.pair_shares(down, set(range(5)))
    assert shares == {(2, 0): 0.5, (2, 1): 0.5, (3, 0): 0.5, (3, 1): 0.5}
    # 1 -> 3 beside a second source for device 2: device 0 serves two, device 2 has two sources
    shares = peer_copy.pair_shares([_t(0, 1), _t(0, 2), _t(5, 2)], {0, 1, 2})
    assert shares == {(0, 1): 1 / 3, (0, 2): 2 / 4, (5, 2): 2 / 3}
    monkeypatch.setenv(peer_copy.PUSH_ENV, "0")
    assert peer_copy.pair_shares(transfers, {0, 1, 2, 3}) == {(0, 1): 0.0, (0, 2): 0.0, (3, 4): 0.0}


class _Store:
    """A rendezvous store for threads of one process (`get` waits)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.cond = threading.Condition()

    def set(self, key: str, value: bytes) -> None:
        with self.cond:
            self.data[key] = value
            self.cond.notify_all()

    def get(self, key: str) -> bytes:
        with self.cond:
            assert self.cond.wait_for(lambda: key in self.data, timeout=30), key
            return self.data[key]


class _NoCancel:
    def check(self) -> None:
        pass


@pytest.mark.parametrize("through", ["store", "mailboxes"])
def test_both_sides_of_an_exchange_copy_every_byte_once(through: str, monkeypatch) -> None:
    """Device 0 serves devices 1 and 2, device 1 also serves device 2 (`pair_shares`: a third of the
    bytes 0 -> 1, half of 0 -> 2 and two thirds of 1 -> 2 are the source's to push): each destination
    ends with its sources' bytes, whoever copied them. The devices
    tell each other what they copy through a store (the coordinator's) or their mailboxes (here the
    three share this process's, over its socket); through mailboxes the regions' fds come with their
    handles (no request to an fd server), and none stays open after the sources closed."""
    if through == "mailboxes":
        def no_round_trip(handles):
            raise AssertionError(f"asked an fd server for {len(handles)} fd(s): they should have come with the handles")

        monkeypatch.setattr(fdpass, "_request", no_round_trip)
    backend = cpu_backend.CpuBackend()
    page = 4096
    sizes = [5 * page + 123, 7 * page, 64, 3 * page, 3 * page]
    regions = {d: [backend.allocate(n, f"xchg{d}.b{i}") for i, n in enumerate(sizes)] for d in (0, 1, 2)}
    for d in (0, 1):
        for i, r in enumerate(regions[d]):
            r.tensor(torch.uint8, (r.size_bytes,)).copy_(torch.randint(0, 256, (r.size_bytes,), dtype=torch.uint8))
    transfers = [_t(0, 1), _t(0, 2), _t(1, 2), _t(0, 1), _t(1, 2)]
    bufs = {d: [(r, 0, r.size_bytes) for r in regions[d]] for d in (0, 1, 2)}
    # each transfer moves one buffer list (a device sends what it holds, never what it is receiving)
    moved = {0: (bufs[0][1:2], bufs[1][1:2]), 1: (bufs[0][:1], bufs[2][:1]), 2: (bufs[1][2:3], bufs[2][2:3]),
             3: (bufs[0][3:4], bufs[1][4:]), 4: (bufs[1][3:4], bufs[2][3:4])}
    shares = peer_copy.pair_shares(transfers, {0, 1, 2, 3, 4})
    store, results, errors = _Store(), {}, []
    box = mailbox.box_id("secret", 7)

    def device(d: int) -> None:
        wanted = [(i, t.src, moved[i][1]) for i, t in enumerate(transfers) if t.dst == d]
        offered: dict = {}
        for i, t in enumerate(transfers):
            if t.src == d:
                offered.setdefault(t.dst, []).append((i, moved[i][0]))
        source = peer_copy.Source()
        if through == "store":
            peers = peer_copy.StorePeers(store, d, 3)
        else:
            own = mailbox.server().name
            peers = peer_copy.MailboxPeers(box, d, {0: own, 1: own, 2: own}, 30.0, lambda: None)
        try:
            results[d] = peer_copy.exchange(backend, peers, source, d, wanted, offered, shares, _NoCancel())
            peers.done({t.src for t in transfers if t.dst == d} | {t.dst for t in transfers if t.src == d})
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            source.close()

    threads = [threading.Thread(target=device, args=(d,)) for d in (0, 1, 2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    for i in moved:
        for (src, _, n), (dst, _, _) in zip(*moved[i]):
            assert torch.equal(src.tensor(torch.uint8, (n,)), dst.tensor(torch.uint8, (n,))), (i, src.name, dst.name)
    # device 0 -> 1: transfers 0 (7 pages) and 3 (3 pages); a third of the bytes holds transfer 3: pushed
    # device 1 -> 2: 64 bytes and 3 pages; the 3 pages are more than its half: device 2 pulls both
    assert results[0][0] == 3 * page and results[1][0] == 0
    assert results[2] == (0, sum(n for i in (1, 2, 4) for _, _, n in moved[i][1]))  # it pushed nothing, got all
    for rs in regions.values():
        for r in rs:
            r.close()
    assert testprocs.settled_memfds("xchg", 0) == 0  # the mailbox's copies were withdrawn with the grants


def test_keys_the_coordinator_told_are_used_as_they_are_and_otherwise_exchanged() -> None:
    import pytest
    import torch.distributed as dist

    backend = cpu_backend.CpuBackend()
    own = peer_copy.locality_key(backend)
    store = dist.HashStore()
    # told: no store round trip at all (nothing is published)
    assert peer_copy.group_keys(store, backend, 1, [4, 7], ["elsewhere", own]) == {4: "elsewhere", 7: own}
    assert store.num_keys() == 0
    # not told: every rank publishes its own and reads the others'
    store.set("locality/0", "elsewhere")
    assert peer_copy.group_keys(store, backend, 1, [4, 7], None) == {4: "elsewhere", 7: own}
    # told something that cannot be this rank's: an error naming both, not a silent misroute
    with pytest.raises(RuntimeError, match="rank 1's 'other' but this HMM's is"):
        peer_copy.group_keys(store, backend, 1, [4, 7], [own, "other"])
    with pytest.raises(RuntimeError, match="1 for 2 rank"):
        peer_copy.group_keys(store, backend, 0, [4, 7], [own])


def test_a_peer_that_published_something_else_fails_the_copy_and_leaves_no_fd_open() -> None:
    """The destination gets the fds with the handles; when the batch names other transfers than it
    expects, it raises, naming them, and closes the fds that came (none stays open once the source
    closed)."""
    backend = cpu_backend.CpuBackend()
    src = backend.allocate(4096, "odd.src")
    dst = backend.allocate(4096, "odd.dst")
    own = mailbox.server().name
    box = mailbox.box_id("secret", 8)
    peers = {d: peer_copy.MailboxPeers(box, d, {0: own, 1: own}, 5.0, lambda: None) for d in (0, 1)}
    source = peer_copy.Source()
    try:
        source.send_for(peers[0], 1, "peer-copy/0-1", [(5, [(src, 0, 4096)])])  # transfer 5, not 3
        with pytest.raises(RuntimeError, match=r"peer copy 3: device 0 published no handles for it \(it published "
                                               r"transfers \[5\]\)"):
            peer_copy.exchange(backend, peers[1], peer_copy.Source(), 1, [(3, 0, [(dst, 0, 4096)])], {},
                               {(0, 1): 0.0}, _NoCancel())
    finally:
        source.close()
        src.close()
        dst.close()
    assert testprocs.settled_memfds("odd.", 0) == 0

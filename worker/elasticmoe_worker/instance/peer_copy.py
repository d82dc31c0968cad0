"""Transport by locality: during a transition, devices on the same host copy bytes through
shared memory, one copy from the source region into the destination region; the others use the
collective backend (gloo, NCCL, HCCL).

Why it exists: over gloo, a same-host transfer goes through loopback TCP (the bytes cross the
kernel twice, in 4 MB-ish segments, at one core's speed per pair) after a process group was
formed (a rendezvous plus one connection per pair). A CPU device's memory is a memfd the HMM
can hand to a peer: the kernel copies its pages into the destination's (`copy_from_peer`), and a
transition whose transfers are all local forms no process group at all.

How:
- Locality. Each HMM of the transition publishes a key in the transition's rendezvous store
  (authenticated control channel): backend, boot id, network namespace (abstract Unix sockets,
  which pass the fds, live there) and effective uid (`fdpass` admits only the owner's uid). Two
  devices are local when their keys are equal and non-empty; every HMM reads every key and
  computes the same split. A backend without `copies_from_peers` publishes "" (never local), as
  does an HMM with ELASTICMOE_PEER_COPY=0 (force the collective, for comparisons).
- Source. For the local transfers it sends, the HMM grants the regions to peers
  (`fdpass.FdServer.grant`) and sends their handles, all of those for one destination under one
  key, `peer-copy/<source>-<destination>` (`send_for`: one message per peer, not one per
  transfer; a transition moves each expert as a transfer of its own). Between HMMs the regions'
  fds go with the message, so the peer has them without a round trip to this HMM's fd server;
  through the store it asks that server (`fdpass.prefetched`). `Source.close` revokes the grants
  (and withdraws a message too large to send, which was posted into its mailbox instead).
- Both sides copy (`exchange`). A copy costs the CPU of the process that makes it; under a
  device's CPU quota one HMM alone copies at its quota's pace. So the transfers between a source
  and a destination are shared out (`split`): the source pushes whole transfers from the end of
  the list, a share of the bytes that evens out every device's copying (`pair_shares`), into the
  destination's regions (`backend.copy_to_peer`), which the destination grants and sends under
  `peer-copy-dst/<source>-<destination>`; the destination pulls the others
  (`backend.copy_from_peer`). Every peer in parallel, a thread each. ELASTICMOE_PEER_PUSH=0: the
  destinations pull everything (for comparisons).
- Completion. Each rank sends `peer-copy-done/<rank>-<peer>` to its peers once its copies are
  done and waits for theirs: no source revokes its grants (or frees a departing region) while a
  peer copies, and no destination says its bytes are there before its sources' pushes into it
  are done.
- Where the handles and completions go (`MailboxPeers`, `StorePeers`): when the coordinator told
  every rank's mailbox (`PrepareTransition.mailboxes`), straight between the HMMs: each message
  has one reader and goes into its inbox (`inbox`: the reader finds it queued, or wakes once when
  it comes; no round trip to the sender's process, which a mailbox take needs); a rank waits only
  for the devices it copied with. Otherwise through the transition's rendezvous store, and
  completion is a barrier of all ranks.

Not guaranteed: the handles are capabilities: any process of the owner's uid that learns one
(they travel only over the authenticated channel) can copy the region until it is revoked.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import time
from typing import Callable

import msgspec

from elasticmoe_worker.backends import base as backends_base
from elasticmoe_worker.backends import fdpass
from elasticmoe_worker.contract import wire
from elasticmoe_worker.instance import inbox, mailbox

logger = logging.getLogger("elasticmoe.hmm")

ENV = "ELASTICMOE_PEER_COPY"

# One buffer of a transfer: the region, the byte offset and length within it.
Buffer = tuple[backends_base.Region, int, int]
_Published = list[tuple[wire.MemoryHandle, int, int]]
_Batch = dict[int, _Published]  # transfer index -> what its source sent (`Source.send_for`)


def locality_key(backend: backends_base.DeviceBackend) -> str:
    """Equal for two HMMs exactly when one can copy from the other's regions; "" when never."""
    if not backend.copies_from_peers or os.environ.get(ENV, "1") == "0":
        return ""
    try:
        boot = boot_id()
        netns = os.readlink("/proc/self/ns/net")
    except OSError as exc:
        logger.info("peer copies off: cannot tell this host apart (%s)", exc)
        return ""
    return f"{backend.name}/{boot}/{netns}/uid{os.geteuid()}"


@functools.lru_cache(maxsize=1)
def boot_id() -> str:
    """This host's boot id (the kernel's; equal for processes that share one clock). OSError without one."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def same_host(key: str) -> bool:
    """Whether a `locality_key` was made on this host (its boot id is this one's)."""
    parts = key.split("/")
    try:
        return len(parts) > 2 and parts[1] == boot_id()
    except OSError:
        return False


def local_transfers(transfers: list[wire.Transfer], keys: dict[int, str]) -> set[int]:
    """Indices of the transfers between two devices (by device index) with the same non-empty key."""
    return {i for i, t in enumerate(transfers) if keys.get(t.src) and keys.get(t.src) == keys.get(t.dst)}


def exchange_keys(store, rank: int, group_ranks: list[int], key: str) -> dict[int, str]:
    """Publish this rank's key, read everyone's: device index -> key."""
    store.set(f"locality/{rank}", key)
    return {device: store.get(f"locality/{r}").decode() for r, device in enumerate(group_ranks)}


def group_keys(store, backend: backends_base.DeviceBackend, rank: int, group_ranks: list[int],
               told: list[str] | None) -> dict[int, str]:
    """Device index -> locality key of every rank: as the coordinator `told` (the keys the HMMs gave it
    with their hellos and heartbeats, the same for every rank of a transition), else exchanged through
    the store (a round trip to wait for the last rank to arrive)."""
    own = locality_key(backend)
    if told is None:
        return exchange_keys(store, rank, group_ranks, own)
    if len(told) != len(group_ranks) or told[rank] != own:
        raise RuntimeError(f"locality keys from the coordinator do not fit this transition: {len(told)} for "
                           f"{len(group_ranks)} rank(s), rank {rank}'s {told[rank] if rank < len(told) else None!r} "
                           f"but this HMM's is {own!r}")
    return dict(zip(group_ranks, told))


class Source:
    """The regions this HMM lets peers copy during one transition; `close` revokes them (and
    withdraws the fds posted with their handles)."""

    def __init__(self) -> None:
        self._tokens: list[bytes] = []
        self._posted: list[tuple[object, str]] = []  # (peers, key) of the posts that carried fds

    def send_for(self, peers, peer: int, key: str, items: list[tuple[int, list[Buffer]]]) -> int:
        """Grant the buffers of every transfer `(index, buffers)` to peers and send their handles,
        with their fds, to `peer` under one key (`peers`: `StorePeers` or `MailboxPeers`). -> bytes
        sent for."""
        server = fdpass.server()
        batch: _Batch = {}
        for index, buffers in items:
            batch[index] = []
            for region, offset, nbytes in buffers:
                server.grant(region.handle.fd_token)
                self._tokens.append(region.handle.fd_token)
                batch[index].append((region.handle, offset, nbytes))
        # NOTE: the fds go with the handles, so the peer need not ask this process's fd server for
        # them: one round trip less per pair of devices, to a process that may be waiting for the cores
        tokens = handle_tokens(batch)
        self._posted.append((peers, key))  # (a message too large to send is posted: withdrawn at close)
        peers.send(peer, key, msgspec.msgpack.encode(batch), server.duplicates(tokens) if tokens else [])
        return sum(n for _, buffers in items for _, _, n in buffers)

    def close(self) -> None:
        for peers, key in self._posted:
            peers.withdraw(key)
        self._posted.clear()
        server = fdpass.server()
        for token in self._tokens:
            server.revoke(token)
        self._tokens.clear()


def handle_tokens(batch: _Batch) -> list[bytes]:
    """The fd tokens of a batch's handles, each once, in the batch's order (the order of the fds
    posted with it, on both sides)."""
    seen: dict[bytes, None] = {}
    for published in batch.values():
        for handle, _, _ in published:
            seen.setdefault(handle.fd_token, None)
    return list(seen)


def receive_batch(peers, peer: int, key: str) -> tuple[_Batch, dict[bytes, int]]:
    """What `peer` sent this device under `key` (`Source.send_for`; waits) -> (its handles by
    transfer, the fds that came with them by token: the caller owns them; none when not all came —
    the store carries none —, and then a round trip to the peer's fd server fetches them)."""
    value, fds = peers.receive(peer, key)
    try:
        batch = msgspec.msgpack.decode(value, type=_Batch)
        tokens = handle_tokens(batch)
    except BaseException:
        fdpass.close_all(fds)
        raise
    if len(fds) != len(tokens):
        fdpass.close_all(fds)
        fds = []
    return batch, dict(zip(tokens, fds))


def pair_shares(transfers: list[wire.Transfer], local: set[int]) -> dict[tuple[int, int], float]:
    """(source, destination) -> the share of the bytes of their local transfers the source copies
    itself (pushes) while the destination pulls the rest: b / (a + b) for a source that serves a
    destinations and a destination that b sources serve, so that every device copies about as many
    bytes (1 -> 2: half each; 1 -> 5: a fifth of each pair, the source four fifths of one in all;
    4 -> 2, two departing sources for two staying destinations: half; before session 21 a source
    pushed 1 / (1 + a), and a staying device of 4 -> 2 copied twice what a departing one did).
    0 for every pair with ELASTICMOE_PEER_PUSH=0 (the destinations pull everything)."""
    pairs = {(transfers[i].src, transfers[i].dst) for i in local}
    if os.environ.get(PUSH_ENV, "1") == "0":
        return {pair: 0.0 for pair in pairs}
    destinations: dict[int, int] = {}
    sources: dict[int, int] = {}
    for src, dst in pairs:
        destinations[src] = destinations.get(src, 0) + 1
        sources[dst] = sources.get(dst, 0) + 1
    return {(src, dst): sources[dst] / (destinations[src] + sources[dst]) for src, dst in pairs}


PUSH_ENV = "ELASTICMOE_PEER_PUSH"

_Items = list[tuple[int, list[Buffer]]]  # (transfer index, its buffers on this side), in transfer order


def split(items: _Items, share: float) -> tuple[_Items, _Items]:
    """The transfers between one source and one destination -> (those the destination pulls, those
    the source pushes): the source takes whole transfers from the end while they fit in `share` of
    the bytes, so each region is copied by one side only. The same on both sides: the same
    transfers in the same order, of the same sizes."""
    budget = share * sum(n for _, buffers in items for _, _, n in buffers)
    cut = len(items)
    while cut > 0 and (n := sum(b[2] for b in items[cut - 1][1])) <= budget:
        budget -= n
        cut -= 1
    return items[:cut], items[cut:]


def exchange(backend: backends_base.DeviceBackend, peers, source: Source, device_index: int,
             wanted: list[tuple[int, int, list[Buffer]]], offered: dict[int, _Items],
             shares: dict[tuple[int, int], float], cancel) -> tuple[int, int]:
    """The local transfers of one device, both sides of the copy at once: for each source it
    receives from (`wanted`: index, source device, this device's buffers) it publishes the regions
    of the transfers that source pushes (`peer-copy-dst/<src>-<dst>`) and pulls the others; for
    each destination it serves (`offered`: destination -> its transfers' buffers here) it publishes
    the regions of the transfers the destination pulls (`peer-copy/<src>-<dst>`) and pushes the
    others (`split`). Every peer in parallel: a copy costs the CPU of the process that makes it, and
    under a device's CPU quota two processes copying move bytes about twice as fast as one.
    -> (bytes this device pushed, bytes its transfers brought it, whoever copied them); pushes
    into it may still run: `barrier` waits for them."""
    started = time.perf_counter()
    by_source: dict[int, _Items] = {}
    for index, src, buffers in wanted:
        by_source.setdefault(src, []).append((index, buffers))
    jobs: list[tuple[int, _Items, bool]] = []
    for src, items in by_source.items():
        pulled, pushed = split(items, shares[(src, device_index)])
        source.send_for(peers, src, f"peer-copy-dst/{src}-{device_index}", pushed)
        jobs.append((src, pulled, False))
    for dst, items in offered.items():
        pulled, pushed = split(items, shares[(device_index, dst)])
        source.send_for(peers, dst, f"peer-copy/{device_index}-{dst}", pulled)
        jobs.append((dst, pushed, True))
    published = time.perf_counter() - started

    def one_peer(peer: int, items: _Items, pushing: bool) -> int:
        t0 = time.perf_counter()
        key = f"peer-copy-dst/{device_index}-{peer}" if pushing else f"peer-copy/{peer}-{device_index}"
        batch, given = receive_batch(peers, peer, key) if items else ({}, {})
        try:
            copies = _pair_copies(peer, batch, items)
        except BaseException:
            fdpass.close_all(list(given.values()))
            raise
        t1 = time.perf_counter()
        copied = 0
        # the fds came with the handles (or one round trip to the peer's fd server fetches them)
        with backend.handles_prefetched([handle for handle, *_ in copies], given):
            t2 = time.perf_counter()
            for handle, their_offset, nbytes, (region, offset, _) in copies:
                cancel.check()
                if pushing:
                    backend.copy_to_peer(region, offset, handle, their_offset, nbytes)
                else:
                    backend.copy_from_peer(region, offset, handle, their_offset, nbytes)
                copied += nbytes
        t3 = time.perf_counter()
        if copies:
            logger.info("device %d: peer copy of %.1f MB %s device %d: this side's grants published in %.3f s, then "
                        "its handles after %.3f s, their file descriptors %.3f s (%s), copies %.3f s (%.2f GB/s)",
                        device_index, copied / 1e6, "into" if pushing else "from", peer, published, t1 - t0, t2 - t1,
                        "with the handles" if given else "from its fd server", t3 - t2,
                        copied / max(t3 - t2, 1e-9) / 1e9)
        return copied

    received = sum(n for _, _, buffers in wanted for _, _, n in buffers)
    jobs = [job for job in jobs if job[1]]
    if not jobs:
        return 0, received
    # the first peer on this thread, the others on one thread each (a pair of devices, 1 -> 2,
    # starts no thread: under load each hand-off waits for the cores)
    if len(jobs) == 1:
        copied = one_peer(*jobs[0])
        return (copied if jobs[0][2] else 0), received
    with concurrent.futures.ThreadPoolExecutor(len(jobs) - 1, thread_name_prefix="peer-copy") as pool:
        futures = [(pool.submit(one_peer, *job), job[2]) for job in jobs[1:]]
        first = one_peer(*jobs[0])
        pushed = (first if jobs[0][2] else 0) + sum(f.result() for f, pushing in futures if pushing)
    return pushed, received


def _pair_copies(peer: int, batch: _Batch, items: _Items) -> list:
    """(their handle, their offset, bytes, this side's buffer) of each buffer of `items`, from what
    `peer` published for them; RuntimeError when it published something else."""
    copies = []
    for index, buffers in items:
        theirs = batch.get(index)
        if theirs is None:
            raise RuntimeError(f"peer copy {index}: device {peer} published no handles for it (it published "
                               f"transfers {sorted(batch)})")
        if [n for _, _, n in theirs] != [n for _, _, n in buffers]:
            raise RuntimeError(f"peer copy {index}: device {peer} published buffers of "
                               f"{[n for _, _, n in theirs]} bytes, this device has {[n for _, _, n in buffers]}")
        copies += [(h, o, n, b) for (h, o, n), b in zip(theirs, buffers)]
    return copies


def needs_store(group_ranks: list[int], transfers: list, locality: list[str] | None,
                mailboxes: list[str] | None) -> bool:
    """Whether the HMMs of a transition (or KV move) need its rendezvous store: not when the coordinator
    told every rank's locality and mailbox and every transfer is between devices of one host."""
    if locality is None or mailboxes is None:
        return True  # (the keys are exchanged through it)
    return len(local_transfers(transfers, dict(zip(group_ranks, locality)))) < len(transfers)


def peers_of(msg, device_index: int, store, box: bytes, timeout_s: float, check: Callable[[], None]):
    """How the HMMs of `msg` (a `PrepareTransition` or `MoveKV`) tell each other what they copy:
    their mailboxes when the coordinator told them (`msg.mailboxes`), else its store."""
    if msg.mailboxes is not None:
        return MailboxPeers(box, device_index, dict(zip(msg.group_ranks, msg.mailboxes)), timeout_s, check)
    return StorePeers(store, msg.rank, len(msg.group_ranks))


class StorePeers:
    """A transition's messages between its HMMs through its rendezvous store (the coordinator)."""

    def __init__(self, store, rank: int, world: int) -> None:
        self.store, self.rank, self.world = store, rank, world

    def withdraw(self, key: str) -> None:
        """Nothing to do: the store, and what was set in it, ends with the transition."""

    def send(self, peer: int, key: str, value: bytes, fds: list[int] = ()) -> None:
        fdpass.close_all(fds)  # a store carries no fds: the peer asks the owner's fd server
        self.store.set(key, value)  # (every rank can read it: the keys name their reader)

    def receive(self, peer: int, key: str) -> tuple[bytes, list[int]]:
        return self.store.get(key), []

    def done(self, peers: set[int]) -> None:
        """This rank's copies are done; wait for every rank's (`barrier`)."""
        barrier(self.store, self.rank, self.world)


class MailboxPeers:
    """A transition's messages straight between its HMMs: each sends into its reader's inbox
    (`inbox`), or, too large for a datagram, posts into its own mailbox (`mailbox`) and sends a
    notice. `done` waits only for the devices this one copied with."""

    def __init__(self, box: bytes, device_index: int, addresses: dict[int, str], timeout_s: float,
                 check: Callable[[], None]) -> None:
        own = mailbox.server()
        if addresses.get(device_index) != own.name:
            raise RuntimeError(f"mailbox addresses from the coordinator do not fit this HMM: device {device_index}'s "
                               f"is {addresses.get(device_index)!r}, this HMM's is {own.name!r}")
        self.own, self.box, self.device_index, self.addresses = own, box, device_index, addresses
        self.timeout_s, self.check = timeout_s, check
        own.open(box)

    def withdraw(self, key: str) -> None:
        self.own.withdraw(self.box, key)

    def send(self, peer: int, key: str, value: bytes, fds: list[int] = ()) -> None:
        """`value` (and `fds`, owned from here) to `peer` alone, into its inbox (`inbox`): it reads it
        without a round trip to this process. One too large for a datagram is posted into this
        mailbox, and a notice sent instead."""
        posted = not inbox.fits(self.box, key, value, len(fds))
        if posted:
            self.own.post(self.box, key, value, fds)
            value, fds = b"", []
        inbox.send(inbox.address(self.addresses[peer]), self.box, key, value, fds, self.timeout_s, posted=posted,
                   own=self.own.inbox, check=self.check)

    def receive(self, peer: int, key: str) -> tuple[bytes, list[int]]:
        """What `peer` sent this device under `key` (waits), and its fds (the caller closes them)."""
        value, fds, posted = self.own.inbox.receive(self.box, key, self.timeout_s, self.check)
        if posted:
            return self.take_with_fds(peer, key)
        return value, fds

    def take_with_fds(self, peer: int, key: str) -> tuple[bytes, list[int]]:
        return mailbox.take_with_fds(self.addresses[peer], self.box, key, self.timeout_s, self.check)

    def done(self, peers: set[int]) -> None:
        """This device's copies are done; wait until each of `peers` says the same of its own (no
        source revokes a grant a peer still copies from, no destination is ready before the pushes
        into it are done)."""
        for peer in sorted(peers):
            self.send(peer, f"peer-copy-done/{self.device_index}-{peer}", b"1")
        for peer in sorted(peers):
            fdpass.close_all(self.receive(peer, f"peer-copy-done/{peer}-{self.device_index}")[1])


def barrier(store, rank: int, world: int) -> float:
    """Publish this rank's completion and wait for every rank's. -> seconds waited."""
    t0 = time.perf_counter()
    store.set(f"peer-copy-done/{rank}", b"1")
    for r in range(world):
        store.get(f"peer-copy-done/{r}")
    return time.perf_counter() - t0

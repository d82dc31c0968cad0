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
- Source. For each local transfer it sends, the HMM grants the regions to peers
  (`fdpass.FdServer.grant`) and publishes their handles under `peer-copy/<transfer index>`.
- Destination. It reads the handles and copies, one thread per source device (sources in
  parallel), each copy through `backend.copy_from_peer`.
- Completion. Each rank publishes `peer-copy-done/<rank>` once its copies are done and waits for
  every rank's: no source revokes its grants (or frees a departing region) while a peer copies.

Not guaranteed: the handles are capabilities: any process of the owner's uid that learns one
(they travel only over the authenticated channel) can copy the region until it is revoked.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time

import msgspec

from elasticmoe_worker.backends import base as backends_base
from elasticmoe_worker.backends import fdpass
from elasticmoe_worker.contract import wire

logger = logging.getLogger("elasticmoe.hmm")

ENV = "ELASTICMOE_PEER_COPY"

# One buffer of a transfer: the region, the byte offset and length within it.
Buffer = tuple[backends_base.Region, int, int]
_Published = list[tuple[wire.MemoryHandle, int, int]]


def locality_key(backend: backends_base.DeviceBackend) -> str:
    """Equal for two HMMs exactly when one can copy from the other's regions; "" when never."""
    if not backend.copies_from_peers or os.environ.get(ENV, "1") == "0":
        return ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        netns = os.readlink("/proc/self/ns/net")
    except OSError as exc:
        logger.info("peer copies off: cannot tell this host apart (%s)", exc)
        return ""
    return f"{backend.name}/{boot}/{netns}/uid{os.geteuid()}"


def local_transfers(transfers: list[wire.Transfer], keys: dict[int, str]) -> set[int]:
    """Indices of the transfers between two devices (by device index) with the same non-empty key."""
    return {i for i, t in enumerate(transfers) if keys.get(t.src) and keys.get(t.src) == keys.get(t.dst)}


def exchange_keys(store, rank: int, group_ranks: list[int], key: str) -> dict[int, str]:
    """Publish this rank's key, read everyone's: device index -> key."""
    store.set(f"locality/{rank}", key)
    return {device: store.get(f"locality/{r}").decode() for r, device in enumerate(group_ranks)}


class Source:
    """The regions this HMM lets peers copy during one transition; `close` revokes them."""

    def __init__(self) -> None:
        self._tokens: list[bytes] = []

    def publish(self, store, index: int, buffers: list[Buffer]) -> int:
        server = fdpass.server()
        published: _Published = []
        for region, offset, nbytes in buffers:
            server.grant(region.handle.fd_token)
            self._tokens.append(region.handle.fd_token)
            published.append((region.handle, offset, nbytes))
        store.set(f"peer-copy/{index}", msgspec.msgpack.encode(published))
        return sum(n for _, _, n in buffers)

    def close(self) -> None:
        server = fdpass.server()
        for token in self._tokens:
            server.revoke(token)
        self._tokens.clear()


def read_published(store, index: int) -> _Published:
    """What the source of transfer `index` published: (handle, offset, bytes) per buffer (waits)."""
    return msgspec.msgpack.decode(store.get(f"peer-copy/{index}"), type=_Published)


def pull(backend: backends_base.DeviceBackend, store, wanted: list[tuple[int, int, list[Buffer]]], cancel,
         device_index: int = -1) -> int:
    """Copy each wanted transfer (index, source device, destination buffers) from its source's
    published regions, sources in parallel. -> bytes copied. Logs, per source, how long this
    device waited for its handles, for their file descriptors and for the copies."""
    by_source: dict[int, list[tuple[int, list[Buffer]]]] = {}
    for index, src, buffers in wanted:
        by_source.setdefault(src, []).append((index, buffers))

    def one_source(src: int, items: list[tuple[int, list[Buffer]]]) -> int:
        t0 = time.perf_counter()
        copies = []
        for index, buffers in items:
            published = read_published(store, index)
            if [n for _, _, n in published] != [n for _, _, n in buffers]:
                raise RuntimeError(f"peer copy {index}: the source published buffers of "
                                   f"{[n for _, _, n in published]} bytes, this device expects "
                                   f"{[n for _, _, n in buffers]}")
            copies += [(handle, src_offset, nbytes, region, dst_offset)
                       for (handle, src_offset, nbytes), (region, dst_offset, _) in zip(published, buffers)]
        t1 = time.perf_counter()
        copied = 0
        with backend.handles_prefetched([handle for handle, *_ in copies]):  # one round trip to the source
            t2 = time.perf_counter()
            for handle, src_offset, nbytes, region, dst_offset in copies:
                cancel.check()
                backend.copy_from_peer(region, dst_offset, handle, src_offset, nbytes)
                copied += nbytes
        t3 = time.perf_counter()
        logger.info("device %d: peer copy of %.1f MB from device %d: its handles after %.3f s, their file "
                    "descriptors %.3f s, copies %.3f s (%.2f GB/s)", device_index, copied / 1e6, src, t1 - t0,
                    t2 - t1, t3 - t2, copied / max(t3 - t2, 1e-9) / 1e9)
        return copied

    if not by_source:
        return 0
    with concurrent.futures.ThreadPoolExecutor(len(by_source), thread_name_prefix="peer-copy") as pool:
        return sum(f.result() for f in [pool.submit(one_source, src, items) for src, items in by_source.items()])


def barrier(store, rank: int, world: int) -> float:
    """Publish this rank's completion and wait for every rank's. -> seconds waited."""
    t0 = time.perf_counter()
    store.set(f"peer-copy-done/{rank}", b"1")
    for r in range(world):
        store.get(f"peer-copy-done/{r}")
    return time.perf_counter() - t0

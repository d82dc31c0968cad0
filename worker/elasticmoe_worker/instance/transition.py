"""The HMM's part of a reconfiguration: allocate what the new configuration needs and move
bytes peer to peer, while this device's current executor keeps serving.

Runs in a thread of the HMM. Transfers between devices of one host copy through shared memory
(`peer_copy`: both sides grant their regions and each copies its share of the transfers, no
process group); the others go over a process group of the backend's collective library (gloo,
NCCL, HCCL: `rendezvous.process_group`) created for this transition only (its own rendezvous
prefix, over the authenticated control channel), so it never touches the executors' collectives. `Cancel.set()` (an abort) makes the thread give up
within about half a second wherever it waits: in the rendezvous or on a transfer.
Every HMM walks the same ordered transfer list and posts the sends and receives that
involve it; the tag is the transfer's position, so pairs never mix up their messages (NCCL and
HCCL ignore tags and match a pair's messages in posting order: the same list order on both sides).
Staying memory is never copied: only new devices receive replicated bytes, and only the
experts a device gains are received.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import threading
import time
from typing import Callable

import torch

from elasticmoe_worker.backends import base as backends_base
from elasticmoe_worker.contract import wire
from elasticmoe_worker.instance import cgroup, mailbox, memory, peer_copy, rendezvous

logger = logging.getLogger("elasticmoe.hmm")


@dataclasses.dataclass
class Result:
    memory: memory.DeviceMemory
    seconds: float
    bytes_sent: int
    bytes_received: int
    setup_seconds: float  # allocation + forming the transfer group
    data_seconds: float  # moving the bytes
    transport: str = ""  # how this device's bytes moved: "shared memory", the collective backend, both, or ""
    allocation_seconds: float = 0.0  # of setup_seconds: allocating, telling the standby, checkpoint reads
    standby_seconds: float = 0.0  # of allocation_seconds: `on_allocated` (telling the standby to start)
    store_seconds: float = 0.0  # of setup_seconds: connecting to the transition's store
    locality_told: bool = False  # the peers' locality keys came with the message (no exchange)
    cpu_seconds: float = 0.0  # this HMM process's CPU in the transition (every thread)
    throttled_seconds: float = -1.0  # its CPU group's throttled time in it; -1: unknown


# (bytes, name) -> a zero-filled region: `backend.allocate`, or a warm worker's `reserve.Reserve.take`
Allocate = Callable[[int, str], backends_base.Region]


def allocate_new_device(backend: backends_base.DeviceBackend, device_index: int,
                        msg: wire.PrepareTransition, allocate: Allocate | None = None) -> memory.DeviceMemory:
    """A device joining the instance: empty regions shaped like its peers'. The replicated region
    comes from `allocate` (default `backend.allocate`); the KV pool is always new (nothing is
    copied into it: its pages arrive as sequences fill it)."""
    replicated = (allocate or backend.allocate)(max(msg.replicated_bytes, 1), f"dev{device_index}.replicated")
    kv = backend.allocate(msg.kv_bytes, f"dev{device_index}.kv")
    ready = wire.HMMReady(
        device_index=device_index, replicated=replicated.handle, replicated_layout=msg.replicated_layout,
        experts=[], kv=kv.handle, num_kv_blocks=msg.num_kv_blocks, bytes_read_from_checkpoint=0, load_seconds=0.0)
    return memory.DeviceMemory(replicated, {}, kv, ready)


class Cancelled(RuntimeError):
    pass


class Cancel:
    """Shared by the HMM's control loop (which sets it) and the transition thread."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.store: rendezvous.ChannelStore | None = None

    def set(self, reason: str) -> None:
        self.reason = reason
        if self.store is not None:
            self.store.cancel(reason)

    def check(self) -> None:
        if self.reason is not None:
            raise Cancelled(f"transition cancelled: {self.reason}")


def wait_for(works: list, cancel: Cancel, deadline: float) -> None:
    """Wait for every work, giving up on a cancel or past `deadline`.

    NOTE: gloo's send/recv cannot be polled: `wait(timeout)` that times out completes the work
    as failed (a send slower than the timeout used to fail the whole transition), and
    `is_completed()` changes only inside `wait`. So one waiter thread waits without a timeout
    and this thread polls it; after a cancel the waiter ends once its peers close the group."""
    done, failure = threading.Event(), []

    def waiter() -> None:
        try:
            for work in works:
                work.wait()
        except Exception as exc:  # a peer went away, or the group was torn down
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=waiter, name="transfer-wait", daemon=True).start()
    while not done.wait(0.5):
        cancel.check()
        if time.monotonic() > deadline:
            raise TimeoutError("the transfers did not complete before the transition's deadline")
    if failure:
        raise failure[0]


def run(backend: backends_base.DeviceBackend, device_index: int, mem: memory.DeviceMemory,
        msg: wire.PrepareTransition, coordinator: str, secret: str, cancel: Cancel, host: str = "",
        on_allocated: Callable[[], None] | None = None, allocate: Allocate | None = None) -> Result:
    """Allocate what this device gains (through `allocate`, default `backend.allocate`), call
    `on_allocated` (the regions exist, their bytes do not yet: a standby may attach and prepare),
    then read and receive the bytes."""
    started, cpu0, throttled0 = time.perf_counter(), _process_cpu(), cgroup.throttling()
    deadline = time.monotonic() + msg.timeout_s
    allocate = allocate or backend.allocate
    for layer in msg.moe_layers:
        for e in msg.expert_ids:
            if (layer, e) not in mem.experts:
                mem.experts[(layer, e)] = (
                    allocate(msg.expert_w13_bytes, f"dev{device_index}.l{layer}.e{e}.w13"),
                    allocate(msg.expert_w2_bytes, f"dev{device_index}.l{layer}.e{e}.w2"),
                )
    cancel.check()
    regions = time.perf_counter()
    if on_allocated is not None:
        on_allocated()
    told_standby = time.perf_counter()
    if msg.checkpoint_experts:  # after a lost device: experts no survivor holds
        t0 = time.perf_counter()
        read_bytes = memory.read_experts(mem, msg.model_dir, msg.dtype, list(msg.checkpoint_experts))
        logger.info("device %d: read experts %s from the checkpoint (%.1f MB) in %.2f s", device_index,
                    list(msg.checkpoint_experts), read_bytes / 1e6, time.perf_counter() - t0)
    if len(msg.group_ranks) == 1:  # a lone survivor of a loss: nobody to exchange with
        assert not msg.transfers, "transfers need two devices"
        seconds = time.perf_counter() - started
        return Result(mem, seconds, 0, 0, seconds, 0.0)
    # NOTE: longer than the scale's own timeout: the coordinator, which knows who is missing,
    # decides when to give up and cancels us; this is only a safety net.
    allocated = time.perf_counter()  # (and any checkpoint reads)
    store = None
    if peer_copy.needs_store(msg.group_ranks, msg.transfers, msg.locality, msg.mailboxes):
        store = rendezvous.ChannelStore(coordinator, secret, f"transition-{msg.config_id}", 1.5 * msg.timeout_s + 2)
        cancel.store = store
        if cancel.reason is not None:
            store.cancel(cancel.reason)
    connected = time.perf_counter()
    try:
        result = _move(backend, mem, msg, device_index, store, secret, cancel, started, deadline, host)
    finally:
        if store is not None:
            store.close()
    result = dataclasses.replace(result, allocation_seconds=allocated - started, store_seconds=connected - allocated,
                                 standby_seconds=told_standby - regions)
    throttled1 = cgroup.throttling()
    known = throttled0 is not None and throttled1 is not None
    periods, waited = (throttled1[0] - throttled0[0], throttled1[1] - throttled0[1]) if known else (0, -1.0)
    quota = f", its CPU group throttled in {periods} period(s), {waited * 1e3:.0f} ms" if known else ""
    result = dataclasses.replace(result, cpu_seconds=_process_cpu() - cpu0, throttled_seconds=waited)
    logger.info("device %d: transition %d moved %.1f MB out, %.1f MB in, in %.3f s (%s; allocation and set-up "
                "%.3f s: allocation %.3f (of it the standby's start %.3f), store %.3f, peers' locality (%s) and group "
                "%.3f; bytes %.3f s (%s); the "
                "peers' completion %.3f s; this HMM's CPU %.0f ms%s)",
                device_index, msg.config_id, result.bytes_sent / 1e6, result.bytes_received / 1e6, result.seconds,
                result.transport or "nothing to move", result.setup_seconds, result.allocation_seconds,
                result.standby_seconds, result.store_seconds,
                "told" if result.locality_told else "exchanged",
                result.setup_seconds - result.allocation_seconds - result.store_seconds,
                result.data_seconds, "peers told through their mailboxes" if msg.mailboxes is not None
                else "peers told through the store", result.seconds - result.setup_seconds - result.data_seconds,
                result.cpu_seconds * 1e3, quota)
    return result


def _process_cpu() -> float:
    """CPU seconds of this whole process (every thread: what its CPU quota counts)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _buffers(mem: memory.DeviceMemory, msg: wire.PrepareTransition, t: wire.Transfer) -> list[peer_copy.Buffer]:
    """The (region, offset, bytes) a transfer moves, the same list on both sides."""
    if t.kind == "replicated":
        return [(mem.replicated, t.offset_bytes, t.size_bytes)]
    out: list[peer_copy.Buffer] = []
    for layer in msg.moe_layers:
        w13, w2 = mem.experts[(layer, t.expert_id)]
        out += [(w13, 0, w13.alloc_bytes), (w2, 0, w2.alloc_bytes)]
    return out


def _move(backend: backends_base.DeviceBackend, mem: memory.DeviceMemory, msg: wire.PrepareTransition,
          device_index: int, store, secret: str, cancel: Cancel, started: float, deadline: float,
          host: str = "") -> Result:
    """Sends and receives straight from and into the regions' device memory (no staging copy):
    between devices of one host through shared memory (`peer_copy.exchange`: the destination pulls
    part of each transfer, its source pushes the rest), between hosts over the collective backend,
    in parallel."""
    rank_of = {d: r for r, d in enumerate(msg.group_ranks)}
    keys = peer_copy.group_keys(store, backend, msg.rank, msg.group_ranks, msg.locality)
    local = peer_copy.local_transfers(msg.transfers, keys)
    # NOTE: every rank computes the same split from the same keys, so all or none form the group
    pg = None
    if len(local) < len(msg.transfers):
        pg = rendezvous.process_group(backend.collective_backend, store, msg.rank, len(msg.group_ranks),
                                      msg.timeout_s, backend.torch_device(), host)
    setup_seconds = time.perf_counter() - started
    data_started = time.perf_counter()
    works, sent, received, used = [], 0, 0, set()
    wanted: list[tuple[int, int, list[peer_copy.Buffer]]] = []
    offered: dict[int, list[tuple[int, list[peer_copy.Buffer]]]] = {}  # destination device -> what it copies from here
    source = peer_copy.Source()
    per_transfer = 2 * max(1, len(msg.moe_layers))
    try:
        for idx, t in enumerate(msg.transfers):
            if device_index not in (t.src, t.dst):
                continue
            buffers = _buffers(mem, msg, t)
            if idx in local:
                used.add("shared memory")
                if t.src == device_index:
                    offered.setdefault(t.dst, []).append((idx, buffers))
                else:
                    wanted.append((idx, t.src, buffers))
                continue
            used.add(backend.collective_backend)
            for j, (region, offset, nbytes) in enumerate(buffers):
                buf = region.tensor(torch.uint8, (nbytes,), offset)
                tag = idx * per_transfer + j
                if t.src == device_index:
                    works.append(pg.send([buf], rank_of[t.dst], tag))
                    sent += nbytes
                else:
                    works.append(pg.recv([buf], rank_of[t.src], tag))
                    received += nbytes
        # while the collective's works run: this device's share of the local copies, both directions
        peers = peer_copy.peers_of(msg, device_index, store, mailbox.box_id(secret, msg.config_id),
                                   1.5 * msg.timeout_s + 2, cancel.check)
        _, brought = peer_copy.exchange(backend, peers, source, device_index, wanted, offered,
                                        peer_copy.pair_shares(msg.transfers, local), cancel)
        sent += sum(n for items in offered.values() for _, buffers in items for _, _, n in buffers)
        received += brought
        if works:  # (none when every transfer was local: no waiter thread to start and wake)
            wait_for(works, cancel, deadline)
        data_seconds = time.perf_counter() - data_started
        if local:  # nobody revokes (or frees) a region a peer still copies from or into, nor is ready before
            # its sources' pushes into it are done
            peers.done({src for _, src, _ in wanted} | set(offered))
    finally:
        source.close()
    if pg is not None:
        # NOTE: nobody leaves before everyone is done: a rank that tears its group down early
        # resets connections that slower peers are still setting up.
        wait_for([pg.barrier()], cancel, deadline)
    seconds = time.perf_counter() - started
    return Result(mem, seconds, sent, received, setup_seconds, data_seconds, " + ".join(sorted(used)),
                  locality_told=msg.locality is not None)

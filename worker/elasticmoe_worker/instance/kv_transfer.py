"""The HMM's part of moving KV blocks between devices during a switch (`wire.MoveKV`).

Why it exists: the sequences of a departing device continue on a surviving one; copying their
KV blocks there (peer to peer, in a process group of the backend's collective library formed
for this copy only, like `transition`'s) saves recomputing prompt + generated tokens. The
coordinator sends `MoveKV` only while admission is paused, after every old executor handed
over (their blocks are final) and before any new executor adopted anything (the destination
blocks are free): nobody else touches these blocks meanwhile.

Devices of one host copy through shared memory instead (`peer_copy`'s locality keys): the
source grants its pool and sends its handle, with its fd, to the destination, which maps it and
copies the blocks straight from the source's pool into its own (no staging buffer, no process
group, no round trip to the source's fd server), and a barrier keeps the grant until every
destination is done (the messages go into the HMMs' inboxes when the coordinator told their
mailboxes, else through its store: `peer_copy.peers_of`). The others form the group:
each (source, destination) pair moves its blocks in rounds of messages of at most `CHUNK_BYTES`:
the source gathers a round's blocks of every layer (keys, then values) into one buffer, the
destination receives into a buffer of its own and scatters it into its pool once the round
arrived, and only before its deadline. The coordinator's deadline is later, so a copy it gave up
on never lands in blocks the new executor uses by then; a copy that fails midway wrote only into
blocks reserved for the copied sequences (free, and overwritten before they are read, when those
sequences are recomputed instead).

Not guaranteed: the bytes are copied as they are (same dtype, block size and model on both sides,
which one instance guarantees); nothing checks their content.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from elasticmoe_worker.backends import base as backends_base
from elasticmoe_worker.backends import fdpass
from elasticmoe_worker.contract import wire
from elasticmoe_worker.instance import mailbox, memory, peer_copy, rendezvous, transition

logger = logging.getLogger("elasticmoe.hmm")

CHUNK_BYTES = 64 << 20  # per message: the staging buffers of one round, per (source, destination) pair


@dataclasses.dataclass
class Result:
    bytes_sent: int
    bytes_received: int
    seconds: float


def block_views(kv: backends_base.Region, view_block_bytes: list[int], num_blocks: int) -> list[torch.Tensor]:
    """The pool as bytes: per layer its keys then its values, each shaped [num_blocks, block_bytes]
    (uint8), views on `kv` (no copy); `view_block_bytes` from `memory.kv_block_bytes`."""
    offsets, _ = memory.kv_view_offsets(view_block_bytes, num_blocks)
    return [kv.tensor(torch.uint8, (num_blocks, n), off) for off, n in zip(offsets, view_block_bytes)]


def run(backend: backends_base.DeviceBackend, device_index: int, mem: memory.DeviceMemory, msg: wire.MoveKV, coordinator: str, secret: str, cancel: transition.Cancel, host: str = "") -> Result:
    """This device's part of `msg`: join the KV group, send and receive, scatter what arrived."""
    started = time.perf_counter()
    deadline = time.monotonic() + msg.timeout_s
    views = block_views(mem.kv, msg.view_block_bytes, mem.ready.num_kv_blocks)
    store = None
    if peer_copy.needs_store(msg.group_ranks, msg.copies, msg.locality, msg.mailboxes):
        store = rendezvous.ChannelStore(coordinator, secret, f"kv-{msg.config_id}", msg.timeout_s)
        cancel.store = store
    sent = received = 0
    try:
        keys = peer_copy.group_keys(store, backend, msg.rank, msg.group_ranks, msg.locality)
        local = peer_copy.local_transfers(msg.copies, keys)
        remote = [c for i, c in enumerate(msg.copies) if i not in local]
        if remote:  # every rank computes the same split: all or none form the group
            pg = rendezvous.process_group(backend.collective_backend, store, msg.rank, len(msg.group_ranks),
                                          msg.timeout_s, backend.torch_device(), host)
            sent, received = copy(pg, {d: r for r, d in enumerate(msg.group_ranks)}, views, remote, device_index,
                                  cancel, deadline)
        if local:
            peers = peer_copy.peers_of(msg, device_index, store, mailbox.box_id(secret, msg.config_id, "kv"),
                                       msg.timeout_s, cancel.check)
            s, r = copy_local(backend, peers, mem.kv, mem.ready.num_kv_blocks, msg, sorted(local),
                              device_index, cancel, deadline)
            sent, received = sent + s, received + r
    finally:
        if store is not None:
            store.close()
    seconds = time.perf_counter() - started
    how = " + ".join(x for x, used in (("shared memory", local), (backend.collective_backend, remote)) if used)
    if local:
        how += ", peers told through their " + ("mailboxes" if msg.mailboxes is not None else "store")
    logger.info("device %d: KV copy for configuration %d: %d block(s) sent (%.2f MB), %d received (%.2f MB) in "
                "%.3f s (%s)", device_index, msg.config_id,
                sum(len(c.src_blocks) for c in msg.copies if c.src == device_index), sent / 1e6,
                sum(len(c.dst_blocks) for c in msg.copies if c.dst == device_index), received / 1e6, seconds,
                how or "nothing to copy")
    return Result(sent, received, seconds)


def copy_local(backend: backends_base.DeviceBackend, peers, kv: backends_base.Region, num_blocks: int,
               msg: wire.MoveKV, indices: list[int], device_index: int,
               cancel: transition.Cancel, deadline: float) -> tuple[int, int]:
    """The copies of `msg.copies` at `indices` (between devices of this host) through shared
    memory: a source sends its pool's handle, with its fd, to the destination (`peers`:
    `peer_copy.MailboxPeers`, into its inbox, or `StorePeers`), which maps it and copies block by
    block from the source's pool into its own; -> (bytes sent, bytes received)."""
    own = block_views(kv, msg.view_block_bytes, num_blocks)
    block_bytes = sum(v.shape[1] for v in own)
    source = peer_copy.Source()
    sent = received = 0
    try:
        for i in indices:
            c = msg.copies[i]
            if c.src == device_index:  # to its one destination: the pool's block count (its layout follows
                # from it), then its handle with its fd
                peers.send(c.dst, f"kv-blocks/{i}", str(num_blocks).encode())
                source.send_for(peers, c.dst, f"kv-copy/{i}", [(i, [(kv, 0, kv.alloc_bytes)])])
                sent += block_bytes * len(c.src_blocks)
        for i in indices:
            c = msg.copies[i]
            if c.dst != device_index:
                continue
            value, fds = peers.receive(c.src, f"kv-blocks/{i}")
            fdpass.close_all(fds)
            batch, given = peer_copy.receive_batch(peers, c.src, f"kv-copy/{i}")
            published = batch.get(i, [])
            with backend.handles_prefetched([h for h, _, _ in published], given):
                if len(published) != 1:
                    raise RuntimeError(f"KV copy {i}: device {c.src} sent {len(published)} handle(s), expected its "
                                       f"pool's one")
                peer = backend.attach(published[0][0])
            try:
                theirs = block_views(peer, msg.view_block_bytes, int(value))
                cancel.check()
                if time.monotonic() > deadline:
                    raise TimeoutError("the KV copy did not complete before its deadline")
                src_idx = torch.tensor(c.src_blocks, dtype=torch.int64, device=own[0].device)
                dst_idx = torch.tensor(c.dst_blocks, dtype=torch.int64, device=own[0].device)
                for mine, src in zip(own, theirs):
                    mine.index_copy_(0, dst_idx, src.index_select(0, src_idx))
                received += block_bytes * len(c.dst_blocks)
                del theirs
            finally:
                peer.close()
        # no grant is revoked before its copy
        peers.done({c.src if c.dst == device_index else c.dst for c in (msg.copies[i] for i in indices)
                    if device_index in (c.src, c.dst)})
    finally:
        source.close()
    return sent, received


def copy(pg, rank_of: dict[int, int], views: list[torch.Tensor], copies: list[wire.KVCopy], device_index: int,
         cancel: transition.Cancel, deadline: float, chunk_bytes: int = CHUNK_BYTES) -> tuple[int, int]:
    """Send and receive this device's part of `copies` in `pg` (`rank_of`: device -> rank) and
    scatter what arrives into `views` (`block_views` of the pool); -> (bytes sent, bytes received).
    Raises when a transfer fails, on a cancel, or past `deadline`.

    In rounds of at most `chunk_bytes` per (source, destination) pair, so the staging buffers stay
    small beside a pool that fills its device. A round is scattered only once all of it arrived,
    and only before `deadline`: a copy that fails midway has written only into blocks the plan
    reserved for the copied sequences, which nobody uses before the commit."""
    device = views[0].device
    block_bytes = sum(v.shape[1] for v in views)
    per = max(1, chunk_bytes // block_bytes)
    rounds = max((-(-len(c.src_blocks) // per) for c in copies), default=0)
    sent = received = 0
    for r in range(rounds):
        works, landing = [], []
        # NOTE: every member walks the same list in the same order: NCCL and HCCL match a pair's
        # messages by posting order (the tag is for gloo).
        for i, c in enumerate(copies):
            src_blocks, dst_blocks = c.src_blocks[r * per:(r + 1) * per], c.dst_blocks[r * per:(r + 1) * per]
            if not src_blocks:
                continue
            if device_index == c.src:
                idx = torch.tensor(src_blocks, dtype=torch.int64, device=device)
                buf = torch.cat([v.index_select(0, idx).reshape(-1) for v in views])
                works.append(pg.send([buf], rank_of[c.dst], i * rounds + r))
                sent += buf.numel()
            elif device_index == c.dst:
                buf = torch.empty(block_bytes * len(dst_blocks), dtype=torch.uint8, device=device)
                works.append(pg.recv([buf], rank_of[c.src], i * rounds + r))
                landing.append((dst_blocks, buf))
                received += buf.numel()
        transition.wait_for(works, cancel, deadline)
        if time.monotonic() > deadline:
            raise TimeoutError("the KV copy did not complete before its deadline")
        for dst_blocks, buf in landing:
            idx = torch.tensor(dst_blocks, dtype=torch.int64, device=device)
            offset = 0
            for v in views:
                n = v.shape[1] * len(dst_blocks)
                v.index_copy_(0, idx, buf[offset:offset + n].view(len(dst_blocks), v.shape[1]))
                offset += n
    # NOTE: the adopting executor (another process) reads these blocks once we answer: the copies
    # must have finished on the device, not only been queued.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)
    transition.wait_for([pg.barrier()], cancel, deadline)
    return sent, received

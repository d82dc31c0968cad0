"""The rendezvous store of collective groups, over the authenticated control channel.

Why it exists: `torch.distributed.TCPStore` listens on every interface whatever host it is
given and takes writes from anyone who reaches it, so whoever could reach its port could
publish rank addresses for the groups that carry hidden states and weights. Here the
coordinator holds the keys (`transport.KeyValue`) and a process reaches them only through a
CURVE-authenticated socket, i.e. only with the worker secret.

`ChannelStore` is a `torch.distributed.Store` written in Python. The collective library
calls it while a group forms (a few dozen keys), so a blocking `get` simply polls. NOTE: torch
2.13 cannot wrap a Python store in `PrefixStore` (an internal assert), so this store prefixes
keys itself, and groups are built by `process_group` as the backend's own class
(`ProcessGroupGloo`, `ProcessGroupNCCL`, torch_npu's `ProcessGroupHCCL`) on this store
directly rather than by `init_process_group`, which would wrap it. Only the gloo path has run
here; NCCL and HCCL groups are built the same way but have not been formed on a GPU or NPU.

`cancel()` makes every waiting call raise at once: an aborted transition leaves no thread
blocked in a rendezvous that will never complete.

A `get` of a key not yet published waits at the coordinator (`StoreRequest.wait`; it answers
once a peer publishes the key) rather than polling, so it returns as soon as the key exists.
Each call takes a socket no other call uses (a pool, a new connection when all are busy): a
get that waits blocks no other thread's requests (the transfers to and from each peer run in
threads of their own), and a ZMQ socket must not be used by two threads at once.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import threading
import time

import torch
import torch.distributed as dist
import zmq

from elasticmoe_worker.contract import wire
from elasticmoe_worker.instance import transport

logger = logging.getLogger(__name__)

_POLL_S = 0.005
_ASK_AGAIN_S = 1.0  # a get that waits at the coordinator is sent again after this long without an answer

COLLECTIVE_BACKENDS = ("gloo", "nccl", "hccl")


class Cancelled(RuntimeError):
    pass


class CollectiveUnavailable(RuntimeError):
    """The collective library a device backend needs is not usable in this process."""


class ChannelStore(dist.Store):
    def __init__(self, address: str, secret: str, prefix: str, timeout_s: float) -> None:
        super().__init__()
        self._ctx = zmq.Context.instance()
        self._address, self._secret = address, secret
        self._name = f"store-{id(self):x}-{time.monotonic_ns():x}"
        self._prefix = prefix.rstrip("/") + "/"
        self._timeout_s = timeout_s
        self._seq = itertools.count(1)
        self._idle: list[zmq.Socket] = []  # connected sockets no call uses now
        self._count = 0
        self._sockets_lock = threading.Lock()
        self._cancelled: str | None = None
        self._closed = False
        self._release(self._acquire())  # connect (and shake hands) while the caller goes on

    # -- plumbing --------------------------------------------------------------------
    def cancel(self, reason: str) -> None:
        self._cancelled = reason

    def close(self) -> None:
        with self._sockets_lock:
            self._closed = True  # a call in flight ends at its next poll (<= 50 ms) and closes its socket
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close(linger=0)

    def _acquire(self) -> zmq.Socket:
        """A socket no other call uses (a new one when every one is busy)."""
        with self._sockets_lock:
            if self._closed:
                raise Cancelled("rendezvous store closed")
            if self._idle:
                return self._idle.pop()
            self._count += 1
            return transport.connect(self._ctx, self._address, f"{self._name}-{self._count}", self._secret,
                                     linger_ms=0)

    def _release(self, sock: zmq.Socket) -> None:
        with self._sockets_lock:
            if not self._closed:
                self._idle.append(sock)
                return
        sock.close(linger=0)

    def _call(self, **fields) -> wire.StoreReply:
        deadline = time.monotonic() + self._timeout_s
        sock = self._acquire()
        try:
            seq = next(self._seq)
            request = wire.encode(wire.StoreRequest(seq=seq, **fields))
            sock.send(request)
            asked = time.monotonic()
            while True:
                if self._cancelled is not None:
                    raise Cancelled(f"rendezvous cancelled: {self._cancelled}")
                if self._closed:
                    raise Cancelled("rendezvous store closed")
                if time.monotonic() > deadline:
                    if fields.get("wait"):
                        raise TimeoutError(f"rendezvous: key {fields['key'][len(self._prefix):]!r} not published "
                                           f"within {self._timeout_s:g} s (a peer never joined)")
                    raise TimeoutError(f"rendezvous: no answer from the coordinator in {self._timeout_s:g} s")
                if sock.poll(50):
                    reply = wire.decode(sock.recv())  # (a late answer to an earlier call on it has another seq)
                    if isinstance(reply, wire.StoreReply) and reply.seq == seq:
                        return reply
                elif fields.get("wait") and time.monotonic() - asked > _ASK_AGAIN_S:
                    # a parked get the coordinator forgot (it restarted, or parked too many): ask again (a
                    # second answer to the same seq is dropped by whichever call reads it)
                    sock.send(request)
                    asked = time.monotonic()
        finally:
            self._release(sock)

    def _key(self, key: str) -> str:
        return self._prefix + key

    # -- the Store interface -----------------------------------------------------------
    def set(self, key, value) -> None:
        self._call(op="set", key=self._key(key), value=value.encode() if isinstance(value, str) else bytes(value))

    def get(self, key) -> bytes:
        k = self._key(key)
        deadline = time.monotonic() + self._timeout_s
        while True:
            reply = self._call(op="get", key=k, wait=True)  # answered once the key exists
            if reply.found:  # (a coordinator before `wait` answers at once: then this polls)
                return reply.value
            if self._cancelled is not None:
                raise Cancelled(f"rendezvous cancelled: {self._cancelled}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"rendezvous: key {key!r} not published within {self._timeout_s:g} s "
                                   f"(a peer never joined)")
            time.sleep(_POLL_S)

    def add(self, key, amount) -> int:
        return self._call(op="add", key=self._key(key), amount=int(amount)).amount

    def check(self, keys) -> bool:
        return self._call(op="check", keys=[self._key(k) for k in keys]).found

    def wait(self, keys, timeout=None) -> None:
        for k in keys:
            self.get(k)

    def compare_set(self, key, expected, desired) -> bytes:
        return self._call(op="compare_set", key=self._key(key), expected=bytes(expected), value=bytes(desired)).value

    def delete_key(self, key) -> bool:
        return self._call(op="delete", key=self._key(key)).found

    def num_keys(self) -> int:
        return self._call(op="num_keys").amount


def gloo_group(store: ChannelStore, rank: int, world_size: int, timeout_s: float,
               host: str = "") -> dist.ProcessGroupGloo:
    """A gloo group formed through `store` (its own key prefix per group). This rank listens
    on `host`, the address its peers dial (a local fleet: 127.0.0.1; a Ray fleet: the node's
    address as Ray reports it); empty: gloo's own choice ($GLOO_SOCKET_IFNAME, else the
    address this machine's hostname resolves to, as in a pod)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if not host:
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    # NOTE: the public constructor takes no device; torch's own init_process_group builds
    # these options the same way.
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(store, rank, world_size, options)


def process_group(collective_backend: str, store: dist.Store, rank: int, world_size: int, timeout_s: float,
                  device: torch.device, host: str = ""):
    """A group of `collective_backend` (a `DeviceBackend.collective_backend`: "gloo", "nccl" or
    "hccl") formed through `store`, for tensors on `device`. The caller uses its methods
    (`allreduce`, `alltoall_base`, `send`, ...) directly: it is not registered with
    torch.distributed's default world.

    `host` is where a gloo rank listens (see `gloo_group`); NCCL and HCCL pick their network
    interface themselves (NCCL_SOCKET_IFNAME, HCCL_IF_IP). NCCL and HCCL bind this thread to
    `device` first, as their groups require. Raises `CollectiveUnavailable` naming what is
    missing, ValueError for an unknown name.
    """
    if collective_backend not in COLLECTIVE_BACKENDS:
        raise ValueError(f"collective backend: got {collective_backend!r}, expected one of "
                         f"{', '.join(COLLECTIVE_BACKENDS)}")
    logger.info("forming a %s group: rank %d of %d on %s", collective_backend, rank, world_size, device)
    if collective_backend == "gloo":
        return gloo_group(store, rank, world_size, timeout_s, host)
    if host:
        logger.info("%s picks its own network interface; the listen address %s is for gloo only",
                    collective_backend, host)
    timeout = datetime.timedelta(seconds=timeout_s)
    if collective_backend == "nccl":
        if not dist.is_nccl_available():
            raise CollectiveUnavailable(
                f"collective backend 'nccl': this torch build ({torch.__version__}) has no NCCL "
                f"(torch.distributed.is_nccl_available() is False); a CUDA build of torch is needed")
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    hccl = _import_hccl()
    torch.npu.set_device(device)
    options = hccl.ProcessGroupHCCL.Options()
    options._timeout = timeout
    return hccl.ProcessGroupHCCL(store, rank, world_size, options)


def _import_hccl():
    """torch_npu's c10d bindings (ProcessGroupHCCL)."""
    try:
        import torch_npu  # noqa: F401  (registers the NPU device with torch)
        from torch_npu._C import _distributed_c10d
    except ImportError as exc:
        raise CollectiveUnavailable(
            "collective backend 'hccl' needs the Python package `torch_npu` (Ascend's extension of torch, "
            f"with the CANN toolkit), which cannot be imported here: {exc}") from exc
    return _distributed_c10d

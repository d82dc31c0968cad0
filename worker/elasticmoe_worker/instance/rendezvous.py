"""The rendezvous store of collective groups, over the authenticated control channel.

Why it exists: `torch.distributed.TCPStore` listens on every interface whatever host it is
given and takes writes from anyone who reaches it, so whoever could reach its port could
publish rank addresses for the groups that carry hidden states and weights. Here the
coordinator holds the keys (`transport.KeyValue`) and a process reaches them only through a
CURVE-authenticated socket, i.e. only with the worker secret.

`ChannelStore` is a `torch.distributed.Store` written in Python. Gloo calls it while a group
forms (a few dozen keys), so a blocking `get` simply polls. NOTE: torch 2.13 cannot wrap a
Python store in `PrefixStore` (an internal assert), so this store prefixes keys itself, and
groups are built as `ProcessGroupGloo(store, rank, size, timeout)` directly rather than by
`init_process_group`, which would wrap it.

`cancel()` makes every waiting call raise at once: an aborted transition leaves no thread
blocked in a rendezvous that will never complete.
"""

from __future__ import annotations

import datetime
import itertools
import threading
import time

import torch.distributed as dist
import zmq

from elasticmoe_worker.contract import wire
from elasticmoe_worker.instance import transport

_POLL_S = 0.005


class Cancelled(RuntimeError):
    pass


class ChannelStore(dist.Store):
    def __init__(self, address: str, secret: str, prefix: str, timeout_s: float) -> None:
        super().__init__()
        self._ctx = zmq.Context.instance()
        self._identity = f"store-{id(self):x}-{time.monotonic_ns():x}"
        self._sock = transport.connect(self._ctx, address, self._identity, secret, linger_ms=0)
        self._prefix = prefix.rstrip("/") + "/"
        self._timeout_s = timeout_s
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._cancelled: str | None = None

    # -- plumbing --------------------------------------------------------------------
    def cancel(self, reason: str) -> None:
        self._cancelled = reason

    def close(self) -> None:
        with self._lock:
            self._sock.close(linger=0)

    def _call(self, **fields) -> wire.StoreReply:
        deadline = time.monotonic() + self._timeout_s
        with self._lock:
            seq = next(self._seq)
            self._sock.send(wire.encode(wire.StoreRequest(seq=seq, **fields)))
            while True:
                if self._cancelled is not None:
                    raise Cancelled(f"rendezvous cancelled: {self._cancelled}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rendezvous: no answer from the coordinator in {self._timeout_s:g} s")
                if self._sock.poll(50):
                    reply = wire.decode(self._sock.recv())
                    if isinstance(reply, wire.StoreReply) and reply.seq == seq:
                        return reply

    def _key(self, key: str) -> str:
        return self._prefix + key

    # -- the Store interface -----------------------------------------------------------
    def set(self, key, value) -> None:
        self._call(op="set", key=self._key(key), value=value.encode() if isinstance(value, str) else bytes(value))

    def get(self, key) -> bytes:
        k = self._key(key)
        deadline = time.monotonic() + self._timeout_s
        while True:
            reply = self._call(op="get", key=k)
            if reply.found:
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

"""The control channel: one ZeroMQ ROUTER socket that every HMM and executor connects to,
authenticated and encrypted with CURVE, owned by one I/O thread.

Why it exists: the coordinator must act only on messages from processes that hold the worker
secret, and must survive anything else that reaches its port. Both key pairs (server and client)
are derived from the worker secret, and a ZAP handler admits only the client key: a process
without the secret cannot complete the handshake, so none of its frames is ever delivered, and
nothing (neither the secret nor a token) travels in clear text. Frames from admitted peers that
do not decode are counted and dropped; a callback that raises is logged and the loop goes on.
If the loop dies anyway, `alive` turns False (the HTTP layer reports 503).

The same channel carries the rendezvous of every collective group (`StoreRequest`): a
key-value store held here, so forming a group needs the secret too, and nothing but this
socket listens for it.

Not guaranteed: ordering between different peers' messages; delivery to a peer that has gone
(ROUTER drops frames for unknown identities). Holders of the secret are trusted alike: an
admitted peer could claim another's identity.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Callable

import msgspec
import zmq
import zmq.auth.thread
import zmq.utils.monitor

from elasticmoe_worker.contract import wire

logger = logging.getLogger(__name__)

SECRET_ENV = "ELASTICMOE_WORKER_SECRET"


class Keys(msgspec.Struct, frozen=True):
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes


def keys_from_secret(secret: str) -> Keys:
    """Both CURVE key pairs, derived from the worker secret (the same on every holder)."""
    if not secret:
        raise ValueError(f"worker secret: empty; set {SECRET_ENV} (the same value for the coordinator and its workers)")

    def pair(role: bytes) -> tuple[bytes, bytes]:
        seed = hashlib.sha256(b"elasticmoe-control-" + role + b"\0" + secret.encode()).digest()
        private = zmq.utils.z85.encode(seed)
        return zmq.curve_public(private), private

    sp, ss = pair(b"server")
    cp, cs = pair(b"client")
    return Keys(sp, ss, cp, cs)


def connect(ctx: zmq.Context, address: str, identity: str, secret: str, linger_ms: int = 1000,
            heartbeat_s: float | None = None) -> zmq.Socket:
    """A DEALER to the coordinator, as an admitted client (CURVE with the secret's keys). With
    `heartbeat_s`, ZeroMQ pings the coordinator that often and drops the connection after ten
    unanswered intervals (libzmq answers, not Python: a busy coordinator still does), so a
    coordinator that vanished without closing the connection counts as gone."""
    keys = keys_from_secret(secret)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.LINGER, linger_ms)
    if heartbeat_s is not None:
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(10 * heartbeat_s * 1000))
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret
    sock.connect(address)
    return sock


class _OnlyClientKey:
    """ZAP credentials provider: admits the one client key derived from the secret."""

    def __init__(self, client_public: bytes) -> None:
        self.client_public = client_public

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key == self.client_public
        if not ok:
            logger.warning("control channel: refused a peer without the worker secret")
        return ok


class KeyValue:
    """The rendezvous store's data, served over the channel (see `rendezvous.ChannelStore`).

    A `get` with `wait` for a key that does not exist yet is parked, and answered by the write
    that creates the key (as torch's TCPStore waits on its server): a peer learns a key as soon
    as it is published instead of at its next poll (5 ms + a round trip apart, on a coordinator
    that is busy). Parked gets are forgotten with their keys' prefix (`drop_prefix`) and past
    `MAX_WAITING`, oldest first: a client still waiting asks again every second. The I/O thread serves the
    requests; `drop_prefix` may come from another (the lock)."""

    MAX_WAITING = 10_000

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.waiting: dict[str, list[tuple[bytes, int]]] = {}  # key -> (identity, seq) of the gets parked on it
        self._lock = threading.Lock()

    def handle(self, req: wire.StoreRequest, identity: bytes = b"") -> list[tuple[bytes, wire.StoreReply]]:
        """-> the replies, each to its peer (none while a `get` waits; the write that creates a key
        answers the gets parked on it too); ValueError for a request no store could serve (`add`
        to a value that is no integer, or past torch's int64), which then changes nothing."""
        with self._lock:
            d = self.data
            reply = self._reply(req)
            if req.op == "get" and req.wait and not reply.found:
                self._park(req.key, identity, req.seq)
                return []
            out = [(identity, reply)]
            if req.op in ("set", "add", "compare_set") and req.key in d and req.key in self.waiting:
                for peer, seq in self.waiting.pop(req.key):
                    out.append((peer, wire.StoreReply(seq=seq, value=d[req.key])))
            return out

    def _park(self, key: str, identity: bytes, seq: int) -> None:
        self.waiting.setdefault(key, []).append((identity, seq))
        parked = sum(len(v) for v in self.waiting.values())
        while parked > self.MAX_WAITING:  # the oldest key's first: they have waited longest
            oldest = next(iter(self.waiting))
            self.waiting[oldest].pop(0)
            if not self.waiting[oldest]:
                del self.waiting[oldest]
            parked -= 1

    def _reply(self, req: wire.StoreRequest) -> wire.StoreReply:
        d = self.data
        if req.op == "set":
            d[req.key] = req.value
            return wire.StoreReply(seq=req.seq)
        if req.op == "get":
            return wire.StoreReply(seq=req.seq, found=req.key in d, value=d.get(req.key, b""))
        if req.op == "add":
            value = int(d.get(req.key, b"0")) + req.amount
            if not -2**63 <= value < 2**63:
                raise ValueError(f"add: {value} is out of the int64 range")
            d[req.key] = str(value).encode()
            return wire.StoreReply(seq=req.seq, amount=value)
        if req.op == "check":
            return wire.StoreReply(seq=req.seq, found=all(k in d for k in req.keys))
        if req.op == "delete":
            return wire.StoreReply(seq=req.seq, found=d.pop(req.key, None) is not None)
        if req.op == "compare_set":
            current = d.get(req.key)
            if (current is None and not req.expected) or current == req.expected:
                d[req.key] = req.value
                return wire.StoreReply(seq=req.seq, value=req.value)
            return wire.StoreReply(seq=req.seq, value=current if current is not None else req.expected)
        if req.op == "num_keys":
            return wire.StoreReply(seq=req.seq, amount=len(d))
        return wire.StoreReply(seq=req.seq, found=False)

    def drop_prefix(self, prefix: str) -> None:
        """Forget a finished group's keys, and the gets parked on them."""
        self.drop_where(lambda key: key.startswith(prefix))

    def drop_scale(self, config_id: int, serving: int) -> None:
        """A scale to `config_id` ended with `serving` serving: its transfers' and KV copies' keys
        are done with, and so are the executor groups' of every configuration older than `serving`
        (the one a scale replaced) and of `config_id` if it never served (an aborted scale: its
        standbys have exited)."""
        for prefix in (f"transition-{config_id}/", f"kv-{config_id}/"):
            self.drop_prefix(prefix)
        self.drop_configs_before(serving)
        if config_id > serving:
            self.drop_prefix(f"config-{config_id}/")

    def drop_configs_before(self, config_id: int) -> int:
        """Forget the keys of every configuration's executor group older than `config_id`
        (`config-<n>/`, `n < config_id`): their executors have exited or are stopping, and no
        group of theirs forms again. -> keys dropped."""
        def older(key: str) -> bool:
            head, sep, _ = key.partition("/")
            return bool(sep) and head.startswith("config-") and head[7:].isdigit() and int(head[7:]) < config_id
        return self.drop_where(older)

    def drop_where(self, match: Callable[[str], bool]) -> int:
        """Forget the keys `match`es, and the gets parked on them. -> keys dropped."""
        with self._lock:
            gone = [k for k in self.data if match(k)]
            for k in gone:
                del self.data[k]
            for k in [k for k in self.waiting if match(k)]:
                del self.waiting[k]
        return len(gone)


class Server:
    """The ROUTER end. `on_message(identity, msg)` and `on_tick()` run on the I/O thread."""

    def __init__(self, secret: str, on_message: Callable[[str, wire.Msg], None], on_tick: Callable[[], None],
                 bind_host: str | None = "127.0.0.1", port: int = 0, advertise_host: str | None = None,
                 tick_interval_s: float = 0.1) -> None:
        self.keys = keys_from_secret(secret)
        self.on_message = on_message
        self.on_tick = on_tick
        self.bind_host = bind_host
        self.port = port
        # Both may be changed until bind() (a Ray fleet learns its node's address only then).
        self.advertise_host = advertise_host
        self.tick_interval_s = tick_interval_s
        self.store = KeyValue()
        self.malformed_frames = 0
        self.refused_handshakes = 0
        self.error: str | None = None
        self.address = ""
        self._ctx: zmq.Context | None = None
        self._auth: zmq.auth.thread.ThreadAuthenticator | None = None
        self._router: zmq.Socket | None = None
        self._wake_pull: zmq.Socket | None = None
        self._wake_push: zmq.Socket | None = None
        self._poll: zmq.Poller | None = None
        self._monitor: zmq.Socket | None = None
        self._send_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- lifecycle -------------------------------------------------------------------
    def bind(self) -> str:
        """Bind the socket (no thread yet: start-up may read it synchronously); -> address."""
        advertise = self.advertise_host or self.bind_host
        if not advertise or advertise in ("0.0.0.0", "::", "*"):
            raise ValueError(f"advertise_host: not set while the control channel binds {self.bind_host!r} (every "
                             f"interface); expected the address workers dial to reach this coordinator")
        self._ctx = zmq.Context()
        self._auth = zmq.auth.thread.ThreadAuthenticator(self._ctx, log=logging.getLogger(__name__ + ".zap"))
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=_OnlyClientKey(self.keys.client_public))
        r = self._ctx.socket(zmq.ROUTER)
        r.setsockopt(zmq.LINGER, 0)
        r.curve_server = True
        r.curve_publickey = self.keys.server_public
        r.curve_secretkey = self.keys.server_secret
        # NOTE: a worker that replaces one of the same device index (a restart, a released
        # worker still on its way out) takes its identity over; without this its frames are dropped.
        r.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if self.port:
            r.bind(f"tcp://{self.bind_host}:{self.port}")
        else:
            self.port = r.bind_to_random_port(f"tcp://{self.bind_host}")
        self._router = r
        # A peer with a wrong secret fails the handshake before any ZAP call (its server key is
        # wrong): the monitor is how those refusals are seen and logged.
        self._monitor = r.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                             | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        # NOTE: only one thread ever touches the ROUTER; others hand it frames through this pipe.
        wake = f"inproc://control-{id(self)}"
        self._wake_pull = self._ctx.socket(zmq.PULL)
        self._wake_pull.bind(wake)
        self._wake_push = self._ctx.socket(zmq.PUSH)
        self._wake_push.connect(wake)
        self.address = f"tcp://{advertise}:{self.port}"
        return self.address

    def start(self) -> None:
        """Hand the socket to the I/O thread."""
        assert self._router is not None, "bind() first"
        self._thread = threading.Thread(target=self._run, name="control-io", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def stop(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._monitor is not None and self._router is not None:
            self._router.disable_monitor()
        for s in (self._monitor, self._router, self._wake_pull, self._wake_push):
            if s is not None:
                s.close(linger=0)
        self._router = self._wake_pull = self._wake_push = self._monitor = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # -- sending (any thread) ----------------------------------------------------------
    def send(self, identity: str, msg: wire.Msg) -> None:
        """Queue a message to one peer; never blocks. Dropped when the peer is unknown."""
        frames = [identity.encode(), wire.encode(msg)]
        with self._send_lock:
            if self._stop or self._router is None:
                return
            if self._thread is None or threading.current_thread() is self._thread:
                self._router.send_multipart(frames)  # this thread owns the socket
            else:
                self._wake_push.send_multipart(frames)

    # -- receiving (before start: the caller's thread; after: the I/O thread) ------------
    def receive(self, timeout_ms: int) -> tuple[str, wire.Msg] | None:
        """One admitted, well-formed message (store requests are answered here), or None."""
        events = dict(self._poller().poll(timeout_ms))
        if self._monitor in events:
            self._drain_monitor()
        if self._wake_pull in events:
            while True:
                try:
                    frames = self._wake_pull.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._router.send_multipart(frames)
        if self._router not in events:
            return None
        try:
            frames = self._router.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        return self._decode(frames)

    def _poller(self) -> zmq.Poller:
        if getattr(self, "_poll", None) is None:
            self._poll = zmq.Poller()
            self._poll.register(self._router, zmq.POLLIN)
            self._poll.register(self._wake_pull, zmq.POLLIN)
            self._poll.register(self._monitor, zmq.POLLIN)
        return self._poll

    def _drain_monitor(self) -> None:
        while True:
            try:
                event = zmq.utils.monitor.recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.refused_handshakes += 1
            n = self.refused_handshakes
            level = logging.WARNING if n in (1, 10, 100) or n % 1000 == 0 else logging.DEBUG
            logger.log(level, "control channel: refused a peer without the worker secret (failed CURVE handshake "
                              "on %s; %d so far)", event.get("endpoint", b"?").decode(errors="replace"), n)

    def _decode(self, frames: list[bytes]) -> tuple[str, wire.Msg] | None:
        if len(frames) != 2:
            self._malformed(f"{len(frames)} frames")
            return None
        identity = frames[0].decode("utf-8", "replace")
        try:
            msg = wire.decode(frames[1])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._malformed(f"from {identity!r}: {exc}")
            return None
        if isinstance(msg, wire.StoreRequest):
            try:
                replies = self.store.handle(msg, frames[0])
            except ValueError as exc:  # dropped like a malformed frame: it must not end the loop
                self._malformed(f"store request from {identity!r}: {exc}")
                return None
            for peer, reply in replies:
                self._router.send_multipart([peer, wire.encode(reply)])
            return None
        return identity, msg

    def _malformed(self, what: str) -> None:
        self.malformed_frames += 1
        # once in a while: a broken peer repeats itself
        level = logging.WARNING if self.malformed_frames in (1, 10, 100) or self.malformed_frames % 1000 == 0 \
            else logging.DEBUG
        logger.log(level, "control channel: dropped a malformed frame (%d so far): %s", self.malformed_frames, what)

    def _run(self) -> None:
        last_tick = 0.0
        try:
            while not self._stop:
                got = self.receive(int(self.tick_interval_s * 1000))
                while got is not None or (got := self.receive(0)) is not None:
                    identity, msg = got
                    got = None
                    try:
                        self.on_message(identity, msg)
                    except Exception:
                        logger.exception("control channel: handling %s from %s failed; going on",
                                         type(msg).__name__, identity)
                now = time.monotonic()
                if now - last_tick >= self.tick_interval_s:
                    last_tick = now
                    try:
                        self.on_tick()
                    except Exception:
                        logger.exception("control channel: periodic check failed; going on")
        except BaseException as exc:
            if not self._stop:
                self.error = f"control channel I/O thread died: {type(exc).__name__}: {exc}"
                logger.exception("%s", self.error)

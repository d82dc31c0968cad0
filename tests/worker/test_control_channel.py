"""The control channel keeps its promises (issue 9): only holders of the worker secret are
heard, whatever an admitted peer sends that does not decode is dropped and counted, a dead I/O
loop shows in /health within 2 s, and a local instance listens on loopback only.

The first tests use a bare `transport.Server`; the others share one 2-device instance (with an
HTTP server over it). The last test kills that instance's channel, so it must stay last.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import random
import re
import shutil
import subprocess
import threading
import time

import httpx
import msgspec
import pytest
import torch.distributed as dist
import zmq
import zmq.utils.monitor

from elasticmoe_worker.contract import admin, wire
from elasticmoe_worker.engine import engine as engine_mod
from elasticmoe_worker.engine import types
from elasticmoe_worker.instance import coordinator, rendezvous, transport
from elasticmoe_worker.server import api
import testprocs

SECRET = "the worker secret of these tests"
CFG = engine_mod.EngineConfig(dtype="float32", kv_cache_bytes=8 << 20, max_num_batched_tokens=32)
GREEDY = types.SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7], list(range(10, 30)), [1999, 3, 1500, 77, 4], list(range(300, 360, 3))]
HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL \
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH


def _wait(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _dealer(ctx: zmq.Context, address: str, identity: bytes, server_public: bytes | None = None,
            client_pair: tuple[bytes, bytes] | None = None) -> tuple[zmq.Socket, zmq.Socket]:
    """A DEALER built by hand, plain (no CURVE) unless given the server's key and a key pair;
    -> (it, its monitor), the monitor attached before it connects."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 0)
    if server_public is not None:
        sock.curve_serverkey = server_public
        sock.curve_publickey, sock.curve_secretkey = client_pair
    monitor = sock.get_monitor_socket(HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sock.connect(address)
    return sock, monitor


def _outsiders(ctx: zmq.Context, address: str, secret: str, identity: str) -> dict[str, tuple[zmq.Socket, zmq.Socket]]:
    """Peers without the secret, each with its monitor: no CURVE at all; keys from a wrong
    secret (it retries, so a monitor attached after the connect still sees it fail); and one
    that knows the server's public key (public by design) but brings a key pair of its own."""
    wrong = transport.connect(ctx, address, identity, "not " + secret, linger_ms=0)
    return {"plain": _dealer(ctx, address, identity.encode()),
            "wrong secret": (wrong, wrong.get_monitor_socket(HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED)),
            "own key pair": _dealer(ctx, address, identity.encode(), transport.keys_from_secret(secret).server_public,
                                    zmq.curve_keypair())}


def _assert_refused(watched: dict[str, tuple[zmq.Socket, zmq.Socket]], timeout_s: float = 5.0) -> None:
    """Each socket's monitor saw its handshake fail, and none saw one succeed."""
    seen: dict[str, set[int]] = {name: set() for name in watched}
    deadline = time.monotonic() + timeout_s
    while not all(any(e & HANDSHAKE_FAILED for e in events) for events in seen.values()):
        if time.monotonic() > deadline:
            break
        for name, (_, monitor) in watched.items():
            while monitor.poll(10):
                seen[name].add(zmq.utils.monitor.recv_monitor_message(monitor)["event"])
    for sock, monitor in watched.values():
        sock.disable_monitor()
        monitor.close(linger=0)
    assert [n for n, events in seen.items() if zmq.EVENT_HANDSHAKE_SUCCEEDED in events] == []
    assert [n for n, events in seen.items() if not any(e & HANDSHAKE_FAILED for e in events)] == [], seen


# -- unit level: a bare server -------------------------------------------------------------------
@pytest.fixture
def bare():
    """A started `transport.Server`; -> (server, the messages delivered to on_message)."""
    delivered: list[tuple[str, wire.Msg]] = []
    server = transport.Server(SECRET, lambda identity, msg: delivered.append((identity, msg)), lambda: None)
    server.bind()
    server.start()
    ctx = zmq.Context()
    yield server, delivered, ctx
    ctx.destroy(linger=0)
    server.stop()


def test_keys_are_derived_from_the_secret_alone():
    a, again, other = transport.keys_from_secret("one"), transport.keys_from_secret("one"), \
        transport.keys_from_secret("two")
    assert a == again
    assert {a.server_public, a.client_public}.isdisjoint({other.server_public, other.client_public})
    assert a.server_public != a.client_public
    assert zmq.curve_public(a.server_secret) == a.server_public and zmq.curve_public(a.client_secret) == a.client_public
    with pytest.raises(ValueError, match=transport.SECRET_ENV):
        transport.keys_from_secret("")


@pytest.mark.parametrize("bind_host, advertise_host, address", [
    ("127.0.0.1", None, "tcp://127.0.0.1:"),
    ("0.0.0.0", "127.0.0.1", "tcp://127.0.0.1:"),
    (None, None, None), ("0.0.0.0", None, None),
])
def test_workers_dial_the_address_given_never_a_guess(bind_host, advertise_host, address):
    server = transport.Server(SECRET, lambda identity, msg: None, lambda: None, bind_host=bind_host,
                              advertise_host=advertise_host)
    if address is None:
        with pytest.raises(ValueError, match="advertise_host: not set while the control channel binds"):
            server.bind()
    else:
        assert server.bind().startswith(address)
    server.stop()


def test_only_a_peer_with_the_secret_is_heard(bare):
    server, delivered, ctx = bare
    hello = wire.encode(wire.HMMHello(device_index=0, pid=1))
    get = wire.encode(wire.StoreRequest(op="get", seq=7, key="k"))
    outsiders = _outsiders(ctx, server.address, SECRET, "hmm-0")
    for sock, _ in outsiders.values():
        sock.send(hello)
        sock.send(get)
    _assert_refused(outsiders)
    _wait(lambda: server.refused_handshakes >= len(outsiders), 5, "the server to log the refusals")
    assert not any(sock.poll(300) for sock, _ in outsiders.values()), "an outsider got a store reply"

    member = transport.connect(ctx, server.address, "hmm-1", SECRET, linger_ms=0)
    member.send(hello)
    member.send(get)
    assert member.poll(5000), "no store reply to the member"
    assert wire.decode(member.recv()) == wire.StoreReply(seq=7, found=False)
    _wait(lambda: delivered, 5, "the member's message")
    time.sleep(0.2)
    assert delivered == [("hmm-1", wire.HMMHello(device_index=0, pid=1))]
    assert server.malformed_frames == 0 and server.alive


def _exercise(store) -> list:
    """The same calls on any torch Store; -> what each returned."""
    store.set("a", "1")
    store.set("b", b"\x00\xffbytes")
    return [store.get("a"), store.get("b"), store.add("a", 5), store.get("a"), store.add("new", -3),
            store.add("new", 0), store.check(["a", "b"]), store.check(["a", "missing"]), store.check([]),
            store.compare_set("missing", b"", b"made"), store.get("missing"),
            store.compare_set("absent", b"nope", b"x"), store.check(["absent"]),
            store.compare_set("a", b"6", b"seven"), store.get("a"),
            store.compare_set("a", b"6", b"eight"), store.get("a"),
            store.num_keys(), store.delete_key("a"), store.delete_key("a"), store.check(["a"]), store.num_keys()]


def test_channel_store_behaves_like_torchs_hash_store(bare):
    server, _, _ = bare
    store = rendezvous.ChannelStore(server.address, SECRET, "group-1", timeout_s=5)
    try:
        got = _exercise(store)
    finally:
        store.close()
    assert got == _exercise(dist.HashStore())
    assert set(server.store.data) == {"group-1/b", "group-1/new", "group-1/missing"}, "keys carry the prefix"


def test_store_without_the_secret_times_out_and_cancel_ends_a_blocked_get(bare):
    server, _, _ = bare
    outsider = rendezvous.ChannelStore(server.address, "not " + SECRET, "g", timeout_s=1)
    try:
        with pytest.raises(TimeoutError, match="no answer from the coordinator"):
            outsider.set("k", b"v")
    finally:
        outsider.close()
    assert server.store.data == {}

    store = rendezvous.ChannelStore(server.address, SECRET, "g", timeout_s=60)
    raised: list[BaseException] = []

    def blocked_get():
        try:
            store.get("never-set")
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            raised.append(exc)

    waiter = threading.Thread(target=blocked_get, daemon=True)
    waiter.start()
    try:
        time.sleep(0.3)
        assert waiter.is_alive(), raised
        started = time.monotonic()
        store.cancel("the transition was aborted")
        waiter.join(timeout=5)
        assert time.monotonic() - started < 1
        assert [type(e) for e in raised] == [rendezvous.Cancelled] and "aborted" in str(raised[0])
    finally:
        store.close()


def test_a_get_waits_at_the_coordinator_and_blocks_no_other_thread(bare):
    server, _, _ = bare
    store = rendezvous.ChannelStore(server.address, SECRET, "g", timeout_s=30)
    writer = rendezvous.ChannelStore(server.address, SECRET, "g", timeout_s=30)
    got: dict[str, tuple[bytes, float]] = {}

    def get(key: str) -> None:
        got[key] = store.get(key), time.monotonic()

    waiters = [threading.Thread(target=get, args=(k,), daemon=True) for k in ("late", "later")]
    try:
        for w in waiters:
            w.start()
        _wait(lambda: sum(len(v) for v in server.store.waiting.values()) == 2, 5, "both gets parked")
        # another call of the same store is not held up by them (each call takes an idle socket or a new one)
        store.set("now", b"1")
        assert store.get("now") == b"1" and store.check(["now"])
        assert waiters[0].is_alive() and waiters[1].is_alive()
        written = time.monotonic()
        writer.set("late", b"L")
        waiters[0].join(timeout=5)
        assert got["late"][0] == b"L" and got["late"][1] - written < 1.0
        assert waiters[1].is_alive(), "a get waits for its own key only"
        writer.add("later", 3)  # any write that creates the key answers
        waiters[1].join(timeout=5)
        assert got["later"][0] == b"3"
        assert server.store.waiting == {}
    finally:
        store.close()
        writer.close()


def test_a_get_the_coordinator_forgot_is_asked_again(bare):
    server, _, _ = bare
    store = rendezvous.ChannelStore(server.address, SECRET, "g", timeout_s=30)
    got: list[bytes] = []
    waiter = threading.Thread(target=lambda: got.append(store.get("k")), daemon=True)
    try:
        waiter.start()
        _wait(lambda: "g/k" in server.store.waiting, 5, "the get parked")
        server.store.drop_prefix("g/")  # as a restarted coordinator would have it: no parked get
        _wait(lambda: "g/k" in server.store.waiting, 5, "the get asked again")
        server.store.handle(wire.StoreRequest(op="set", seq=1, key="g/k", value=b"v"), b"nobody")  # (no such peer)
        waiter.join(timeout=5)
        assert got == [b"v"]
    finally:
        store.close()


def test_parked_gets_go_with_their_prefix_and_past_the_limit(bare, monkeypatch):
    kv = transport.KeyValue()
    monkeypatch.setattr(transport.KeyValue, "MAX_WAITING", 3)
    for seq, key in enumerate(["transition-5/a", "transition-5/b", "transition-6/a", "transition-6/b"], 1):
        assert kv.handle(wire.StoreRequest(op="get", seq=seq, key=key, wait=True), b"peer") == []
    assert list(kv.waiting) == ["transition-5/b", "transition-6/a", "transition-6/b"], "the oldest went first"
    kv.handle(wire.StoreRequest(op="set", seq=9, key="transition-5/x", value=b"v"), b"peer")
    kv.drop_prefix("transition-5/")
    assert list(kv.waiting) == ["transition-6/a", "transition-6/b"] and "transition-5/x" not in kv.data
    replies = kv.handle(wire.StoreRequest(op="set", seq=10, key="transition-6/a", value=b"w"), b"writer")
    assert [(peer, r.seq, r.found, r.value) for peer, r in replies] == [(b"writer", 10, True, b""),
                                                                        (b"peer", 3, True, b"w")]
    # a get without `wait` (an older client) is answered at once, found or not
    assert [(r.found, r.value) for _, r in kv.handle(wire.StoreRequest(op="get", seq=11, key="nope"), b"old")] \
        == [(False, b"")]


def test_older_configurations_group_keys_go(bare):
    kv = transport.KeyValue()
    for seq, key in enumerate(["config-1/a", "config-2/a", "config-10/a", "config-3/b", "transition-2/a",
                               "configx/a", "config-/a", "config-2"], 1):
        kv.handle(wire.StoreRequest(op="set", seq=seq, key=key, value=b"v"), b"peer")
    assert kv.handle(wire.StoreRequest(op="get", seq=20, key="config-2/late", wait=True), b"peer") == []
    assert kv.handle(wire.StoreRequest(op="get", seq=21, key="config-3/late", wait=True), b"peer") == []
    assert kv.drop_configs_before(3) == 2
    assert sorted(kv.data) == ["config-/a", "config-10/a", "config-2", "config-3/b", "configx/a", "transition-2/a"]
    assert list(kv.waiting) == ["config-3/late"]


def test_a_store_request_that_cannot_be_served_is_dropped_and_the_loop_lives_on(bare):
    server, _, ctx = bare
    member = transport.connect(ctx, server.address, "exec-1-0", SECRET, linger_ms=0)
    requests = [wire.StoreRequest(op="set", seq=1, key="text", value=b"not a number"),
                wire.StoreRequest(op="add", seq=2, key="text", amount=1),
                wire.StoreRequest(op="add", seq=3, key="n", amount=2**63 - 1),
                wire.StoreRequest(op="add", seq=4, key="n", amount=1),  # past int64 (torch's counters)
                wire.StoreRequest(op="add", seq=5, key="m", amount=2**64 - 1),  # a huge int msgpack still carries
                wire.StoreRequest(op="get", seq=6, key="n")]
    for r in requests:
        member.send(wire.encode(r))
    replies = []
    while member.poll(2000):
        replies.append(wire.decode(member.recv()))
        if replies[-1].seq == 6:
            break
    assert [r.seq for r in replies] == [1, 3, 6]
    assert replies[-1].value == str(2**63 - 1).encode(), "a refused add changed the value"
    assert server.alive and server.malformed_frames == 3
    assert set(server.store.data) == {"text", "n"}


# -- one instance for the rest ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tiny_models):
    inst = coordinator.Instance(tiny_models["qwen3_moe"], 2, CFG)
    server = api.make_server(api.build_app(inst), "127.0.0.1", testprocs.free_port(), log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    try:
        inst.start()
        thread.start()
        base = f"http://127.0.0.1:{server.config.port}"
        _wait(lambda: testprocs.healthy(base), 30, "the HTTP server")
        yield inst, base
    finally:
        server.should_exit = True
        if thread.is_alive():
            thread.join(timeout=30)
        inst.shutdown(timeout_s=3)  # after the last test its channel is dead: no Shutdown reaches the workers


async def _complete(inst, request_id: str, prompt: list[int], first: asyncio.Event) -> tuple[list[int], str]:
    tokens, text = [], ""
    async for out in inst.generate(request_id, prompt, GREEDY):
        assert out.error is None, out.error
        tokens += out.token_ids
        text += out.text
        first.set()
    assert out.finish_reason is types.FinishReason.LENGTH
    return tokens, text


def _greedy(inst, tag: str, meanwhile=None) -> list[tuple[list[int], str]]:
    """PROMPTS, concurrently; `meanwhile()` runs in a thread once tokens flow and must end
    while requests are still running."""
    async def main():
        first = asyncio.Event()
        tasks = [asyncio.create_task(_complete(inst, f"{tag}-{i}", p, first)) for i, p in enumerate(PROMPTS)]
        if meanwhile is not None:
            await first.wait()
            await asyncio.to_thread(meanwhile)
            assert not all(t.done() for t in tasks), "every request ended before the test was done meddling"
        return await asyncio.gather(*tasks)

    return asyncio.run(main())


@pytest.fixture(scope="module")
def reference(served):
    return _greedy(served[0], "reference")


def _still_serving(inst, base: str) -> None:
    assert inst.phase is admin.Phase.SERVING and inst.stats().healthy, inst.stats().error
    assert inst.config_id == 1 and inst.num_devices == 2
    assert httpx.get(f"{base}/health", timeout=5).status_code == 200


@pytest.fixture
def spy(served, monkeypatch):
    """Every message the channel delivers to the coordinator, recorded."""
    inst, _ = served
    delivered: list[tuple[str, wire.Msg]] = []
    real = inst.transport.on_message

    def record(identity, msg):
        delivered.append((identity, msg))
        real(identity, msg)

    monkeypatch.setattr(inst.transport, "on_message", record)
    return delivered


def test_forged_messages_from_outsiders_change_nothing(served, reference, spy):
    inst, base = served
    ctx = zmq.Context()

    def forge():
        in_flight = sorted(inst.router.flights)
        assert in_flight
        cfg = inst.config_id
        forged = [wire.HMMFailed(device_index=0, error="forged", config_id=cfg),
                  wire.Output(request_id=in_flight[0], text="FORGED", token_ids=[1, 2, 3], finish_reason="stop",
                              num_prompt_tokens=1, num_output_tokens=3),
                  wire.Handover(rank=0, config_id=cfg, requests=[]),
                  wire.ExecutorFailed(rank=1, error="forged", config_id=cfg)]
        outsiders = {f"{kind} as {identity}": watched
                     for identity in ("hmm-0", "hmm-1", f"exec-{cfg}-0", f"exec-{cfg}-1")
                     for kind, watched in _outsiders(ctx, inst.transport.address, inst.worker_secret,
                                                     identity).items()}
        for sock, _ in outsiders.values():
            for msg in forged:
                try:
                    sock.send(wire.encode(msg), zmq.NOBLOCK)
                except zmq.Again:
                    # NOTE: a DEALER whose handshake was refused already has no pipe and would block
                    # for ever (the test hung in one CI run): nothing of it can reach the coordinator.
                    break
        _assert_refused(outsiders)

    try:
        refused_before = inst.transport.refused_handshakes
        got = _greedy(inst, "forged", forge)
    finally:
        ctx.destroy(linger=0)
    assert got == reference
    assert not any("FORGED" in text for _, text in got)
    assert inst.transport.refused_handshakes - refused_before >= 12
    assert [(i, m) for i, m in spy if isinstance(m, (wire.HMMFailed, wire.ExecutorFailed, wire.Handover))
            or (isinstance(m, wire.Output) and m.text == "FORGED")] == []
    assert inst.transport.malformed_frames == 0
    _still_serving(inst, base)


def _junk(rng: random.Random, request_id: str) -> list[bytes]:
    """One multipart message that is no valid control message."""
    enc = msgspec.msgpack.encode
    output = {"type": "Output", "request_id": request_id, "text": "JUNK", "token_ids": [1], "finish_reason": "stop",
              "num_prompt_tokens": 1, "num_output_tokens": 1}
    valid = [enc(output), wire.encode(wire.HMMFailed(device_index=0, error="junk")),
             wire.encode(wire.StoreRequest(op="set", seq=1, key="junk", value=b"x"))]
    kind = rng.randrange(7)
    if kind == 0:  # random bytes, empty ones included
        return [rng.randbytes(rng.randrange(0, 300))]
    if kind == 1:  # a valid message cut short
        frame = rng.choice(valid)
        return [frame[:rng.randrange(0, len(frame))]]
    if kind == 2:  # msgpack of the wrong shape
        return [enc(rng.choice([[1, 2, 3], "Output", None, 3.5, {1: 2}, {"type": "Output"},
                                {**output, "token_ids": "abc"}, {**output, "request_id": None},
                                {"type": "HMMFailed", "device_index": "0", "error": 1},
                                {"type": "StoreRequest", "op": "set", "seq": 1, "value": "not bytes"},
                                {"type": "Output", "error_kind": "no such kind", **output}]))]
    if kind == 3:  # a tag no message has
        return [enc({**output, "type": rng.choice(["Nope", "output", "", "Msg", "MemoryHandle", 7])})]
    if kind == 4:  # two or three valid frames in one message (the ROUTER sees 3 or 4 with the identity)
        return [rng.choice(valid) for _ in range(rng.choice([2, 3]))]
    if kind == 5:  # huge ints, where they do not belong, and lengths that lie
        return [rng.choice([enc(2**64 - 1), enc(-(2**63)), b"\xcf" + b"\xff" * 8, b"\xdd\xff\xff\xff\xff",
                            b"\xdf\xff\xff\xff\xff\xa4type", enc({**output, "request_id": 2**64 - 1}),
                            enc({**output, "num_output_tokens": 2**64 - 1, "type": "Outputs"})])]
    return [b"\x91" * rng.randrange(1, 5000)]  # deep nesting


def test_junk_from_an_admitted_peer_is_counted_and_dropped(served, reference, spy):
    inst, base = served
    rng = random.Random(9)
    junk = [_junk(rng, "fuzzed-0") for _ in range(1000)]  # its Outputs name a request that runs meanwhile
    ctx = zmq.Context()
    try:
        # Through an outsider: refused before the first frame, so nothing is even counted.
        refused_before = inst.transport.refused_handshakes
        outsider = transport.connect(ctx, inst.transport.address, "hmm-0", "not " + inst.worker_secret, linger_ms=0)
        for frames in junk:
            try:
                outsider.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                break  # its queue is full: the handshake never completes
        _assert_refused({"wrong secret": (outsider, outsider.get_monitor_socket(HANDSHAKE_FAILED))})
        _wait(lambda: inst.transport.refused_handshakes > refused_before, 5, "the refusal")
        assert inst.transport.malformed_frames == 0

        keys = transport.keys_from_secret(inst.worker_secret)
        members = [transport.connect(ctx, inst.transport.address, "fuzz", inst.worker_secret, linger_ms=0),
                   _dealer(ctx, inst.transport.address, b"\xff\xfe\x80fuzz", keys.server_public,
                           (keys.client_public, keys.client_secret))[0]]  # an identity that is no UTF-8

        def fuzz():
            for n, frames in enumerate(junk):
                members[n % 2].send_multipart(frames)
            # Well-formed, but no store can serve them (they once killed the I/O thread).
            for r in (wire.StoreRequest(op="set", seq=1, key="fuzz/text", value=b"text"),
                      wire.StoreRequest(op="add", seq=2, key="fuzz/text", amount=1),
                      wire.StoreRequest(op="add", seq=3, key="fuzz/n", amount=2**64 - 1)):
                members[1].send(wire.encode(r))
            _wait(lambda: inst.transport.malformed_frames >= len(junk) + 2, 10, "the junk to be counted")

        got = _greedy(inst, "fuzzed", fuzz)
    finally:
        ctx.destroy(linger=0)
    assert got == reference
    assert inst.transport.malformed_frames == len(junk) + 2
    assert [(i, m) for i, m in spy if i.endswith("fuzz")] == []
    _still_serving(inst, base)
    assert _greedy(inst, "after") == reference


def _family(pid: int) -> set[int]:
    """pid and its descendants (/proc/<pid>/task/<tid>/children)."""
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        for children in pathlib.Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in children.read_text().split()]
            except OSError:
                pass  # it exited meanwhile
    return out


def test_a_local_instance_listens_on_loopback_only(served):
    inst, base = served
    if shutil.which("ss") is None:
        pytest.fail("`ss` (iproute2) is needed to list listening sockets: apt-get install iproute2")
    ours = _family(os.getpid())
    for hmm in inst.fleet.pids().values():
        ours |= _family(hmm)
    executors = {r.pid for r in inst.executors.values()}
    assert executors <= ours, "the executors are not children of the HMMs"

    listing = subprocess.run(["ss", "-Hltunp"], capture_output=True, text=True, check=True).stdout
    listeners: dict[int, list[str]] = {}
    for line in listing.splitlines():
        fields = line.split()
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in ours:
                listeners.setdefault(pid, []).append(fields[4])
    assert listeners, f"ss shows no listener of these processes (is -p allowed?):\n{listing}"
    mine = listeners.get(os.getpid(), [])
    assert f"127.0.0.1:{inst.transport.port}" in mine and f"127.0.0.1:{base.rsplit(':', 1)[1]}" in mine, mine
    assert executors & set(listeners), "no executor listens (gloo): the check would miss it"
    loopback = ("127.0.0.1", "[::1]", "[::ffff:127.0.0.1]")
    assert {p: a for p, a in listeners.items() if any(x.rsplit(":", 1)[0] not in loopback for x in a)} == {}


def test_a_dead_io_loop_turns_health_503_within_2s(served, monkeypatch):
    """LAST in this module: the instance's channel stays dead."""
    inst, base = served
    _still_serving(inst, base)

    def closed(timeout_ms):  # what polling a socket closed under the loop raises
        raise zmq.ZMQError(zmq.ENOTSOCK)

    monkeypatch.setattr(inst.transport, "receive", closed)
    started = time.monotonic()
    with httpx.Client(base_url=base, timeout=5) as client:
        while (r := client.get("/health")).status_code == 200:
            assert time.monotonic() - started < 10, "/health still 200 after 10 s"
            time.sleep(0.02)
        took_s = time.monotonic() - started
        assert r.status_code == 503 and "I/O thread died" in r.json()["error"], r.text
        assert took_s < 2
        assert client.post("/v1/completions", json={"model": inst.model_name, "prompt": "x",
                                                     "max_tokens": 2}).status_code == 503
    assert inst.phase is admin.Phase.DEGRADED

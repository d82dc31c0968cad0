"""The ledger the tests of `reconfig.step` share (tests/worker/test_reconfig.py): literal facts,
message builders, and `Harness`, which feeds events to the machine and checks its invariants
after every step; `random_event` turns hypothesis' draws into events that fit the state.

`Harness.step` checks, from the actions that come back: the state's configuration is the one
the actions committed or recovered to (exactly one serves); no request is adopted twice by one
handover or released twice, and none is adopted that was never handed over; nothing goes to an
executor of an aborted configuration and no configuration id is started twice; a FailRequests
names the configuration that serves (the shell drops any other, and its requests would hang);
only a switch pauses admission; no request held in the pause is forgotten; every finished scale
has exactly one record, and its phases add up to its duration; admission is paused only in a
switch or while requests are suspended (a recovery), and suspended requests end recomputed
(Resume) or failed. Whenever neither a switch nor a recovery is under way (requests wait
then) it also checks `settled`: every request handed over was adopted or failed, every request
held in the pause was released or failed.
"""

from __future__ import annotations

import collections
import dataclasses

from elasticmoe_worker import planner
from elasticmoe_worker.contract import admin, wire
from elasticmoe_worker.instance import reconfig

WORKERS, TRANSFER, STANDBY, SWITCH = reconfig.STAGES
TIMEOUT_S = 10.0
DT = 0.0137  # between two messages: not a round number of milliseconds, so rounding shows
ENGINE = wire.EngineOptions(dtype="float32", block_size=16, num_kv_blocks=64, kv_cache_bytes=0, max_num_seqs=8,
                            max_num_batched_tokens=256, max_model_len=128, max_waiting=64, seed=0)
FACTS = reconfig.Facts(num_experts=8, replicated_bytes=1000,
                       replicated_layout=(wire.TensorSlot("embed", "float32", (10, 25), 0),),
                       expert_w13_bytes=100, expert_w2_bytes=50, moe_layers=(1, 2), num_kv_blocks=64, kv_bytes=4096,
                       kv_view_block_bytes=(32, 32, 32, 32),
                       config_json="{}", tokenizer_files={"tokenizer.json": "{}"}, engine=ENGINE, model_name="tiny",
                       collective_timeout_s=5.0, recovery_grace_s=0.5, model_dir="/models/tiny",
                       recovery_timeout_s=TIMEOUT_S)
SAMPLING = wire.SamplingOptions(max_tokens=16, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=[],
                                ignore_eos=False)


def hmm_ready(device: int) -> wire.HMMReady:
    handle = wire.MemoryHandle(backend="cpu", name=f"dev{device}", size_bytes=1, owner_pid=100 + device)
    return wire.HMMReady(device_index=device, replicated=handle, replicated_layout=list(FACTS.replicated_layout),
                         experts=[], kv=handle, num_kv_blocks=64, bytes_read_from_checkpoint=0, load_seconds=0.0)


def seq(request_id: str) -> wire.SequenceState:
    return wire.SequenceState(request_id=request_id, prompt_token_ids=[1, 2, 3], output_token_ids=[4], num_computed=4,
                              block_ids=[0], params=SAMPLING, arrival_s=0.0, emitted_chars=1, emitted_tokens=1)


def summary(actions) -> list[str]:
    return [f"{a.dest} {type(a.msg).__name__}" if isinstance(a, reconfig.Send) else type(a).__name__ for a in actions]


def finished(actions) -> admin.ScaleRecord:
    (record,) = [a.record for a in actions if isinstance(a, reconfig.Finished)]
    return record


def commit_of(actions) -> reconfig.Commit:
    (commit,) = [a for a in actions if isinstance(a, reconfig.Commit)]
    return commit


def kv_moves(actions) -> dict[str, wire.MoveKV]:
    return {a.dest: a.msg for a in actions if isinstance(a, reconfig.Send) and isinstance(a.msg, wire.MoveKV)}


def adopts(actions) -> list[tuple[str, list[str], bool]]:
    return [(a.dest, [s.request_id for s in a.msg.requests], a.msg.keep_kv) for a in actions
            if isinstance(a, reconfig.Send) and isinstance(a.msg, wire.Adopt)]


class Harness:
    """Feeds events to `reconfig.step` and checks the invariants after every step, following
    from the emitted actions where each request id lives."""

    def __init__(self, num_devices: int = 1, warm=(), copies: int = 1, facts: reconfig.Facts = FACTS) -> None:
        facts = dataclasses.replace(facts, expert_copies=copies)
        placement = planner.initial_placement(facts.num_experts, list(range(num_devices)), min(copies, num_devices))
        self.state = reconfig.initial(facts, 1, num_devices, placement, {d: hmm_ready(d) for d in range(num_devices)},
                                      frozenset(warm))
        self.now = 0.0
        self.serving = 1  # what the actions committed
        self.started = {1}  # configuration ids executors were started for
        self.aborted: set[int] = set()
        self.switching: int | None = None  # told to hand over, not yet replaced
        self.replaced: int | None = None  # replaced by the last commit: its late handovers still count
        self.home: dict[str, tuple[int, int]] = {}  # request handed over -> (configuration, rank) it is on
        self.pending: set[str] = set()  # handed over and not adopted yet
        self.adopted: set[str] = set()  # ever
        self.released: collections.Counter[str] = collections.Counter()
        self.held: set[str] = set()  # every request that arrived during a pause
        self.failed: set[str] = set()
        self.failed_ranks: set[tuple[int, int]] = set()
        self.failed_all = 0  # the newest configuration whose requests were all failed
        self.scales: list[str] = []
        self.records: dict[str, admin.ScaleRecord] = {}
        self.events: list[reconfig.Event] = []
        self.ids = 0
        self.suspended = False  # a Suspend without its Resume yet

    # -- events -------------------------------------------------------------------------
    def step(self, event: reconfig.Event) -> list[reconfig.Action]:
        before = self.state
        self.state, actions = reconfig.step(before, event)
        self.events.append(event)
        self._account(before, event, actions)
        return actions

    def _at(self) -> float:
        self.now += DT
        return self.now

    def scale(self, target: int) -> list[reconfig.Action]:
        assert reconfig.refuse_scale(self.state, target) is None
        self.scales.append(f"s{len(self.scales) + 1}")
        return self.step(reconfig.ScaleRequested(target, self.scales[-1], "test", TIMEOUT_S, "2026-01-01T00:00:00Z",
                                                 self._at()))

    def register(self, device: int):
        return self.step(reconfig.WorkerRegistered(device, self._at()))

    def transfer_ready(self, device: int, config_id: int | None = None, data_s: float = 0.25):
        msg = wire.TransitionReady(device_index=device, config_id=config_id or self.state.scale.new_config,
                                   ready=hmm_ready(device), transfer_seconds=0.5, bytes_received=0, bytes_sent=0,
                                   data_seconds=data_s + device / 100, setup_seconds=0.1, cpu_seconds=0.02,
                                   told_seconds=0.001)
        # its report's delivery: known for even devices (ms: 3 + device), not for odd ones (another host)
        return self.step(reconfig.TransferReady(msg, self._at(), (device + 3) / 1000 if device % 2 == 0 else -1.0))

    def executor_ready(self, rank: int, config_id: int | None = None):
        return self.step(reconfig.ExecutorReady(rank, config_id or self.state.scale.new_config, self._at()))

    def hand_over(self, rank: int, request_ids=(), config_id: int | None = None):
        config_id = config_id or (self.state.scale.old_config if self.state.scale else self.replaced)
        return self.step(reconfig.HandedOver(rank, config_id, tuple(seq(r) for r in request_ids), self._at()))

    def request(self, request_id: str | None = None):
        self.ids += 1
        return self.step(reconfig.RequestArrived(request_id or f"q{self.ids}", self._at()))

    def handover_of(self, rank: int, config_id: int, fresh: int) -> reconfig.HandedOver:
        """What rank `rank` of `config_id` runs (adopted there, not failed) and `fresh` new requests."""
        ids = [r for r, home in self.home.items() if home == (config_id, rank) and r not in self.failed]
        self.ids += 1
        ids += [f"h{self.ids}-{k}" for k in range(fresh)]
        return reconfig.HandedOver(rank, config_id, tuple(seq(r) for r in ids), self.now)

    def kv_moved(self, device: int, ok: bool = True, config_id: int | None = None):
        msg = wire.KVMoved(device_index=device, config_id=config_id or self.state.scale.new_config, ok=ok,
                           error="" if ok else "peer went away", bytes_received=1000 if ok else 0)
        return self.step(reconfig.KVMoved(msg, self._at()))

    def kv_all(self) -> list[reconfig.Action]:
        """Every HMM that copies KV blocks says it is done (nothing when no copy is under way)."""
        sc = self.state.scale
        return [a for d in sorted(sc.kv_waiting if sc is not None else ()) for a in self.kv_moved(d)]

    def tick(self, now: float):
        self.now = max(self.now, now)
        return self.step(reconfig.Tick(now))

    def complete_stage(self, handed=None) -> list[reconfig.Action]:
        """Everything the current stage waits for; a switch hands over `handed[rank]`, and the
        HMMs copy the departing devices' KV blocks when told to."""
        sc = self.state.scale
        send = {WORKERS: self.register, TRANSFER: self.transfer_ready, STANDBY: self.executor_ready,
                SWITCH: lambda r: self.hand_over(r, (handed or {}).get(r, ()))}[sc.stage]
        actions = [a for x in sorted(sc.waiting) for a in send(x)]
        return actions + self.kv_all()

    def to_stage(self, stage: str) -> None:
        for _ in reconfig.STAGES:
            if self.state.scale.stage != stage:
                self.complete_stage()
        assert self.state.scale.stage == stage

    # -- the ledger and the invariants ----------------------------------------------------
    def _account(self, before: reconfig.State, event, actions) -> None:
        if isinstance(event, reconfig.RequestArrived):
            if before.paused:
                self.held.add(event.request_id)
            else:
                assert reconfig.Release((event.request_id,)) in actions, "a request outside a pause waits"
        if isinstance(event, reconfig.HandedOver) and event.config_id in (self.switching, self.replaced):
            for s in event.requests:
                # the first handover of this request by the configuration it lives on; a copy of an
                # older handover (its request lives on a newer configuration now) is not one
                lives_on = self.home.get(s.request_id, (event.config_id,))[0]
                if s.request_id not in self.pending and lives_on == event.config_id:
                    self.home[s.request_id] = (event.config_id, event.rank)
                    self.pending.add(s.request_id)
                    if (event.config_id, event.rank) in self.failed_ranks or event.config_id <= self.failed_all:
                        self.failed.add(s.request_id)  # the router failed it before it was handed over
        adopted: dict[str, int] = {}
        starts: set[int] = set()
        for a in actions:
            if isinstance(a, reconfig.Send) and a.dest.startswith("exec-"):
                config, rank = map(int, a.dest.split("-")[1:])
                assert config not in self.aborted, f"{summary([a])}: to an executor of an aborted configuration"
                if isinstance(a.msg, wire.Adopt):
                    assert a.msg.config_id == config
                    for s in a.msg.requests:
                        assert s.request_id in self.pending, f"{s.request_id} adopted twice, or never handed over"
                        self.pending.remove(s.request_id)
                        self.adopted.add(s.request_id)
                        adopted[s.request_id] = rank
                        self.home[s.request_id] = (config, rank)
                elif isinstance(a.msg, wire.PauseForSwitch):
                    assert config == a.msg.config_id == self.serving
                    self.switching = config
                else:
                    assert isinstance(a.msg, wire.Shutdown), a
            elif isinstance(a, reconfig.Send):
                if isinstance(a.msg, wire.StartExecutor):
                    assert a.msg.config_id not in self.started, f"configuration id {a.msg.config_id} reused"
                    starts.add(a.msg.config_id)
                elif isinstance(a.msg, wire.AbortTransition):
                    self.aborted.add(a.msg.config_id)
            elif isinstance(a, reconfig.Commit):
                assert a.config_id not in self.aborted and dict(a.ranks) == adopted
                self.serving, self.replaced, self.switching = a.config_id, self.switching, None
            elif isinstance(a, reconfig.Rebind):
                assert dict(a.ranks) == adopted
            elif isinstance(a, reconfig.Recovering):
                self.serving, self.replaced = a.config_id, None
            elif isinstance(a, (reconfig.Suspend, reconfig.Resume)):
                # the router takes back, and later recomputes, what runs on the serving configuration
                assert isinstance(a, reconfig.Resume) or a.config_id == self.serving, a
                self.suspended = isinstance(a, reconfig.Suspend)
                if self.suspended:  # a late handover is the router's to recompute now, not the machine's
                    assert not self.pending - self.failed, "suspended with handed-over requests pending"
                    self.replaced = None
            elif isinstance(a, reconfig.Release):
                for r in a.request_ids:
                    self.released[r] += 1
                    assert self.released[r] == 1, f"{r} released twice"
            elif isinstance(a, reconfig.FailRequests):
                # the shell drops a FailRequests for another configuration: its requests would hang
                assert a.config_id == self.serving and a.error, a
                if a.ranks is None:
                    self.failed_all = max(self.failed_all, a.config_id)
                    self.failed |= set(self.home) | self.held
                    self.suspended = False  # suspended requests are failed too
                else:
                    self.failed_ranks |= {(a.config_id, r) for r in a.ranks}
                    self.failed |= {r for r, (c, k) in self.home.items() if c == a.config_id and k in a.ranks}
            elif isinstance(a, reconfig.Finished):
                rec = a.record
                assert rec.scale_id not in self.records, f"scale {rec.scale_id} finished twice"
                assert rec.outcome in admin.TERMINAL_OUTCOMES
                assert bool(rec.message) == (rec.outcome != admin.Outcome.SUCCEEDED), rec
                assert sum(rec.phases_ms.values()) == rec.duration_ms
                self.records[rec.scale_id] = rec
                # (a recovery may start in the same step: an aborted scale made way for it)
                assert self.state.scale is None or (self.state.scale.lost and self.state.scale.scale_id != rec.scale_id)
        self.started |= starts
        s = self.state
        assert all(self.home[r][0] == self.serving for r in adopted), "adopted by a configuration that does not serve"
        assert s.config_id == self.serving, "the state serves another configuration than the actions committed"
        assert not s.paused or (s.scale is not None and s.scale.stage == SWITCH) or s.suspended_since is not None, \
            "paused outside a switch or a recovery"
        assert s.suspended_since is None or s.paused, "requests suspended while admission goes on"
        assert self.suspended == (s.suspended_since is not None), "suspended requests neither recomputed nor failed"
        assert self.held - set(self.released) - self.failed <= set(s.held), "a held request was forgotten"
        if (s.scale is None or s.scale.stage != SWITCH) and s.suspended_since is None:
            self.settled(scale_over=False)

    def settled(self, scale_over: bool = True) -> None:
        if scale_over:
            assert self.state.scale is None and not self.state.paused
            asked = sorted(r for r in self.records if not r.startswith("recovery-"))  # recoveries: ours
            assert asked == sorted(self.scales), "a scale without exactly one record"
        lost = sorted(self.pending - self.failed)
        assert not lost, f"handed over, neither adopted nor failed: {lost}"
        waiting = [r for r in self.held if self.released[r] != 1 and r not in self.failed]
        assert not waiting, f"held, neither released nor failed: {waiting}"


STALE = {  # a message of configuration c, which is over
    "TransitionReady": lambda h, c: reconfig.TransferReady(wire.TransitionReady(
        device_index=1, config_id=c, ready=hmm_ready(1), transfer_seconds=1.0, bytes_received=0, bytes_sent=0), h.now),
    "ExecutorReady": lambda h, c: reconfig.ExecutorReady(1, c, h.now),
    "ExecutorFailed": lambda h, c: reconfig.ExecutorFailed(1, c, "torn down", h.now),
    "HMMFailed": lambda h, c: reconfig.HMMFailed(1, c, "transition aborted", h.now),
    "Handover": lambda h, c: reconfig.HandedOver(0, c, (seq("ghost"),), h.now),
}


# weighted towards progress, so that most examples get through a few switches
KINDS = ("progress",) * 16 + ("dup",) * 3 + ("stale", "stale", "late", "late", "raced", "request", "request", "tick",
                                             "abort", "scale", "worker_died", "executor_failed", "hmm_failed")


def play(h: Harness, ops, check=None) -> None:
    """Feed hypothesis' (kind, i, dt) draws to the machine as `random_event`s (`check(before,
    kind, event, actions)` after each), then end whatever is under way — any scale aborts or
    commits, restarted executors come up and recompute the suspended requests — and check
    `settled`."""
    for kind, i, dt in ops:
        h.now += dt
        event = random_event(h, kind, i)
        if event is None:
            continue
        before = h.state
        actions = h.step(event)
        if check is not None:
            check(before, kind, event, actions)
    h.tick(h.now + 2 * TIMEOUT_S)  # ends any scale (abort or commit) ...
    h.tick(h.now + 2 * TIMEOUT_S)  # ... and starts any restart of failed executors ...
    for rank in sorted(h.state.recovering):  # ... which come up, and recompute the suspended requests
        h.step(reconfig.ExecutorReady(rank, h.state.config_id, h.now))
    h.settled()


def random_event(h: Harness, kind: str, i: int) -> reconfig.Event | None:
    """An event of `kind` that fits the state (`i` picks among the candidates), or None when
    there is none: "progress" is what the scale waits for (or a new scale), "dup" a message
    delivered again, "stale" one of an aborted or replaced configuration, "raced" and "late" a
    handover after the rank's first one and after the commit; the rest are failures, requests
    and ticks."""
    s, sc, now = h.state, h.state.scale, h.now
    if kind == "progress":
        if sc is None and s.recovering:
            return reconfig.ExecutorReady(min(s.recovering), s.config_id, now)
        if sc is None:
            kind = "scale"
        elif sc.stage == SWITCH and not sc.waiting:  # the KV copy of departing devices' sequences
            d = sorted(sc.kv_waiting)[i % len(sc.kv_waiting)]
            return reconfig.KVMoved(wire.KVMoved(device_index=d, config_id=sc.new_config, ok=i % 5 != 0,
                                                 bytes_received=100), now)
        elif sc.stage == SWITCH:  # what the rank runs, and requests that reached it before the pause
            return h.handover_of(sorted(sc.waiting)[i % len(sc.waiting)], sc.old_config, i % 3)
        else:
            x = sorted(sc.waiting)[i % len(sc.waiting)]
            return {WORKERS: lambda: reconfig.WorkerRegistered(x, now),
                    TRANSFER: lambda: reconfig.TransferReady(wire.TransitionReady(
                        device_index=x, config_id=sc.new_config, ready=hmm_ready(x), transfer_seconds=0.1,
                        bytes_received=0, bytes_sent=0, data_seconds=0.05), now),
                    STANDBY: lambda: reconfig.ExecutorReady(x, sc.new_config, now)}[sc.stage]()
    if kind == "scale":
        targets = [t for t in (1, 2, 3, 4) if reconfig.refuse_scale(s, t) is None]
        if targets:
            h.scales.append(f"s{len(h.scales) + 1}")
            return reconfig.ScaleRequested(targets[i % len(targets)], h.scales[-1], "random", TIMEOUT_S, "", now)
        return None
    if kind == "dup":
        again = [e for e in h.events if isinstance(e, (reconfig.WorkerRegistered, reconfig.TransferReady,
                                                       reconfig.ExecutorReady, reconfig.HandedOver,
                                                       reconfig.KVMoved))]
        return dataclasses.replace(again[i % len(again)], now=now) if again else None
    if kind == "stale":  # of an aborted attempt; of a replaced configuration, all but a handover
        gone = sorted(h.started - {s.config_id} - ({sc.new_config} if sc else set()) | h.aborted)
        if not gone:
            return None
        config = gone[i % len(gone)]
        name = list(STALE)[i % len(STALE)]
        if name == "Handover" and config not in h.aborted:
            name = "ExecutorFailed"
        return STALE[name](h, config)
    if kind == "raced" and sc is not None and sc.stage == SWITCH and set(sc.old_devices) - sc.waiting:
        done = sorted(set(sc.old_devices) - sc.waiting)  # a second handover: requests that raced the pause
        return h.handover_of(done[i % len(done)], sc.old_config, 1 + i % 2)
    if kind == "late" and h.replaced is not None:
        return h.handover_of(i % 4, h.replaced, 1)
    if kind == "request":
        h.ids += 1
        return reconfig.RequestArrived(f"q{h.ids}", now)
    if kind == "tick":
        return reconfig.Tick(now)
    if kind == "load":  # an executor's routed tokens per expert (a delta)
        return reconfig.ExpertLoadReported(tuple((i * (e + 3)) % 7 for e in range(s.facts.num_experts)), now)
    if kind == "abort":
        return reconfig.AbortRequested("random abort", now)
    if kind == "worker_died":
        return reconfig.WorkerDied(i % 5, "exit code -9", now)
    if kind == "executor_failed":
        return reconfig.ExecutorFailed(i % 4, sc.new_config if sc and i % 2 else s.config_id, "random", now)
    if kind == "hmm_failed":
        return reconfig.HMMFailed(i % 5, sc.new_config if sc and i % 2 else 0, "random", now)
    return None

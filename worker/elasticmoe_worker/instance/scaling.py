"""Change the number of devices of a live instance without failing a request.

The sequence (DESIGN §4.6): the fleet adds workers → the planner decides placement and
transfers → the HMMs move bytes peer to peer while the old executors serve → standby
executors for the new configuration start and warm up → switch: the old executors stop
after their current step and hand over their sequences (KV blocks stay where they are) →
the standby executors adopt them and serve → the old executors exit, the HMMs release what
the new configuration dropped, the fleet deletes departing workers.

Anything that fails before the switch aborts back to the old configuration, which never
stopped serving. Runs in its own thread; the coordinator's I/O thread feeds it messages.
Devices are removed from the top (the highest indices), so rank == device index always.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import time

import msgspec

from elasticmoe_worker import planner
from elasticmoe_worker.contract import wire

logger = logging.getLogger(__name__)


class ScaleAborted(RuntimeError):
    pass


def initial_placement(num_experts: int, num_devices: int) -> planner.Placement:
    if not 1 <= num_devices <= num_experts:
        raise ValueError(f"devices: got {num_devices}, expected 1..{num_experts} (one expert per device at least)")
    return planner.initial_placement(num_experts, list(range(num_devices)))


def owner_list(placement: planner.Placement, num_experts: int) -> list[int]:
    """Expert id -> the device that computes it (the first home; one copy per expert)."""
    assert len(placement.homes) == num_experts
    return [homes[0] for homes in placement.homes]


def experts_by_device(placement: planner.Placement) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for e, homes in enumerate(placement.homes):
        for d in homes:
            out.setdefault(d, []).append(e)
    return out


@dataclasses.dataclass
class ScaleRecord:
    """What `GET /admin/status` shows of a scale."""

    from_devices: int
    to_devices: int
    reason: str
    started_at: float  # unix time
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    outcome: str = "running"  # running | succeeded | aborted
    error: str | None = None
    bytes_transferred: int = 0
    transfer_data_seconds: float = 0.0  # of the transfer phase: moving bytes (the rest: allocation, group set-up)
    requests_handed_over: int = 0


class Scaler:
    def __init__(self, inst, target: int, reason: str, timeout_s: float) -> None:
        self.inst = inst
        self.target = target
        self.timeout_s = timeout_s
        self.inbox: queue.Queue = queue.Queue()
        self.old_config = inst.config_id
        # A fresh id even after an aborted attempt: rendezvous keys are prefixed with it.
        self.new_config = inst.next_config_id()
        self.old_devices = list(range(inst.num_devices))
        self.new_devices = list(range(target))
        self.added = [d for d in self.new_devices if d not in self.old_devices]
        self.removed = [d for d in self.old_devices if d not in self.new_devices]
        self.record = ScaleRecord(inst.num_devices, target, reason, time.time())
        self.switched = False
        self._phase_started = time.perf_counter()
        self._started = time.perf_counter()

    # -- helpers -------------------------------------------------------------------
    def _phase(self, name: str) -> None:
        now = time.perf_counter()
        self.record.phases[name] = round(now - self._phase_started, 4)
        self._phase_started = now

    def _wait(self, want: type, keys: set, what: str, key=lambda m: m.device_index) -> dict:
        got: dict = {}
        deadline = time.monotonic() + self.timeout_s
        while len(got) < len(keys):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ScaleAborted(f"timed out after {self.timeout_s:.0f} s waiting for {what} "
                                   f"({len(got)}/{len(keys)})")
            try:
                msg = self.inbox.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if isinstance(msg, ScaleAborted):
                raise msg
            if isinstance(msg, want) and key(msg) in keys:
                got[key(msg)] = msg
        return got

    # -- the sequence --------------------------------------------------------------
    def run(self) -> ScaleRecord:
        try:
            self._prepare()
        except Exception as exc:
            self._abort(str(exc))
            return self.record
        self._switch()
        self._finish()
        return self.record

    def _prepare(self) -> None:
        inst = self.inst
        cold = [d for d in self.added if d not in inst._warm]
        for d in cold:
            inst.fleet.add(d)
        if cold:
            self._wait(wire.HMMHello, set(cold), "new workers to register")
        for d in self.added:
            inst._warm.discard(d)
        self._phase("workers")

        spec = inst.spec
        layout = inst.hmm_ready[0].replicated_layout
        ready0 = inst.hmm_ready[0]
        replicated_bytes = inst.replicated_bytes
        w13_bytes, w2_bytes = ready0.experts[0].w13.size_bytes, ready0.experts[0].w2.size_bytes
        moe_layers = sorted({r.layer for r in ready0.experts})
        the_plan = planner.plan(inst.placement, self.old_devices, self.new_devices,
                                replicated_bytes=replicated_bytes,
                                expert_bytes=(w13_bytes + w2_bytes) * len(moe_layers))
        logger.info("scale %d -> %d devices, plan:\n%s", len(self.old_devices), self.target, the_plan.describe())
        self.plan = the_plan
        transfers = [wire.Transfer("replicated", t.src_device, t.dst_device, t.offset_bytes, t.size_bytes)
                     for t in the_plan.replicated_transfers]
        transfers += [wire.Transfer("expert", m.src_device, m.dst_device, expert_id=m.expert)
                      for m in the_plan.expert_moves]
        self.record.bytes_transferred = the_plan.bytes_moved
        self._phase("plan")

        group = sorted(set(self.old_devices) | set(self.new_devices))
        holds = experts_by_device(the_plan.new_placement)
        for rank, d in enumerate(group):
            inst._send(f"hmm-{d}", wire.PrepareTransition(
                config_id=self.new_config, rank=rank, group_ranks=group, store_host=inst.advertise_host,
                store_port=inst.store_port, expert_ids=sorted(holds.get(d, [])), transfers=transfers,
                replicated_layout=layout, replicated_bytes=replicated_bytes, expert_w13_bytes=w13_bytes,
                expert_w2_bytes=w2_bytes, moe_layers=moe_layers, num_kv_blocks=ready0.num_kv_blocks,
                kv_bytes=ready0.kv.size_bytes, config_json=inst.config_json, tokenizer_files=inst.tokenizer_files,
                timeout_s=self.timeout_s))
        self.transition_ready = self._wait(wire.TransitionReady, set(group), "peer-to-peer transfers")
        self.record.transfer_data_seconds = round(max(r.data_seconds for r in self.transition_ready.values()), 4)
        self._phase("transfer")

        owner = owner_list(the_plan.new_placement, spec.num_experts)
        for d in self.new_devices:
            start = inst._start_message(d)
            inst._send(f"hmm-{d}", msgspec.structs.replace(start, config_id=self.new_config, world_size=self.target,
                                                       expert_owner=owner, replace=False))
        ready = self._wait(wire.ExecutorReady, set(self.new_devices), "standby executors",
                           key=lambda m: m.rank if m.config_id == self.new_config else None)
        self.standby = ready
        self.record.phases["remap"] = round(max(r.attach_seconds for r in ready.values()), 4)
        self._phase("standby_start")

    def _switch(self) -> None:
        """Past this point there is no way back: the old executors stop for good."""
        inst = self.inst
        self.switched = True
        inst._switching = True
        for r in self.old_devices:
            inst._send(f"exec-{self.old_config}-{r}", wire.PauseForSwitch(config_id=self.old_config))
        handovers = self._wait(wire.Handover, set(self.old_devices), "the old executors to hand over",
                               key=lambda m: m.rank if m.config_id == self.old_config else None)
        adopt: dict[int, list[dict]] = {d: [] for d in self.new_devices}
        recompute: list[dict] = []
        for r, h in handovers.items():
            if r in self.new_devices:
                adopt[r].extend(h.requests)
            else:
                recompute.extend(h.requests)
        counts = {d: len(v) for d, v in adopt.items()}
        moved: dict[int, list[dict]] = {d: [] for d in self.new_devices}
        for st in recompute:  # sequences of departing devices: recomputed on the least loaded
            d = min(self.new_devices, key=lambda x: counts[x])
            counts[d] += 1
            moved[d].append(st)
        for d in self.new_devices:
            inst._send(f"exec-{self.new_config}-{d}", wire.Adopt(requests=adopt[d], keep_kv=True))
            if moved[d]:
                inst._send(f"exec-{self.new_config}-{d}", wire.Adopt(requests=moved[d], keep_kv=False))
        ranks = {st["request_id"]: d for d in self.new_devices for st in adopt[d] + moved[d]}
        self.record.requests_handed_over = len(ranks)
        inst._commit_switch(self.new_config, self.target, self.plan.new_placement, ranks)
        self._phase("switch")

    def _finish(self) -> None:
        inst = self.inst
        for r in self.old_devices:
            inst._send(f"exec-{self.old_config}-{r}", wire.Shutdown(reason="replaced by a new configuration"))
        for d in self.new_devices:
            inst._send(f"hmm-{d}", wire.CommitTransition(config_id=self.new_config))
        for d in self.removed:
            inst._send(f"hmm-{d}", wire.Shutdown(reason="device released"))
        for d in self.removed:
            inst.fleet.remove(d)
        for d in self.added:
            inst.hmm_ready[d] = self.transition_ready[d].ready
        for d in self.removed:
            inst.hmm_ready.pop(d, None)
        self.record.seconds = round(time.perf_counter() - self._started, 4)
        self.record.outcome = "succeeded"
        logger.info("scaled %d -> %d devices in %.2f s (phases %s)", len(self.old_devices), self.target,
                    self.record.seconds, self.record.phases)

    def _abort(self, reason: str) -> None:
        inst = self.inst
        logger.error("scale %d -> %d aborted: %s; the current configuration keeps serving",
                     len(self.old_devices), self.target, reason)
        for d in self.old_devices:
            inst._send(f"hmm-{d}", wire.AbortTransition(config_id=self.new_config, reason=reason))
        for d in self.added:
            # A worker of a pod fleet outlives remove(): it must drop what it half-received.
            inst._send(f"hmm-{d}", wire.Shutdown(reason=f"scale aborted: {reason}"))
            inst.fleet.remove(d)
            inst._warm.discard(d)
        self.record.seconds = round(time.perf_counter() - self._started, 4)
        self.record.outcome = "aborted"
        self.record.error = reason

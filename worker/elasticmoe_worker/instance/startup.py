"""How an instance starts (the start-up half of `coordinator.Instance`, a mixin): bind the control
channel, make the fleet, and either start fresh workers and load the model, or adopt the workers
that a coordinator that died left holding their memory.

Why it is apart: `coordinator` wires the running instance (messages, reconfiguration, admin API);
starting is a different, one-off conversation with the workers, run on the caller's thread
before the control channel's I/O thread exists (`_recv_until` reads the socket directly).

Adoption: the workers connect again and send `wire.HMMRejoin`; `reconfig_rejoin` decides
whether what they hold makes one whole configuration; fresh executors start on it under a new
configuration id. Workers that hold memory no configuration served from are told to exit.

Not guaranteed: an adoption waits at most `_REJOIN_WINDOW_S` for a local fleet's workers (the
startup deadline for pods); a configuration with a device missing is refused, not recovered.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time

import torch

from elasticmoe_worker import hotcopies, planner
from elasticmoe_worker.contract import admin, wire
from elasticmoe_worker.engine import engine as engine_mod
from elasticmoe_worker.engine import kv_cache
from elasticmoe_worker.instance import fleet as fleet_mod
from elasticmoe_worker.instance import membership, memory, procutil, rayfleet, reconfig, reconfig_rejoin, routing, transport
from elasticmoe_worker.models import registry

logger = logging.getLogger("elasticmoe_worker.instance.coordinator")

# A restarted local coordinator waits this long for its predecessor's workers to rejoin before it
# starts fresh ones (they reconnect within a second: ZeroMQ retries every 100 ms).
_REJOIN_WINDOW_S = 5.0
_REJOIN_SETTLE_S = 0.5


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class StartUp:
    """The start-up methods of `coordinator.Instance` (which holds the state they fill in)."""

    def _start(self) -> None:
        started = time.monotonic()
        deadline = started + self.startup_timeout_s
        self.members = membership.Membership(self._make_fleet(), self._warm_workers, self.max_devices)
        rejoins, hellos = self._discover(deadline)
        if rejoins:
            self._adopt(rejoins, hellos, started, deadline)
            return
        if self.spec is None:
            raise FileNotFoundError(f"model directory {self.model_dir}: no config.json, and no worker holding a "
                                    f"model rejoined on {self.transport.address}")
        n = self._initial_devices
        if isinstance(self.members.fleet, fleet_mod.LocalFleet):
            for d, hello in hellos.items():  # workers of a coordinator that died before they held anything
                self.members.fleet.adopt(d, hello.pid)
        self.members.add(range(n))
        warm: set[int] = set()
        stats: dict[int, wire.RankStats] = {}
        self._recv_until(wire.HMMHello, n, deadline, warm, stats, got={d: h for d, h in hellos.items() if d < n})
        warm |= {d for d in hellos if d >= n}
        copies = hotcopies.wanted(self.spec.num_experts, n, self.expert_copies, self.redundant_expert_bytes,
                                  self._estimated_expert_bytes())
        placement = planner.initial_placement(self.spec.num_experts, list(range(n)), copies)
        if not placement.uniform:
            logger.info("start-up: no routed tokens counted yet, so the %d expert(s) with a second copy that the "
                        "budget of %d B per device fits are the lowest ids: %s; every scale and recovery chooses "
                        "the most routed ones again", len(placement.redundant_experts), self.redundant_expert_bytes,
                        list(placement.redundant_experts))
        owner = reconfig.owner_list(placement, tuple(range(n)))
        for i in range(n):
            self.transport.send(reconfig.hmm_dest(i), wire.LoadPlan(
                model_dir=str(self.model_dir), dtype=self.config.dtype, expert_ids=list(placement.experts_on(i)),
                kv_cache_bytes=self._kv_cache_bytes(), block_size=self.config.block_size))
        hmm_ready = self._recv_until(wire.HMMReady, n, deadline, warm, stats)
        facts = self._facts(hmm_ready[0])
        fits = sum(c > 1 for c in reconfig.copies_for(facts, n))
        if len(placement.redundant_experts) > fits:  # the estimate left out the page padding
            logger.warning("start-up: %d experts have a second copy, but at their %d B as loaded the budget fits %d; "
                           "the next scale or recovery drops the excess", len(placement.redundant_experts),
                           facts.expert_bytes, fits)
        config_id = 1
        for i in range(n):
            self.transport.send(reconfig.hmm_dest(i), reconfig.start_message(facts, config_id, i, n, owner))
        self.executors = self._recv_until(wire.ExecutorReady, n, deadline, warm, stats)
        self.state = reconfig.initial(facts, config_id, n, placement, hmm_ready, frozenset(warm))
        self.router = routing.Router(self.transport.send, self._on_held, config_id, n, self.config.max_waiting)
        self._send_reserves()
        for s in stats.values():
            self.router.on_stats(s)
        self.transport.start()
        logger.info("instance ready: %d device(s), %d experts x %d copies placed contiguously (%d with more than "
                    "one), in %.1f s", n, self.spec.num_experts, placement.copies_per_expert,
                    len(placement.redundant_experts), time.monotonic() - started)
        self.prewarm()

    def _discover(self, deadline: float) -> tuple[dict[int, wire.HMMRejoin], dict[int, wire.HMMHello]]:
        """Start-up: the workers of a coordinator that died, as they connect -> (those holding
        memory, by device; those holding nothing). Returns once the ones holding memory make a
        whole configuration, or when none came: after a short window (local fleet) or once the
        first N workers have said hello holding nothing (external fleet). Raises when some came
        but never a whole configuration."""
        if not self._adopts:
            return {}, {}
        local = self._fleet_kind == "local"
        window_end = time.monotonic() + _REJOIN_WINDOW_S if local else deadline
        rejoins: dict[int, wire.HMMRejoin] = {}
        hellos: dict[int, wire.HMMHello] = {}
        complete_at = None
        while True:
            if rejoins and reconfig_rejoin.missing(rejoins) is None:
                # a moment more for the rest of the wave (workers holding nothing, or a half-done scale's)
                complete_at = complete_at or time.monotonic()
                if time.monotonic() - complete_at > _REJOIN_SETTLE_S:
                    return rejoins, hellos
            if not rejoins and not local and all(d in hellos for d in range(self._initial_devices)):
                return rejoins, hellos
            if time.monotonic() > window_end and complete_at is None:
                if rejoins:
                    raise RuntimeError(f"coordinator restart: {reconfig_rejoin.missing(rejoins)} on "
                                       f"{self.transport.address}; not adopting an incomplete configuration")
                if not local:
                    raise TimeoutError(f"start-up: {len(hellos)}/{self._initial_devices} workers registered "
                                       f"before the deadline")
                return rejoins, hellos
            received = self.transport.receive(100)
            if received is None:
                continue
            _, msg = received
            if isinstance(msg, (wire.HMMHello, wire.HMMRejoin, wire.Heartbeat)):
                self.members.seen(msg.device_index)
            if isinstance(msg, wire.HMMRejoin) and msg.config_id == 0:
                self._release_stray(msg)
            elif isinstance(msg, wire.HMMRejoin):
                if not rejoins:
                    logger.info("coordinator restart: device %d rejoined holding configuration %d; waiting for the "
                                "others", msg.device_index, msg.config_id)
                    window_end = max(window_end, time.monotonic() + _REJOIN_WINDOW_S) if local else window_end
                rejoins[msg.device_index] = msg
                hellos.pop(msg.device_index, None)
            elif isinstance(msg, wire.HMMHello) and msg.device_index not in rejoins:
                hellos[msg.device_index] = msg

    def _release_stray(self, msg: wire.HMMRejoin) -> None:
        """A worker holding memory that no configuration served from (its coordinator died while
        it loaded, or while a scale-up was filling it): nothing can use that memory; it exits
        (a pod's is then replaced by the operator)."""
        d = msg.device_index
        logger.warning("coordinator restart: device %d holds memory of no configuration that served (its coordinator "
                       "died while it loaded or joined a scale); telling it to exit", d)
        if isinstance(self.members.fleet, fleet_mod.LocalFleet):
            # NOTE: by pid, not by message or fleet: a fresh worker of ours may hold that device index already
            try:
                procutil.AdoptedProcess(msg.pid).terminate()
            except ProcessLookupError:
                pass
            return
        self.transport.send(reconfig.hmm_dest(d), wire.Shutdown(reason="its memory belongs to no configuration"))
        self.members.remove([d])

    def _adopt(self, rejoins: dict[int, wire.HMMRejoin], hellos: dict[int, wire.HMMHello], started: float,
               deadline: float) -> None:
        """Serve on the memory of the workers a coordinator that died left behind: learn the
        configuration from what they hold, start fresh executors on it (new configuration id:
        the old executors' identities and rendezvous keys are never reused)."""
        started_at = now_rfc3339()
        discovered = time.monotonic()
        first = rejoins[min(rejoins)]
        from_checkpoint = self.config_json if self.spec is not None else None
        if self.spec is None:
            self._set_model(first.config_json, first.tokenizer_files, load_tokenizer=False)
        try:
            adoption = reconfig_rejoin.adopt(rejoins, num_experts=self.spec.num_experts,
                                             expert_copies=self.expert_copies, model_config_json=from_checkpoint,
                                             redundant_budget_bytes=self.redundant_expert_bytes)
        except reconfig_rejoin.Refused as exc:
            raise RuntimeError(f"coordinator restart: cannot adopt the workers that rejoined: {exc}") from None
        devices, n = adoption.devices, len(adoption.devices)
        if adoption.over_budget:
            logger.warning("coordinator restart: %s; adopted as it is, the next scale or recovery drops the excess",
                           adoption.over_budget)
        self.members.max_devices = self.max_devices
        if isinstance(self.members.fleet, fleet_mod.LocalFleet):
            for d, msg in [*rejoins.items(), *hellos.items()]:
                self.members.fleet.adopt(d, msg.pid)
        else:
            for d in [*rejoins, *hellos]:
                self.members.fleet.add(d)
        for d in [*rejoins, *hellos]:
            self.members.seen(d)
        warm = set(hellos) - set(devices)
        facts = self._facts(adoption.hmm_ready[devices[0]])
        config_id = adoption.next_config_id
        owner = reconfig.owner_list(adoption.placement, devices)
        for rank, d in enumerate(devices):
            self.transport.send(reconfig.hmm_dest(d), reconfig.start_message(facts, config_id, rank, n, owner))
        if self.tokenizer is None:  # while the executors start
            self.tokenizer = engine_mod.tokenizer_from_files(self.tokenizer_files)
        stats: dict[int, wire.RankStats] = {}
        self.executors = self._recv_until(wire.ExecutorReady, n, deadline, warm, stats, config_id=config_id)
        self.state = reconfig.initial(facts, config_id, n, adoption.placement, adoption.hmm_ready, frozenset(warm),
                                      device_ids=devices)
        self.router = routing.Router(self.transport.send, self._on_held, config_id, n, self.config.max_waiting)
        self._send_reserves()
        for s in stats.values():
            self.router.on_stats(s)
        self.transport.start()
        now = time.monotonic()
        reason = (f"coordinator restart: adopted the memory of device(s) {list(devices)} (configuration "
                  f"{adoption.config_id}); nothing read from the checkpoint")
        record = admin.ScaleRecord(
            from_devices=n, to_devices=n, reason=reason, scale_id=f"restart-{config_id}", started_at=started_at,
            outcome=admin.Outcome.SUCCEEDED, duration_ms=round((now - started) * 1000),
            phases_ms={reconfig.WORKERS: round((discovered - started) * 1000),
                       reconfig.STANDBY: round((now - started) * 1000) - round((discovered - started) * 1000)})
        self._adopted_at = started
        logger.warning("%s; serving as configuration %d %.2f s after start-up began (%.2f s for the workers to "
                       "rejoin, %.2f s to start executors on their memory)", reason, config_id, now - started, discovered - started,
                       now - discovered)
        with self._lock:
            self._finished(record)

    def _make_fleet(self) -> fleet_mod.Fleet:
        """Bind the control channel and make the fleet whose workers dial it."""
        env = {transport.SECRET_ENV: self.worker_secret}
        if self._fleet_kind == "local":
            return fleet_mod.LocalFleet(self.transport.bind(), self.backend, env=env,
                                        cpu_per_device=self._cpu_per_device,
                                        heartbeat_timeout_s=self._heartbeat_timeout_s,
                                        orphan_timeout_s=self._orphan_timeout_s)
        if self._fleet_kind == "external":
            self.transport.bind()
            return fleet_mod.ExternalFleet(self._heartbeat_timeout_s)
        fleet = rayfleet.RayFleet(self.backend, env=env, options=self._ray_options)
        try:
            # NOTE: workers on other nodes reach this node at the address Ray knows it by.
            self.transport.bind_host = self.transport.bind_host or fleet.node_ip
            if self.transport.bind_host in ("0.0.0.0", "::", "*"):
                self.transport.advertise_host = self.transport.advertise_host or fleet.node_ip
            fleet.coordinator_address = self.transport.bind()
        except BaseException:
            fleet.close()
            raise
        return fleet

    def _send_reserves(self) -> None:
        """Each serving device's reserve for a scale-down (`--scale-down-reserve-mb`)."""
        for d, msg in reconfig.reserve_actions(self.state):
            self.transport.send(reconfig.hmm_dest(d), msg)

    def _facts(self, ready0: wire.HMMReady) -> reconfig.Facts:
        options = wire.EngineOptions(**{**dataclasses.asdict(self.config), "max_model_len": self.max_model_len})
        return reconfig.Facts(
            num_experts=self.spec.num_experts, replicated_bytes=ready0.replicated.size_bytes,
            replicated_layout=tuple(ready0.replicated_layout), expert_w13_bytes=ready0.experts[0].w13.size_bytes,
            expert_w2_bytes=ready0.experts[0].w2.size_bytes,
            moe_layers=tuple(sorted({r.layer for r in ready0.experts})), num_kv_blocks=ready0.num_kv_blocks,
            kv_bytes=ready0.kv.size_bytes, config_json=self.config_json,
            kv_view_block_bytes=tuple(memory.kv_block_bytes(self.spec, options.block_size,
                                                            registry.resolve_dtype(self.spec, options.dtype))), tokenizer_files=dict(self.tokenizer_files),
            engine=options, model_name=self.model_name, collective_timeout_s=self.collective_timeout_s,
            expert_copies=self.expert_copies, model_dir=str(self.model_dir),
            redundant_budget_bytes=self.redundant_expert_bytes,
            scale_down_reserve_bytes=self.scale_down_reserve_bytes)

    def _estimated_expert_bytes(self) -> int:
        """One routed expert over every MoE layer at the serving dtype, from the model's config:
        what the budget is divided by before any HMM says what it allocated (which adds page
        padding, so it can be a little more; `Facts.expert_bytes` is exact)."""
        spec = self.spec
        item = torch.empty((), dtype=registry.resolve_dtype(spec, self.config.dtype)).element_size()
        return 3 * spec.moe_intermediate_size * spec.hidden_size * item * spec.num_moe_layers

    def _recv_until(self, want: type, count: int, deadline: float, warm: set[int],
                    stats: dict[int, wire.RankStats], config_id: int = 1,
                    got: dict[int, wire.Msg] | None = None) -> dict[int, wire.Msg]:
        """Start-up only (before the I/O thread owns the channel): wait for `count` messages
        (`got`: those that came already). Messages about other configurations than `config_id`
        (a dead coordinator's, queued in its workers' sockets) are ignored."""
        got = dict(got or {})
        while len(got) < count:
            dead = self.members.new_deaths()
            if dead:
                reasons = "; ".join(f"device {d}: {self.members.death_reason(d, c)}" for d, c in sorted(dead.items()))
                raise RuntimeError(f"worker(s) lost during start-up: {reasons}; see their logs")
            if time.monotonic() > deadline:
                raise TimeoutError(f"start-up: {len(got)}/{count} {want.__name__} messages before the deadline")
            received = self.transport.receive(200)
            if received is None:
                continue
            _, msg = received
            if isinstance(msg, (wire.HMMHello, wire.Heartbeat)):
                self.members.seen(msg.device_index)
            if isinstance(msg, wire.HMMRejoin) and msg.config_id == 0:
                self._release_stray(msg)
            if isinstance(msg, (wire.HMMFailed, wire.ExecutorFailed, wire.ExecutorReady, wire.RankStats)) \
                    and msg.config_id not in (0, config_id):
                logger.debug("start-up: ignored %s of configuration %d", type(msg).__name__, msg.config_id)
                continue
            if isinstance(msg, (wire.HMMFailed, wire.ExecutorFailed)):
                raise RuntimeError(f"start-up failed: {msg.error}")
            if isinstance(msg, want):
                key = msg.device_index if hasattr(msg, "device_index") else msg.rank
                if key < count:
                    got[key] = msg
                elif isinstance(msg, wire.HMMHello):
                    warm.add(key)  # a worker beyond the first N (a pod created early)
            elif isinstance(msg, wire.RankStats):
                stats[msg.rank] = msg
        return got

    def _kv_cache_bytes(self) -> int:
        if self.config.num_kv_blocks is None:
            return self.config.kv_cache_bytes
        dtype = registry.resolve_dtype(self.spec, self.config.dtype)
        per_block = kv_cache.KVCachePool.bytes_per_block(
            self.spec.num_layers, self.spec.num_kv_heads, self.spec.qk_head_dim, self.spec.v_head_dim,
            self.config.block_size, dtype)
        return self.config.num_kv_blocks * per_block

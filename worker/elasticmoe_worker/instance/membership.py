"""Membership: which workers exist, which are alive, and the warm pool.

Why it exists: a fleet (`fleet.LocalFleet` for child processes, `fleet.ExternalFleet` for pods,
`rayfleet.RayFleet` for Ray actors) only starts and stops workers by device index; this module
turns what the coordinator hears (hellos, heartbeats) and what the fleet sees (exit codes,
silence, ended actors) into facts for the reconfiguration: each death is reported once, removals
never block the control loop, and the warm pool (workers started ahead of a scale-up, holding
no memory) is kept at its size.

Not guaranteed: a worker cut off from the coordinator for longer than the heartbeat timeout is
declared dead even if it still runs (pods); it is then never used again by this instance.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from elasticmoe_worker.contract import wire
from elasticmoe_worker.instance import fleet as fleet_mod
from elasticmoe_worker.instance import peer_copy

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Heard:
    """What a device's HMM last said of itself in its hellos and heartbeats (the I/O thread writes,
    a scale's caller reads: single assignments)."""

    spare_ready: bool = False  # its spare executor had finished importing (heartbeat)
    informed: bool = False  # it holds this model's tokenizer files, by digest (heartbeat; a new process's hello: no)
    locality: tuple[str, str] | None = None  # (locality key, mailbox address: "" none); None: unknown (an older HMM)


class Membership:
    def __init__(self, fleet: fleet_mod.Fleet, warm_workers: int,
                 max_devices: int) -> None:
        self.fleet = fleet
        self.warm_workers = warm_workers
        self.max_devices = max_devices
        self._reported: set[int] = set()
        self.heard: dict[int, Heard] = {}  # device -> what its HMM last said of itself
        self._lock = threading.Lock()
        self._adding = threading.Lock()
        self._closed = False

    @property
    def starts_workers(self) -> bool:
        return self.fleet.starts_workers

    def seen(self, device: int) -> None:
        self.fleet.seen(device)

    def registered(self, device: int) -> None:
        """A worker said hello. Only one that holds nothing yet does (one on its way out sends
        heartbeats only), so with pods it is a new worker even under the id of one that died or
        was released: the operator replaces a lost device's pod under the same index, and that
        worker's heartbeats and death must count again."""
        if not self.fleet.starts_workers:
            with self._lock:
                self._reported.discard(device)
            self.fleet.add(device)
        self.fleet.seen(device)

    def heartbeat(self, msg: wire.Heartbeat, tokenizer_digest: str) -> None:
        """A worker is alive, and what it says of itself (`tokenizer_digest`: the model's, "" unknown)."""
        self.fleet.seen(msg.device_index)
        heard = self.heard.setdefault(msg.device_index, Heard())
        heard.spare_ready = msg.spare_ready
        heard.informed = bool(tokenizer_digest) and msg.tokenizer_digest == tokenizer_digest
        heard.locality = _locality(msg)

    def hello(self, msg: wire.HMMHello) -> None:
        """A worker said hello (`registered`), and what it says of itself."""
        self.registered(msg.device_index)
        heard = self.heard.setdefault(msg.device_index, Heard())
        if not msg.knows_model:  # (a new process; the same one says hello each second until it holds memory)
            heard.informed = False
        heard.locality = _locality(msg)

    def spares_ready(self, devices) -> frozenset[int]:
        """Of `devices`, those whose spare executor had finished importing at their last heartbeat."""
        return frozenset(d for d in devices if d in self.heard and self.heard[d].spare_ready)

    def informed(self, devices) -> frozenset[int]:
        """Of `devices`, those whose HMM holds the model's tokenizer files (its last heartbeat said so)."""
        return frozenset(d for d in devices if d in self.heard and self.heard[d].informed)

    def on_this_host(self, device: int) -> bool:
        """Whether a device's HMM runs on this process's host (its locality key names this boot)."""
        heard = self.locality(device)
        return heard is not None and peer_copy.same_host(heard[0])

    def locality(self, device: int) -> tuple[str, str] | None:
        """(locality key, mailbox address) of a device's HMM; None: not known."""
        heard = self.heard.get(device)
        return heard.locality if heard is not None else None

    def add(self, devices) -> None:
        """Start these devices' workers (idempotent per device). Starts from different threads
        (a scale's on the control loop, the warm pool's refill on its own) take turns; after
        `stop_adding` none starts."""
        for d in devices:
            with self._adding:
                if self._closed:
                    logger.info("device %d: its worker is not started: the instance is stopping", d)
                    return
                with self._lock:
                    self._reported.discard(d)
                self.fleet.add(d)

    def stop_adding(self) -> None:
        """Start no worker from now on; returns once a start under way has ended (its worker is
        then in the fleet, for the caller to stop)."""
        self._closed = True  # (before the lock: a caller starting several must not take it back first)
        with self._adding:
            pass

    def remove(self, devices) -> None:
        """Stop these workers; never blocks (processes are reaped in the background), and the
        device indices are free for new workers at once."""
        for d in devices:
            self.fleet.remove(d, wait=False)

    def new_deaths(self) -> dict[int, int]:
        """Device -> exit code (-1: none known) of workers that died since the last call."""
        with self._lock:
            dead = {d: c for d, c in self.fleet.dead().items() if d not in self._reported}
            self._reported |= set(dead)
        return dead

    def death_reason(self, device: int, code: int) -> str:
        return self.fleet.death_reason(device, code)

    def pool_changes(self, active: set[int], warm: set[int], busy: set[int]) -> tuple[list[int], list[int]]:
        """-> (devices to start, warm devices to stop) so that `warm_workers` idle workers stand
        on the lowest unused ids (those a scale-up adds next, `planner.resize`, after any warm one
        whose spare is ready). Only a fleet
        that starts workers keeps a pool: with pods, the operator decides which exist. `busy`:
        devices a scale in progress uses."""
        if not self.fleet.starts_workers:
            return [], []
        unused = [d for d in range(self.max_devices) if d not in active]
        want = set(unused[:self.warm_workers])
        start = sorted(d for d in want if d not in self.fleet.workers)
        stop = sorted(d for d in self.fleet.workers if d not in active and d not in want and d not in busy)
        return start, stop


def _locality(msg: wire.Heartbeat | wire.HMMHello) -> tuple[str, str] | None:
    """An HMM's locality key and mailbox address; None from an older HMM, which says no key."""
    return None if msg.locality is None else (msg.locality, msg.mailbox)

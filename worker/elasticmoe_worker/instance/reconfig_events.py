"""The vocabulary of `reconfig.step`: the events it takes and the actions it returns.

Why it is apart: `reconfig` holds the decisions; these are plain frozen records that the
coordinator builds from messages and clock ticks (events) and executes (actions). Pure: no
I/O, no clock, no threads (a test enforces it). `reconfig` re-exports every name, so callers
write `reconfig.ScaleRequested`, `reconfig.Send`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Union

from elasticmoe_worker.contract import admin, wire


# -- events ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScaleRequested:
    target: int
    scale_id: str
    reason: str
    timeout_s: float
    started_at: str  # RFC 3339 wall clock, for the record
    now: float
    # warm devices whose spare executor is ready: a scale-up adds them before other unused ids
    # (a warm worker restarted a moment ago still imports: ~12 s at 0.225 cores)
    ready: frozenset[int] = frozenset()
    # devices whose HMM said it holds the model's tokenizer files: a transition sends them none
    informed: frozenset[int] = frozenset()


@dataclasses.dataclass(frozen=True)
class WorkerRegistered:
    device: int
    now: float = 0.0


@dataclasses.dataclass(frozen=True)
class WorkerDied:
    device: int
    detail: str
    now: float = 0.0


@dataclasses.dataclass(frozen=True)
class TransferReady:
    msg: wire.TransitionReady
    now: float = 0.0
    # from the HMM's send to this event; -1: unknown (`TransferProfile.delivery_ms`): where the HMM is on
    # another host, whose clock is not the coordinator's (then its `told_seconds` is not read either)
    delivery_s: float = -1.0


@dataclasses.dataclass(frozen=True)
class HMMFailed:
    device: int
    config_id: int  # 0: not about a transition (the device's memory is gone)
    error: str
    now: float = 0.0


@dataclasses.dataclass(frozen=True)
class ExecutorReady:
    rank: int
    config_id: int
    now: float = 0.0


@dataclasses.dataclass(frozen=True)
class ExecutorFailed:
    rank: int
    config_id: int
    error: str
    now: float = 0.0


@dataclasses.dataclass(frozen=True)
class HandedOver:
    rank: int
    config_id: int
    requests: tuple[wire.SequenceState, ...]
    now: float = 0.0


@dataclasses.dataclass(frozen=True)
class KVMoved:
    msg: wire.KVMoved
    now: float = 0.0


@dataclasses.dataclass(frozen=True)
class RequestArrived:
    """A request reached the coordinator while admission is paused (the shell holds it)."""

    request_id: str
    now: float = 0.0


@dataclasses.dataclass(frozen=True)
class ExpertLoadReported:
    """An executor's routed-token counts per expert since its previous report (a delta)."""

    tokens: tuple[int, ...]
    now: float = 0.0


@dataclasses.dataclass(frozen=True)
class Tick:
    now: float


@dataclasses.dataclass(frozen=True)
class AbortRequested:
    reason: str
    now: float = 0.0


Event = Union[ScaleRequested, WorkerRegistered, WorkerDied, TransferReady, HMMFailed, ExecutorReady,
              ExecutorFailed, HandedOver, KVMoved, RequestArrived, ExpertLoadReported, Tick, AbortRequested]


# -- actions --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Send:
    dest: str  # "hmm-<device>" or "exec-<config>-<rank>"
    msg: wire.Msg


@dataclasses.dataclass(frozen=True)
class AddWorkers:
    devices: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class RemoveWorkers:
    devices: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PauseAdmission:
    """New requests wait (the shell reports them as RequestArrived) until Commit."""


@dataclasses.dataclass(frozen=True)
class Commit:
    """The new configuration serves: requests in `ranks` now live on those ranks of
    `config_id`; admission resumes."""

    config_id: int
    num_devices: int
    ranks: Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class Release:
    """Route these held requests now, to the configuration that serves."""

    request_ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rebind:
    """Requests handed over late (after the commit) now live on these ranks."""

    ranks: Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class FailRequests:
    """End with `error` every request in flight on these ranks of `config_id` (all when ranks is None)."""

    config_id: int
    ranks: tuple[int, ...] | None
    error: str


@dataclasses.dataclass(frozen=True)
class SetHealth:
    error: str | None  # None: healthy again


@dataclasses.dataclass(frozen=True)
class Recovering:
    """Fresh executors for the same devices start as `config_id`: route to them from now on."""

    config_id: int


@dataclasses.dataclass(frozen=True)
class Suspend:
    """The serving configuration's executors are broken: admission pauses (new requests wait,
    reported as RequestArrived) and every request in flight waits to be recomputed."""

    config_id: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Resume:
    """Recompute every suspended request (prompt + the tokens its client already has) on the
    configuration that serves now, and admit again."""


@dataclasses.dataclass(frozen=True)
class Finished:
    record: admin.ScaleRecord
    config_id: int = 0  # the configuration the scale was to make (its store keys can go)


Action = Union[Send, AddWorkers, RemoveWorkers, PauseAdmission, Commit, Release, Rebind, FailRequests, SetHealth,
               Recovering, Suspend, Resume, Finished]

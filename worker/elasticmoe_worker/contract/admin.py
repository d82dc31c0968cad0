"""The admin API as typed models: what `GET /admin/status` returns and `POST /admin/scale` takes.

Why it exists: three parties read and write these bodies (the coordinator's HTTP server, the
operator, `elasticmoe scale`), and the operator copies scale records into the custom resource's
status. One definition, decoded strictly on every side, keeps them from drifting apart. JSON
field names are camelCase (Kubernetes API conventions); Python names are snake_case.

A `ScaleRecord` has the same JSON shape as the custom resource's `status.lastScale` entries
(`elasticmoe_operator.api.ScaleRecord` mirrors it for the CRD schema; a test keeps both equal).

Imports only msgspec and the standard library: no torch, no worker internals.
"""

from __future__ import annotations

import enum

import msgspec


class Phase(str, enum.Enum):
    """Where the instance stands."""

    STARTING = "Starting"
    SERVING = "Serving"
    SCALING = "Scaling"
    DEGRADED = "Degraded"


class Outcome(str, enum.Enum):
    """How a scale ended (or that it has not yet)."""

    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    ABORTED = "Aborted"  # gave up before the switch: the old configuration kept serving
    FAILED = "Failed"  # went wrong after the switch, or a bug: see the message


TERMINAL_OUTCOMES = (Outcome.SUCCEEDED, Outcome.ABORTED, Outcome.FAILED)


class _Body(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=False):
    pass


class ScaleRequest(_Body, kw_only=True, forbid_unknown_fields=True):
    """`POST /admin/scale`. `scale_id` is the caller's: the coordinator echoes it in the record,
    so a caller (the operator after a restart, say) finds its own scale among others."""

    devices: int
    reason: str = ""
    scale_id: str = ""
    wait: bool = False


class TransferProfile(_Body, kw_only=True):
    """One device's part of a scale's transfer phase, as its HMM measured it; whole milliseconds.
    `setup_ms + bytes_ms + peers_ms` is the device's whole transition (`total_ms`)."""

    device: int
    bytes_sent: int = 0
    bytes_received: int = 0
    total_ms: int = 0
    setup_ms: int = 0  # allocation, telling its standby, the transfer's set-up
    bytes_ms: int = 0  # moving bytes, its own copies and waiting for its peers' into it
    peers_ms: int = 0  # after its bytes: waiting until its peers were done with its regions
    hmm_cpu_ms: int = 0  # the HMM's CPU in all of it
    throttled_ms: int = -1  # of which its CPU group waited at its quota; -1: unknown (no cgroup)
    # before it: from the coordinator sending `PrepareTransition` until the HMM took it up; after it:
    # from its HMM sending `TransitionReady` until the coordinator handled it (under the instance's
    # lock). -1: unknown (an HMM on another host, whose clock is not the coordinator's)
    told_ms: int = -1
    delivery_ms: int = -1


class ScaleRecord(_Body, kw_only=True):
    """One scale and what came of it; durations in whole milliseconds."""

    from_devices: int = msgspec.field(name="from")
    to_devices: int = msgspec.field(name="to")
    reason: str = ""
    scale_id: str = ""
    started_at: str = ""  # RFC 3339, UTC
    outcome: Outcome = Outcome.RUNNING
    message: str = ""
    duration_ms: int = 0
    phases_ms: dict[str, int] = {}
    bytes_transferred: int = 0
    transfer_data_ms: int = 0  # of the transfer phase: moving bytes (the rest: allocation, group set-up)
    transfer_devices: list[TransferProfile] = []  # each device's part of the transfer phase, by device
    # how the bytes moved, over all devices: "shared memory" (devices of one host), the collective
    # backend ("gloo", "nccl", "hccl"), both joined by " + ", or "" (nothing moved)
    transport: str = ""
    requests_handed_over: int = 0
    # of a recovery from a lost device: prompt + output tokens of its suspended requests; of a scale: the
    # tokens the departing devices' sequences had in their KV caches, computed again on their adopters
    tokens_recomputed: int = 0
    # of a scale-down: sequences of departing devices whose KV blocks moved peer to peer to their adopters
    # (no recomputation), the bytes that took, and why the others' did not ("" when nothing fell back)
    sequences_kv_moved: int = 0
    kv_bytes_moved: int = 0
    kv_fallback: str = ""


class ExpertCopies(_Body, kw_only=True):
    """Where the routed experts live and what redundancy costs (`--expert-copies`,
    `--redundant-expert-mb`). Fields after `per_device` are absent from older coordinators
    (read as their defaults)."""

    wanted: int  # copies of each expert asked for
    copies_per_expert: int  # the most any expert holds now (fewer than wanted on fewer devices)
    bytes_per_copy: int  # one expert, every MoE layer
    redundant_bytes: int  # memory of the copies beyond the first, over all devices
    per_device: dict[str, int] = {}  # device id -> experts it holds (computed + redundant)
    min_copies: int = 0  # the fewest any expert holds now (< copies_per_expert: only some have a second)
    redundant_experts: list[int] = []  # the experts that hold more than one copy now, ascending
    # redundancy budget per device (`--redundant-expert-mb`, in bytes); None: no limit
    budget_bytes_per_device: int | None = None
    # why fewer experts than all have `wanted` copies ("" when all do): one device, or the budget
    limited_by: str = ""
    # how the experts with a second copy were chosen: the most routed tokens, or (before any were
    # counted) the lowest ids
    chosen_by: str = ""
    routed_tokens: list[int] = []  # tokens routed to each expert so far, every MoE layer ([] before any)
    # the same, each token counting half after hotness_half_life_s: what picks the hottest experts
    hotness: list[float] = []
    hotness_half_life_s: float = 600.0


class DeviceCounts(_Body, kw_only=True):
    desired: int
    active: int
    warming: int = 0
    registered: list[int] = []  # workers up and registered (serving or idle): what the operator waits for
    # The device ids of the serving configuration, ascending (rank r on active_ids[r]). Not always
    # 0..active-1: a recovery drops the lost device's id, and a scale-up then takes the lowest unused
    # ids first. [] from a coordinator that predates the field (read as 0..active-1).
    active_ids: list[int] = []


class Parallelism(_Body, kw_only=True):
    dp: int
    ep: int
    tp: int = 1


class RequestCounts(_Body, kw_only=True):
    running: int = 0
    waiting: int = 0


class KVBlocks(_Body, kw_only=True):
    used: int = 0
    total: int = 0


class AutoscalerDecision(_Body, kw_only=True):
    """One decision of `serve --autoscale`'s policy, with the signal values it came from."""

    time: str  # RFC 3339, UTC
    action: str  # up | down | hold
    target: int
    reason: str
    values: dict[str, float] = {}  # e.g. ttftRatio, tpotRatio, signal, rawSignal, active, requestsPerS
    scale_id: str = ""  # the scale this decision started, if it started one


class AutoscalerStatus(_Body, kw_only=True):
    """What the in-process autoscaler (`serve --autoscale`) last decided and why."""

    mode: str = "Slo"  # the only mode of the in-process autoscaler (the operator's names)
    min_devices: int
    max_devices: int
    evaluations: int = 0
    action: str = ""  # of the last decision: up | down | hold ("" before the first)
    target: int | None = None
    reason: str = ""
    signal: float | None = None  # smoothed SLO signal: max of p90 latency / target; 1.0 = at the SLO
    metrics_available: bool = False
    metrics_reason: str = ""  # why not, or "ok"
    # The last 10 decisions that changed something or said something new (scale-ups and -downs,
    # and holds whose reason differs from the previous one's but for its numbers), oldest first.
    history: list[AutoscalerDecision] = []


class AdminStatus(_Body, kw_only=True):
    phase: Phase
    healthy: bool
    error: str | None = None
    configuration: int = 0
    devices: DeviceCounts
    parallelism: Parallelism
    requests: RequestCounts = msgspec.field(default_factory=RequestCounts)
    kv_blocks: KVBlocks = msgspec.field(default_factory=KVBlocks)
    scaling: bool = False  # whether this server can scale at all (a multi-device instance)
    current_scale: ScaleRecord | None = None
    last_scale: ScaleRecord | None = None
    history: list[ScaleRecord] = []
    autoscaler: AutoscalerStatus | None = None  # only while `serve --autoscale` runs
    experts: ExpertCopies | None = None  # a multi-device instance's expert placement

    def find_scale(self, scale_id: str) -> ScaleRecord | None:
        """The record of the scale the caller started with `scale_id` (running or ended)."""
        if not scale_id:
            return None
        for rec in [self.current_scale, self.last_scale, *reversed(self.history)]:
            if rec is not None and rec.scale_id == scale_id:
                return rec
        return None


class ScalingCounters(msgspec.Struct, kw_only=True):
    """Cumulative scaling figures since the instance started, for `/metrics`."""

    devices: DeviceCounts
    scales_by_outcome: dict[str, int]  # Outcome value (terminal ones) -> count
    phase_seconds: list[tuple[str, float]]  # (phase, seconds) of every finished scale, in order
    requests_handed_over: int


def encode(body: msgspec.Struct) -> bytes:
    return msgspec.json.encode(body)


def decode_status(data: bytes | str) -> AdminStatus:
    """Strict: a missing or mistyped field raises `msgspec.ValidationError` naming its path."""
    return msgspec.json.decode(data, type=AdminStatus)


def decode_scale_request(data: bytes | str) -> ScaleRequest:
    return msgspec.json.decode(data, type=ScaleRequest)


def to_builtins(body: msgspec.Struct) -> dict:
    """JSON-ready dict (enums as strings, camelCase names)."""
    return msgspec.to_builtins(body)

"""Typed control messages between the coordinator, HMMs and executors.

Every message is a msgspec Struct tagged with its class name and travels as msgpack over
ZeroMQ (coordinator <-> HMM/executor) or a pipe (HMM -> its executor). Nothing here
imports torch: the operator and the coordinator's routing code can use it as is.
"""

from __future__ import annotations

import msgspec

from elasticmoe_worker.backends import base as backends_base


class Msg(msgspec.Struct, tag=True, kw_only=True):
    pass


# -- HMM <-> coordinator ---------------------------------------------------------------
class HMMHello(Msg):
    device_index: int
    pid: int
    token: str = ""  # the shared admin token: a coordinator with one ignores workers without it


class Heartbeat(Msg):
    """Sent by every HMM each second from a socket of its own: how a fleet of pods (not child
    processes) notices a dead worker."""
    device_index: int
    loaded: bool  # holds model memory (of some configuration) already
    token: str = ""


class LoadPlan(Msg):
    """What one device holds: the replicated tensors plus these routed experts."""

    model_dir: str
    dtype: str
    expert_ids: list[int]
    kv_cache_bytes: int
    block_size: int


class TensorSlot(msgspec.Struct, frozen=True):
    """Where one tensor lives inside a shared region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset_bytes: int


class ExpertRegion(msgspec.Struct, frozen=True):
    layer: int
    expert_id: int
    w13: backends_base.MemoryHandle
    w2: backends_base.MemoryHandle


class HMMReady(Msg):
    device_index: int
    replicated: backends_base.MemoryHandle
    replicated_layout: list[TensorSlot]
    experts: list[ExpertRegion]
    kv: backends_base.MemoryHandle
    num_kv_blocks: int
    bytes_read_from_checkpoint: int
    load_seconds: float


class StartExecutor(Msg):
    """Coordinator -> HMM: start an executor for configuration `config_id`."""

    config_id: int
    rank: int
    world_size: int
    store_host: str
    store_port: int
    expert_owner: list[int]  # global expert id -> rank that computes it
    engine: dict  # EngineConfig fields (plain values)
    model_name: str
    collective_timeout_s: float
    replace: bool = True  # stop this device's other executors first (False: a standby beside them)


class Transfer(msgspec.Struct, frozen=True):
    """One point-to-point copy between HMMs during a transition.

    kind "replicated": bytes [offset, offset+size) of the replicated region;
    kind "expert": the whole w13 and w2 regions of `expert_id` in every MoE layer.
    """

    kind: str
    src: int  # device index
    dst: int
    offset_bytes: int = 0
    size_bytes: int = 0
    expert_id: int = -1


class PrepareTransition(Msg):
    """Coordinator -> every HMM taking part: get ready for configuration `config_id`.

    New devices allocate their memory by the layout of the live ones and receive everything
    from peers (they never open the checkpoint); live devices send what the plan says and
    receive the experts they gain. The old executors keep serving meanwhile.
    """

    config_id: int
    rank: int  # this device's rank in the transfer group
    group_ranks: list[int]  # device index of each transfer-group rank
    store_host: str
    store_port: int
    expert_ids: list[int]  # what this device holds in the new configuration
    transfers: list[Transfer]
    replicated_layout: list[TensorSlot]
    replicated_bytes: int
    expert_w13_bytes: int
    expert_w2_bytes: int
    moe_layers: list[int]
    num_kv_blocks: int
    kv_bytes: int
    config_json: str  # new devices read nothing from the checkpoint directory
    tokenizer_files: dict[str, str]
    timeout_s: float


class TransitionReady(Msg):
    """HMM -> coordinator: transfers done; the handles for the new configuration."""

    device_index: int
    config_id: int
    ready: HMMReady
    transfer_seconds: float
    bytes_received: int
    bytes_sent: int
    data_seconds: float = 0.0  # of transfer_seconds, the time spent moving bytes


class CommitTransition(Msg):
    """Coordinator -> HMM: the switch happened; free what the new configuration dropped."""

    config_id: int


class AbortTransition(Msg):
    config_id: int
    reason: str


class PauseForSwitch(Msg):
    """Coordinator -> old executors: stop after the current step and hand over."""

    config_id: int


class Handover(Msg):
    rank: int
    config_id: int
    requests: list[dict]  # LLMEngine.export_requests()


class Adopt(Msg):
    requests: list[dict]
    keep_kv: bool


class Adopted(Msg):
    rank: int
    config_id: int
    num_requests: int


class HMMFailed(Msg):
    device_index: int
    error: str
    config_id: int = 0  # the transition that failed, 0 when not about one


# -- HMM -> executor (over the executor's stdin) ----------------------------------------
class ExecutorSpec(Msg):
    device_index: int
    backend: str
    coordinator: str  # ZeroMQ address
    config_json: str
    tokenizer_files: dict[str, str]  # file name -> content; the executor reads no checkpoint file
    model_name: str
    ready: HMMReady
    start: StartExecutor


# -- executor <-> coordinator ----------------------------------------------------------
class ExecutorReady(Msg):
    rank: int
    config_id: int
    pid: int
    attach_seconds: float  # mapping the HMM's regions (expert pages) into this process
    bytes_read_from_checkpoint: int
    startup_seconds: float
    weight_bytes: int  # bytes of weights this executor sees (all views, every page read once)
    attach_private_bytes: int  # growth of its private memory (USS) from attaching and reading them


class AddRequest(Msg):
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    ignore_eos: bool


class AbortRequest(Msg):
    request_id: str


class Output(Msg):
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None


class RankStats(Msg):
    rank: int
    config_id: int
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions_total: int


class ExecutorFailed(Msg):
    rank: int
    error: str
    config_id: int = 0


class Shutdown(Msg):
    reason: str = ""


ANY = HMMHello | Heartbeat | LoadPlan | HMMReady | StartExecutor | HMMFailed | ExecutorSpec | ExecutorReady | AddRequest \
    | AbortRequest | Output | RankStats | ExecutorFailed | Shutdown | PrepareTransition | TransitionReady \
    | CommitTransition | AbortTransition | PauseForSwitch | Handover | Adopt | Adopted

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ANY)


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Msg:
    return _decoder.decode(data)

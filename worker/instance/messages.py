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


class HMMFailed(Msg):
    device_index: int
    error: str


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


ANY = HMMHello | LoadPlan | HMMReady | StartExecutor | HMMFailed | ExecutorSpec | ExecutorReady | AddRequest \
    | AbortRequest | Output | RankStats | ExecutorFailed | Shutdown

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ANY)


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Msg:
    return _decoder.decode(data)

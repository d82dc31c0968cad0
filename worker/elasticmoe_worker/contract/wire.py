"""The control-channel messages between the coordinator, HMMs and executors, and the
memory handles and sequence state they carry.

Every message is a msgspec Struct tagged with its class name and travels as msgpack over
the authenticated ZeroMQ channel (`instance.transport`) or a pipe (HMM -> its executor).
Handover state is typed (`SequenceState`), engine options too (`EngineOptions`): nothing on
the wire is a free-form dict.

Imports only msgspec and the standard library (a test checks it): the operator and pure
modules use it without loading torch. `decode` raises `msgspec.DecodeError` (or
`ValidationError`) on any malformed frame; callers drop such frames, they never crash on them.
"""

from __future__ import annotations

import enum

import msgspec


class MemoryHandle(msgspec.Struct, frozen=True):
    """What another process needs to attach a region. Plain data; crosses processes as msgpack."""

    backend: str  # "cpu" | "cuda" | "ascend"
    name: str  # human-readable, e.g. "layer3.expert17.w13"
    size_bytes: int
    owner_pid: int
    fd: int = -1  # cpu: memfd number in the owner; cuda: the exported POSIX fd in the owner
    ipc: bytes = b""  # ascend: the 8-byte shareable handle; unused elsewhere
    device_index: int = 0
    # cpu, cuda: the owner's abstract Unix socket that sends the fd (SCM_RIGHTS), and the
    # region's random token it asks for (see backends.fdpass)
    fd_socket: str = ""
    fd_token: bytes = b""


class ErrorKind(str, enum.Enum):
    """Why an executor refused or ended a request: the HTTP layer maps each to one status."""

    INVALID_REQUEST = "invalid_request"  # the caller's input (400)
    OVERLOADED = "overloaded"  # the rank's queue is full (429)
    ENGINE = "engine"  # the engine failed while the request ran (503)


class EngineOptions(msgspec.Struct, kw_only=True):
    """`EngineConfig`'s fields as sent to an executor (max_model_len resolved)."""

    dtype: str
    block_size: int
    num_kv_blocks: int | None
    kv_cache_bytes: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int | None
    max_waiting: int
    seed: int


class SamplingOptions(msgspec.Struct, kw_only=True):
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    ignore_eos: bool


class SequenceState(msgspec.Struct, kw_only=True):
    """One running request handed from an old executor to a new one: where its KV blocks are
    (same pool, they stay in place) and how far it got."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_computed: int
    block_ids: list[int]
    params: SamplingOptions
    arrival_s: float
    emitted_chars: int
    emitted_tokens: int
    generator_state: list[int] | None = None  # a seeded request's own generator


class Msg(msgspec.Struct, tag=True, kw_only=True):
    pass


# -- HMM <-> coordinator ---------------------------------------------------------------
class HMMHello(Msg):
    device_index: int
    pid: int
    # it has the model's files (from its checkpoint, a scale or `ModelFiles`); absent from older HMMs
    knows_model: bool = False
    # `peer_copy.locality_key`: equal for two HMMs that can copy each other's regions, "" never;
    # None from older HMMs (unknown: a transition's HMMs then exchange their keys themselves)
    locality: str | None = None
    # the address of its peer mailbox (`mailbox.server().name`); "" if it has none (an older HMM, a
    # backend that never copies from peers): then a transition's HMMs talk through the store
    mailbox: str = ""


class ModelFiles(Msg):
    """Coordinator -> an HMM that said hello without knowing the model (a warm worker): the files
    its executors are given (config, tokenizer), so that its spare loads the tokenizer while it
    waits, not during the scale that takes it, and the memory to reserve meanwhile."""

    config_json: str
    tokenizer_files: dict[str, str]
    # bytes of each region a device joining the instance would receive into (its replicated region,
    # each expert's w13 and w2 per MoE layer): the worker reserves them while it waits (`reserve`)
    reserve_bytes: list[int] = []


class Heartbeat(Msg):
    """Sent by every HMM each second from a socket of its own: how a fleet of pods (not child
    processes) notices a dead worker."""
    device_index: int
    loaded: bool  # holds model memory (of some configuration) already
    # its spare executor has imported everything and waits for work (a standby started now costs
    # attach + group join, not imports); absent from older HMMs (read as False)
    spare_ready: bool = False
    locality: str | None = None  # as in HMMHello (a coordinator that restarts learns it here)
    mailbox: str = ""  # as in HMMHello
    # `engine.tokenizer_digest` of the tokenizer files it holds; "" while it holds none (and from
    # older HMMs): a warm worker that holds the instance's is sent none again by a transition
    tokenizer_digest: str = ""


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
    w13: MemoryHandle
    w2: MemoryHandle


class HMMReady(Msg):
    device_index: int
    replicated: MemoryHandle
    replicated_layout: list[TensorSlot]
    experts: list[ExpertRegion]
    kv: MemoryHandle
    num_kv_blocks: int
    bytes_read_from_checkpoint: int
    load_seconds: float


class StartExecutor(Msg):
    """Coordinator -> HMM: start an executor for configuration `config_id`."""

    config_id: int
    rank: int
    world_size: int
    expert_owner: list[int]  # global expert id -> rank that computes it
    engine: EngineOptions
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
    # Sent to a device that joins and has not said (`Heartbeat.tokenizer_digest`) it holds them;
    # {} to the others. 0.55 MB to encode, send and decode per device, on the busy bench machine,
    # delayed 4 -> 2's start of the transfer by 50-150 ms.
    tokenizer_files: dict[str, str]
    timeout_s: float
    # After a lost device: experts this device gains that no survivor holds. It reads them (only
    # them) from the checkpoint at model_dir, in dtype, into the regions it allocates for them.
    checkpoint_experts: list[int] = []
    model_dir: str = ""
    dtype: str = ""
    # The standby executor of this device in the new configuration, started as soon as the new
    # memory is allocated (before bytes move): it builds its model, engine and group meanwhile
    # and says ready only once the HMM has received every byte. None: started after the transfer.
    standby: StartExecutor | None = None
    # each rank's locality key (`HMMHello.locality`), when the coordinator knows every one: the HMMs
    # then start moving bytes without first exchanging them; None: they exchange them
    locality: list[str] | None = None
    # each rank's mailbox address (`HMMHello.mailbox`), when the coordinator knows every one: the HMMs
    # of one host tell each other what they copy straight (`mailbox`); None: through the store
    mailboxes: list[str] | None = None
    # the coordinator's wall clock (time.time()) as it sent this; 0: not said. The HMM reports how long
    # it took to arrive (`TransitionReady.told_seconds`)
    sent_at: float = 0.0


class TransitionReady(Msg):
    """HMM -> coordinator: transfers done; the handles for the new configuration."""

    device_index: int
    config_id: int
    ready: HMMReady
    transfer_seconds: float
    bytes_received: int
    bytes_sent: int
    data_seconds: float = 0.0  # of transfer_seconds, the time spent moving bytes
    transport: str = ""  # how: "shared memory", the collective backend ("gloo"), both joined by " + ", or ""
    setup_seconds: float = 0.0  # of transfer_seconds, before the bytes: allocation, the standby told, set-up
    cpu_seconds: float = 0.0  # the HMM process's CPU during the transition (every thread)
    throttled_seconds: float = -1.0  # its CPU group's throttled time during the transition; -1: unknown
    # from the coordinator sending `PrepareTransition` until this HMM took it up, by the HMM's clock
    # against the message's `sent_at`; -1: unknown (not said). Meaningful where both share a host
    told_seconds: float = -1.0
    # the HMM's wall clock (time.time()) as it sent this; 0: not said (an older HMM). The coordinator
    # takes its delivery (sent -> handled) from it when the HMM runs on its own host (one clock)
    sent_at: float = 0.0


class CommitTransition(Msg):
    """Coordinator -> HMM: the switch happened; free what the new configuration dropped."""

    config_id: int
    # True: a `Reserve` follows, saying what of the HMM's reserve to keep (its unused regions stay
    # until then); False (a coordinator that keeps no reserve on serving devices): free it all now
    keep_reserve: bool = False


class Reserve(Msg):
    """Coordinator -> a serving HMM: regions a scale-down would have it receive into (each
    expert's w13 and w2 per MoE layer, for as many experts as `--scale-down-reserve-mb` holds, at
    most those a scale to one device would bring it): it keeps them allocated and populated
    (`reserve`), so a scale-down copies into pages that exist. [] frees the reserve."""

    config_id: int
    reserve_bytes: list[int] = []


class AbortTransition(Msg):
    config_id: int
    reason: str


class PauseForSwitch(Msg):
    """Coordinator -> old executors: stop after the current step and hand over."""

    config_id: int


class Handover(Msg):
    rank: int
    config_id: int
    requests: list[SequenceState]  # LLMEngine.export_requests()


class Adopt(Msg):
    config_id: int  # the configuration whose executor adopts (stale ones are ignored)
    requests: list[SequenceState]
    keep_kv: bool


class KVCopy(msgspec.Struct, frozen=True):
    """KV blocks of sequences leaving device `src` for device `dst`: block `src_blocks[i]` of
    src's pool lands in block `dst_blocks[i]` of dst's (every layer, keys and values)."""

    src: int
    dst: int
    src_blocks: list[int]
    dst_blocks: list[int]


class MoveKV(Msg):
    """Coordinator -> each HMM taking part, during a switch's pause (the old executors handed
    over: their KV is final; the new ones have not adopted yet: the destination blocks are
    free): copy these blocks peer to peer, then answer `KVMoved`."""

    config_id: int  # the configuration that adopts the sequences
    rank: int  # this device's rank in the KV group
    group_ranks: list[int]  # device index of each rank
    copies: list[KVCopy]
    # bytes of one block in each view of a pool (per layer keys, then values; `memory.kv_block_bytes`):
    # with each pool's number of blocks, its layout, so the HMM need not parse the model's config
    view_block_bytes: list[int]
    timeout_s: float
    locality: list[str] | None = None  # as in PrepareTransition
    mailboxes: list[str] | None = None  # as in PrepareTransition


class KVMoved(Msg):
    """HMM -> coordinator: its part of `MoveKV` is over. An adopting device writes into its pool
    only before it sends this (and only when every byte arrived)."""

    device_index: int
    config_id: int
    ok: bool
    error: str = ""
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


class Adopted(Msg):
    rank: int
    config_id: int
    num_requests: int


class HMMFailed(Msg):
    device_index: int
    error: str
    config_id: int = 0  # the transition that failed, 0 when not about one


class HMMRejoin(Msg):
    """HMM -> a coordinator it connected to again while holding memory (the coordinator it
    served restarted): what it holds, so the new coordinator adopts it instead of reading the
    checkpoint. Its executors were stopped when the old coordinator went away."""

    device_index: int
    pid: int
    config_id: int  # the configuration whose memory it holds (its last committed or started one)
    last_config_id: int  # the highest configuration id it has seen (executor identities, rendezvous keys)
    rank: int  # its rank in config_id (devices ascending), -1 when it never started an executor of it
    world_size: int  # the devices of config_id, 0 when unknown
    expert_ids: list[int]
    ready: HMMReady  # its memory: layout and handles, for `expert_ids`
    config_json: str  # the model's config and tokenizer, kept in memory: the checkpoint may be gone
    tokenizer_files: dict[str, str]


# -- HMM -> executor (over the executor's stdin) ----------------------------------------
# Frames on an executor's stdin: a length (8 bytes, little-endian), then the message. A length with
# PRELOAD_FLAG holds an ExecutorPreload: the spare handles it and goes on waiting, still niced.
PRELOAD_FLAG = 1 << 63


class ExecutorPreload(Msg):
    """Before the spec, to a spare whose HMM knows the model already: what the spare loads while it
    waits for work (the tokenizer), so that a standby does not load it during a scale. A spec
    whose tokenizer files differ is served with its own."""

    tokenizer_files: dict[str, str]
    digest: str = ""  # `engine.tokenizer_digest` of the files ("": not given; the spec then carries its files)


class ExecutorSpec(Msg):
    device_index: int
    backend: str
    coordinator: str  # ZeroMQ address
    config_json: str
    # file name -> content; the executor reads no checkpoint file. Empty when its spare was
    # preloaded with files of `tokenizer_digest` (not sent twice: 0.55 MB for the small preset,
    # ~11 MB for Qwen3's, which a standby would decode on its critical path)
    tokenizer_files: dict[str, str]
    model_name: str
    ready: HMMReady
    start: StartExecutor
    host: str = ""  # the address its collectives listen on (its HMM's --host); empty: gloo's choice
    # a pre-initialised standby: its memory is still being received; it prepares everything and
    # says ready only when its HMM writes b"1" on its stdin after the spec (EOF: the scale ended)
    wait_for_weights: bool = False
    tokenizer_digest: str = ""  # `engine.tokenizer_digest` of the model's tokenizer files ("": not given)


# -- executor <-> coordinator ----------------------------------------------------------
class ExecutorReady(Msg):
    rank: int
    config_id: int
    pid: int
    attach_seconds: float  # mapping the HMM's regions (expert pages) into this process
    bytes_read_from_checkpoint: int
    startup_seconds: float
    weight_bytes: int  # bytes of weights this executor sees (all views, every page read once)
    attach_private_bytes: int  # growth of its anonymous resident memory (RssAnon) from attaching and reading them


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
    error_kind: ErrorKind | None = None
    error_param: str | None = None  # the request field at fault, for INVALID_REQUEST


class RankStats(Msg):
    rank: int
    config_id: int
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions_total: int
    # tokens computed again that were in some KV cache before (a request adopted without its KV, or preempted)
    num_recomputed_tokens_total: int = 0
    # Token copies this rank's routers sent to each expert (global id), over every MoE layer, since
    # the previous report that carried them; [] in the reports in between (sent about once a second).
    expert_tokens: list[int] = []


class ExecutorFailed(Msg):
    rank: int
    error: str
    config_id: int = 0


class Shutdown(Msg):
    reason: str = ""


# -- rendezvous (collectives' key-value store, served by the coordinator) ------------------
class StoreRequest(Msg):
    """A key-value operation of `instance.rendezvous.ChannelStore`. op: set | get | add |
    check | delete | compare_set | num_keys. `get` answers `found=False` at once when the key
    does not exist (the client polls), unless `wait`: then the answer comes once it exists (or
    never: the client gives up on its own deadline and asks again)."""

    op: str
    seq: int
    key: str = ""
    value: bytes = b""
    expected: bytes = b""
    amount: int = 0
    keys: list[str] = []
    wait: bool = False  # absent from older clients: they poll


class StoreReply(Msg):
    seq: int
    found: bool = True
    value: bytes = b""
    amount: int = 0


ANY = HMMHello | ModelFiles | HMMRejoin | Heartbeat | LoadPlan | HMMReady | StartExecutor | HMMFailed | ExecutorPreload \
    | ExecutorSpec | ExecutorReady | AddRequest | AbortRequest | Output | RankStats | ExecutorFailed | Shutdown | PrepareTransition | TransitionReady \
    | CommitTransition | Reserve | AbortTransition | PauseForSwitch | Handover | Adopt | Adopted | MoveKV | KVMoved \
    | StoreRequest | StoreReply

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ANY)


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Msg:
    return _decoder.decode(data)

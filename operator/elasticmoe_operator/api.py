"""The `ElasticMoE` custom resource (`elasticmoe.io/v1alpha1`) as typed models.

These models are the single source of truth: the CRD's OpenAPI schema is generated from
them (`python -m elasticmoe_operator.crd`), the operator parses every resource through
them, and the chart ships the generated CRD. Pure: no I/O, no clock, no kopf, no torch.

Scale records have the JSON shape of the coordinator's (`elasticmoe_worker.contract.admin`,
the one module of the worker the operator imports: msgspec and the standard library only) and
its outcome vocabulary; a test keeps the field names equal.

What this module does not do: cross-field rules are enforced twice on purpose — as CEL rules
in the CRD (the API server rejects the object) and by `parse_spec` here (an object that was
created before a rule existed, or on a server without CEL, still gets a Degraded condition
naming the field instead of a crash).
"""

from __future__ import annotations

import enum
from typing import Any, Optional

import pydantic
from pydantic import alias_generators

from elasticmoe_worker.contract import admin

GROUP = "elasticmoe.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ElasticMoE"
PLURAL = "elasticmoes"
SINGULAR = "elasticmoe"
SHORT_NAMES = ["emoe"]
CRD_NAME = f"{PLURAL}.{GROUP}"

HISTORY_LIMIT = 10


class ConditionType(str, enum.Enum):
    AVAILABLE = "Available"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"
    SCALING_ACTIVE = "ScalingActive"
    METRICS_AVAILABLE = "MetricsAvailable"


class Phase(str, enum.Enum):
    PENDING = "Pending"
    SERVING = "Serving"
    SCALING = "Scaling"
    DEGRADED = "Degraded"


class Backend(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"
    ASCEND = "ascend"


class DType(str, enum.Enum):
    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class AutoscalingMode(str, enum.Enum):
    DISABLED = "Disabled"  # the device count changes only through spec / the scale subresource
    SLO = "Slo"  # the operator's policy on Prometheus metrics
    EXTERNAL = "External"  # an HPA or KEDA writes the scale subresource


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(alias_generator=alias_generators.to_camel, populate_by_name=True,
                                       extra="forbid", use_enum_values=True)

    def dump(self) -> dict:
        """The Kubernetes (camelCase) form, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# Kubernetes objects we pass through to the pods (volumes, resources, env, tolerations):
# their schemas are Kubernetes' own, validated by the API server when the pod is created.
KubeObject = dict[str, Any]


class ModelSpec(_Model):
    source: str = pydantic.Field(
        "", max_length=4096,
        description="Checkpoint directory inside the containers (config.json, *.safetensors, tokenizer). "
                    "Empty: the embedded default model baked into the image.")
    served_name: str = pydantic.Field("", max_length=253, description="Model name in the OpenAI API. "
                                      "Empty: the directory name of source.")
    dtype: DType = pydantic.Field(DType.AUTO, description="Weight and compute dtype; auto keeps the checkpoint's.")
    volume: Optional[KubeObject] = pydantic.Field(
        None, description="A Kubernetes volume source (e.g. {persistentVolumeClaim: {claimName: models}}) "
                          "mounted read-only at mountPath in the coordinator and every worker.")
    mount_path: str = pydantic.Field("/models", max_length=4096, description="Where volume is mounted.")


class DevicesSpec(_Model):
    min: int = pydantic.Field(1, ge=1, le=1024, description="Fewest devices the instance may scale to.")
    max: int = pydantic.Field(4, ge=1, le=1024, description="Most devices the instance may scale to "
                              "(also at most one per routed expert of the model).")
    initial: int = pydantic.Field(1, ge=1, le=1024, description="Devices at creation.")
    replicas: Optional[int] = pydantic.Field(
        None, ge=1, le=1024,
        description="Desired device count, written by `kubectl scale`, an HPA, KEDA or the SLO autoscaler "
                    "through the scale subresource. Unset: initial.")
    step: int = pydantic.Field(1, ge=1, le=1024, description="Most devices added or removed by one scale; "
                               "larger changes go in several scales.")
    backend: Backend = pydantic.Field(Backend.CPU, description="Device kind: cpu, cuda (NVIDIA) or ascend (torch_npu).")
    resource: str = pydantic.Field(
        "", max_length=253, pattern=r"^$|^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        description="Extended resource each worker pod requests, e.g. nvidia.com/gpu or huawei.com/Ascend910; "
                    "empty for cpu.")
    per_worker: int = pydantic.Field(1, ge=1, le=1, description="Devices per worker pod (1 in v1alpha1: one "
                                     "HMM per device).")

    @property
    def desired(self) -> int:
        return self.replicas if self.replicas is not None else self.initial


class ParallelismSpec(_Model):
    tensor_parallel: int = pydantic.Field(1, ge=1, le=1, description="Tensor-parallel size inside one "
                                          "DP rank (1 in v1alpha1: attention is data-parallel, experts "
                                          "expert-parallel).")


class SloSpec(_Model):
    ttft_p90_ms: int = pydantic.Field(2000, ge=1, description="Target p90 time to first token, milliseconds.")
    tpot_p90_ms: int = pydantic.Field(100, ge=1, description="Target p90 time per output token, milliseconds.")
    queue_p90_ms: int = pydantic.Field(1000, ge=1, description="Target p90 time a request waits in the queue, "
                                       "milliseconds.")


class SecretKeyRef(_Model):
    name: str = pydantic.Field(min_length=1, max_length=253, description="A Secret in the ElasticMoE's namespace.")
    key: str = pydantic.Field("token", min_length=1, max_length=253, description="The key of the Secret holding "
                              "the value.")


class AutoscalingSpec(_Model):
    mode: AutoscalingMode = pydantic.Field(
        AutoscalingMode.DISABLED,
        description="Who writes spec.devices.replicas: Disabled (people, `kubectl scale`), Slo (the operator's "
                    "SLO policy on Prometheus metrics; nobody else should write it), External (an HPA or KEDA "
                    "through the scale subresource; the operator never writes it).")
    prometheus_url: str = pydantic.Field("", max_length=2048, description="Prometheus HTTP API base URL "
                                         "(mode Slo), e.g. http://prometheus-operated.monitoring.svc:9090.")
    prometheus_bearer_token_secret: Optional[SecretKeyRef] = pydantic.Field(
        None, description="Bearer token sent to the Prometheus HTTP API (mode Slo), read from this Secret; "
                          "unset: no Authorization header.")
    prometheus_selector: str = pydantic.Field(
        "", max_length=1024,
        description="PromQL label matchers selecting this instance's coordinator series, e.g. "
                    "'job=\"moe\",env=\"prod\"'. Empty: namespace=\"<namespace>\",elasticmoe_instance=\"<name>\", "
                    "the labels the chart's ServiceMonitor and alert rules use.")
    metrics_window_seconds: int = pydantic.Field(60, ge=2, le=3600, description="Window of the rates the p90 "
                                                 "latencies and the request rate are computed over; at least "
                                                 "four scrape intervals.")
    evaluation_interval_seconds: int = pydantic.Field(15, ge=1, le=3600, description="How often the Slo policy "
                                                      "evaluates; a firing SLO alert evaluates at once.")
    scale_up_cooldown_seconds: int = pydantic.Field(30, ge=0, le=86400, description="Least time between "
                                                    "two scale-ups.")
    scale_down_stabilization_seconds: int = pydantic.Field(300, ge=0, le=86400, description="How long load "
                                                           "must stay low before a scale-down, at most.")
    stabilization_ready_multiple: float = pydantic.Field(
        10.0, ge=0, le=1000, description="The scale-down stabilization window is this many times the measured "
        "time of a scale back up (n-1 -> n devices, from status.history), at least metricsWindowSeconds and at most "
        "scaleDownStabilizationSeconds: a device that comes back in seconds is not held idle for minutes. Before a "
        "scale-up was measured, 30 s is assumed. 0: always scaleDownStabilizationSeconds.")
    learn_tpot: bool = pydantic.Field(
        True, description="Learn the p90 time per output token seen at each device count and batch per device, "
        "and act on it: hold a TPOT breach that more devices were seen not to lower (ScaleUpWouldNotHelp), go to "
        "fewer devices that were seen to step faster (FewerDevicesFaster). false: TPOT is projected x devices/fewer.")


class PodSpec(_Model):
    image: str = pydantic.Field("", max_length=1024, description="Container image; empty: the operator's "
                                "default (its --image).")
    image_pull_policy: str = pydantic.Field("IfNotPresent", pattern=r"^(Always|IfNotPresent|Never)$",
                                            description="Always, IfNotPresent or Never.")
    resources: Optional[KubeObject] = pydantic.Field(None, description="Kubernetes ResourceRequirements of "
                                                     "the container (the device resource is added for workers).")
    env: list[KubeObject] = pydantic.Field(default_factory=list, description="Extra environment variables "
                                           "(Kubernetes EnvVar objects).")
    node_selector: dict[str, str] = pydantic.Field(default_factory=dict, description="Node labels the pod "
                                                   "must match (Kubernetes nodeSelector).")
    tolerations: list[KubeObject] = pydantic.Field(default_factory=list, description="Kubernetes Toleration "
                                                   "objects, e.g. for tainted accelerator nodes.")


class WorkerSpec(PodSpec):
    shm_size_mi_b: int = pydantic.Field(
        2048, ge=64, le=1048576, alias="shmSizeMiB",
        description="Size of the memory-backed /dev/shm of a worker (weights + KV cache on cpu), MiB.")


class EngineSpec(_Model):
    kv_cache_mb: int = pydantic.Field(256, ge=1, description="KV-cache memory per device, MiB.")
    max_num_seqs: int = pydantic.Field(64, ge=1, description="Most sequences per device in one step.")
    max_model_len: Optional[int] = pydantic.Field(None, ge=1, description="Longest sequence; unset: the model's.")
    expert_copies: int = pydantic.Field(1, ge=1, le=2, description="Copies of each routed expert across the "
                                        "devices. 2: when a device is lost, its experts come from a peer's copy "
                                        "instead of the checkpoint (costs the memory of one more copy of every "
                                        "expert, reported in the coordinator's /admin/status).")
    redundant_expert_mb: Optional[int] = pydantic.Field(
        None, ge=0, description="With expertCopies 2: memory per device for the second copies, MiB. The "
        "hottest experts (most routed tokens; before any, the lowest ids) get one, as many as fit: "
        "min(experts, floor(devices x this / one expert's bytes)), kept on average over the devices. "
        "Unset: every expert gets its second copy.")
    extra_args: list[str] = pydantic.Field(default_factory=list, description="More `elasticmoe coordinator` "
                                           "arguments, e.g. [--block-size, '32'].")


class ElasticMoESpec(_Model):
    model: ModelSpec = pydantic.Field(default_factory=ModelSpec, description="The checkpoint to serve.")
    devices: DevicesSpec = pydantic.Field(default_factory=DevicesSpec, description="How many devices, of "
                                          "which kind, and the bounds scaling keeps to.")
    parallelism: ParallelismSpec = pydantic.Field(default_factory=ParallelismSpec)
    slo: SloSpec = pydantic.Field(default_factory=SloSpec, description="Latency targets of the SLO autoscaler.")
    autoscaling: AutoscalingSpec = pydantic.Field(default_factory=AutoscalingSpec, description="Who changes "
                                                  "the device count.")
    engine: EngineSpec = pydantic.Field(default_factory=EngineSpec, description="Serving-engine settings.")
    coordinator: PodSpec = pydantic.Field(default_factory=PodSpec, description="The coordinator pod (OpenAI "
                                          "API, admin API, the workers' control channel).")
    worker: WorkerSpec = pydantic.Field(default_factory=WorkerSpec, description="The worker pods, one per "
                                        "device.")
    scale_timeout_seconds: int = pydantic.Field(600, ge=10, le=86400, description="A scale whose new "
                                                "workers have not registered after this long is aborted "
                                                "(its new pods deleted).")


# -- status ---------------------------------------------------------------------------
class Condition(_Model):
    type: str = pydantic.Field(description="Available, Progressing, Degraded, ScalingActive or "
                               "MetricsAvailable.")
    status: str = pydantic.Field(pattern=r"^(True|False|Unknown)$", description="True, False or Unknown.")
    reason: str = ""
    message: str = ""
    last_transition_time: str = ""
    observed_generation: int = 0


class DevicesStatus(_Model):
    desired: int = pydantic.Field(0, description="Devices the instance is scaling to.")
    ready: int = pydantic.Field(0, description="Worker pods running with their HMM registered.")
    active: int = pydantic.Field(0, description="Devices serving in the current configuration.")
    warming: int = pydantic.Field(0, description="Worker pods created and not yet ready.")


class ParallelismStatus(_Model):
    dp: int = 0
    ep: int = 0
    tp: int = 0


class ScaleRecord(_Model):
    """One scale and what came of it, in the shape of the coordinator's record of it (admin API)."""
    from_devices: int = pydantic.Field(alias="from")
    to_devices: int = pydantic.Field(alias="to")
    reason: str = ""
    scale_id: str = pydantic.Field("", description="The id the operator posted the scale under; the "
                                   "coordinator's record of it carries the same.")
    started_at: str = ""
    outcome: admin.Outcome = pydantic.Field(admin.Outcome.RUNNING, description="Running, Succeeded, Aborted "
                                            "(given up before the switch: the old configuration kept serving) "
                                            "or Failed (see message).")
    message: str = ""
    duration_ms: int = 0
    phases_ms: dict[str, int] = pydantic.Field(default_factory=dict, description="Duration of each "
                                               "phase reported by the coordinator, milliseconds.")
    bytes_transferred: int = 0
    transfer_data_ms: int = pydantic.Field(0, description="Of the transfer phase, the time spent moving "
                                           "bytes, milliseconds.")
    transport: str = pydantic.Field("", description="How the bytes moved: shared memory (devices of one "
                                    "host), the collective backend (gloo, nccl, hccl), both joined by ' + ', "
                                    "or empty (nothing moved).")
    requests_handed_over: int = 0
    tokens_recomputed: int = pydantic.Field(0, description="Of a recovery from a lost device: prompt and "
                                            "output tokens recomputed for the requests it suspended; of a "
                                            "scale: the tokens the departing devices' sequences had in their KV "
                                            "caches, computed again on their adopters.")
    sequences_kv_moved: int = pydantic.Field(0, description="Of a scale-down: sequences of departing devices "
                                             "whose KV blocks moved peer to peer to their adopters (not "
                                             "recomputed).")
    kv_bytes_moved: int = pydantic.Field(0, description="The bytes those KV blocks took.")
    kv_fallback: str = pydantic.Field("", description="Why the departing devices' KV was not moved and their "
                                      "sequences were recomputed instead; empty when it was moved.")


class ScalingStatus(_Model):
    """A scale in progress, written before each step so a restarted operator resumes it."""
    from_devices: int = pydantic.Field(alias="from")
    to_devices: int = pydantic.Field(alias="to")
    reason: str = ""
    scale_id: str = pydantic.Field("", description="Sent with POST /admin/scale; how the operator finds "
                                   "the coordinator's record of this scale, also after a restart.")
    started_at: str = ""
    stage: str = pydantic.Field("", description="WaitingForWorkers or Scaling.")


class AlertTrigger(_Model):
    """The Alertmanager notification that made the operator evaluate at once."""
    alertname: str = ""
    fingerprint: str = ""
    starts_at: str = pydantic.Field("", description="The alert's startsAt, as Alertmanager sent it.")
    received_at: str = pydantic.Field("", description="When the operator received it (RFC 3339, milliseconds).")


class AutoscaleDecision(_Model):
    """One evaluation of the Slo policy: what it saw, what it decided and why."""
    time: str = pydantic.Field("", description="When it was evaluated (RFC 3339, milliseconds).")
    from_devices: int = pydantic.Field(alias="from", description="spec.devices.replicas (or initial) before.")
    to_devices: int = pydantic.Field(alias="to", description="The count it wrote to spec.devices.replicas.")
    action: str = pydantic.Field("", description="up, down or hold.")
    code: str = pydantic.Field("", description="The reason in a word: SloBreached, SurvivorsUnderTarget, "
                               "FewerDevicesFaster, OutOfBounds, AtMaximum, WaitingForScale, Cooldown, "
                               "ScaleUpWouldNotHelp, Stabilizing, WithinDeadBand, MetricsUnavailable, MetricsStale "
                               "or NoSamples.")
    reason: str = ""
    signals: dict[str, str] = pydantic.Field(default_factory=dict, description="The inputs: p90 latencies "
                                             "(ms), their ratios to the SLO, the smoothed signal, request rate, "
                                             "active and warming devices.")
    trigger: Optional[AlertTrigger] = pydantic.Field(None, description="The alert that caused this evaluation; "
                                                     "unset: the periodic evaluation.")


class AutoscalerStatus(_Model):
    last_evaluation: Optional[AutoscaleDecision] = pydantic.Field(None, description="The latest evaluation.")
    history: list[AutoscaleDecision] = pydantic.Field(
        default_factory=list, max_length=HISTORY_LIMIT,
        description=f"The last {HISTORY_LIMIT} decisions that changed the device count, oldest first.")


class ElasticMoEStatus(_Model):
    observed_generation: int = pydantic.Field(0, description="The metadata.generation this status describes.")
    phase: str = pydantic.Field("", description="Pending, Serving, Scaling or Degraded.")
    selector: str = pydantic.Field("", description="Label selector of the worker pods (scale subresource).")
    coordinator_url: str = pydantic.Field("", description="In-cluster URL of the OpenAI API.")
    conditions: list[Condition] = pydantic.Field(default_factory=list)
    devices: DevicesStatus = pydantic.Field(default_factory=DevicesStatus)
    parallelism: ParallelismStatus = pydantic.Field(default_factory=ParallelismStatus)
    scaling: Optional[ScalingStatus] = pydantic.Field(None, description="The scale in progress, if any.")
    last_scale: Optional[ScaleRecord] = pydantic.Field(None, description="The most recent scale.")
    history: list[ScaleRecord] = pydantic.Field(default_factory=list, max_length=HISTORY_LIMIT,
                                                description=f"The last {HISTORY_LIMIT} scales, oldest first.")
    autoscaler: Optional[AutoscalerStatus] = pydantic.Field(None, description="The Slo policy's evaluations "
                                                            "(autoscaling.mode Slo).")


# -- validation -----------------------------------------------------------------------
_MAX_SHOWN = 120  # characters of a bad value quoted in a SpecError


class SpecError(ValueError):
    """A spec the operator cannot act on; the message names the field, the value and what is expected."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        self.field, self.value, self.expected = field, value, expected
        shown = repr(value)
        if len(shown) > _MAX_SHOWN:  # the message lands in a condition; a 4 KiB path would drown it
            shown = f"{shown[:_MAX_SHOWN]}... ({len(shown)} characters)"
        super().__init__(f"{'spec.' + field if field else 'spec'}: got {shown}, expected {expected}")


def _expected(err: dict) -> str:
    """pydantic's message as what is expected, with enum values and patterns in their own case."""
    if err["type"] == "extra_forbidden":
        return "no such field (unknown fields are rejected)"
    if err["type"] == "missing":
        return "a value (the field is required)"
    msg: str = err["msg"]
    for prefix, replacement in (("Input should be ", ""), ("String should match ", "a string matching "),
                                ("String should have ", "a string with "), ("List should have ", "a list with ")):
        if msg.startswith(prefix):
            return replacement + msg[len(prefix):]
    return msg[:1].lower() + msg[1:]


def _loc(loc: tuple) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts[-1] = f"{parts[-1]}[{p}]" if parts else f"[{p}]"
        else:
            parts.append(str(p))
    return ".".join(parts)


def parse_spec(spec: dict | None) -> ElasticMoESpec:
    """The typed spec, or SpecError naming the first bad field (the CEL rules of the CRD, again)."""
    try:
        parsed = ElasticMoESpec.model_validate(spec or {})
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        raise SpecError(_loc(err["loc"]), err.get("input"), _expected(err)) from None
    d = parsed.devices
    if d.min > d.max:
        raise SpecError("devices.min", d.min, f"<= devices.max ({d.max})")
    if not d.min <= d.initial <= d.max:
        raise SpecError("devices.initial", d.initial, f"in [devices.min, devices.max] = [{d.min}, {d.max}]")
    if d.replicas is not None and not d.min <= d.replicas <= d.max:
        raise SpecError("devices.replicas", d.replicas, f"in [devices.min, devices.max] = [{d.min}, {d.max}]")
    if d.backend != Backend.CPU.value and not d.resource:
        raise SpecError("devices.resource", d.resource, f"a device resource name for backend {d.backend} "
                        "(e.g. nvidia.com/gpu or huawei.com/Ascend910)")
    if parsed.engine.redundant_expert_mb is not None and parsed.engine.expert_copies != 2:
        raise SpecError("engine.redundantExpertMb", parsed.engine.redundant_expert_mb,
                        f"unset unless engine.expertCopies is 2 (got {parsed.engine.expert_copies}): it budgets "
                        f"the second copies")
    if parsed.autoscaling.mode == AutoscalingMode.SLO.value and not parsed.autoscaling.prometheus_url:
        raise SpecError("autoscaling.prometheusUrl", "", "a Prometheus URL when autoscaling.mode is Slo")
    return parsed


# CEL rules of the CRD, beside the model they guard: (path in the schema, rule, message, fieldPath).
CEL_RULES: list[tuple[str, str, str, str]] = [
    ("devices", "self.min <= self.max", "devices.min must be <= devices.max", ".min"),
    ("devices", "self.min <= self.initial && self.initial <= self.max",
     "devices.initial must be in [devices.min, devices.max]", ".initial"),
    ("devices", "!has(self.replicas) || (self.min <= self.replicas && self.replicas <= self.max)",
     "devices.replicas must be in [devices.min, devices.max]", ".replicas"),
    ("devices", "self.backend == 'cpu' || self.resource != ''",
     "devices.resource is required when devices.backend is cuda or ascend", ".resource"),
    ("engine", "!has(self.redundantExpertMb) || self.expertCopies == 2",
     "engine.redundantExpertMb is only allowed when engine.expertCopies is 2", ".redundantExpertMb"),
    ("autoscaling", "self.mode != 'Slo' || self.prometheusUrl != ''",
     "autoscaling.prometheusUrl is required when autoscaling.mode is Slo", ".prometheusUrl"),
]

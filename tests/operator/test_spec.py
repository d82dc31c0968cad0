"""The typed ElasticMoE models: `parse_spec` accepts what the CRD accepts, and every rejection
names the field path, the bad value and what was expected (it becomes a Degraded condition a
user reads in `kubectl describe`); the status round-trips through its Kubernetes (camelCase,
`from`/`to`) form."""

from __future__ import annotations

import msgspec
import pydantic
import pytest

from elasticmoe_worker.contract import admin

from elasticmoe_operator import api, crd


# -- spec: accepted ---------------------------------------------------------------------
@pytest.mark.parametrize("spec, desired, backend", [
    (None, 1, "cpu"),
    ({}, 1, "cpu"),
    ({"devices": {"min": 1, "max": 4, "initial": 2}}, 2, "cpu"),
    ({"devices": {"min": 2, "max": 8, "initial": 2, "replicas": 8}}, 8, "cpu"),
    ({"devices": {"min": 4, "max": 4, "initial": 4}}, 4, "cpu"),
    ({"devices": {"backend": "cuda", "resource": "nvidia.com/gpu"}}, 1, "cuda"),
    ({"devices": {"backend": "ascend", "resource": "huawei.com/Ascend910", "max": 16, "initial": 8}}, 8, "ascend"),
    ({"autoscaling": {"mode": "Slo", "prometheusUrl": "http://prometheus:9090"}}, 1, "cpu"),
    ({"autoscaling": {"mode": "External"}, "devices": {"replicas": 3}}, 3, "cpu"),
    ({"engine": {"expertCopies": 2, "redundantExpertMb": 0}}, 1, "cpu"),
    ({"engine": {"expertCopies": 2, "redundantExpertMb": 4096}}, 1, "cpu"),
])
def test_parse_spec_accepts(spec, desired, backend):
    parsed = api.parse_spec(spec)
    assert (parsed.devices.desired, parsed.devices.backend) == (desired, backend)


def test_full_spec_round_trips_in_kubernetes_form():
    spec = {
        "model": {"source": "/models/m", "servedName": "m", "dtype": "bfloat16",
                  "volume": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}, "mountPath": "/models"},
        "devices": {"min": 2, "max": 8, "initial": 4, "replicas": 6, "step": 2, "backend": "cuda",
                    "resource": "nvidia.com/gpu", "perWorker": 1},
        "parallelism": {"tensorParallel": 1},
        "slo": {"ttftP90Ms": 1500, "tpotP90Ms": 80, "queueP90Ms": 500},
        "autoscaling": {"mode": "Slo", "prometheusUrl": "http://p:9090",
                        "prometheusBearerTokenSecret": {"name": "prom", "key": "token"},
                        "prometheusSelector": 'job="moe"', "metricsWindowSeconds": 30,
                        "evaluationIntervalSeconds": 5, "scaleUpCooldownSeconds": 60,
                        "scaleDownStabilizationSeconds": 600, "stabilizationReadyMultiple": 4.0, "learnTpot": False},
        "engine": {"kvCacheMb": 1024, "maxNumSeqs": 16, "maxModelLen": 4096, "expertCopies": 2,
                   "extraArgs": ["--block-size", "32"]},
        "coordinator": {"image": "elasticmoe:dev", "imagePullPolicy": "Never", "resources": {"limits": {"memory": "1Gi"}},
                        "env": [{"name": "A", "value": "1"}], "nodeSelector": {"pool": "cpu"}, "tolerations": []},
        "worker": {"image": "elasticmoe:dev", "imagePullPolicy": "Always", "env": [], "nodeSelector": {},
                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                   "shmSizeMiB": 4096},
        "scaleTimeoutSeconds": 900,
    }
    assert api.parse_spec(spec).dump() == spec


def test_empty_spec_dump_holds_every_default():
    assert api.parse_spec({}).dump() == {
        "model": {"source": "", "servedName": "", "dtype": "auto", "mountPath": "/models"},
        "devices": {"min": 1, "max": 4, "initial": 1, "step": 1, "backend": "cpu", "resource": "", "perWorker": 1},
        "parallelism": {"tensorParallel": 1},
        "slo": {"ttftP90Ms": 2000, "tpotP90Ms": 100, "queueP90Ms": 1000},
        "autoscaling": {"mode": "Disabled", "prometheusUrl": "", "prometheusSelector": "",
                        "metricsWindowSeconds": 60, "evaluationIntervalSeconds": 15, "scaleUpCooldownSeconds": 30,
                        "scaleDownStabilizationSeconds": 300, "stabilizationReadyMultiple": 10.0,
                            "learnTpot": True},
        "engine": {"kvCacheMb": 256, "maxNumSeqs": 64, "expertCopies": 1, "extraArgs": []},
        "coordinator": {"image": "", "imagePullPolicy": "IfNotPresent", "env": [], "nodeSelector": {}, "tolerations": []},
        "worker": {"image": "", "imagePullPolicy": "IfNotPresent", "env": [], "nodeSelector": {}, "tolerations": [],
                   "shmSizeMiB": 2048},
        "scaleTimeoutSeconds": 600,
    }


# -- spec: rejected, naming field, value and expectation -------------------------------
@pytest.mark.parametrize("spec, field, value, expected", [
    # cross-field rules (the CEL rules of the CRD)
    ({"devices": {"initial": 5}}, "devices.initial", 5, "in [devices.min, devices.max] = [1, 4]"),
    ({"devices": {"min": 5, "initial": 5}}, "devices.min", 5, "<= devices.max (4)"),
    ({"devices": {"min": 2, "initial": 2, "replicas": 1}}, "devices.replicas", 1, "= [2, 4]"),
    ({"devices": {"replicas": 9}}, "devices.replicas", 9, "in [devices.min, devices.max]"),
    ({"devices": {"backend": "cuda"}}, "devices.resource", "", "resource name for backend cuda"),
    ({"devices": {"backend": "ascend"}}, "devices.resource", "", "huawei.com/Ascend910"),
    ({"autoscaling": {"mode": "Slo"}}, "autoscaling.prometheusUrl", "", "when autoscaling.mode is Slo"),
    ({"engine": {"redundantExpertMb": 512}}, "engine.redundantExpertMb", 512,
     "unset unless engine.expertCopies is 2 (got 1)"),
    # field rules (the OpenAPI schema of the CRD)
    ({"devices": {"min": 0}}, "devices.min", 0, "greater than or equal to 1"),
    ({"devices": {"max": 2000}}, "devices.max", 2000, "less than or equal to 1024"),
    ({"devices": {"perWorker": 2}}, "devices.perWorker", 2, "less than or equal to 1"),
    ({"devices": {"backend": "tpu"}}, "devices.backend", "tpu", "'cpu', 'cuda' or 'ascend'"),
    ({"devices": {"resource": "nvidia gpu"}}, "devices.resource", "nvidia gpu", "a string matching pattern"),
    ({"devices": {"min": "two"}}, "devices.min", "two", "a valid integer"),
    ({"autoscaling": {"mode": "slo"}}, "autoscaling.mode", "slo", "'Disabled', 'Slo' or 'External'"),
    ({"autoscaling": {"scaleUpCooldownSeconds": -1}}, "autoscaling.scaleUpCooldownSeconds", -1,
     "greater than or equal to 0"),
    ({"model": {"dtype": "int8"}}, "model.dtype", "int8", "'auto', 'float32', 'bfloat16' or 'float16'"),
    ({"parallelism": {"tensorParallel": 2}}, "parallelism.tensorParallel", 2, "less than or equal to 1"),
    ({"slo": {"ttftP90Ms": 0}}, "slo.ttftP90Ms", 0, "greater than or equal to 1"),
    ({"engine": {"kvCacheMb": "lots"}}, "engine.kvCacheMb", "lots", "a valid integer"),
    ({"engine": {"expertCopies": 2, "redundantExpertMb": -1}}, "engine.redundantExpertMb", -1,
     "greater than or equal to 0"),
    ({"engine": {"extraArgs": [3]}}, "engine.extraArgs[0]", 3, "a valid string"),
    ({"coordinator": {"imagePullPolicy": "Sometimes"}}, "coordinator.imagePullPolicy", "Sometimes",
     "pattern '^(Always|IfNotPresent|Never)$'"),
    ({"coordinator": {"env": ["A=1"]}}, "coordinator.env[0]", "A=1", "a valid dictionary"),
    ({"worker": {"shmSizeMiB": 32}}, "worker.shmSizeMiB", 32, "greater than or equal to 64"),
    ({"worker": {"nodeSelector": {"gpu": True}}}, "worker.nodeSelector.gpu", True, "a valid string"),
    ({"scaleTimeoutSeconds": 5}, "scaleTimeoutSeconds", 5, "greater than or equal to 10"),
    # unknown fields (a typo would otherwise be silently ignored)
    ({"devices": {"gpus": 2}}, "devices.gpus", 2, "no such field"),
    ({"replicas": 3}, "replicas", 3, "no such field"),
    ({"worker": {"shmSizeMib": 4096}}, "worker.shmSizeMib", 4096, "no such field"),
])
def test_parse_spec_rejects(spec, field, value, expected):
    with pytest.raises(api.SpecError) as info:
        api.parse_spec(spec)
    err = info.value
    assert (err.field, err.value) == (field, value)
    assert expected in err.expected
    assert str(err) == f"spec.{field}: got {value!r}, expected {err.expected}"


def test_non_object_spec_is_named_spec():
    with pytest.raises(api.SpecError, match=r"^spec: got \[1\], expected a valid dictionary"):
        api.parse_spec([1])  # type: ignore[arg-type]


def test_long_bad_value_is_shortened_in_message():
    with pytest.raises(api.SpecError) as info:
        api.parse_spec({"model": {"source": "/m" * 3000}})
    assert info.value.field == "model.source" and len(info.value.value) == 6000
    assert len(str(info.value)) < 300 and "(6002 characters)" in str(info.value)
    assert str(info.value).endswith("expected a string with at most 4096 characters")


def test_spec_error_is_a_value_error():
    assert issubclass(api.SpecError, ValueError)


# -- status -----------------------------------------------------------------------------
STATUS = {
    "observedGeneration": 3,
    "phase": "Scaling",
    "selector": "app.kubernetes.io/instance=m,app.kubernetes.io/component=worker",
    "coordinatorUrl": "http://m-coordinator.ns.svc:8000",
    "conditions": [
        {"type": "Available", "status": "True", "reason": "Serving", "message": "2 devices",
         "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 3},
        {"type": "Progressing", "status": "True", "reason": "ScalingUp", "message": "",
         "lastTransitionTime": "2025-01-01T00:00:10Z", "observedGeneration": 3},
    ],
    "devices": {"desired": 3, "ready": 2, "active": 2, "warming": 1},
    "parallelism": {"dp": 2, "ep": 2, "tp": 1},
    "scaling": {"from": 2, "to": 3, "reason": "ttft p90 3.1s > 2s", "scaleId": "m-2-3-2025-01-01T000010Z",
                "startedAt": "2025-01-01T00:00:10Z", "stage": "WaitingForWorkers"},
    "lastScale": {"from": 1, "to": 2, "reason": "kubectl scale", "scaleId": "m-1-2-2025-01-01T000000Z",
                  "startedAt": "2025-01-01T00:00:00Z", "outcome": "Succeeded", "message": "", "durationMs": 4200,
                  "phasesMs": {"transfer": 3000, "switch": 200}, "bytesTransferred": 123456789,
                  "transferDataMs": 2500, "transport": "shared memory", "requestsHandedOver": 7, "tokensRecomputed": 0,
                  "sequencesKvMoved": 0, "kvBytesMoved": 0, "kvFallback": ""},
    "history": [{"from": 1, "to": 2, "reason": "kubectl scale", "scaleId": "", "startedAt": "2025-01-01T00:00:00Z",
                 "outcome": "Aborted", "message": "workers did not register", "durationMs": 4200, "phasesMs": {},
                 "bytesTransferred": 0, "transferDataMs": 0, "transport": "", "requestsHandedOver": 0, "tokensRecomputed": 0,
                 "sequencesKvMoved": 0, "kvBytesMoved": 0, "kvFallback": ""}],
}


def test_status_round_trips_with_aliases():
    status = api.ElasticMoEStatus.model_validate(STATUS)
    assert status.scaling is not None and (status.scaling.from_devices, status.scaling.to_devices) == (2, 3)
    assert status.last_scale is not None and status.last_scale.phases_ms == {"transfer": 3000, "switch": 200}
    assert status.dump() == STATUS


def test_status_built_in_python_dumps_from_and_to():
    record = api.ScaleRecord(from_devices=2, to_devices=4, reason="slo", outcome=admin.Outcome.RUNNING)
    dumped = record.dump()
    assert (dumped["from"], dumped["to"]) == (2, 4) and "from_devices" not in dumped
    assert api.ScaleRecord.model_validate(dumped) == record


def _struct_json_names(struct) -> list[str]:
    return [f.encode_name for f in msgspec.structs.fields(struct)]


# the admin API's per-device profile of a scale's transfer is not kept in the resource's status: one
# entry per device in each of the 11 records there, for what an operator can read from the coordinator
NOT_IN_STATUS = {"transferDevices"}


def test_scale_record_has_the_coordinators_json_shape():
    """The CRD's record and the admin API's: the same field names and outcome values, so a
    coordinator record copies into status unchanged (but `NOT_IN_STATUS`)."""
    ours = [f.alias or name for name, f in api.ScaleRecord.model_fields.items()]
    assert sorted(ours) == sorted(set(_struct_json_names(admin.ScaleRecord)) - NOT_IN_STATUS)
    outcome = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"][
        "properties"]["lastScale"]["properties"]["outcome"]
    assert set(outcome["enum"]) == {o.value for o in admin.Outcome} == {"Running", "Succeeded", "Aborted", "Failed"}


def test_a_coordinator_record_is_a_valid_status_record():
    rec = admin.ScaleRecord(from_devices=1, to_devices=2, reason="r", scale_id="m-1-2-x", outcome=admin.Outcome.ABORTED,
                            phases_ms={"transfer": 5}, transfer_data_ms=3,
                            transfer_devices=[admin.TransferProfile(device=0, bytes_sent=9, total_ms=4)])
    kept = {k: v for k, v in admin.to_builtins(rec).items() if k not in NOT_IN_STATUS}
    assert api.ScaleRecord.model_validate(kept).dump() == kept


def test_scaling_status_keeps_the_scale_id():
    sc = api.ScalingStatus.model_validate(STATUS["scaling"])
    assert sc.scale_id == "m-2-3-2025-01-01T000010Z" and sc.dump()["scaleId"] == sc.scale_id


def test_default_status_dump():
    assert api.ElasticMoEStatus().dump() == {
        "observedGeneration": 0, "phase": "", "selector": "", "coordinatorUrl": "", "conditions": [],
        "devices": {"desired": 0, "ready": 0, "active": 0, "warming": 0},
        "parallelism": {"dp": 0, "ep": 0, "tp": 0}, "history": []}


@pytest.mark.parametrize("status, loc", [
    ({"devices": {"bogus": 1}}, ("devices", "bogus")),
    ({"lastScale": {"from": 1, "to": 2, "seconds": 3}}, ("lastScale", "seconds")),
    ({"lastScale": {"from": 1, "to": 2, "outcome": "RolledBack"}}, ("lastScale", "outcome")),
    ({"conditions": [{"type": "Available", "status": "Maybe"}]}, ("conditions", 0, "status")),
    ({"conditions": [{"status": "True"}]}, ("conditions", 0, "type")),
    ({"scaling": {"from": 1}}, ("scaling", "to")),
    ({"history": [{"from": 1, "to": 2}] * (api.HISTORY_LIMIT + 1)}, ("history",)),
])
def test_status_rejects_naming_field(status, loc):
    with pytest.raises(pydantic.ValidationError) as info:
        api.ElasticMoEStatus.model_validate(status)
    assert info.value.errors()[0]["loc"] == loc


@pytest.mark.parametrize("enum, values", [
    (api.ConditionType, ["Available", "Progressing", "Degraded", "ScalingActive", "MetricsAvailable"]),
    (api.Phase, ["Pending", "Serving", "Scaling", "Degraded"]),
    (api.Backend, ["cpu", "cuda", "ascend"]),
    (api.AutoscalingMode, ["Disabled", "Slo", "External"]),
])
def test_enum_values_are_the_documented_strings(enum, values):
    assert [m.value for m in enum] == values


def test_cel_rules_name_known_fields():
    for path, _, _, field_path in api.CEL_RULES:
        model = api.ElasticMoESpec.model_fields[path].annotation
        aliases = {f.alias or n for n, f in model.model_fields.items()}
        assert field_path.lstrip(".") in aliases, (path, field_path)

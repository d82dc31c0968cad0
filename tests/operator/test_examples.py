"""Every document in examples/*.yaml is one a cluster would accept.

ElasticMoE documents are checked against the generated CRD's OpenAPI schema (with jsonschema,
Kubernetes extensions stripped and unknown fields made errors, because the API server would
silently prune a misspelt field) and then through `api.parse_spec`, which also applies the CEL
rules. Every other kind is checked by kubernetes-validate, strict, against the newest
Kubernetes it ships.
"""

from __future__ import annotations

import pathlib

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

from elasticmoe_operator import api, autoscaler, crd

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
K8S_VERSION = kv_utils.latest_version()


def strict_jsonschema(node: dict) -> dict:
    """The CRD schema as plain JSON schema: `x-kubernetes-*` dropped, closed objects closed."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if "properties" in node:
        out["properties"] = {name: strict_jsonschema(sub) for name, sub in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if "items" in node:
        out["items"] = strict_jsonschema(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_jsonschema(node["additionalProperties"])
    return out


SCHEMA = strict_jsonschema(crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
jsonschema.Draft202012Validator.check_schema(SCHEMA)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

DOCS = [(path.name, i, doc) for path in EXAMPLES for i, doc in enumerate(yaml.safe_load_all(path.read_text()))
        if doc is not None]
CRS = [d for d in DOCS if d[2].get("kind") == api.KIND]
OTHERS = [d for d in DOCS if d[2].get("kind") != api.KIND]


def _id(entry) -> str:
    name, i, doc = entry
    return f"{name}#{i}:{doc.get('kind')}"


def test_the_documented_examples_exist():
    assert {"cpu.yaml", "gpu.yaml", "ascend.yaml", "hpa.yaml"} <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("entry", CRS, ids=_id)
def test_elasticmoe_matches_crd_schema(entry):
    _, _, doc = entry
    assert doc["apiVersion"] == api.API_VERSION
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(doc)]
    assert not errors, errors


@pytest.mark.parametrize("entry", CRS, ids=_id)
def test_elasticmoe_parses(entry):
    _, _, doc = entry
    spec = api.parse_spec(doc["spec"])
    assert spec.devices.min <= spec.devices.desired <= spec.devices.max


@pytest.mark.parametrize("entry", OTHERS, ids=_id)
def test_other_kinds_validate_with_kubernetes(entry):
    _, _, doc = entry
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name, backend, resource", [
    ("cpu.yaml", "cpu", ""),
    ("gpu.yaml", "cuda", "nvidia.com/gpu"),
    ("ascend.yaml", "ascend", "huawei.com/Ascend910"),
])
def test_example_targets_its_hardware(name, backend, resource):
    (doc,) = [d for n, _, d in CRS if n == name]
    spec = api.parse_spec(doc["spec"])
    assert (spec.devices.backend, spec.devices.resource) == (backend, resource)
    if backend != "cpu":  # accelerator examples load a real checkpoint from a volume
        assert "persistentVolumeClaim" in (spec.model.volume or {})
        assert spec.model.source.startswith(spec.model.mount_path + "/")
        assert spec.worker.node_selector and spec.worker.tolerations


def test_hpa_targets_an_elasticmoe_in_the_same_file_within_its_bounds():
    hpas = [(n, d) for n, _, d in OTHERS if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpas, "no HorizontalPodAutoscaler example"
    for name, hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == (api.API_VERSION, api.KIND)
        (target,) = [d for n, _, d in CRS if n == name and d["metadata"]["name"] == ref["name"]]
        spec = api.parse_spec(target["spec"])
        assert spec.autoscaling.mode == api.AutoscalingMode.EXTERNAL.value
        assert spec.devices.replicas is not None, "an HPA does not scale a target whose replicas read 0"
        assert spec.devices.min <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"] <= spec.devices.max



def test_hpa_target_has_the_scale_subresource_an_hpa_needs():
    """An HPA reads and writes the target's scale subresource and refuses a target whose scale
    has no status.selector; the operator writes status.selector (the worker pods)."""
    definition = crd.build_crd()
    (version,) = [v for v in definition["spec"]["versions"] if v["name"] == api.VERSION]
    scale = version["subresources"]["scale"]
    assert scale == {"specReplicasPath": ".spec.devices.replicas", "statusReplicasPath": ".status.devices.active",
                     "labelSelectorPath": ".status.selector"}
    status_props = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status_props["selector"]["type"] == "string"
    for _, hpa in [(n, d) for n, _, d in OTHERS if d["kind"] == "HorizontalPodAutoscaler"]:
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["apiVersion"] == f"{definition['spec']['group']}/{version['name']}"
        assert ref["kind"] == definition["spec"]["names"]["kind"]


def test_slo_examples_give_the_autoscaler_a_complete_config():
    slo = [(n, api.parse_spec(d["spec"])) for n, _, d in CRS if d["spec"].get("autoscaling", {}).get("mode") == "Slo"]
    assert [n for n, _ in slo] == ["gpu.yaml"]
    for _, spec in slo:
        cfg = autoscaler.config(spec)  # what the operator's policy runs with
        assert spec.autoscaling.prometheus_url.startswith("http")
        assert (cfg.min_devices, cfg.max_devices, cfg.ttft_p90_s, cfg.tpot_p90_s) == (
            spec.devices.min, spec.devices.max, spec.slo.ttft_p90_ms / 1000, spec.slo.tpot_p90_ms / 1000)


@pytest.mark.parametrize("doc", [
    {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {}, "spec": {"devices": {"gpus": 2}}},
    {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {}, "spec": {"devices": {"min": "1"}}},
    {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {}, "spec": {"model": {"dtype": "int4"}}},
    {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {}, "spec": {"worker": {"env": "A=1"}}},
], ids=["unknown-field", "string-for-int", "bad-enum", "env-not-list"])
def test_schema_check_catches_mistakes(doc):
    assert list(VALIDATOR.iter_errors(doc))

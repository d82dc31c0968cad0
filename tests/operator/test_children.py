"""The child objects of an ElasticMoE: valid Kubernetes, named, labelled and secured as the
contract says, for a cpu, a cuda and an ascend instance."""

from __future__ import annotations

import base64
import json

import kubernetes_validate
import pytest

from elasticmoe_operator import api, children

# The newest Kubernetes whose schemas the installed kubernetes-validate bundles.
K8S_VERSION = kubernetes_validate.latest_version()
IMAGE = "registry.example/elasticmoe:0.1.0"
NAME, NAMESPACE, UID = "moe", "serving", "4f1c9a52-6a7e-4d1b-9c1e-2b3f1d0e8a77"

SPECS = {
    "cpu": {"devices": {"min": 1, "max": 4, "initial": 2}},
    "cuda": {
        "model": {"source": "/models/qwen3-30b-a3b", "servedName": "qwen3", "dtype": "bfloat16",
                  "volume": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
                  "mountPath": "/models"},
        "devices": {"min": 1, "max": 8, "initial": 2, "backend": "cuda", "resource": "nvidia.com/gpu"},
        "engine": {"kvCacheMb": 4096, "maxNumSeqs": 128, "maxModelLen": 8192, "expertCopies": 2,
                   "redundantExpertMb": 2048, "extraArgs": ["--block-size", "32"]},
        "coordinator": {"image": "registry.example/elasticmoe:coord", "imagePullPolicy": "Always",
                        "resources": {"requests": {"cpu": "2", "memory": "8Gi"}},
                        "env": [{"name": "LOG_FORMAT", "value": "json"}]},
        "worker": {"image": "registry.example/elasticmoe:cuda", "shmSizeMiB": 16384,
                   "resources": {"limits": {"cpu": "8", "memory": "64Gi"}, "requests": {"cpu": "4", "memory": "32Gi"}},
                   "env": [{"name": "NCCL_DEBUG", "value": "WARN"}],
                   "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    },
    "ascend": {
        "model": {"source": "/mnt/models/deepseek-v2-lite", "volume": {"persistentVolumeClaim": {"claimName": "ds"}},
                  "mountPath": "/mnt/models"},
        "devices": {"min": 2, "max": 16, "initial": 4, "replicas": 6, "backend": "ascend",
                    "resource": "huawei.com/Ascend910"},
        "worker": {"resources": {"requests": {"memory": "128Gi"}},
                   # a user default replaced; an operator-owned variable ignored
                   "env": [{"name": "MPLCONFIGDIR", "value": "/tmp/mpl"},
                           {"name": "ELASTICMOE_DEVICE_INDEX", "value": "99"}],
                   "tolerations": [{"key": "huawei.com/Ascend910", "operator": "Exists"}]},
    },
}
KINDS = list(SPECS)


def _owner(kind: str) -> dict:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND,
            "metadata": {"name": NAME, "namespace": NAMESPACE, "uid": UID}, "spec": SPECS[kind]}


def _spec(kind: str) -> api.ElasticMoESpec:
    return api.parse_spec(SPECS[kind])


def _all(kind: str) -> dict[str, dict]:
    owner, spec = _owner(kind), _spec(kind)
    return {"secret": children.secret(owner, "s3cret-token", "w0rker-secret"),
            "config": children.config_map(owner, spec),
            "service": children.coordinator_service(owner),
            "deployment": children.coordinator_deployment(owner, spec, IMAGE, spec.devices.desired),
            "worker0": children.worker_pod(owner, spec, IMAGE, 0),
            "worker3": children.worker_pod(owner, spec, IMAGE, 3)}


def _pod_specs(kind: str) -> dict[str, dict]:
    objs = _all(kind)
    return {"coordinator": objs["deployment"]["spec"]["template"]["spec"],
            "worker": objs["worker0"]["spec"]}


def _flags(args: list[str]) -> dict[str, str]:
    """`--flag value` pairs (every flag the builders write takes a value)."""
    assert len(args) % 2 == 0 and all(a.startswith("--") for a in args[::2]), args
    return dict(zip(args[::2], args[1::2]))


def _matches(selector: str, pod_labels: dict[str, str]) -> bool:
    terms = [t.split("=", 1) for t in selector.split(",")]
    return all(pod_labels.get(k) == v for k, v in terms)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("obj", ["secret", "config", "service", "deployment", "worker0", "worker3"])
def test_every_object_is_valid_kubernetes(kind, obj):
    kubernetes_validate.validate(_all(kind)[obj], K8S_VERSION, strict=True)


def test_validation_would_catch_a_bad_object():
    pod = _all("cpu")["worker0"]
    pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalaton"] = False  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


@pytest.mark.parametrize("kind", KINDS)
def test_names_are_deterministic(kind):
    objs = _all(kind)
    assert {k: o["metadata"]["name"] for k, o in objs.items()} == {
        "secret": "moe-admin-token", "config": "moe-config", "service": "moe-coordinator",
        "deployment": "moe-coordinator", "worker0": "moe-worker-0", "worker3": "moe-worker-3"}
    assert objs == _all(kind)
    assert {o["metadata"]["namespace"] for o in objs.values()} == {NAMESPACE}
    assert children.coordinator_host(NAME, NAMESPACE) == "moe-coordinator.serving.svc"


@pytest.mark.parametrize("kind", KINDS)
def test_every_child_is_controlled_by_the_instance(kind):
    expected = {"apiVersion": "elasticmoe.io/v1alpha1", "kind": "ElasticMoE", "name": NAME, "uid": UID,
                "controller": True, "blockOwnerDeletion": True}
    for obj in _all(kind).values():
        assert obj["metadata"]["ownerReferences"] == [expected]


@pytest.mark.parametrize("kind", KINDS)
def test_labels_and_selectors_agree(kind):
    objs = _all(kind)
    common = {"app.kubernetes.io/name": "elasticmoe", "app.kubernetes.io/instance": NAME,
              "app.kubernetes.io/managed-by": "elasticmoe-operator"}
    for key, component in [("config", "config"), ("service", "coordinator"), ("deployment", "coordinator"),
                           ("worker0", "worker"), ("worker3", "worker")]:
        assert objs[key]["metadata"]["labels"].items() >= {**common, "app.kubernetes.io/component": component}.items()
    assert objs["worker3"]["metadata"]["labels"]["elasticmoe.io/device-index"] == "3"

    selector = children.worker_selector(NAME)
    assert selector == "app.kubernetes.io/instance=moe,app.kubernetes.io/component=worker"
    coordinator_pod_labels = objs["deployment"]["spec"]["template"]["metadata"]["labels"]
    assert _matches(selector, objs["worker0"]["metadata"]["labels"])
    assert _matches(selector, objs["worker3"]["metadata"]["labels"])
    assert not _matches(selector, coordinator_pod_labels)
    assert not _matches(selector, {**objs["worker0"]["metadata"]["labels"], "app.kubernetes.io/instance": "other"})

    deployment_selector = objs["deployment"]["spec"]["selector"]["matchLabels"]
    assert coordinator_pod_labels.items() >= deployment_selector.items()
    service_selector = objs["service"]["spec"]["selector"]
    assert coordinator_pod_labels.items() >= service_selector.items()
    assert not objs["worker0"]["metadata"]["labels"].items() >= service_selector.items()


@pytest.mark.parametrize("kind", KINDS)
def test_device_resource_is_requested_exactly_when_configured(kind):
    spec, objs = _spec(kind), _all(kind)
    worker = objs["worker0"]["spec"]["containers"][0].get("resources", {})
    coordinator = objs["deployment"]["spec"]["template"]["spec"]["containers"][0].get("resources", {})
    extended = {k for part in worker.values() for k in part if "/" in k}
    if spec.devices.resource:
        assert worker["limits"][spec.devices.resource] == "1"
        assert worker["requests"][spec.devices.resource] == "1"
        assert extended == {spec.devices.resource}
    else:
        assert extended == set()
    # what the user asked for is kept beside the device
    user = spec.worker.resources or {}
    for part, values in user.items():
        assert worker[part].items() >= values.items()
    assert coordinator == (spec.coordinator.resources or {})


def _restricted_violations(pod_spec: dict) -> list[str]:
    """The restricted Pod Security Standard's checks (plus the contract's read-only root)."""
    bad = []
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}
    for v in pod_spec.get("volumes", []):
        if not set(v) - {"name"} <= allowed_volumes:
            bad.append(f"volume {v['name']}")
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(host):
            bad.append(host)
    pod_sc = pod_spec.get("securityContext", {})
    if pod_sc.get("runAsUser") == 0:
        bad.append("pod runAsUser 0")
    if pod_sc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        bad.append("pod seccompProfile")
    for c in pod_spec.get("initContainers", []) + pod_spec["containers"]:
        sc = c.get("securityContext", {})
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            bad.append(f"{c['name']} runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) in (None, 0):
            bad.append(f"{c['name']} runAsUser")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{c['name']} allowPrivilegeEscalation")
        if sc.get("privileged"):
            bad.append(f"{c['name']} privileged")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            bad.append(f"{c['name']} capabilities.drop")
        if not set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}:
            bad.append(f"{c['name']} capabilities.add")
        if "seccompProfile" in sc and sc["seccompProfile"].get("type") not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{c['name']} seccompProfile")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{c['name']} readOnlyRootFilesystem")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{c['name']} hostPort")
    return bad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("component", ["coordinator", "worker"])
def test_pods_meet_the_restricted_pod_security_standard(kind, component):
    pod_spec = _pod_specs(kind)[component]
    assert _restricted_violations(pod_spec) == []
    assert pod_spec["securityContext"]["runAsUser"] == pod_spec["securityContext"]["runAsGroup"] == 10001
    assert pod_spec["automountServiceAccountToken"] is False
    # the root filesystem is read-only, so something must be writable
    mounts = {m["mountPath"] for m in pod_spec["containers"][0]["volumeMounts"]}
    assert "/tmp" in mounts
    mplconfigdir = [e["value"] for e in pod_spec["containers"][0]["env"] if e["name"] == "MPLCONFIGDIR"]
    assert len(mplconfigdir) == 1 and mplconfigdir[0].startswith("/tmp")


def test_restricted_check_catches_a_violation():
    pod_spec = _pod_specs("cpu")["worker"]
    pod_spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    pod_spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert _restricted_violations(pod_spec) == ["volume host", "worker allowPrivilegeEscalation"]


@pytest.mark.parametrize("kind", KINDS)
def test_coordinator_command_carries_the_spec(kind):
    spec = _spec(kind)
    container = _all(kind)["deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["elasticmoe", "coordinator"]
    extra = spec.engine.extra_args
    args = container["args"][:len(container["args"]) - len(extra)]
    assert container["args"][len(args):] == extra  # last, so they can override
    flags = _flags(args)
    assert flags == {
        "--host": "0.0.0.0", "--port": "8000", "--control-port": "5555",
        "--advertise-host": "moe-coordinator.serving.svc", "--devices": str(spec.devices.desired),
        "--backend": kind,
        "--dtype": spec.model.dtype, "--kv-cache-mb": str(spec.engine.kv_cache_mb),
        "--max-num-seqs": str(spec.engine.max_num_seqs), "--expert-copies": str(spec.engine.expert_copies),
        **({"--model": spec.model.source} if spec.model.source else {}),
        **({"--served-model-name": spec.model.served_name} if spec.model.served_name else {}),
        **({"--max-model-len": str(spec.engine.max_model_len)} if spec.engine.max_model_len else {}),
        **({"--redundant-expert-mb": str(spec.engine.redundant_expert_mb)}
           if spec.engine.redundant_expert_mb is not None else {}),
    }


def test_coordinator_args_of_the_full_spec():
    args = children.coordinator_args(NAME, NAMESPACE, _spec("cuda"), devices=5)
    flags = _flags(args[:-2])
    assert (flags["--model"], flags["--served-model-name"], flags["--dtype"]) == ("/models/qwen3-30b-a3b", "qwen3",
                                                                                 "bfloat16")
    assert (flags["--kv-cache-mb"], flags["--max-num-seqs"], flags["--max-model-len"]) == ("4096", "128", "8192")
    assert flags["--devices"] == "5"
    assert (flags["--expert-copies"], flags["--redundant-expert-mb"]) == ("2", "2048")
    assert args[-2:] == ["--block-size", "32"]


def test_empty_model_source_uses_the_embedded_model():
    args = children.coordinator_args(NAME, NAMESPACE, _spec("cpu"), devices=2)
    assert "--model" not in args and "--served-model-name" not in args and "--max-model-len" not in args
    assert "--redundant-expert-mb" not in args  # unset: no budget, every expert gets its copies


@pytest.mark.parametrize("kind", KINDS)
def test_workers_register_on_the_coordinator_services_control_port(kind):
    objs = _all(kind)
    service, coordinator = objs["service"], objs["deployment"]["spec"]["template"]["spec"]["containers"][0]
    worker = objs["worker3"]["spec"]["containers"][0]
    assert worker["command"] == ["elasticmoe", "worker"]
    flags = _flags(worker["args"])
    assert flags["--device-index"] == "3" and flags["--backend"] == kind
    scheme, rest = flags["--coordinator"].split("://")
    host, port = rest.rsplit(":", 1)
    assert scheme == "tcp"
    assert host == f"{service['metadata']['name']}.{NAMESPACE}.svc"
    control = next(p for p in service["spec"]["ports"] if p["name"] == "control")
    assert int(port) == control["port"] == children.PORT_CONTROL
    # ... and the Service forwards it to the coordinator container's port of that name
    assert {"name": control["targetPort"], "containerPort": children.PORT_CONTROL, "protocol": "TCP"} \
        in coordinator["ports"]
    assert service["spec"]["publishNotReadyAddresses"] is True


def _secret_refs(container: dict) -> dict[str, dict]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}


@pytest.mark.parametrize("kind", KINDS)
def test_admin_token_reaches_only_the_coordinator_and_the_worker_secret_both(kind):
    objs = _all(kind)
    secret = objs["secret"]
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "token": "s3cret-token", "worker-secret": "w0rker-secret"}
    name = secret["metadata"]["name"]
    coordinator = objs["deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert _secret_refs(coordinator) == {"ELASTICMOE_ADMIN_TOKEN": {"name": name, "key": "token"},
                                         "ELASTICMOE_WORKER_SECRET": {"name": name, "key": "worker-secret"}}
    for worker in ("worker0", "worker3"):
        pod_spec = objs[worker]["spec"]
        assert _secret_refs(pod_spec["containers"][0]) == {
            "ELASTICMOE_WORKER_SECRET": {"name": name, "key": "worker-secret"}}
        assert not any("secret" in v for v in pod_spec["volumes"])  # nor as a file
    env = {e["name"]: e for e in objs["worker3"]["spec"]["containers"][0]["env"]}
    assert env["ELASTICMOE_DEVICE_INDEX"] == {"name": "ELASTICMOE_DEVICE_INDEX", "value": "3"}


def test_user_env_cannot_replace_the_secrets():
    spec = api.parse_spec({"coordinator": {"env": [{"name": "ELASTICMOE_ADMIN_TOKEN", "value": "mine"}]},
                           "worker": {"env": [{"name": "ELASTICMOE_WORKER_SECRET", "value": "mine"}]}})
    owner = _owner("cpu")
    coordinator = children.coordinator_deployment(owner, spec, IMAGE, 1)["spec"]["template"]["spec"]["containers"][0]
    worker = children.worker_pod(owner, spec, IMAGE, 0)["spec"]["containers"][0]
    for container, env in ((coordinator, "ELASTICMOE_ADMIN_TOKEN"), (worker, "ELASTICMOE_WORKER_SECRET")):
        assert [e for e in container["env"] if e["name"] == env] == [
            {"name": env, "valueFrom": {"secretKeyRef": {"name": "moe-admin-token", "key": children.TOKEN_KEY
                                                         if env == "ELASTICMOE_ADMIN_TOKEN" else "worker-secret"}}}]


@pytest.mark.parametrize("token, worker_secret", [("", "w"), ("t", ""), ("same", "same")])
def test_the_secret_needs_two_different_values(token, worker_secret):
    with pytest.raises(ValueError, match="worker secret"):
        children.secret(_owner("cpu"), token, worker_secret)


def test_secret_values_decode_what_was_written_and_a_patch_adds_the_worker_secret():
    made = children.secret(_owner("cpu"), "t", "w")
    assert children.secret_values(made) == {"token": "t", "worker-secret": "w"}
    old = {"metadata": {"name": "moe-admin-token", "resourceVersion": "41"},
           "data": {"token": base64.b64encode(b"t").decode()}}
    patch = children.worker_secret_patch(old, "w2")
    assert patch["metadata"] == {"resourceVersion": "41"} and "token" not in patch["data"]
    assert children.secret_values({**old, "data": {**old["data"], **patch["data"]}}) == {"token": "t",
                                                                                         "worker-secret": "w2"}
    assert children.secret_values({"stringData": {"token": "plain"}}) == {"token": "plain"}


@pytest.mark.parametrize("kind", KINDS)
def test_user_env_is_passed_but_cannot_replace_operator_variables(kind):
    spec, objs = _spec(kind), _all(kind)
    worker_env = objs["worker0"]["spec"]["containers"][0]["env"]
    names = [e["name"] for e in worker_env]
    assert len(names) == len(set(names))
    for e in spec.worker.env:
        if e["name"] != "ELASTICMOE_DEVICE_INDEX":
            assert e in worker_env
    coordinator_env = objs["deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
    for e in spec.coordinator.env:
        assert e in coordinator_env


@pytest.mark.parametrize("kind", KINDS)
def test_model_volume_is_mounted_read_only_in_every_pod(kind):
    spec = _spec(kind)
    for pod_spec in _pod_specs(kind).values():
        mounts = [m for m in pod_spec["containers"][0]["volumeMounts"] if m["name"] == "model"]
        volumes = [v for v in pod_spec["volumes"] if v["name"] == "model"]
        if spec.model.volume is None:
            assert mounts == volumes == []
        else:
            assert mounts == [{"name": "model", "mountPath": spec.model.mount_path, "readOnly": True}]
            assert volumes == [{"name": "model", **spec.model.volume}]


@pytest.mark.parametrize("kind", KINDS)
def test_worker_pod_shape(kind):
    spec = _spec(kind)
    pod_spec = _all(kind)["worker0"]["spec"]
    assert pod_spec["restartPolicy"] == "Never"
    assert pod_spec["terminationGracePeriodSeconds"] == 30
    dshm = next(v for v in pod_spec["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{spec.worker.shm_size_mi_b}Mi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod_spec["containers"][0]["volumeMounts"]
    assert pod_spec.get("nodeSelector", {}) == spec.worker.node_selector
    assert pod_spec.get("tolerations", []) == spec.worker.tolerations
    assert pod_spec["containers"][0]["image"] == IMAGE
    assert pod_spec["containers"][0]["imagePullPolicy"] == spec.worker.image_pull_policy


@pytest.mark.parametrize("kind", KINDS)
def test_coordinator_deployment_shape(kind):
    spec, deployment = _spec(kind), _all(kind)["deployment"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod_spec = deployment["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    liveness, startup = container["livenessProbe"], container["startupProbe"]
    assert liveness["failureThreshold"] * liveness["periodSeconds"] >= 120
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 300
    assert pod_spec["restartPolicy"] == "Always" and pod_spec["terminationGracePeriodSeconds"] == 30
    assert pod_spec.get("nodeSelector", {}) == spec.coordinator.node_selector
    assert container["imagePullPolicy"] == spec.coordinator.image_pull_policy


@pytest.mark.parametrize("kind", KINDS)
def test_config_map_holds_the_parsed_spec(kind):
    spec = _spec(kind)
    assert json.loads(children.config_map(_owner(kind), spec)["data"]["spec.json"]) == spec.dump()


def test_outputs_do_not_alias_the_spec_or_each_other():
    owner, spec = _owner("cuda"), _spec("cuda")
    before = spec.dump()
    pod = children.worker_pod(owner, spec, IMAGE, 0)
    pristine_pod = json.loads(json.dumps(pod))
    pod["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "1000"
    pod["spec"]["containers"][0]["env"][-1]["value"] = "changed"  # the user's
    pod["spec"]["containers"][0]["env"][2]["value"] = "changed"  # the default MPLCONFIGDIR
    pod["spec"]["tolerations"][0]["key"] = "changed"
    pod["spec"]["nodeSelector"]["extra"] = "changed"
    next(v for v in pod["spec"]["volumes"] if v["name"] == "model")["persistentVolumeClaim"]["claimName"] = "x"
    deployment = children.coordinator_deployment(owner, spec, IMAGE, 2)
    pristine_deployment = json.loads(json.dumps(deployment))
    deployment["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] = "changed"
    deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] = "1000"
    assert spec.dump() == before
    assert children.worker_pod(owner, spec, IMAGE, 0) == pristine_pod
    assert children.coordinator_deployment(owner, spec, IMAGE, 2) == pristine_deployment


@pytest.mark.parametrize("index", [0, 1, 7, 1023])
def test_worker_index_round_trips(index):
    assert children.worker_index(children.worker_pod(_owner("cpu"), _spec("cpu"), IMAGE, index)) == index


@pytest.mark.parametrize("pod", [
    {}, {"metadata": {}}, {"metadata": {"labels": None}},
    {"metadata": {"labels": {"app.kubernetes.io/component": "worker"}}},
    *({"metadata": {"labels": {"elasticmoe.io/device-index": v}}}
      for v in ["", "x", "-1", "+1", "01", "1.0", " 1", "\u0661"]),  # the last: ARABIC-INDIC DIGIT ONE
])
def test_worker_index_rejects_a_pod_without_a_valid_label(pod):
    assert children.worker_index(pod) is None


def test_negative_worker_index_is_refused():
    with pytest.raises(ValueError, match="worker index"):
        children.worker_pod(_owner("cpu"), _spec("cpu"), IMAGE, -1)


@pytest.mark.parametrize("kind", KINDS)
def test_the_pod_commands_parse_with_the_workers_own_cli(kind):
    """The operator writes `elasticmoe coordinator` / `elasticmoe worker` command lines; the CLI
    they run must accept every flag (a flag the serving plane dropped fails here, not in a pod)."""
    from elasticmoe_worker import cli  # the tests may import the worker; the operator may not

    parser = cli.build_parser()
    objs = _all(kind)
    coordinator = objs["deployment"]["spec"]["template"]["spec"]["containers"][0]
    args = parser.parse_args([*coordinator["command"][1:], *coordinator["args"]])
    assert (args.command, args.devices, args.backend) == ("coordinator", _spec(kind).devices.desired, kind)
    worker = objs["worker3"]["spec"]["containers"][0]
    args = parser.parse_args([*worker["command"][1:], *worker["args"]])
    assert (args.command, args.device_index) == ("worker", 3)

"""The Kubernetes objects the operator creates for one `ElasticMoE`, as plain dicts.

Why: the handlers decide *which* children should exist; this module says *what* each one
is, so names, labels, commands and security settings live in one place and are tested
without a cluster. Pure: no I/O, no clock, no kopf, no torch. Every builder returns a fresh
dict (pass-through parts of the spec are deep-copied), so callers may mutate the result.

What this module does not guarantee: that the API server accepts the objects. Pass-through
parts of the spec (the model volume, resources, env, tolerations) are Kubernetes' own types
and are validated by the server, not here; a hostPath or nfs model volume, for instance,
is refused by a namespace that enforces the restricted Pod Security Standard. Names are
not shortened: an instance name longer than 49 characters makes a Service name over the
63-character DNS label limit.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json

from elasticmoe_operator import api

PORT_HTTP = 8000
PORT_CONTROL = 5555
# The instance's Secret holds two keys (DESIGN 5.2): the admin API's bearer token, which only the
# coordinator (and the operator) know, and the worker secret, which the coordinator and its
# workers share for the control channel and the collectives. A worker never gets the admin token.
TOKEN_KEY = "token"
WORKER_SECRET_KEY = "worker-secret"
ADMIN_TOKEN_ENV = "ELASTICMOE_ADMIN_TOKEN"
WORKER_SECRET_ENV = "ELASTICMOE_WORKER_SECRET"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_DEVICE_INDEX = "elasticmoe.io/device-index"
COMPONENT_COORDINATOR = "coordinator"
COMPONENT_WORKER = "worker"
COMPONENT_CONFIG = "config"
COMPONENT_NETWORK = "network"
MANAGED_BY = "elasticmoe-operator"

RUN_AS_ID = 10001  # the image's `elasticmoe` user and group (see Dockerfile)
TERMINATION_GRACE_S = 30


def coordinator_name(name: str) -> str:
    return f"{name}-coordinator"


def worker_name(name: str, index: int) -> str:
    return f"{name}-worker-{index}"


def secret_name(name: str) -> str:
    """The Secret with the admin token and the worker secret (named before the latter existed)."""
    return f"{name}-admin-token"


def config_name(name: str) -> str:
    return f"{name}-config"


def network_policy_name(name: str) -> str:
    return f"{name}-ingress"


def labels(name: str, component: str) -> dict[str, str]:
    return {LABEL_NAME: "elasticmoe", LABEL_INSTANCE: name, LABEL_COMPONENT: component,
            LABEL_MANAGED_BY: MANAGED_BY}


def _selector_labels(name: str, component: str) -> dict[str, str]:
    # NOTE: a Deployment's selector is immutable; keep it to labels that never change.
    return {LABEL_INSTANCE: name, LABEL_COMPONENT: component}


def worker_selector(name: str) -> str:
    """The label selector of the worker pods, as `status.selector` (scale subresource) wants it."""
    return ",".join(f"{k}={v}" for k, v in _selector_labels(name, COMPONENT_WORKER).items())


def coordinator_host(name: str, namespace: str) -> str:
    return f"{coordinator_name(name)}.{namespace}.svc"


def owner_reference(owner: dict) -> dict:
    meta = owner["metadata"]
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}


def _metadata(owner: dict, name: str, component: str) -> dict:
    return {"name": name, "namespace": owner["metadata"]["namespace"],
            "labels": labels(owner["metadata"]["name"], component),
            "ownerReferences": [owner_reference(owner)]}


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode("ascii")


def secret(owner: dict, token: str, worker_secret: str) -> dict:
    if not token or not worker_secret or token == worker_secret:
        raise ValueError("secret: expected a non-empty admin token and a different, non-empty worker secret")
    # `data`, not `stringData`: what a later read returns is what was written.
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _metadata(owner, secret_name(owner["metadata"]["name"]), COMPONENT_COORDINATOR),
            "data": {TOKEN_KEY: _b64(token), WORKER_SECRET_KEY: _b64(worker_secret)}}


def worker_secret_patch(existing: dict, worker_secret: str) -> dict:
    """Merge patch adding the worker secret to a Secret made before it existed (its admin token
    kept); it carries the resourceVersion read, so a concurrent writer makes it fail (409)."""
    return {"metadata": {"resourceVersion": existing["metadata"]["resourceVersion"]},
            "data": {WORKER_SECRET_KEY: _b64(worker_secret)}}


def secret_values(existing: dict) -> dict[str, str]:
    """The decoded keys of a Secret as read back (`data`; `stringData` if someone wrote that)."""
    out = {k: base64.b64decode(v).decode() for k, v in (existing.get("data") or {}).items()}
    return {**dict(existing.get("stringData") or {}), **out}


def _secret_env(env: str, name: str, key: str) -> dict:
    return {"name": env, "valueFrom": {"secretKeyRef": {"name": secret_name(name), "key": key}}}


def config_map(owner: dict, spec: api.ElasticMoESpec) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(owner, config_name(owner["metadata"]["name"]), COMPONENT_CONFIG),
            "data": {"spec.json": json.dumps(spec.dump(), indent=2, sort_keys=True) + "\n"}}


def coordinator_service(owner: dict) -> dict:
    name = owner["metadata"]["name"]
    ports = [{"name": "http", "port": PORT_HTTP, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"},
             {"name": "control", "port": PORT_CONTROL, "targetPort": "control", "protocol": "TCP"}]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(owner, coordinator_name(name), COMPONENT_COORDINATOR),
            "spec": {"type": "ClusterIP", "selector": _selector_labels(name, COMPONENT_COORDINATOR),
                     "ports": ports,
                     # NOTE: workers register (and their collectives rendezvous) on `control`
                     # *before* the coordinator can be healthy (it waits for them), so that port
                     # must be reachable while it is not Ready. There is one coordinator, so this sends
                     # API traffic nowhere it would not go anyway; its /health still answers 503.
                     "publishNotReadyAddresses": True}}


def _pod_security_context() -> dict:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_ID, "runAsGroup": RUN_AS_ID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security_context() -> dict:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_ID, "runAsGroup": RUN_AS_ID,
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "privileged": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _env(fixed: list[dict], defaults: list[dict], user: list[dict]) -> list[dict]:
    """Operator-owned variables, then defaults the user did not set, then the user's (which
    may not replace an operator-owned one: the secrets and the device index must stay ours)."""
    fixed_names = {e["name"] for e in fixed}
    user_names = {e.get("name") for e in user}
    return (fixed + [dict(e) for e in defaults if e["name"] not in user_names]
            + [copy.deepcopy(e) for e in user if e.get("name") not in fixed_names])


# The root filesystem is read-only; anything that must write goes to /tmp (an emptyDir).
_DEFAULT_ENV = [{"name": "MPLCONFIGDIR", "value": "/tmp"}]


def _volumes(spec: api.ElasticMoESpec) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) shared by the coordinator and the workers: /tmp and the model."""
    volumes = [{"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    if spec.model.volume:
        volumes.append({"name": "model", **copy.deepcopy(spec.model.volume)})
        mounts.append({"name": "model", "mountPath": spec.model.mount_path, "readOnly": True})
    return volumes, mounts


def _pod_spec(pod: api.PodSpec, container: dict, volumes: list[dict], restart_policy: str) -> dict:
    out = {"restartPolicy": restart_policy, "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
           # Neither process talks to the Kubernetes API.
           "automountServiceAccountToken": False,
           # Service links would inject variables such as ELASTICMOE_COORDINATOR_PORT (for an
           # instance named `elasticmoe`) into our own ELASTICMOE_* namespace.
           "enableServiceLinks": False,
           "securityContext": _pod_security_context(), "containers": [container], "volumes": volumes}
    if pod.node_selector:
        out["nodeSelector"] = dict(pod.node_selector)
    if pod.tolerations:
        out["tolerations"] = copy.deepcopy(pod.tolerations)
    return out


def coordinator_args(name: str, namespace: str, spec: api.ElasticMoESpec, devices: int) -> list[str]:
    """`elasticmoe coordinator` arguments; `devices` is the device count it starts with."""
    model, engine = spec.model, spec.engine
    args = ["--host", "0.0.0.0", "--port", str(PORT_HTTP), "--control-port", str(PORT_CONTROL),
            "--advertise-host", coordinator_host(name, namespace),
            "--devices", str(devices), "--backend", spec.devices.backend]
    if model.source:  # empty: the embedded default model baked into the image
        args += ["--model", model.source]
    if model.served_name:
        args += ["--served-model-name", model.served_name]
    args += ["--dtype", model.dtype, "--kv-cache-mb", str(engine.kv_cache_mb),
             "--max-num-seqs", str(engine.max_num_seqs), "--expert-copies", str(engine.expert_copies)]
    if engine.max_model_len is not None:
        args += ["--max-model-len", str(engine.max_model_len)]
    if engine.redundant_expert_mb is not None:
        args += ["--redundant-expert-mb", str(engine.redundant_expert_mb)]
    return args + list(engine.extra_args)  # last, so they can override what came before


def coordinator_deployment(owner: dict, spec: api.ElasticMoESpec, image: str, devices: int) -> dict:
    name, namespace = owner["metadata"]["name"], owner["metadata"]["namespace"]
    pod = spec.coordinator
    volumes, mounts = _volumes(spec)
    fixed = [_secret_env(ADMIN_TOKEN_ENV, name, TOKEN_KEY), _secret_env(WORKER_SECRET_ENV, name, WORKER_SECRET_KEY)]
    health = {"httpGet": {"path": "/health", "port": "http"}, "timeoutSeconds": 5}
    container = {
        "name": COMPONENT_COORDINATOR, "image": image, "imagePullPolicy": pod.image_pull_policy,
        "command": ["elasticmoe", "coordinator"], "args": coordinator_args(name, namespace, spec, devices),
        "ports": [{"name": "http", "containerPort": PORT_HTTP, "protocol": "TCP"},
                  {"name": "control", "containerPort": PORT_CONTROL, "protocol": "TCP"}],
        "env": _env(fixed, _DEFAULT_ENV, pod.env),
        "volumeMounts": mounts, "securityContext": _container_security_context(),
        # Up to 15 minutes for the model to load and the first workers (their images can be
        # large) to be scheduled and register before /health must answer.
        "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": 90},
        "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 2},
        # Generous: /health is also 503 while a lost worker is being replaced; restarting the
        # coordinator then would drop every request in flight, so give the operator 5 minutes.
        "livenessProbe": {**health, "periodSeconds": 10, "failureThreshold": 30},
    }
    if pod.resources:
        container["resources"] = copy.deepcopy(pod.resources)
    selector = _selector_labels(name, COMPONENT_COORDINATOR)
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _metadata(owner, coordinator_name(name), COMPONENT_COORDINATOR),
            "spec": {"replicas": 1,
                     # NOTE: never two coordinators: workers register with exactly one, and a
                     # rolling update would start the second while the first still holds them.
                     "strategy": {"type": "Recreate"},
                     "selector": {"matchLabels": selector},
                     "template": {"metadata": {"labels": labels(name, COMPONENT_COORDINATOR)},
                                  "spec": _pod_spec(pod, container, volumes, "Always")}}}


def _worker_resources(spec: api.ElasticMoESpec) -> dict:
    resources = copy.deepcopy(spec.worker.resources) or {}
    if spec.devices.resource:
        # Extended resources cannot be overcommitted: requests must equal limits.
        count = str(spec.devices.per_worker)
        for key in ("limits", "requests"):
            resources[key] = {**(resources.get(key) or {}), spec.devices.resource: count}
    # Nothing else per backend: an accelerator's device nodes and driver mounts (NVIDIA, Ascend)
    # are the device plugin's job once the pod requests its resource.
    return resources


def worker_pod(owner: dict, spec: api.ElasticMoESpec, image: str, index: int) -> dict:
    if index < 0:
        raise ValueError(f"worker index: got {index}, expected >= 0")
    name, namespace = owner["metadata"]["name"], owner["metadata"]["namespace"]
    pod = spec.worker
    volumes, mounts = _volumes(spec)
    # Memory-backed: the HMM's weights and KV cache live here (on cpu) and executors map them.
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{pod.shm_size_mi_b}Mi"}})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    fixed = [_secret_env(WORKER_SECRET_ENV, name, WORKER_SECRET_KEY),
             {"name": "ELASTICMOE_DEVICE_INDEX", "value": str(index)}]
    container = {
        "name": COMPONENT_WORKER, "image": image, "imagePullPolicy": pod.image_pull_policy,
        "command": ["elasticmoe", "worker"],
        "args": ["--device-index", str(index),
                 "--coordinator", f"tcp://{coordinator_host(name, namespace)}:{PORT_CONTROL}",
                 "--backend", spec.devices.backend],
        "env": _env(fixed, _DEFAULT_ENV, pod.env),
        "volumeMounts": mounts, "securityContext": _container_security_context(),
    }
    resources = _worker_resources(spec)
    if resources:
        container["resources"] = resources
    metadata = _metadata(owner, worker_name(name, index), COMPONENT_WORKER)
    metadata["labels"][LABEL_DEVICE_INDEX] = str(index)
    # restartPolicy Never: when a worker's HMM dies its device memory (weights, KV cache) is
    # gone and the coordinator has already dropped it as a lost worker; restarting the
    # container in place would bring back an empty process under the same name. Never lets the
    # pod show as Failed, and the operator decides: delete it and create it again by name.
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": _pod_spec(pod, container, volumes, "Never")}


def worker_index(pod: dict) -> int | None:
    """The device index of a worker pod from its label, or None if it has none or a bad one."""
    value = ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_DEVICE_INDEX)
    if not isinstance(value, str) or not value.isdecimal() or not value.isascii():
        return None
    index = int(value)
    return index if str(index) == value else None  # "01" is not what worker_pod writes


# -- NetworkPolicy ----------------------------------------------------------------------------
_PEER_KEYS = frozenset({"podSelector", "namespaceSelector", "ipBlock"})


@dataclasses.dataclass(frozen=True)
class NetworkPeers:
    """Who besides the instance's own pods may reach its coordinator's `http` port, as
    Kubernetes NetworkPolicyPeers: the operator (admin API), Prometheus (/metrics) and the API's
    clients (the OpenAI API is served on the same port, so only a port-level rule is possible)."""
    operator: tuple[dict, ...]
    prometheus: tuple[dict, ...]
    api_clients: tuple[dict, ...]


def network_peers(text: str) -> NetworkPeers:
    """Parse `--network-policy`: a JSON object with the lists `operator`, `prometheus`, `apiClients`."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--network-policy: not JSON ({exc}); expected an object with the lists "
                         f"operator, prometheus and apiClients") from None
    fields = {"operator": "operator", "prometheus": "prometheus", "apiClients": "api_clients"}
    if not isinstance(raw, dict) or set(raw) != set(fields):
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"--network-policy: got {got}, expected an object with exactly the keys {sorted(fields)}")
    out = {}
    for key, attr in fields.items():
        peers = raw[key]
        if not isinstance(peers, list):
            raise ValueError(f"--network-policy.{key}: got {type(peers).__name__}, expected a list of NetworkPolicyPeers")
        for i, peer in enumerate(peers):
            if not isinstance(peer, dict) or not peer or not set(peer) <= _PEER_KEYS:
                raise ValueError(f"--network-policy.{key}[{i}]: got {peer!r}, expected a NetworkPolicyPeer "
                                 f"(one or more of {sorted(_PEER_KEYS)})")
        out[attr] = tuple(copy.deepcopy(peers))
    return NetworkPeers(**out)


def _instance_pods(name: str) -> dict:
    """Every pod of the instance: the coordinator's and the workers' (not another instance's)."""
    return {"matchLabels": {LABEL_NAME: "elasticmoe", LABEL_INSTANCE: name}}


def network_policy(owner: dict, peers: NetworkPeers) -> dict:
    """The instance's ingress policy: its own pods reach each other on every port; the `http`
    port (OpenAI API, /admin, /metrics) takes the listed peers too; nothing else gets in."""
    name = owner["metadata"]["name"]
    # NOTE: the instance's own pods reach one another on *every* port. `control` (5555) carries
    # worker registration, heartbeats and the rendezvous of every collective group (there is no
    # separate TCPStore), but gloo's collectives then connect worker to worker on ephemeral
    # ports, which no port list can name.
    ingress = [{"from": [{"podSelector": _instance_pods(name)}]}]
    sources = [copy.deepcopy(p) for p in (*peers.operator, *peers.prometheus, *peers.api_clients)]
    if sources:  # NOTE: an empty `from` would admit every source; no peers: only the instance's own pods
        ingress.append({"ports": [{"port": "http", "protocol": "TCP"}], "from": sources})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _metadata(owner, network_policy_name(name), COMPONENT_NETWORK),
            "spec": {"podSelector": _instance_pods(name), "policyTypes": ["Ingress"], "ingress": ingress}}

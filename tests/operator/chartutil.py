"""Lint and render the elasticmoe Helm chart with real Helm (helm-sdkpy), for the chart's tests.

helm-sdkpy has no `helm template` and its Install has no client-only dry run: its options are
create_namespace, wait, timeout, schema validation, apply method, ownership and rollback, and
every install talks to a cluster. So a chart is rendered by a real `helm install` into kmock's
`KubernetesEmulator` behind a generated kubeconfig. Helm discovers the API (/version, /api,
/apis), checks the chart's kubeVersion, renders, maps every object to a served resource,
checks none exists and creates them; the release's manifest and the objects the emulator
received are the result.

Two things make this work:
- Helm keeps its release record in memory (HELM_DRIVER=memory). The Go runtime inside
  helm-sdkpy reads the environment only when it loads, so the install runs in a child Python
  process started with that variable (`python chartutil.py --child`). With the default
  Secret driver, Helm would write the record as protobuf, which kmock cannot parse.
- `_Cluster` fixes what kmock 0.8 serves for this: a Kubernetes version new enough for the
  chart, the group version of the core API ("v1", not "/v1"), and CRDs that start being
  served once created, as a real API server does.

What this does not do: no admission, defaulting, RBAC or OpenAPI validation happens in the
emulator; the tests validate the objects themselves (kubernetes-validate).

`lint` runs Helm's lint in this process. helm-sdkpy's Lint takes no values (it lints with the
chart's values.yaml), so values are linted from a copy of the chart whose values.yaml is the
chart's own merged with them.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "elasticmoe"

# Severity of a helm lint message (helm.sh/helm/v4/pkg/chart/v2/lint/support).
LINT_INFO, LINT_WARNING, LINT_ERROR = 1, 2, 3

_RENDER_TIMEOUT_S = 120


def kube_version() -> str:
    """The newest Kubernetes version kubernetes-validate has schemas for, e.g. '1.37.0'."""
    import kubernetes_validate

    return kubernetes_validate.latest_version()


def deep_merge(base: dict, override: dict) -> dict:
    """`override` merged into a copy of `base`, dicts recursively, like Helm merges values."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def default_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def ci_values() -> dict[str, dict]:
    """The chart's ci/*-values.yaml by file name, e.g. {'cluster-values.yaml': {...}}."""
    return {p.name: yaml.safe_load(p.read_text()) or {} for p in sorted((CHART / "ci").glob("*-values.yaml"))}


# -- lint ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LintMessage:
    severity: int
    path: str  # helm-sdkpy returns the messages' texts empty; the path is all there is


def lint(values: dict | None = None) -> list[LintMessage]:
    """`helm lint` of the chart with `values` merged over its values.yaml."""
    import helm_sdkpy

    with tempfile.TemporaryDirectory(prefix="elasticmoe-lint-") as tmp:
        chart = pathlib.Path(tmp) / CHART.name
        shutil.copytree(CHART, chart)
        if values:
            merged = deep_merge(default_values(), values)
            (chart / "values.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
        result = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(str(chart)))
    messages = [LintMessage(m["Severity"], m["Path"]) for m in result.get("Messages") or []]
    if result.get("Errors") and not any(m.severity >= LINT_ERROR for m in messages):
        messages.append(LintMessage(LINT_ERROR, "<errors without a message>"))
    return messages


# -- render -------------------------------------------------------------------------------
@dataclasses.dataclass
class Rendered:
    """One `helm install` into the emulator."""
    values: dict
    namespace: str
    release: str
    error: str = ""  # Helm's error when the install failed (rendering, schema, kubeVersion...)
    manifests: list[tuple[str, dict]] = dataclasses.field(default_factory=list)  # (template, object)
    notes: str = ""
    created: list[dict] = dataclasses.field(default_factory=list)  # what the API server received, CRDs too

    def find(self, kind: str, name: str | None = None) -> list[dict]:
        return [o for _, o in self.manifests if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = self.find(kind, name)
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}: {self.kinds()}"
        return found[0]

    def kinds(self) -> list[str]:
        return sorted(f"{o['kind']}/{o['metadata']['name']}" for _, o in self.manifests)


_SOURCE = re.compile(r"^# Source: (\S+)", re.M)


def _split_manifest(manifest: str) -> list[tuple[str, dict]]:
    docs = []
    for text in re.split(r"^---\s*$", manifest, flags=re.M):
        obj = yaml.safe_load(text)
        if obj:
            match = _SOURCE.search(text)
            docs.append((match.group(1) if match else "?", obj))
    return docs


def render_many(jobs: list[dict]) -> list[Rendered]:
    """Install a chart once per job ({values, namespace, release, chart}), each into a fresh emulator.

    chart defaults to CHART; one child process for all jobs (loading Helm takes ~0.3s).
    """
    jobs = [{"values": j.get("values") or {}, "namespace": j.get("namespace", "elasticmoe"),
             "release": j.get("release", "emoe"), "chart": str(j.get("chart", CHART))} for j in jobs]
    with tempfile.TemporaryDirectory(prefix="elasticmoe-render-") as tmp:
        out = pathlib.Path(tmp) / "result.json"
        env = {**os.environ, "HELM_DRIVER": "memory",
               # Helm's caches and config in a scratch directory, not the user's home.
               "HELM_CACHE_HOME": tmp, "HELM_CONFIG_HOME": tmp, "HELM_DATA_HOME": tmp}
        proc = subprocess.run([sys.executable, __file__, "--child", str(out)], input=json.dumps(jobs),
                              text=True, capture_output=True, env=env, timeout=_RENDER_TIMEOUT_S)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"rendering the chart failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        results = json.loads(out.read_text())
    rendered = []
    for job, result in zip(jobs, results):
        rel = result.get("release") or {}
        rendered.append(Rendered(values=job["values"], namespace=job["namespace"], release=job["release"],
                                 error=result.get("error", ""),
                                 manifests=_split_manifest(rel.get("manifest", "")),
                                 notes=(rel.get("info") or {}).get("notes", ""),
                                 created=result.get("created", [])))
    return rendered


def render(values: dict | None = None, namespace: str = "elasticmoe", release: str = "emoe",
           chart: pathlib.Path = CHART) -> Rendered:
    return render_many([{"values": values, "namespace": namespace, "release": release, "chart": chart}])[0]


# -- the child process: a real helm install into kmock's emulator -------------------------
_VERBS = ["get", "list", "watch", "create", "update", "patch", "delete"]

# The resources the emulator serves: what the chart creates and the core kinds beside them
# (group/version/plural, kind, namespaced).
_RESOURCES = [
    ("v1/namespaces", "Namespace", False),
    ("v1/configmaps", "ConfigMap", True),
    ("v1/secrets", "Secret", True),
    ("v1/services", "Service", True),
    ("v1/serviceaccounts", "ServiceAccount", True),
    ("v1/pods", "Pod", True),
    ("v1/events", "Event", True),
    ("apps/v1/deployments", "Deployment", True),
    ("rbac.authorization.k8s.io/v1/roles", "Role", True),
    ("rbac.authorization.k8s.io/v1/rolebindings", "RoleBinding", True),
    ("rbac.authorization.k8s.io/v1/clusterroles", "ClusterRole", False),
    ("rbac.authorization.k8s.io/v1/clusterrolebindings", "ClusterRoleBinding", False),
    ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition", False),
    # prometheus-operator's CRDs, as in a cluster with kube-prometheus-stack.
    ("monitoring.coreos.com/v1/servicemonitors", "ServiceMonitor", True),
    ("monitoring.coreos.com/v1/prometheusrules", "PrometheusRule", True),
]


def _emulator_class():
    import kmock

    class _Cluster(kmock.KubernetesEmulator):
        """kmock's emulator as a Kubernetes `kube_version()` API server, for Helm."""

        async def _serve_server_version(self, request):
            major, minor, _ = kube_version().split(".")
            return {"major": major, "minor": minor, "gitVersion": f"v{kube_version()}",
                    "platform": "linux/amd64"}

        async def _serve_version(self, request):
            payload = await super()._serve_version(request)
            # kmock 0.8 writes "/v1" for the core group; client-go then maps no core kind.
            payload["groupVersion"] = payload["groupVersion"].lstrip("/")
            return payload

        async def _handle(self, request):
            response = await super()._handle(request)
            if (request.resource is not None and request.resource.plural == "customresourcedefinitions"
                    and request.action == kmock.action.CREATE and response.status < 300):
                self.serve_crd(request.data)
            return response

        def serve_crd(self, crd: dict) -> None:
            spec, names = crd["spec"], crd["spec"]["names"]
            for version in spec["versions"]:
                if version.get("served", True):
                    subresources = set((version.get("subresources") or {}).keys())
                    self.resources[f"{spec['group']}/{version['name']}/{names['plural']}"] = kmock.ResourceInfo(
                        kind=names["kind"], singular=names.get("singular"), namespaced=spec["scope"] == "Namespaced",
                        verbs=_VERBS, shortnames=names.get("shortNames", []), subresources=subresources)

    return _Cluster


async def _install(job: dict) -> dict:
    import helm_sdkpy
    import kmock

    async with _emulator_class()() as cluster, kmock.Server(cluster) as server:
        for key, kind, namespaced in _RESOURCES:
            cluster.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, verbs=_VERBS)
        kubeconfig = yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": str(server.url)}}],
            "users": [{"name": "emulator", "user": {"token": "unused"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                          "namespace": job["namespace"]}}],
        })
        config = helm_sdkpy.Configuration(namespace=job["namespace"], kubeconfig=kubeconfig)
        result: dict[str, Any] = {}
        try:
            result["release"] = await helm_sdkpy.Install(config).run(
                job["release"], job["chart"], values=job["values"], wait=False, timeout=60)
        except helm_sdkpy.HelmError as exc:
            result["error"] = str(exc)
        result["created"] = [obj.raw for obj in cluster.objects.values() if not obj.deleted]
        return result


def _child(out: str) -> None:
    if os.environ.get("HELM_DRIVER") != "memory":
        raise SystemExit("chartutil --child needs HELM_DRIVER=memory in its environment from the start")
    jobs = json.loads(sys.stdin.read())
    results = [asyncio.run(_install(job)) for job in jobs]
    pathlib.Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(sys.argv[2])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --child RESULT_JSON  (jobs as JSON on stdin)")

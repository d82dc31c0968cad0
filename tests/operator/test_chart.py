"""The elasticmoe Helm chart, through real Helm (helm-sdkpy): `helm lint` with every values
file, a real `helm install` of each into kmock's Kubernetes emulator (see chartutil), every
object it creates validated against the Kubernetes schemas of the newest version
kubernetes-validate knows, least-privilege RBAC per watch scope, the restricted Pod Security
Standard, and values that are documented and typed.

prometheus-operator's objects (ServiceMonitor, PrometheusRule) are CRDs kubernetes-validate has
no schema for: they are checked against the subset of their CRD schemas the chart uses
(_MONITORING_SCHEMAS), and the PrometheusRule's rules by promtool in test_rules.py.
"""

from __future__ import annotations

import base64
import json
import pathlib
import re
import shutil

import jsonschema
import kubernetes_validate
import pytest
import yaml

import chartutil

KUBE_VERSION = chartutil.kube_version()
CI_VALUES = chartutil.ci_values()
SCENARIOS = {"values.yaml": {}, **CI_VALUES}
NAMESPACE, RELEASE = "elasticmoe", "emoe"
OPERATOR = f"{RELEASE}-operator"
SERVICE_ACCOUNT = {"kind": "ServiceAccount", "name": OPERATOR, "namespace": NAMESPACE}

# What the operator must be able to do in a namespace it serves (the helpers' contract):
# (apiGroup, resource) -> verbs.
OPERATOR_NEEDS = {
    ("elasticmoe.io", "elasticmoes"): {"get", "list", "watch", "patch", "update"},
    ("elasticmoe.io", "elasticmoes/status"): {"get", "patch", "update"},
    # children set blockOwnerDeletion (OwnerReferencesPermissionEnforcement checks this)
    ("elasticmoe.io", "elasticmoes/finalizers"): {"update"},
    **{("", r): {"get", "list", "watch", "create", "patch", "update", "delete"}
       for r in ("pods", "services", "configmaps", "secrets")},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
# With networkPolicy.enabled (ci/cluster-values.yaml): one NetworkPolicy per instance.
NETWORK_POLICY_NEEDS = {("networking.k8s.io", "networkpolicies"): {"get", "create", "patch"}}
# What kopf reads cluster-wide, whatever the scope.
CLUSTER_READS = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}

# The serving metrics the coordinator exports (the helpers' contract); histograms as series.
METRICS = {
    *(f"elasticmoe_{h}_{s}" for h in ("time_to_first_token_seconds", "time_per_output_token_seconds",
                                       "e2e_request_latency_seconds") for s in ("bucket", "sum", "count")),
    "elasticmoe_num_requests_running", "elasticmoe_num_requests_waiting", "elasticmoe_kv_cache_used_blocks",
    "elasticmoe_kv_cache_total_blocks", "elasticmoe_healthy", "elasticmoe_preemptions",
    "elasticmoe_prompt_tokens_total", "elasticmoe_generation_tokens_total",
    "elasticmoe_requests_finished_total", "elasticmoe_requests_rejected_total",
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, chartutil.Rendered]:
    no_crds = tmp_path_factory.mktemp("chart") / "elasticmoe"
    shutil.copytree(chartutil.CHART, no_crds, ignore=shutil.ignore_patterns("crds"))
    jobs = {name: {"values": values} for name, values in SCENARIOS.items()}
    jobs["cluster+monitoring"] = {"values": chartutil.deep_merge(CI_VALUES["monitoring-values.yaml"],
                                                                 CI_VALUES["cluster-values.yaml"])}
    jobs["no crds/"] = {"values": {}, "chart": no_crds}
    jobs["namespace other"] = {"values": {}, "namespace": "other"}
    jobs["scope Bogus"] = {"values": {"watch": {"scope": "Bogus"}}}
    jobs["own token secret"] = {"values": {"alertmanager": {"tokenSecret": "my-alert-token", "exampleReceiver": {
        "enabled": True, "credentialsFile": "/secrets/token"}}}}
    jobs["rules without threshold"] = {"values": {"metrics": {"prometheusRule": {"enabled": True}}},
                                       "chart": _chart_with_broken_rules(tmp_path_factory.mktemp("broken"))}
    for job in jobs.values():
        job.setdefault("namespace", NAMESPACE)
        job["release"] = RELEASE
    return dict(zip(jobs, chartutil.render_many(list(jobs.values()))))


def _chart_with_broken_rules(root: pathlib.Path) -> pathlib.Path:
    chart = root / "elasticmoe"
    shutil.copytree(chartutil.CHART, chart)
    rules = chart / "files" / "rules.yaml"
    rules.write_text(rules.read_text().replace("elasticmoe_num_requests_waiting) > 8",
                                               "elasticmoe_num_requests_waiting) >= 8"))
    return chart


def _installed(rendered, name: str) -> chartutil.Rendered:
    result = rendered[name]
    assert not result.error, f"helm install with {name} failed: {result.error}"
    assert result.manifests, f"helm install with {name} rendered nothing"
    return result


# -- helm lint ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCENARIOS)
def test_lint_is_clean(name):
    messages = chartutil.lint(SCENARIOS[name])
    bad = [m for m in messages if m.severity >= chartutil.LINT_WARNING]
    assert not bad, f"helm lint with {name}: warnings or errors at {[(m.severity, m.path) for m in bad]}"


def test_lint_rejects_a_scope_outside_the_schema():
    messages = chartutil.lint({"watch": {"scope": "Bogus"}})
    assert chartutil.LintMessage(chartutil.LINT_ERROR, "values.yaml") in messages, messages


# -- values: documented, typed, validated ---------------------------------------------------
def _schema() -> dict:
    return json.loads((chartutil.CHART / "values.schema.json").read_text())


def _keys(node: yaml.MappingNode, schema: dict, path: tuple = ()):
    """(path, line, schema of the key) of every key of values.yaml down to the leaves, and into
    objects only where the schema names their properties (not into Kubernetes pass-through
    objects such as resources or securityContext, documented as a whole)."""
    for key_node, value_node in node.value:
        sub = (schema.get("properties") or {}).get(key_node.value)
        yield path + (key_node.value,), key_node.start_mark.line, sub
        if sub and "properties" in sub and isinstance(value_node, yaml.MappingNode):
            yield from _keys(value_node, sub, path + (key_node.value,))


def _comment_above(lines: list[str], line: int) -> list[str]:
    block = []
    while line > 0 and lines[line - 1].strip().startswith("#"):
        line -= 1
        block.insert(0, lines[line].strip())
    return block


def test_every_value_is_documented_and_in_the_schema():
    text = (chartutil.CHART / "values.yaml").read_text()
    lines, schema = text.splitlines(), _schema()
    keys = list(_keys(yaml.compose(text), schema))
    assert keys
    missing = [".".join(p) for p, _, sub in keys if sub is None]
    assert not missing, f"values.yaml keys not in values.schema.json: {missing}"
    # helm-docs: a `# --` comment right above a value documents it; objects with typed
    # properties are documented through their keys.
    undocumented = [".".join(p) for p, line, sub in keys
                    if "properties" not in sub and not any(c.startswith("# --") for c in _comment_above(lines, line))]
    assert not undocumented, f"values without a `# --` comment: {undocumented}"
    no_description = [".".join(p) for p, _, sub in keys if not sub.get("description")]
    assert not no_description, f"schema properties without a description: {no_description}"


def test_every_schema_property_is_a_value():
    def paths(schema, path=()):
        for key, sub in (schema.get("properties") or {}).items():
            yield path + (key,)
            yield from paths(sub, path + (key,))

    values = chartutil.default_values()

    def has(path):
        node = values
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        return True

    assert [".".join(p) for p in paths(_schema()) if not has(p)] == []


def test_schema_is_closed():
    def objects(schema, path="<top>"):
        if "properties" in schema:
            yield path, schema
        for key, sub in (schema.get("properties") or {}).items():
            yield from objects(sub, f"{path}.{key}")

    schema = _schema()
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    open_objects = [p for p, s in objects(schema) if s.get("additionalProperties") is not False]
    assert open_objects == []
    assert schema["properties"]["watch"]["properties"]["scope"]["enum"] == ["Namespace", "Cluster"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_values_files_meet_the_schema(name):
    jsonschema.Draft7Validator(_schema()).validate(chartutil.deep_merge(chartutil.default_values(), SCENARIOS[name]))


@pytest.mark.parametrize("bad", [
    {"watch": {"scope": "Bogus"}},
    {"watch": {"namespaces": ["Not_A_Namespace"]}},
    {"operator": {"replicas": 2}},
    {"operator": {"logLevel": "verbose"}},
    {"metrics": {"serviceMonitor": {"interval": "15 seconds"}}},
    {"metrics": {"prometheusRule": {"slo": {"ttftP90Seconds": 0}}}},
    {"metrics": {"prometheusRule": {"sloo": {}}}},
    {"metrics": {"prometheusRule": {"interval": "1 second"}}},
    {"imageTag": "latest"},
], ids=lambda bad: json.dumps(bad))
def test_schema_rejects(bad):
    values = chartutil.deep_merge(chartutil.default_values(), bad)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(_schema()).validate(values)


def test_install_rejects_a_scope_outside_the_schema(rendered):
    result = rendered["scope Bogus"]
    assert result.error and "scope" in result.error and not result.manifests, result.error


# -- every object is valid Kubernetes -------------------------------------------------------
def test_validator_is_strict():
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"selector": {}, "template": {}, "replica": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {"type": "object", "required": ["name", "namespace"],
             "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS}}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                          r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
def _closed(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": properties, "required": list(required)}


def _monitoring(kind: str, spec: dict) -> dict:
    return _closed({"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind},
                    "metadata": _METADATA, "spec": spec}, required=("apiVersion", "kind", "metadata", "spec"))


_RELABELING = _closed({
    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "targetLabel": {"type": "string"},
    "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "labelmap", "LabelMap"]},
})
_ENDPOINT = _closed({"port": {"type": "string"}, "path": {"type": "string"}, "interval": _DURATION,
                     "relabelings": {"type": "array", "items": _RELABELING}}, required=("port",))
_RULE = {**_closed({"record": {"type": "string"}, "alert": {"type": "string"},
                    "expr": {"type": "string", "minLength": 1}, "for": _DURATION,
                    "labels": _LABELS, "annotations": _LABELS}, required=("expr",)),
         "oneOf": [{"required": ["record"]}, {"required": ["alert"]}]}
_GROUP = _closed({"name": {"type": "string", "minLength": 1}, "interval": _DURATION,
                  "rules": {"type": "array", "items": _RULE}}, required=("name", "rules"))
# The parts of prometheus-operator's CRD schemas (monitoring.coreos.com/v1) the chart uses;
# closed, so a misspelt field fails here instead of being dropped by the API server.
_MONITORING_SCHEMAS = {
    "ServiceMonitor": _monitoring("ServiceMonitor", _closed({
        "selector": _closed({"matchLabels": _LABELS}),
        "namespaceSelector": _closed({"any": {"type": "boolean"},
                                      "matchNames": {"type": "array", "items": {"type": "string"}}}),
        "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
    }, required=("selector", "endpoints"))),
    "PrometheusRule": _monitoring("PrometheusRule", _closed({
        "groups": {"type": "array", "minItems": 1, "items": _GROUP},
    }, required=("groups",))),
}


def _validate(source: str, obj: dict) -> None:
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        schema = _MONITORING_SCHEMAS.get(obj["kind"])
        assert schema, f"{source}: no schema for {obj['apiVersion']} {obj['kind']}"
        jsonschema.Draft7Validator(schema).validate(obj)
    else:
        assert kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("name", [*SCENARIOS, "cluster+monitoring", "no crds/"])
def test_every_object_is_valid(rendered, name):
    result = _installed(rendered, name)
    errors = []
    for source, obj in result.manifests:
        try:
            _validate(source, obj)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{source}: {obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
    assert not errors, "\n".join(errors)
    # Namespaced objects name their namespace, so `helm template | kubectl apply` lands them right.
    unplaced = [f"{o['kind']}/{o['metadata']['name']}" for _, o in result.manifests
                if o["kind"] not in ("ClusterRole", "ClusterRoleBinding") and not o["metadata"].get("namespace")]
    assert not unplaced


@pytest.mark.parametrize("name", ["values.yaml", "no crds/"])
def test_helm_installs_the_crds_of_the_chart(rendered, name):
    result = _installed(rendered, name)
    crds = [o for o in result.created if o["kind"] == "CustomResourceDefinition"]
    shipped = [] if name == "no crds/" else [
        doc["metadata"]["name"] for path in sorted((chartutil.CHART / "crds").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert sorted(o["metadata"]["name"] for o in crds) == sorted(shipped)
    for crd in crds:
        assert kubernetes_validate.validate(crd, KUBE_VERSION, strict=True)
    # Helm sent the API server what it rendered and nothing else.
    assert len(result.created) == len(result.manifests) + len(crds)


def test_notes_warn_when_the_cluster_lacks_the_crd(rendered):
    without = _installed(rendered, "no crds/").notes
    assert "does not serve the ElasticMoE API" in without
    if list((chartutil.CHART / "crds").glob("*.yaml")):
        assert "does not serve the ElasticMoE API" not in _installed(rendered, "values.yaml").notes


def test_notes_say_how_to_run_an_elasticmoe(rendered):
    notes = _installed(rendered, "values.yaml").notes
    assert f"kubectl apply -n {NAMESPACE} -f examples/cpu.yaml" in notes
    assert f"kubectl get elasticmoe -n {NAMESPACE}" in notes
    assert f"kubectl scale elasticmoe/<name> -n {NAMESPACE} --replicas 3" in notes
    assert (chartutil.REPO / "examples" / "cpu.yaml").exists()


# -- RBAC: least privilege ----------------------------------------------------------------
def _grants(rules: list[dict]) -> dict[tuple[str, str], set[str]]:
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule.get("apiGroups", []), rule
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


def _bound_to_operator(result: chartutil.Rendered, binding_kind: str) -> dict[tuple[str, str], dict]:
    """(namespace or '', role name) -> role, for every binding of the operator's ServiceAccount."""
    role_kind = {"RoleBinding": "Role", "ClusterRoleBinding": "ClusterRole"}[binding_kind]
    bound = {}
    for binding in result.find(binding_kind):
        if SERVICE_ACCOUNT in binding["subjects"]:
            assert binding["roleRef"]["kind"] == role_kind, binding
            namespace = binding["metadata"].get("namespace", "")
            roles = [r for r in result.find(role_kind, binding["roleRef"]["name"])
                     if r["metadata"].get("namespace", "") == namespace]
            assert len(roles) == 1, f"{binding_kind} {binding['metadata']['name']} binds a missing {role_kind}"
            bound[(namespace, roles[0]["metadata"]["name"])] = roles[0]
    return bound


@pytest.mark.parametrize("name,namespaces", [("values.yaml", [NAMESPACE]),
                                             ("monitoring-values.yaml", [NAMESPACE, "ml-team"])])
def test_namespace_scope_is_least_privilege(rendered, name, namespaces):
    result = _installed(rendered, name)
    cluster_roles = _bound_to_operator(result, "ClusterRoleBinding")
    assert len(cluster_roles) == 1
    assert _grants(next(iter(cluster_roles.values()))["rules"]) == CLUSTER_READS
    roles = _bound_to_operator(result, "RoleBinding")
    assert sorted(ns for ns, _ in roles) == sorted(namespaces)
    for role in roles.values():
        assert _grants(role["rules"]) == OPERATOR_NEEDS
    # People's roles (aggregated into admin/edit/view) are bound to nobody by the chart.
    bound = {b["roleRef"]["name"] for b in result.find("ClusterRoleBinding")}
    for role in result.find("ClusterRole"):
        if role["metadata"]["name"] not in bound:
            assert any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in role["metadata"]["labels"])


@pytest.mark.parametrize("name", ["cluster-values.yaml", "cluster+monitoring"])
def test_cluster_scope_binds_one_cluster_role(rendered, name):
    result = _installed(rendered, name)
    assert result.find("Role") == [] and result.find("RoleBinding") == []
    cluster_roles = _bound_to_operator(result, "ClusterRoleBinding")
    assert len(cluster_roles) == 1
    assert _grants(next(iter(cluster_roles.values()))["rules"]) == {**OPERATOR_NEEDS, **NETWORK_POLICY_NEEDS,
                                                                      **CLUSTER_READS}


def test_cluster_roles_of_two_releases_do_not_collide(rendered):
    # Same release name in two namespaces: cluster-scoped names must differ.
    other = _installed(rendered, "namespace other")
    mine = {r["metadata"]["name"] for r in _installed(rendered, "values.yaml").find("ClusterRole")}
    assert mine and not mine & {r["metadata"]["name"] for r in other.find("ClusterRole")}


# -- the operator's pod -------------------------------------------------------------------
def _operator_pod(result: chartutil.Rendered) -> dict:
    return result.one("Deployment", OPERATOR)["spec"]["template"]["spec"]


@pytest.mark.parametrize("name", [*SCENARIOS, "cluster+monitoring"])
def test_operator_pod_meets_the_restricted_pod_security_standard(rendered, name):
    pod = _operator_pod(_installed(rendered, name))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key)
    assert all(set(v) - {"name"} <= {"emptyDir", "configMap", "secret", "projected", "downwardAPI",
                                     "persistentVolumeClaim", "ephemeral", "csi"} for v in pod["volumes"])
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True
        assert not sc.get("privileged")
        assert sc.get("runAsNonRoot", True) is True and sc.get("runAsUser", 10001) != 0
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]


def test_operator_serves_the_release_namespaces_standalone(rendered):
    result = _installed(rendered, "monitoring-values.yaml")
    deployment = result.one("Deployment", OPERATOR)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = _operator_pod(result)["containers"][0]
    assert container["command"] == ["elasticmoe", "operator"]
    assert container["args"] == ["--standalone", "--namespace", NAMESPACE, "--namespace", "ml-team",
                                 "--image", "elasticmoe:0.1.0", "--liveness", "http://0.0.0.0:8080/healthz",
                                 "--listen", "0.0.0.0:8081", "--alerts-token-file", "/etc/elasticmoe/alerts/token"]
    assert container["image"] == "elasticmoe:0.1.0"  # the tag defaults to the chart's appVersion
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert {"name": probe["port"], "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert _operator_pod(result)["serviceAccountName"] == OPERATOR


def test_operator_serves_all_namespaces_in_cluster_scope(rendered):
    container = _operator_pod(_installed(rendered, "cluster-values.yaml"))["containers"][0]
    args = container["args"]
    assert args[:11] == ["--standalone", "--all-namespaces", "--image", "elasticmoe:0.1.0-test",
                         "--liveness", "http://0.0.0.0:8080/healthz", "--listen", "0.0.0.0:8081",
                         "--alerts-token-file", "/etc/elasticmoe/alerts/token", "--network-policy"]
    assert args[12:] == ["--log-format", "text"]  # operator.extraArgs last
    assert {"name": "ELASTICMOE_LOG_LEVEL", "value": "DEBUG"} in container["env"]


def test_network_policy_peers_come_from_values_and_name_this_operator(rendered):
    from elasticmoe_operator import children

    result = _installed(rendered, "cluster-values.yaml")
    args = _operator_pod(result)["containers"][0]["args"]
    peers = children.network_peers(args[args.index("--network-policy") + 1])
    (operator,) = peers.operator
    assert operator["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
    pod_labels = result.one("Deployment", OPERATOR)["spec"]["template"]["metadata"]["labels"]
    assert operator["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert peers.prometheus == tuple(chartutil.default_values()["networkPolicy"]["prometheus"])
    assert peers.api_clients == tuple(CI_VALUES["cluster-values.yaml"]["networkPolicy"]["apiClients"])
    owner = {"apiVersion": "elasticmoe.io/v1alpha1", "kind": "ElasticMoE",
             "metadata": {"name": "demo", "namespace": "ml", "uid": "u1"}}
    assert kubernetes_validate.validate(children.network_policy(owner, peers), KUBE_VERSION, strict=True)
    # off by default: no argument, and no NetworkPolicy permissions (test_namespace_scope_is_least_privilege)
    assert "--network-policy" not in _operator_pod(_installed(rendered, "values.yaml"))["containers"][0]["args"]


@pytest.mark.parametrize("name", ["values.yaml", "default-values.yaml", "cluster-values.yaml",
                                  "monitoring-values.yaml"])
def test_operator_arguments_are_accepted_by_the_operator(rendered, name):
    """The chart's arguments parse with the real `elasticmoe operator` command line."""
    from elasticmoe_operator import children, cli

    container = _operator_pod(_installed(rendered, name))["containers"][0]
    assert container["command"] == ["elasticmoe", "operator"]
    args = cli.build_parser().parse_args(container["args"])
    assert args.standalone and args.liveness == "http://0.0.0.0:8080/healthz"
    if args.network_policy is not None:
        children.network_peers(args.network_policy)  # raises on what the operator would refuse
    assert args.listen == "0.0.0.0:8081" and args.alerts_token_file == "/etc/elasticmoe/alerts/token"
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("ELASTICMOE_LOG_LEVEL", "INFO").lower() in ("debug", "info", "warning", "error")


def test_operator_service_exposes_the_alert_webhook(rendered):
    result = _installed(rendered, "values.yaml")
    service = result.one("Service", OPERATOR)
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"webhook": (8081, "webhook"), "health": (8080, "health")}
    pod_labels = result.one("Deployment", OPERATOR)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in _operator_pod(result)["containers"][0]["ports"]}
    assert container_ports == {"health": 8080, "webhook": 8081}


def test_operator_is_not_selected_as_an_instance(rendered):
    labels = _installed(rendered, "values.yaml").one("Deployment", OPERATOR)["spec"]["template"]["metadata"]["labels"]
    # The instances' pods and Services are app.kubernetes.io/name=elasticmoe with component
    # coordinator or worker; the ServiceMonitor and status.selector select on those.
    assert labels["app.kubernetes.io/name"] != "elasticmoe"
    assert labels["app.kubernetes.io/component"] not in ("coordinator", "worker")


# -- monitoring -----------------------------------------------------------------------------
def test_monitoring_objects_only_when_enabled(rendered):
    kinds = {o["kind"] for _, o in _installed(rendered, "values.yaml").manifests}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    assert _installed(rendered, "values.yaml").find("ConfigMap") == []


@pytest.mark.parametrize("name,namespace_selector", [
    ("monitoring-values.yaml", {"matchNames": [NAMESPACE, "ml-team"]}),
    ("cluster+monitoring", {"any": True}),
])
def test_service_monitor_scrapes_the_coordinators(rendered, name, namespace_selector):
    monitor = _installed(rendered, name).one("ServiceMonitor", OPERATOR)
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    # The labels of the coordinator Service `<name>-coordinator` the operator creates.
    assert spec["selector"] == {"matchLabels": {"app.kubernetes.io/name": "elasticmoe",
                                                "app.kubernetes.io/component": "coordinator"}}
    assert spec["namespaceSelector"] == namespace_selector
    (endpoint,) = spec["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("http", "/metrics", "10s")
    assert {"sourceLabels": ["__meta_kubernetes_service_label_app_kubernetes_io_instance"],
            "targetLabel": "elasticmoe_instance", "action": "replace"} in endpoint["relabelings"]


def test_alertmanager_example_routes_alerts_to_the_operator(rendered):
    config_map = _installed(rendered, "monitoring-values.yaml").one("ConfigMap", f"{OPERATOR}-alertmanager-example")
    config = yaml.safe_load(config_map["data"]["alertmanager.yaml"])
    (route,) = config["route"]["routes"]
    assert route["matchers"] == ['alertname =~ "ElasticMoE.*"']
    assert {"namespace", "elasticmoe_instance"} <= set(route["group_by"])
    receiver = next(r for r in config["receivers"] if r["name"] == route["receiver"])
    assert receiver["webhook_configs"][0]["url"] == f"http://{OPERATOR}.{NAMESPACE}.svc:8081/alerts"
    # bearer auth with the token of the Secret the operator reads, as prometheus-operator mounts it
    assert receiver["webhook_configs"][0]["http_config"] == {"authorization": {
        "type": "Bearer", "credentials_file": f"/etc/alertmanager/secrets/{OPERATOR}-alerts/token"}}


def test_the_alert_token_secret_is_made_once_and_mounted_into_the_operator(rendered):
    result = _installed(rendered, "values.yaml")
    secret = result.one("Secret", f"{OPERATOR}-alerts")
    token = base64.b64decode(secret["data"]["token"])
    assert len(token) == 48 and token.isalnum()
    pod = _operator_pod(result)
    (volume,) = [v for v in pod["volumes"] if v["name"] == "alerts-token"]
    assert volume["secret"] == {"secretName": f"{OPERATOR}-alerts", "items": [{"key": "token", "path": "token"}]}
    assert {"name": "alerts-token", "mountPath": "/etc/elasticmoe/alerts", "readOnly": True} in \
        pod["containers"][0]["volumeMounts"]


def test_an_own_alert_token_secret_is_used_and_none_is_made(rendered):
    result = _installed(rendered, "own token secret")
    assert result.find("Secret") == []
    (volume,) = [v for v in _operator_pod(result)["volumes"] if v["name"] == "alerts-token"]
    assert volume["secret"]["secretName"] == "my-alert-token"
    config = yaml.safe_load(result.one("ConfigMap", f"{OPERATOR}-alertmanager-example")["data"]["alertmanager.yaml"])
    assert config["receivers"][1]["webhook_configs"][0]["http_config"]["authorization"]["credentials_file"] == \
        "/secrets/token"


def test_prometheus_rule_thresholds_come_from_values(rendered):
    rule = _installed(rendered, "monitoring-values.yaml").one("PrometheusRule", OPERATOR)
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert set(alerts) == {"ElasticMoETTFTHigh", "ElasticMoETPOTHigh", "ElasticMoEQueueing", "ElasticMoEUnhealthy"}
    assert alerts["ElasticMoETTFTHigh"]["expr"].endswith("p90_rate1m > 1.5")
    assert alerts["ElasticMoETPOTHigh"]["expr"].endswith("p90_rate1m > 0.05")
    assert alerts["ElasticMoEQueueing"]["expr"].endswith("(elasticmoe_num_requests_waiting) > 4")
    assert {a["for"] for a in alerts.values()} == {"15s"}
    assert {g["interval"] for g in rule["spec"]["groups"]} == {"10s"}  # metrics.prometheusRule.interval
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_prometheus_rule_refuses_an_alert_without_its_threshold(rendered):
    error = rendered["rules without threshold"].error
    assert "ElasticMoEQueueing must end in '> <threshold>'" in error, error


def test_grafana_dashboard(rendered):
    config_map = _installed(rendered, "monitoring-values.yaml").one("ConfigMap", f"{OPERATOR}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["elasticmoe.json"])
    titles = {p["title"] for p in dashboard["panels"]}
    assert titles == {"TTFT p90", "TPOT p90", "Requests waiting / running", "KV-cache usage", "Tokens/s", "Healthy"}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\belasticmoe_[a-z0-9_]+", e)} - {"elasticmoe_instance"}
    assert used and used <= METRICS, used - METRICS

"""The per-instance NetworkPolicy (`elasticmoe operator --network-policy`): what it lets in, that
it selects exactly the instance's pods, that Kubernetes' schemas accept it, how the flag is
parsed, and how the operator creates it and brings an existing one back to its peers (through
`kube.Kube` against kmock's API-server emulator)."""

from __future__ import annotations

import json

import kopf
import kubernetes_validate
import pytest
import pytest_asyncio

from elasticmoe_operator import api, children, handlers, kube
import chartutil
import cluster

NS = "ml"
OWNER = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "demo", "namespace": NS, "uid": "u1"}}
OPERATOR = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "elasticmoe"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "elasticmoe-operator"}}}
PROMETHEUS = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
CLIENTS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}
PEERS = children.NetworkPeers(operator=(OPERATOR,), prometheus=(PROMETHEUS,), api_clients=(CLIENTS,))


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) == {"matchLabels"}, selector
    return selector["matchLabels"].items() <= labels.items()


def test_own_pods_reach_every_port_and_listed_peers_only_http():
    policy = children.network_policy(OWNER, PEERS)
    assert policy["metadata"]["name"] == "demo-ingress"
    assert policy["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] is True
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]  # egress is not restricted
    own, http = spec["ingress"]
    # every port among the instance's pods: control/rendezvous, and gloo's ephemeral ports
    assert "ports" not in own and own["from"] == [{"podSelector": spec["podSelector"]}]
    assert http["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert http["from"] == [OPERATOR, PROMETHEUS, CLIENTS]
    assert kubernetes_validate.validate(policy, chartutil.kube_version(), strict=True)


def test_it_selects_the_instances_pods_and_no_other_instances():
    spec = api.parse_spec({"model": {"source": "/m"}})
    selector = children.network_policy(OWNER, PEERS)["spec"]["podSelector"]
    coordinator = children.coordinator_deployment(OWNER, spec, "img", 1)
    worker = children.worker_pod(OWNER, spec, "img", 0)
    assert _selects(selector, coordinator["spec"]["template"]["metadata"]["labels"])
    assert _selects(selector, worker["metadata"]["labels"])
    other = {**OWNER, "metadata": {**OWNER["metadata"], "name": "demo2", "uid": "u2"}}
    assert not _selects(selector, children.worker_pod(other, spec, "img", 0)["metadata"]["labels"])
    # the port the peers are let in on is the coordinator's API/admin/metrics port, by name
    (container,) = coordinator["spec"]["template"]["spec"]["containers"]
    assert {"name": "http", "containerPort": children.PORT_HTTP, "protocol": "TCP"} in container["ports"]


def test_without_peers_nothing_outside_the_instance_gets_in():
    # NOTE: a rule whose `from` is empty or absent admits every source; there must be none.
    policy = children.network_policy(OWNER, children.NetworkPeers(operator=(), prometheus=(), api_clients=()))
    assert [r.get("from") for r in policy["spec"]["ingress"]] == [[{"podSelector": policy["spec"]["podSelector"]}]]
    assert kubernetes_validate.validate(policy, chartutil.kube_version(), strict=True)


def test_the_flag_parses_into_peers():
    text = json.dumps({"operator": [OPERATOR], "prometheus": [PROMETHEUS], "apiClients": [CLIENTS]})
    assert children.network_peers(text) == PEERS


@pytest.mark.parametrize("text, says", [
    ("{", "not JSON"),
    ("[]", "got list, expected an object with exactly the keys ['apiClients', 'operator', 'prometheus']"),
    (json.dumps({"operator": [], "prometheus": []}), "got ['operator', 'prometheus']"),
    (json.dumps({"operator": {}, "prometheus": [], "apiClients": []}), "--network-policy.operator: got dict"),
    (json.dumps({"operator": [], "prometheus": [{}], "apiClients": []}), "--network-policy.prometheus[0]: got {}"),
    (json.dumps({"operator": [], "prometheus": [], "apiClients": [{"pods": {}}]}), "apiClients[0]"),
])
def test_the_flag_refuses_what_is_not_peers_and_says_where(text, says):
    with pytest.raises(ValueError) as info:
        children.network_peers(text)
    assert says in str(info.value)


def test_the_operator_command_line_refuses_a_bad_flag(capsys):
    from elasticmoe_operator import cli

    with pytest.raises(SystemExit):
        cli.main(["--network-policy", "{}"])
    assert "--network-policy: got []" in capsys.readouterr().err


# -- the operator's side, against the API-server emulator ---------------------------------------
class Recording(cluster.Emulator):
    def setup(self) -> None:
        super().setup()
        self.methods: list[str] = []

    async def _handle(self, request):
        if request.resource is not None and request.resource.plural == "networkpolicies":
            self.methods.append(request.method.value if hasattr(request.method, "value") else str(request.method))
        return await super()._handle(request)


@pytest_asyncio.fixture
async def emulated(tmp_path, monkeypatch):
    emulator = Recording()
    async with cluster.logged_in(emulator, tmp_path, monkeypatch) as (k, _):
        yield k, emulator


@pytest.mark.asyncio
async def test_the_operator_creates_it_and_brings_an_existing_one_back_to_its_peers(emulated):
    k, emulator = emulated
    memo = kopf.Memo()
    await handlers._network_policy(k, OWNER, PEERS, memo)
    await handlers._network_policy(k, OWNER, PEERS, memo)  # the next tick: it exists and is ours
    assert emulator.methods == ["POST", "POST"]
    made = await k.get("NetworkPolicy", NS, "demo-ingress")
    assert made["spec"] == children.network_policy(OWNER, PEERS)["spec"]

    # A restarted operator (empty memo) with other peers, e.g. after a chart upgrade.
    fewer = children.NetworkPeers(operator=(OPERATOR,), prometheus=(PROMETHEUS,), api_clients=())
    emulator.methods.clear()
    await handlers._network_policy(k, OWNER, fewer, kopf.Memo())
    assert emulator.methods == ["POST", "PATCH"]
    patched = await k.get("NetworkPolicy", NS, "demo-ingress")
    assert patched["spec"]["ingress"][1]["from"] == [OPERATOR, PROMETHEUS]  # the list replaced, not merged
    assert patched["metadata"]["ownerReferences"] == made["metadata"]["ownerReferences"]

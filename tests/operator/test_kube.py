"""`kube.Kube` (kubernetes_asyncio) against kmock's API-server emulator, logged in through a
kubeconfig as the operator logs in; `kube.Coordinator` against a real HTTP server on 127.0.0.1:
it speaks the admin contract (`elasticmoe_worker.contract.admin`) and treats a body that breaks
it like no answer."""

from __future__ import annotations

import json

import kopf
import pytest
import pytest_asyncio
from aiohttp import web

from elasticmoe_worker.contract import admin

from elasticmoe_operator import api, kube
import cluster

pytestmark = pytest.mark.asyncio
NS = "t"

TOKEN = "t0ken"
STATUS = admin.AdminStatus(
    phase=admin.Phase.SCALING, healthy=True, configuration=3,
    devices=admin.DeviceCounts(desired=2, active=1, registered=[0, 1]), parallelism=admin.Parallelism(dp=1, ep=1),
    current_scale=admin.ScaleRecord(from_devices=1, to_devices=2, scale_id="demo-1-2-x", reason="r"))


class Server:
    """Answers GET /admin/status with `status_body` and records what POST /admin/scale got."""

    def __init__(self) -> None:
        self.status_body: bytes = admin.encode(STATUS)
        self.scale_reply: tuple[int, str] = (202, admin.encode(STATUS).decode())
        self.posted: list[tuple[str, str, bytes]] = []  # (authorization, content type, body)

    async def status(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": {"message": "unauthorized"}}, status=401)
        return web.Response(body=self.status_body, content_type="application/json")

    async def scale(self, request: web.Request) -> web.Response:
        self.posted.append((request.headers.get("Authorization", ""), request.content_type, await request.read()))
        code, text = self.scale_reply
        return web.Response(status=code, text=text, content_type="application/json")


@pytest_asyncio.fixture
async def server():
    s = Server()
    app = web.Application()
    app.router.add_get("/admin/status", s.status)
    app.router.add_post("/admin/scale", s.scale)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield s, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_status_decodes_into_the_contracts_types(server):
    _, url = server
    status = await kube.Coordinator(url, TOKEN).status()
    assert status == STATUS and status.find_scale("demo-1-2-x").to_devices == 2


@pytest.mark.parametrize("body, says", [
    (b"{not json", "malformed body"),
    (json.dumps({"phase": "Serving", "healthy": True}).encode(), "devices"),  # required field missing
    (json.dumps({**admin.to_builtins(STATUS), "phase": "Bogus"}).encode(), "phase"),
    (json.dumps({**admin.to_builtins(STATUS), "lastScale": {"from": 1, "to": 2, "outcome": "succeeded"}}).encode(),
     "outcome"),  # the old lowercase vocabulary
])
async def test_a_body_that_breaks_the_contract_is_unusable_and_says_where(server, body, says):
    s, url = server
    s.status_body = body
    with pytest.raises(kube.CoordinatorUnavailable) as info:
        await kube.Coordinator(url, TOKEN).status()
    assert info.value.malformed and says in str(info.value)


async def test_a_wrong_token_is_unavailable_not_malformed(server):
    _, url = server
    with pytest.raises(kube.CoordinatorUnavailable) as info:
        await kube.Coordinator(url, "wrong").status()
    assert not info.value.malformed and "HTTP 401" in str(info.value)


async def test_nothing_listening_is_unavailable(server):
    _, url = server
    with pytest.raises(kube.CoordinatorUnavailable):
        await kube.Coordinator("http://127.0.0.1:1", TOKEN, timeout_s=2).status()


async def test_scale_posts_a_scale_request_with_its_id(server):
    s, url = server
    request = admin.ScaleRequest(devices=2, reason="spec.devices desired 2, active 1", scale_id="demo-1-2-x")
    code, reply = await kube.Coordinator(url, TOKEN).scale(request)
    assert code == 202 and reply["phase"] == "Scaling"
    [(authorization, content_type, body)] = s.posted
    assert (authorization, content_type) == (f"Bearer {TOKEN}", "application/json")
    assert json.loads(body) == {"devices": 2, "reason": "spec.devices desired 2, active 1", "scaleId": "demo-1-2-x",
                                "wait": False}
    assert admin.decode_scale_request(body) == request


@pytest.mark.parametrize("reply, message", [
    ('{"error": {"message": "devices: got 9, expected at most 4"}}', "devices: got 9, expected at most 4"),
    ("<html>bad gateway</html>", "<html>bad gateway</html>"),
    ("[1, 2]", "[1, 2]"),
])
async def test_a_refusal_comes_back_as_a_dict_with_the_message(server, reply, message):
    s, url = server
    s.scale_reply = (400, reply)
    code, body = await kube.Coordinator(url, TOKEN).scale(admin.ScaleRequest(devices=9))
    assert code == 400 and body["error"]["message"] == message


# -- kube.Kube: the children's calls, through kubernetes_asyncio --------------------------------
class Recording(cluster.Emulator):
    """The emulator, noting (method, path, Authorization, Content-Type) and the label selector of
    every request."""

    def setup(self) -> None:
        super().setup()
        self.seen: list[tuple[str, str, str, str]] = []
        self.selectors: list[str | None] = []

    async def _handle(self, request):
        self.seen.append((request.method, request.url.path, request.headers.get("Authorization", ""),
                          request.headers.get("Content-Type", "")))
        self.selectors.append(request.params.get("labelSelector"))
        return await super()._handle(request)


@pytest_asyncio.fixture
async def emulated(tmp_path, monkeypatch):
    """(Kube logged in through a kubeconfig naming the emulator, the emulator, the ConnectionInfo for kopf)."""
    emulator = Recording()
    async with cluster.logged_in(emulator, tmp_path, monkeypatch, token="s3cret-token") as (k, info):
        yield k, emulator, info


def _secret(name: str, component: str = "coordinator") -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": NS, "labels": {"app.kubernetes.io/component": component}},
            "data": {"token": "dG9rZW4="}}


async def test_login_gives_kopf_the_kubeconfigs_credentials_and_the_client_sends_them(emulated):
    k, emulator, info = emulated
    assert (info.scheme, info.token) == ("Bearer", "s3cret-token") and info.server.startswith("http://127.0.0.1:")
    assert await k.get("Secret", NS, "absent") is None
    assert emulator.seen[-1][:3] == ("GET", f"/api/v1/namespaces/{NS}/secrets/absent", "Bearer s3cret-token")


async def test_login_without_credentials_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(kopf.LoginError) as info:
        await kube.login()
    assert "service account" in str(info.value) and "missing" in str(info.value)


async def test_create_and_delete_are_idempotent(emulated):
    k, _, _ = emulated
    assert await k.create(_secret("a")) is True
    assert await k.create(_secret("a")) is False  # 409: it exists
    got = await k.get("Secret", NS, "a")
    assert got["data"] == {"token": "dG9rZW4="} and got["metadata"]["labels"]["app.kubernetes.io/component"] == \
        "coordinator"
    assert await k.delete("Secret", NS, "a") is True
    assert await k.delete("Secret", NS, "a") is False  # 404: already gone
    assert await k.get("Secret", NS, "a") is None


async def test_list_sends_the_label_selector_and_gives_plain_dicts(emulated):
    k, emulator, _ = emulated
    for name, component in (("c", "coordinator"), ("w0", "worker"), ("w1", "worker")):
        await k.create(_secret(name, component))
    listed = await k.list("Secret", NS, "app.kubernetes.io/component=worker")
    # kmock's emulator does not filter by label: what matters is that the selector went out.
    assert emulator.selectors[-1] == "app.kubernetes.io/component=worker"
    assert sorted(s["metadata"]["name"] for s in listed) == ["c", "w0", "w1"]
    assert all(isinstance(s, dict) and s["data"] == {"token": "dG9rZW4="} for s in listed)


async def test_merge_patch_of_the_custom_resource_sends_a_merge_patch(emulated):
    k, emulator, _ = emulated
    await k.create({"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "demo", "namespace": NS},
                    "spec": {"devices": {"replicas": 1, "min": 1}}})
    result = await k.merge_patch(api.KIND, NS, "demo", {"spec": {"devices": {"replicas": 3}}})
    assert result["spec"]["devices"] == {"replicas": 3, "min": 1}  # merged, not replaced
    method, path, _, content_type = emulator.seen[-1]
    assert (method, path, content_type) == ("PATCH", f"/apis/{api.API_VERSION}/namespaces/{NS}/{api.PLURAL}/demo",
                                            kube.MERGE_PATCH)


async def test_other_refusals_are_errors_with_the_status_and_message(emulated):
    k, _, _ = emulated
    with pytest.raises(kube.KubeError) as info:  # a patch tolerates nothing: the object must exist
        await k.merge_patch("Secret", NS, "absent", {"data": {"x": "eA=="}})
    assert info.value.status == 404 and str(info.value).startswith("Kubernetes API 404: ")
    with pytest.raises(ValueError, match="kind: got 'Job'"):
        await k.get("Job", NS, "x")

"""`kube.Coordinator` against a real HTTP server on 127.0.0.1: it speaks the admin contract
(`elasticmoe_worker.contract.admin`) and treats a body that breaks it like no answer."""

from __future__ import annotations

import json

import pytest
import pytest_asyncio
from aiohttp import web

from elasticmoe_worker.contract import admin

from elasticmoe_operator import kube

pytestmark = pytest.mark.asyncio

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

"""The operator's HTTP port (the chart's `webhook` port, 8081): POST /alerts and GET /metrics.

Why it exists: Alertmanager posts the chart's SLO alerts to the operator, and the operator's own
metrics (autoscale decisions, alerts received) need a scrape endpoint. It runs inside the
operator's event loop (aiohttp, which kopf brings), started by a kopf startup handler; what a
notification means is `alerts.Receiver`'s business, not this module's.

The bearer token is read from a file (a mounted Secret) on every request, so a rotated Secret
takes effect without a restart; without a token every notification is refused (401).

Not guaranteed: no TLS here (terminate it in front, or keep the port inside the cluster).
"""

from __future__ import annotations

import logging
import pathlib
import time

from aiohttp import web

from elasticmoe_operator import alerts, metrics

logger = logging.getLogger("elasticmoe.operator")

MAX_BODY_BYTES = 4 * 1024 * 1024  # Alertmanager caps a group at its own limits; this is generous


class TokenFile:
    """The expected bearer token: the file's content (surrounding whitespace stripped), or a
    literal value; None when neither gives a non-empty token."""

    def __init__(self, path: str | None = None, value: str | None = None) -> None:
        self.path = pathlib.Path(path) if path else None
        self.value = value.strip().encode() if value else None

    def __call__(self) -> bytes | None:
        if self.path is not None:
            try:
                token = self.path.read_bytes().strip()
            except OSError as exc:
                logger.warning("alerts token file %s unreadable: %s", self.path, exc)
                return None
            return token or None
        return self.value or None


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` (`[::]:8081` for IPv6); ValueError naming what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen: got {address!r}, expected HOST:PORT, e.g. 0.0.0.0:8081")
    return host.strip("[]") or "0.0.0.0", int(port)


def app(receiver: alerts.Receiver, clock=time.time) -> web.Application:
    async def post_alerts(request: web.Request) -> web.Response:
        now = clock()
        body = await request.read()
        code, reply, receipts = receiver.handle(request.headers.get("Authorization"), body, now)
        metrics.NOTIFICATIONS.labels(str(code)).inc()
        if code != 200:
            logger.warning("POST /alerts from %s: HTTP %d: %s", request.remote, code, reply.get("error"))
        for r in receipts:
            metrics.ALERTS_RECEIVED.labels(r.alertname, r.status, r.outcome).inc()
            logger.info("alert %s %s for %s/%s (fingerprint %s, startsAt %s) received at %s: %s", r.alertname,
                        r.status, r.namespace, r.instance, r.fingerprint, r.starts_at, alerts.iso_ms(r.received_at),
                        r.outcome)
        headers = {"WWW-Authenticate": 'Bearer realm="elasticmoe-operator"'} if code == 401 else None
        return web.json_response(reply, status=code, headers=headers)

    async def get_metrics(_: web.Request) -> web.Response:
        body, content_type = metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def get_healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    a = web.Application(client_max_size=MAX_BODY_BYTES)
    a.router.add_post("/alerts", post_alerts)
    a.router.add_get("/metrics", get_metrics)
    a.router.add_get("/healthz", get_healthz)
    return a


async def start(address: str, receiver: alerts.Receiver) -> web.AppRunner:
    host, port = parse_address(address)
    runner = web.AppRunner(app(receiver), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    logger.info("serving POST /alerts and GET /metrics on %s:%d", host, port)
    return runner

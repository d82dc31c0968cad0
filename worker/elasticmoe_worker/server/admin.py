"""The admin API: `POST /admin/scale` and `GET /admin/status`, behind a bearer token.

The token comes from `$ELASTICMOE_ADMIN_TOKEN`, or a file (a mounted Secret), or, when
neither is given, is generated at start and written to a 0600 file whose path is logged.
Without the right token every admin call is 401 and changes nothing.

Bodies are the typed models of `contract.admin` (camelCase JSON). Scaling needs a
multi-device instance (`serve --devices N`); a single in-process engine answers 400 saying
so. POST answers 202 at once (or waits with `"wait": true`) with the status, whose records
carry the caller's `scaleId`; status shows each scale's phases.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import logging
import os
import pathlib
import secrets

import fastapi
import msgspec
from fastapi import responses

from elasticmoe_worker.contract import admin as admin_contract

logger = logging.getLogger(__name__)

TOKEN_ENV = "ELASTICMOE_ADMIN_TOKEN"


def resolve_token(token_file: str | os.PathLike | None, generated_dir: pathlib.Path) -> str:
    """The admin token: env var, else token file, else a new random one saved 0600."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    if token_file is not None:
        text = pathlib.Path(token_file).read_text().strip()
        if not text:
            raise ValueError(f"--admin-token-file {token_file}: the file is empty, expected a token")
        return text
    token = secrets.token_urlsafe(24)
    generated_dir.mkdir(parents=True, exist_ok=True)
    path = generated_dir / "admin-token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    logger.info("admin API token generated and saved to %s (set %s to choose one)", path, TOKEN_ENV)
    return token


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           headers: dict | None = None) -> responses.JSONResponse:
    return responses.JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                   "param": param, "code": code}}, status_code=status, headers=headers)


def status_body(engine, autoscaler=None) -> admin_contract.AdminStatus:
    """What GET /admin/status returns, for an instance or a single engine; with the
    autoscaler's status when `serve --autoscale` runs one (`autoscale.Autoscaler`)."""
    if hasattr(engine, "status"):
        body = engine.status()
        if autoscaler is not None:
            body = msgspec.structs.replace(body, autoscaler=autoscaler.status())
        return body
    stats = engine.stats()
    return admin_contract.AdminStatus(
        phase=admin_contract.Phase.SERVING if stats.healthy else admin_contract.Phase.DEGRADED,
        healthy=stats.healthy, error=stats.error, configuration=0,
        devices=admin_contract.DeviceCounts(desired=1, active=1, registered=[0]),
        parallelism=admin_contract.Parallelism(dp=1, ep=1, tp=1),
        requests=admin_contract.RequestCounts(running=stats.num_running, waiting=stats.num_waiting),
        kv_blocks=admin_contract.KVBlocks(used=stats.kv_blocks_used, total=stats.kv_blocks_total), scaling=False)


def _json(body: admin_contract.AdminStatus, status_code: int = 200) -> fastapi.Response:
    return fastapi.Response(admin_contract.encode(body), status_code=status_code, media_type="application/json")


def add_routes(app: fastapi.FastAPI, engine, token: str, autoscaler=None) -> None:
    """`autoscaler`: the `autoscale.Autoscaler` of `serve --autoscale`, shown in the status.
    A scale asked for here while it runs is carried out all the same (a manual override): the
    autoscaler's next evaluations start from the new device count."""
    def authorized(request: fastapi.Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        # bytes on both sides: compare_digest raises TypeError on non-ASCII str
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def unauthorized() -> responses.JSONResponse:
        return _error(401, "admin API: missing or wrong bearer token (Authorization: Bearer <token>)",
                      code="unauthorized", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/admin/status")
    async def admin_status(request: fastapi.Request):
        if not authorized(request):
            return unauthorized()
        return _json(status_body(engine, autoscaler))

    @app.post("/admin/scale")
    async def admin_scale(request: fastapi.Request):
        if not authorized(request):
            return unauthorized()
        raw = await request.body()
        try:
            body = admin_contract.decode_scale_request(raw)
        except msgspec.ValidationError as exc:
            param = _path_param(str(exc))
            return _error(400, f"{exc}; expected {{\"devices\": <int>, \"reason\": <str>, \"scaleId\": <str>, "
                               f"\"wait\": <bool>}}", param=param)
        except msgspec.DecodeError:
            return _error(400, "request body is not valid JSON; expected {\"devices\": <int>}", code="invalid_json")
        if not hasattr(engine, "start_scale"):
            return _error(400, "this server runs one in-process engine; start it with `elasticmoe serve "
                               "--devices N` to scale", param="devices", code="not_elastic")
        from elasticmoe_worker.instance import coordinator

        try:
            scale_id = engine.start_scale(body.devices, body.reason or "admin API", scale_id=body.scale_id)
        except ValueError as exc:
            return _error(400, str(exc), param="devices", code="out_of_bounds")
        except coordinator.ScaleInProgress as exc:
            return _error(409, str(exc), param="devices", code="scale_in_progress")
        if body.wait:
            record = await asyncio.to_thread(engine.wait_scale, scale_id)
            return _json(status_body(engine, autoscaler),
                         200 if record.outcome == admin_contract.Outcome.SUCCEEDED else 500)
        return _json(status_body(engine, autoscaler), 202)


def _path_param(message: str) -> str | None:
    """The field at fault in msgspec's message ("... - at `$.devices`", "missing required
    field `devices`", "unknown field `x`")."""
    m = re.search(r"at `\$\.(\w+)", message) or re.search(r"field `(\w+)`", message)
    return m.group(1) if m else None

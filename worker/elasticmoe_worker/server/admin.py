"""The admin API: `POST /admin/scale` and `GET /admin/status`, behind a bearer token.

The token comes from `$ELASTICMOE_ADMIN_TOKEN`, or a file (a mounted Secret), or, when
neither is given, is generated at start and written to a 0600 file whose path is logged.
Without the right token every admin call is 401 and changes nothing.

Scaling needs a multi-device instance (`serve --devices N`); a single in-process engine
answers 400 saying so. A scale runs in a background thread; POST answers 202 at once (or
waits with `"wait": true`), and status shows its phases.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import pathlib
import secrets

import fastapi
from fastapi import responses

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


def status_body(engine) -> dict:
    """What GET /admin/status returns, for an instance or a single engine."""
    stats = engine.stats()
    scaler = getattr(engine, "_scaler", None)
    active = getattr(engine, "num_devices", 1)
    body = {
        "phase": getattr(engine, "phase", "Serving" if stats.healthy else "Degraded"),
        "healthy": stats.healthy,
        "error": stats.error,
        "configuration": getattr(engine, "config_id", 0),
        "devices": {"desired": scaler.target if scaler else active, "active": active,
                    "warming": len(scaler.added) if scaler else 0,
                    # workers up and registered (serving or idle): what the operator waits for
                    "registered": list(getattr(engine, "registered_devices", range(active)))},
        "parallelism": {"dp": active, "ep": active, "tp": 1},
        "requests": {"running": stats.num_running, "waiting": stats.num_waiting},
        "kvBlocks": {"used": stats.kv_blocks_used, "total": stats.kv_blocks_total},
        "scaling": hasattr(engine, "start_scale"),
    }
    if scaler is not None:
        body["currentScale"] = dataclasses.asdict(scaler.record)
    last = getattr(engine, "last_scale", None)
    body["lastScale"] = dataclasses.asdict(last) if last is not None else None
    body["history"] = [dataclasses.asdict(r) for r in getattr(engine, "history", [])]
    return body


def add_routes(app: fastapi.FastAPI, engine, token: str) -> None:
    def authorized(request: fastapi.Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def unauthorized() -> responses.JSONResponse:
        return _error(401, "admin API: missing or wrong bearer token (Authorization: Bearer <token>)",
                      code="unauthorized", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/admin/status")
    async def admin_status(request: fastapi.Request):
        if not authorized(request):
            return unauthorized()
        return status_body(engine)

    @app.post("/admin/scale")
    async def admin_scale(request: fastapi.Request):
        if not authorized(request):
            return unauthorized()
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not valid JSON; expected {\"devices\": <int>}", code="invalid_json")
        if not isinstance(body, dict) or "devices" not in body:
            return _error(400, "devices: missing; expected {\"devices\": <int>}", param="devices")
        devices = body["devices"]
        if not isinstance(devices, int) or isinstance(devices, bool):
            return _error(400, f"devices: got {devices!r}, expected an integer", param="devices")
        if not hasattr(engine, "start_scale"):
            return _error(400, "this server runs one in-process engine; start it with `elasticmoe serve "
                               "--devices N` to scale", param="devices", code="not_elastic")
        reason = str(body.get("reason") or "admin API")
        from elasticmoe_worker.instance import coordinator

        try:
            thread = engine.start_scale(devices, reason)
        except ValueError as exc:
            return _error(400, str(exc), param="devices", code="out_of_bounds")
        except coordinator.ScaleInProgress as exc:
            return _error(409, str(exc), param="devices", code="scale_in_progress")
        if body.get("wait"):
            import asyncio

            await asyncio.to_thread(thread.join)
            status = status_body(engine)
            ok = status["lastScale"] and status["lastScale"]["outcome"] == "succeeded"
            return responses.JSONResponse(status, status_code=200 if ok else 500)
        return responses.JSONResponse(status_body(engine), status_code=202)

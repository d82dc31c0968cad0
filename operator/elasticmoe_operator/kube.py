"""The few Kubernetes API calls the operator makes itself, and its calls to the coordinator.

kopf watches the ElasticMoE resources and patches their status; the children (pods, the
Deployment, Services, ConfigMaps, Secrets) are read and written here over plain HTTP with the
credentials kopf logged in with, so the operator image needs no Kubernetes client library.
Creates tolerate 409 and deletes tolerate 404 (idempotent actions). The coordinator's admin API
speaks `elasticmoe_worker.contract.admin` (the one part of the worker the operator imports); a
status body that does not decode is treated like no answer. Not a general client:
no watch, no pagination (an instance has at most a few hundred pods).
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import tempfile
import urllib.parse

import aiohttp
import kopf
import msgspec

from elasticmoe_worker.contract import admin

from elasticmoe_operator import api

logger = logging.getLogger("elasticmoe.operator")

_PATHS = {  # kind -> (API prefix, plural)
    "Pod": ("/api/v1", "pods"),
    "Service": ("/api/v1", "services"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Secret": ("/api/v1", "secrets"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    api.KIND: (f"/apis/{api.API_VERSION}", api.PLURAL),  # the Slo autoscaler writes spec.devices.replicas
}


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"Kubernetes API {status}: {message}")


class Kube:
    def __init__(self, info: kopf.ConnectionInfo) -> None:
        self.server = info.server.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if info.token:
            self.headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        auth = aiohttp.BasicAuth(info.username, info.password or "") if info.username else None
        ssl_ctx: ssl.SSLContext | bool = False if info.insecure else True
        if not info.insecure and (info.ca_path or info.ca_data or info.certificate_path or info.certificate_data):
            ssl_ctx = ssl.create_default_context(cafile=info.ca_path,
                                                 cadata=_text(info.ca_data) if info.ca_data else None)
            if info.certificate_path or info.certificate_data:
                ssl_ctx.load_cert_chain(_as_file(info.certificate_path, info.certificate_data),
                                        _as_file(info.private_key_path, info.private_key_data))
        self._ssl = ssl_ctx
        self._auth = auth
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self.headers, auth=self._auth,
                                                  timeout=aiohttp.ClientTimeout(total=30))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(self, method: str, path: str, body: dict | None = None, content_type: str | None = None,
                    params: dict | None = None) -> dict | None:
        headers = {"Content-Type": content_type} if content_type else None
        async with self._client().request(method, self.server + path, data=None if body is None else json.dumps(body),
                                          headers=headers, params=params, ssl=self._ssl) as r:
            text = await r.text()
            if r.status >= 400:
                try:
                    message = json.loads(text).get("message", text)
                except ValueError:
                    message = text
                raise KubeError(r.status, message)
            return json.loads(text) if text else None

    @staticmethod
    def _path(kind: str, namespace: str, name: str | None = None) -> str:
        prefix, plural = _PATHS[kind]
        path = f"{prefix}/namespaces/{urllib.parse.quote(namespace)}/{plural}"
        return f"{path}/{urllib.parse.quote(name)}" if name else path

    async def get(self, kind: str, namespace: str, name: str) -> dict | None:
        try:
            return await self._call("GET", self._path(kind, namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, kind: str, namespace: str, selector: str) -> list[dict]:
        body = await self._call("GET", self._path(kind, namespace), params={"labelSelector": selector})
        return list((body or {}).get("items") or [])

    async def create(self, obj: dict) -> bool:
        """-> True when created, False when it already existed."""
        meta = obj["metadata"]
        try:
            await self._call("POST", self._path(obj["kind"], meta["namespace"]), obj)
            logger.info("created %s %s/%s", obj["kind"], meta["namespace"], meta["name"])
            return True
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise

    async def merge_patch(self, kind: str, namespace: str, name: str, patch: dict) -> dict | None:
        """A JSON merge patch; put metadata.resourceVersion in it to get a 409 on a concurrent write."""
        result = await self._call("PATCH", self._path(kind, namespace, name), patch,
                                  content_type="application/merge-patch+json")
        logger.info("patched %s %s/%s", kind, namespace, name)
        return result

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """-> True when deleted now, False when it was already gone."""
        try:
            await self._call("DELETE", self._path(kind, namespace, name))
            logger.info("deleted %s %s/%s", kind, namespace, name)
            return True
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise


def _text(data) -> str:
    return data.decode() if isinstance(data, bytes) else str(data)


def _as_file(path: str | None, data) -> str | None:
    if path or not data:
        return path
    raw = data if isinstance(data, bytes) else base64.b64decode(data) if not str(data).startswith("-----") else str(data).encode()
    f = tempfile.NamedTemporaryFile(prefix="elasticmoe-operator-", delete=False)
    f.write(raw)
    f.close()
    return f.name


class CoordinatorUnavailable(Exception):
    """Not reachable, not answering 200, or (`malformed`) answering what the contract does not allow."""

    def __init__(self, message: str, malformed: bool = False) -> None:
        self.malformed = malformed
        super().__init__(message)


class Coordinator:
    """The coordinator's admin API (bearer token), as the operator uses it: typed bodies of
    `elasticmoe_worker.contract.admin`, decoded strictly."""

    def __init__(self, url: str, token: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def status(self) -> admin.AdminStatus:
        """Raises CoordinatorUnavailable when it does not answer 200 with a well-formed body."""
        try:
            async with aiohttp.ClientSession(timeout=self.timeout, headers=self.headers) as s:
                async with s.get(self.url + "/admin/status") as r:
                    if r.status != 200:
                        raise CoordinatorUnavailable(f"GET /admin/status: HTTP {r.status}")
                    body = await r.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise CoordinatorUnavailable(f"GET {self.url}/admin/status: {type(exc).__name__}: {exc}") from None
        try:
            return admin.decode_status(body)
        except msgspec.DecodeError as exc:  # ValidationError included: a field missing or of another type
            raise CoordinatorUnavailable(f"GET /admin/status: malformed body: {exc}", malformed=True) from None

    async def scale(self, request: admin.ScaleRequest) -> tuple[int, dict]:
        """-> (HTTP status, body): 202 started, 409 one is already running, 400 refused."""
        try:
            async with aiohttp.ClientSession(timeout=self.timeout, headers=self.headers) as s:
                async with s.post(self.url + "/admin/scale", data=admin.encode(request),
                                  headers={"Content-Type": "application/json"}) as r:
                    code, text = r.status, await r.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise CoordinatorUnavailable(f"POST {self.url}/admin/scale: {type(exc).__name__}: {exc}") from None
        try:
            reply = json.loads(text) if text else {}
        except ValueError:
            reply = None
        return code, reply if isinstance(reply, dict) else {"error": {"message": text[:500]}}

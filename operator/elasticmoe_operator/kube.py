"""The Kubernetes API calls the operator makes itself (through `kubernetes_asyncio`), and its
calls to the coordinator.

kopf watches the ElasticMoE resources and patches their status; the children (pods, the
Deployment, Services, ConfigMaps, Secrets, NetworkPolicies) are read and written here with the
`kubernetes_asyncio` client in kopf's own event loop, with the configuration kopf logs in with
(`login`: the pod's service account, else $KUBECONFIG / ~/.kube/config). Creates tolerate 409
and deletes tolerate 404 (idempotent actions); any other refusal is a `KubeError` with the API
server's status and message.

Objects go in and come out as plain dicts, as the API server sends them: responses are read raw
(`_preload_content=False`) and decoded as JSON here, because the client's typed models drop
fields they do not know and building them costs about 0.5 ms per pod, paid on kopf's loop on
every tick (0.2 s for a list of 300 pods).

The coordinator's admin API speaks `elasticmoe_worker.contract.admin` (the one part of the
worker the operator imports); a status body that does not decode is treated like no answer.
Not a general client: no watch, no pagination (an instance has at most a few hundred pods).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from typing import Any, Awaitable, Callable

import aiohttp
import kopf
import msgspec
from kubernetes_asyncio import client, config

from elasticmoe_worker.contract import admin

from elasticmoe_operator import api

logger = logging.getLogger("elasticmoe.operator")

MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT_S = 30
# A replaced client (after a new login) is closed this much later, once the calls that were
# already under way on it have ended (each ends within REQUEST_TIMEOUT_S).
RETIRE_AFTER_S = 2 * REQUEST_TIMEOUT_S
_retiring: set[asyncio.Task] = set()


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"Kubernetes API {status}: {message}")


async def login(trust_env: bool = False) -> tuple[client.Configuration, kopf.ConnectionInfo]:
    """The client configuration (the pod's service account, else $KUBECONFIG / ~/.kube/config,
    as kubernetes_asyncio loads them) and the same credentials for kopf's own calls.

    A fresh `Configuration`, not the library's process-wide default. In a pod the service
    account token is re-read as the kubelet rotates it; kopf logs in again (calling this) when
    its own calls get a 401."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException as in_cluster:
        # $KUBECONFIG as it is now (the library reads it once, at import); a list of paths is merged.
        kubeconfig = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        try:
            await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        except config.ConfigException as exc:
            raise kopf.LoginError(f"no Kubernetes credentials: not in a pod with a service account "
                                  f"({in_cluster}), and no usable kubeconfig at {kubeconfig} ({exc})") from None
    header = await configuration.get_api_key_with_prefix("BearerToken") or ""
    scheme, _, token = header.partition(" ") if " " in header else ("", "", header)  # RFC 7235: "<scheme> <token>"
    info = kopf.ConnectionInfo(
        server=configuration.host, ca_path=configuration.ssl_ca_cert, insecure=not configuration.verify_ssl,
        username=configuration.username or None, password=configuration.password or None,
        scheme=scheme or None, token=token or None,
        certificate_path=configuration.cert_file, private_key_path=configuration.key_file,
        proxy_url=configuration.proxy, trust_env=trust_env)
    return configuration, info


@dataclasses.dataclass(frozen=True)
class _Calls:
    """The client's five calls for one kind, with one signature whatever the kind."""
    read: Callable[..., Awaitable[Any]]  # (namespace, name)
    list: Callable[..., Awaitable[Any]]  # (namespace, label_selector)
    create: Callable[..., Awaitable[Any]]  # (namespace, body)
    patch: Callable[..., Awaitable[Any]]  # (namespace, name, body): a JSON merge patch
    delete: Callable[..., Awaitable[Any]]  # (namespace, name)


def _typed(api_: object, kind: str) -> _Calls:
    """`CoreV1Api.read_namespaced_pod(name, namespace)` and its kin, for `kind` in snake case."""
    read, list_, create, patch, delete = (getattr(api_, f"{verb}_namespaced_{kind}")
                                          for verb in ("read", "list", "create", "patch", "delete"))
    return _Calls(read=lambda ns, name, **kw: read(name, ns, **kw),
                  list=lambda ns, selector, **kw: list_(ns, label_selector=selector, **kw),
                  create=lambda ns, body, **kw: create(ns, body, **kw),
                  patch=lambda ns, name, body, **kw: patch(name, ns, body, _content_type=MERGE_PATCH, **kw),
                  delete=lambda ns, name, **kw: delete(name, ns, **kw))


def _custom(custom: client.CustomObjectsApi, group: str, version: str, plural: str) -> _Calls:
    return _Calls(
        read=lambda ns, name, **kw: custom.get_namespaced_custom_object(group, version, ns, plural, name, **kw),
        list=lambda ns, selector, **kw: custom.list_namespaced_custom_object(group, version, ns, plural,
                                                                             label_selector=selector, **kw),
        create=lambda ns, body, **kw: custom.create_namespaced_custom_object(group, version, ns, plural, body, **kw),
        patch=lambda ns, name, body, **kw: custom.patch_namespaced_custom_object(
            group, version, ns, plural, name, body, _content_type=MERGE_PATCH, **kw),
        delete=lambda ns, name, **kw: custom.delete_namespaced_custom_object(group, version, ns, plural, name, **kw))


class Kube:
    """The children's API calls, on one `kubernetes_asyncio.client.ApiClient` (create it, and
    call it, in kopf's event loop)."""

    def __init__(self, configuration: client.Configuration) -> None:
        self._client = client.ApiClient(configuration)
        core, apps = client.CoreV1Api(self._client), client.AppsV1Api(self._client)
        self._calls = {
            "Pod": _typed(core, "pod"),
            "Service": _typed(core, "service"),
            "ConfigMap": _typed(core, "config_map"),
            "Secret": _typed(core, "secret"),
            "Deployment": _typed(apps, "deployment"),
            "NetworkPolicy": _typed(client.NetworkingV1Api(self._client), "network_policy"),
            # the Slo autoscaler writes spec.devices.replicas
            api.KIND: _custom(client.CustomObjectsApi(self._client), api.GROUP, api.VERSION, api.PLURAL),
        }

    async def close(self) -> None:
        await self._client.close()

    def retire(self) -> None:
        """Close later: this client has been replaced, but calls may still be under way on it."""
        task = asyncio.get_running_loop().create_task(self._close_after(RETIRE_AFTER_S))
        _retiring.add(task)  # the loop holds tasks weakly
        task.add_done_callback(_retiring.discard)

    async def _close_after(self, delay_s: float) -> None:
        try:
            await asyncio.sleep(delay_s)
        finally:
            await self.close()

    async def _call(self, kind: str, verb: str, *args) -> dict | None:
        calls = self._calls.get(kind)
        if calls is None:
            raise ValueError(f"kind: got {kind!r}, expected one of {sorted(self._calls)}")
        response = await getattr(calls, verb)(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S)
        async with response:
            status, text = response.status, await response.text()
        if status >= 400:
            try:
                message = json.loads(text).get("message", text)
            except (ValueError, AttributeError):
                message = text
            raise KubeError(status, message or response.reason or "")
        return json.loads(text) if text else None

    async def get(self, kind: str, namespace: str, name: str) -> dict | None:
        try:
            return await self._call(kind, "read", namespace, name)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, kind: str, namespace: str, selector: str) -> list[dict]:
        body = await self._call(kind, "list", namespace, selector)
        return list((body or {}).get("items") or [])

    async def create(self, obj: dict) -> bool:
        """-> True when created, False when it already existed."""
        meta = obj["metadata"]
        try:
            await self._call(obj["kind"], "create", meta["namespace"], obj)
            logger.info("created %s %s/%s", obj["kind"], meta["namespace"], meta["name"])
            return True
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise

    async def merge_patch(self, kind: str, namespace: str, name: str, patch: dict) -> dict | None:
        """A JSON merge patch; put metadata.resourceVersion in it to get a 409 on a concurrent write."""
        result = await self._call(kind, "patch", namespace, name, patch)
        logger.info("patched %s %s/%s", kind, namespace, name)
        return result

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """-> True when deleted now, False when it was already gone."""
        try:
            await self._call(kind, "delete", namespace, name)
            logger.info("deleted %s %s/%s", kind, namespace, name)
            return True
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise


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

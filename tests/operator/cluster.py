"""A one-machine stand-in for a cluster, for the operator tests.

- `Emulator`: kmock's KubernetesEmulator declaring the resources kopf and the operator use,
  plus the few API-server behaviours the operator relies on and kmock leaves out: the scale
  subresource of ElasticMoE (specReplicasPath .spec.devices.replicas, as in our CRD),
  metadata.generation bumped on spec changes, a new resourceVersion on every write, and 422 for a
  JSON patch whose `test` fails.
- `Kubelet`: runs what the operator asks for as real local processes — the coordinator
  Deployment's container as `elasticmoe coordinator` and each worker Pod as
  `elasticmoe worker`, with the same arguments, only hosts and ports rewritten to 127.0.0.1,
  and the container's env (`value`s and `secretKeyRef`s resolved, like a kubelet; none of the
  test runner's own ELASTICMOE_* secrets leak in) — and reports pod phases back through the API
  like a kubelet, with the container's exit code (128 + the signal for a killed one). A
  Deployment's process that exits is started again (restartPolicy Always: a coordinator pod
  restarting); a worker pod's is not (restartPolicy Never: the pod goes Failed or Succeeded). It
  kills what it started when the pod is deleted and at teardown; `kill` signals a pod's process
  as a crash, OOM kill or node problem would.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import pathlib
import signal
import subprocess

import aiohttp
import aiohttp.web
import jsonpatch
import kmock
import yaml

from elasticmoe_operator import kube
import testprocs

# The secrets the operator hands to pods; a test runner's own must not reach them.
SECRET_ENV = ("ELASTICMOE_ADMIN_TOKEN", "ELASTICMOE_WORKER_SECRET")
VERBS = ["get", "list", "watch", "patch", "create", "update", "delete"]
RESOURCES = [
    ("v1/namespaces", "Namespace", False, set()),
    ("v1/events", "Event", True, set()),
    ("events.k8s.io/v1/events", "Event", True, set()),
    ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition", False, set()),
    ("elasticmoe.io/v1alpha1/elasticmoes", "ElasticMoE", True, {"status", "scale"}),
    ("v1/pods", "Pod", True, {"status"}),
    ("v1/services", "Service", True, set()),
    ("v1/configmaps", "ConfigMap", True, set()),
    ("v1/secrets", "Secret", True, set()),
    ("apps/v1/deployments", "Deployment", True, set()),
    ("networking.k8s.io/v1/networkpolicies", "NetworkPolicy", True, set()),
]


class Emulator(kmock.KubernetesEmulator):
    def setup(self) -> None:
        for key, kind, namespaced, subresources in RESOURCES:
            self.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, verbs=VERBS,
                                                     subresources=subresources)

    async def _serve_version(self, request):
        payload = await super()._serve_version(request)
        payload["groupVersion"] = payload["groupVersion"].lstrip("/")  # kmock 0.8 says "/v1"
        return payload

    async def _handle(self, request):
        # NOTE: kmock's Request is frozen but its parsed body is a plain dict: rewrite it in place.
        data = request.data if isinstance(request.data, dict) else None
        if request.resource is not None and request.resource.plural == "elasticmoes" and data is not None:
            if request.action == kmock.action.UPDATE and request.subresource == "scale":
                replicas = data.get("spec", {}).get("replicas")
                data.clear()
                data["spec"] = {"devices": {"replicas": replicas}}
            key = (request.resource, request.namespace, request.name)
            if request.action == kmock.action.UPDATE and "spec" in data and key in self.objects \
                    and not self.objects[key].deleted:
                data.setdefault("metadata", {})["generation"] = int(
                    self.objects[key].get("metadata", {}).get("generation") or 1) + 1
            if request.action == kmock.action.CREATE:
                meta = data.setdefault("metadata", {})
                meta.setdefault("generation", 1)
                meta.setdefault("uid", f"uid-{meta.get('name')}")
        if request.resource is not None and data is not None and request.action in (kmock.action.CREATE,
                                                                                   kmock.action.UPDATE):
            # kopf's JSON patches test metadata.resourceVersion: give every write a new one.
            self._version = getattr(self, "_version", 0) + 1
            meta = data.setdefault("metadata", {})
            meta["resourceVersion"] = str(self._version)
            if request.action == kmock.action.CREATE and not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{self._version}"  # kopf's events use generateName
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as exc:
            # A JSON patch whose `test` fails (kopf's test of metadata.resourceVersion when the object
            # changed meanwhile) is 422 Invalid from an API server, which kopf takes as "try again on the
            # next cycle"; kmock answers 500, which kopf retries with the same stale patch, backing off
            # for ~1 minute while the object's newer changes wait.
            return aiohttp.web.json_response(
                {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "reason": "Invalid",
                 "code": 422, "message": f"the server rejected our request due to an error in our request: {exc}"},
                status=422)


def write_kubeconfig(path: pathlib.Path, server_url: str, token: str = "unused") -> pathlib.Path:
    """A kubeconfig naming the emulator, as the operator reads it from $KUBECONFIG."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": server_url}}],
        "users": [{"name": "emulator", "user": {"token": token}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator"}}]}))
    return path


@contextlib.asynccontextmanager
async def logged_in(emulator: Emulator, tmp_path: pathlib.Path, monkeypatch, token: str = "unused"):
    """Serve `emulator` and yield (`kube.Kube`, the ConnectionInfo for kopf), logged in the
    operator's way: `kube.login` outside a pod, reading a kubeconfig from $KUBECONFIG."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod: the kubeconfig is used
    async with emulator, kmock.Server(emulator) as server:
        emulator.setup()
        monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", str(server.url), token)))
        configuration, info = await kube.login()
        k = kube.Kube(configuration)
        try:
            yield k, info
        finally:
            await k.close()


class Api:
    """What tests (and the kubelet) send to the emulator over HTTP."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.session = aiohttp.ClientSession()

    async def request(self, method: str, path: str, body=None, content_type="application/merge-patch+json"):
        async with self.session.request(method, self.url + path, json=body,
                                        headers={"Content-Type": content_type}) as r:
            data = await r.json(content_type=None)
            if r.status >= 400:
                raise AssertionError(f"{method} {path}: HTTP {r.status}: {data}")
            return data

    async def list(self, path: str) -> list[dict]:
        return (await self.request("GET", path))["items"]

    async def get(self, path: str) -> dict | None:
        async with self.session.get(self.url + path) as r:
            return None if r.status == 404 else await r.json(content_type=None)

    async def close(self) -> None:
        await self.session.close()


class Kubelet:
    def __init__(self, api: Api, namespace: str, tmp: pathlib.Path, http_port: int) -> None:
        self.api, self.ns, self.tmp = api, namespace, tmp
        self.http_port, self.control_port = http_port, testprocs.free_port()
        self.procs: dict[tuple[str, str], subprocess.Popen] = {}
        self.started: list[str] = []  # names of pods started, in order
        self.env: dict[str, dict[str, str]] = {}  # pod (or Deployment) name -> the env it last started with
        self.restarts: dict[str, int] = {}  # Deployment name -> times its process was started again
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "Kubelet":
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        # The coordinator first (it stops its workers in order), also after it was started again
        # (then it comes after them in `procs`).
        for key in sorted(self.procs, key=lambda k: k[0] != "Deployment"):
            self._stop(key)

    def kill(self, kind: str, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the main process of a running pod (`kind` "Pod") or Deployment, not its children."""
        proc = self.procs[(kind, name)]
        assert proc.poll() is None, f"{kind} {name} is not running"
        proc.send_signal(sig)

    def _stop(self, key) -> None:
        proc = self.procs.pop(key)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT if key[0] == "Deployment" else signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    async def _env(self, container: dict) -> dict[str, str] | None:
        """The container's env as a kubelet resolves it; None while a referenced Secret or key
        is missing (a kubelet would not start the container either)."""
        env = {}
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = var["value"]
                continue
            ref = var["valueFrom"]["secretKeyRef"]
            secret = await self.api.get(f"/api/v1/namespaces/{self.ns}/secrets/{ref['name']}")
            if secret is None or ref["key"] not in (secret.get("data") or {}):
                return None
            env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        return env

    def _spawn(self, key, argv: list[str], env: dict, log: str) -> None:
        inherited = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        self.procs[key] = subprocess.Popen(testprocs.elasticmoe(*argv),
                                           env={**inherited, **env}, stdout=open(self.tmp / log, "ab"),
                                           stderr=subprocess.STDOUT, start_new_session=True,
                                           preexec_fn=testprocs.die_with_test)
        self.started.append(key[1])
        self.env[key[1]] = env

    async def _loop(self) -> None:
        while True:
            await self._tick()
            await asyncio.sleep(0.2)

    async def _tick(self) -> None:
        deployments = await self.api.list(f"/apis/apps/v1/namespaces/{self.ns}/deployments")
        pods = await self.api.list(f"/api/v1/namespaces/{self.ns}/pods")
        present = {("Deployment", d["metadata"]["name"]) for d in deployments} | {
            ("Pod", p["metadata"]["name"]) for p in pods}
        for key in [k for k in self.procs if k not in present]:
            self._stop(key)
        for d in deployments:
            key = ("Deployment", d["metadata"]["name"])
            c = d["spec"]["template"]["spec"]["containers"][0]
            if key in self.procs and self.procs[key].poll() is not None:  # restartPolicy Always
                old = self.procs.pop(key)
                if old.returncode < 0:  # the process group's other members (none expected) go with it
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(old.pid, signal.SIGKILL)
                self.restarts[key[1]] = self.restarts.get(key[1], 0) + 1
            env = None if key in self.procs else await self._env(c)
            if env is None:
                continue
            assert c["command"] == ["elasticmoe", "coordinator"], c["command"]
            self._spawn(key, ["coordinator", *c["args"], "--host", "127.0.0.1", "--port", str(self.http_port),
                              "--control-port", str(self.control_port), "--advertise-host", "127.0.0.1",
                              "--heartbeat-timeout-s", "5"], env, f"{key[1]}.log")
        for p in pods:
            key = ("Pod", p["metadata"]["name"])
            phase = (p.get("status") or {}).get("phase")
            if key not in self.procs and phase is None:
                c = p["spec"]["containers"][0]
                env = await self._env(c)
                if env is None:
                    continue
                assert c["command"] == ["elasticmoe", "worker"], c["command"]
                args = list(c["args"])
                args[args.index("--coordinator") + 1] = f"tcp://127.0.0.1:{self.control_port}"
                self._spawn(key, ["worker", *args], env, f"{key[1]}.log")
                await self._phase(key[1], "Running")
            elif key in self.procs and phase == "Running" and self.procs[key].poll() is not None:
                code = self.procs[key].returncode
                code = 128 - code if code < 0 else code  # as a container runtime reports a signal
                await self._phase(key[1], "Succeeded" if code == 0 else "Failed", code)

    async def _phase(self, pod: str, phase: str, exit_code: int | None = None) -> None:
        ready = "True" if phase == "Running" else "False"
        body = {"status": {"phase": phase, "conditions": [{"type": "Ready", "status": ready}]}}
        if exit_code is not None:
            body["status"]["containerStatuses"] = [{"name": "worker", "ready": False, "state": {"terminated": {
                "exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error"}}}]
        async with self.api.session.patch(f"{self.api.url}/api/v1/namespaces/{self.ns}/pods/{pod}/status", json=body,
                                          headers={"Content-Type": "application/merge-patch+json"}) as r:
            # 404: deleted since this tick listed it (a released worker exits as its pod goes), as
            # a kubelet finds a pod gone; nothing to report.
            if r.status >= 400 and r.status != 404:
                raise AssertionError(f"PATCH pods/{pod}/status: HTTP {r.status}: {await r.text()}")

"""kopf handlers: the thin shell around `reconcile.decide`.

One timer per ElasticMoE runs observe -> decide -> act every second (kopf never
overlaps a timer with itself for one object, so there is one writer per object). Spec
changes, `kubectl scale` and HPA/KEDA writes are all just a new desired count that the next
tick sees; nothing branches on which event fired. The scale in progress lives in the
object's memo and in `status.scaling`; a restarted operator resumes from the latter.

In mode Slo the same tick first lets the autoscaler (`autoscaler.tick`) evaluate when due and
write spec.devices.replicas, then carries the count out. The operator's HTTP port (`--listen`:
POST /alerts from Alertmanager, GET /metrics) runs in the same event loop, started here.

A worker pod that fails or is deleted is replaced, and a restarting coordinator is waited for
with its worker pods left alone: `reconcile` says how and what it does not guarantee.

Not guaranteed: no finalizer is set (children carry owner references, and Kubernetes' garbage
collector deletes them with the resource).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import secrets

import kopf
import pydantic

from elasticmoe_operator import alerts, api, autoscaler, children, httpserver, kube, reconcile

logger = logging.getLogger("elasticmoe.operator")

START_DEVICES_ANNOTATION = "elasticmoe.io/start-devices"


@dataclasses.dataclass
class Config:
    image: str = "elasticmoe:0.1.0"
    # Where the operator reaches a coordinator's admin API; {name}, {namespace}, {service} and
    # {port} are filled in. Tests and out-of-cluster runs point it elsewhere.
    coordinator_url: str = "http://{service}.{namespace}.svc:{port}"
    kube: kube.Kube | None = None
    listen: str | None = None  # HOST:PORT of POST /alerts and GET /metrics; None: not served
    alerts_token_file: str | None = None  # the bearer token Alertmanager sends (a mounted Secret)
    alerts_token: str | None = None  # or the token itself (environment)
    http: object | None = None  # the running aiohttp AppRunner
    prometheus_transport: object | None = None  # tests: an httpx transport standing in for Prometheus
    # --network-policy: who may reach each instance's http port; None: no NetworkPolicy is made
    network_peers: children.NetworkPeers | None = None


CONFIG = Config()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    # Events for the scale decisions are posted explicitly; kopf's own per-handler events would
    # add one per timer tick.
    settings.posting.level = logging.WARNING
    # kopf's own finalizer name under our group (it only sets one if a handler needs it).
    settings.persistence.finalizer = "elasticmoe.io/operator"


@kopf.on.startup()
async def serve_http(**_) -> None:
    """The alert receiver and /metrics, in kopf's event loop (the receiver only marks instances
    for evaluation; the reconcile timer evaluates them)."""
    if not CONFIG.listen:
        return
    token = httpserver.TokenFile(CONFIG.alerts_token_file, CONFIG.alerts_token)
    if token() is None:
        logger.warning("no alerts token (--alerts-token-file / $ELASTICMOE_ALERTS_TOKEN): POST /alerts refuses "
                       "every notification (401)")
    CONFIG.http = await httpserver.start(CONFIG.listen, alerts.Receiver(token, autoscaler.trigger))


@kopf.on.login()
async def login(settings: kopf.OperatorSettings, **_) -> kopf.ConnectionInfo:
    """The service account in a pod, else $KUBECONFIG / ~/.kube/config, as kubernetes_asyncio
    loads them: kopf gets the credentials, our client (made here, in kopf's loop) the configuration."""
    configuration, info = await kube.login(trust_env=settings.networking.trust_env)
    previous, CONFIG.kube = CONFIG.kube, kube.Kube(configuration)
    if previous is not None:  # a new login (kopf got a 401): the old client may be mid-call
        previous.retire()
    return info


@kopf.on.cleanup()
async def close(**_) -> None:
    if CONFIG.kube is not None:
        await CONFIG.kube.close()
    if CONFIG.http is not None:
        await CONFIG.http.cleanup()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def coordinator_url(name: str, namespace: str) -> str:
    return CONFIG.coordinator_url.format(name=name, namespace=namespace, service=children.coordinator_name(name),
                                         port=children.PORT_HTTP)


async def _admin_token(k: kube.Kube, owner: dict) -> str:
    """Make sure the instance's Secret holds an admin token and a worker secret (an existing one
    is kept, never regenerated: running pods hold its values); -> the admin token."""
    ns, name = owner["metadata"]["namespace"], owner["metadata"]["name"]
    existing = await k.get("Secret", ns, children.secret_name(name))
    if existing is None:
        new = children.secret(owner, secrets.token_urlsafe(32), secrets.token_urlsafe(32))
        if await k.create(new):
            return children.secret_values(new)[children.TOKEN_KEY]
        existing = await k.get("Secret", ns, children.secret_name(name))  # created concurrently
    values = children.secret_values(existing or {})
    if children.TOKEN_KEY not in values:
        raise kopf.TemporaryError(f"Secret {children.secret_name(name)} has no key {children.TOKEN_KEY!r}", delay=5)
    if children.WORKER_SECRET_KEY not in values:
        # Made by an operator from before the worker secret: add one (a 409 retries next tick).
        await k.merge_patch("Secret", ns, children.secret_name(name),
                            children.worker_secret_patch(existing, secrets.token_urlsafe(32)))
    return values[children.TOKEN_KEY]


async def _start_devices(k: kube.Kube, owner: dict, spec: api.ElasticMoESpec) -> int:
    """Create the coordinator's Deployment if missing; -> the device count it starts with."""
    ns, name = owner["metadata"]["namespace"], owner["metadata"]["name"]
    existing = await k.get("Deployment", ns, children.coordinator_name(name))
    if existing is not None:
        return int(existing["metadata"].get("annotations", {}).get(START_DEVICES_ANNOTATION, spec.devices.desired))
    devices = spec.devices.desired
    deployment = children.coordinator_deployment(owner, spec, spec.coordinator.image or CONFIG.image, devices)
    deployment["metadata"].setdefault("annotations", {})[START_DEVICES_ANNOTATION] = str(devices)
    await k.create(deployment)
    return devices


async def _network_policy(k: kube.Kube, owner: dict, peers: children.NetworkPeers, memo: kopf.Memo) -> None:
    """Create the instance's NetworkPolicy if missing; an existing one is brought to this
    operator's peers once per operator run (after that a 409 means it is as we made it)."""
    policy = children.network_policy(owner, peers)
    if await k.create(policy) or memo.get("network_policy") == policy["spec"]:
        memo["network_policy"] = policy["spec"]
        return
    meta = policy["metadata"]
    # A merge patch replaces the lists (ingress) whole: the spec becomes exactly ours.
    await k.merge_patch("NetworkPolicy", meta["namespace"], meta["name"], {"spec": policy["spec"]})
    memo["network_policy"] = policy["spec"]


def _pod_phase(pod: dict) -> str:
    if pod["metadata"].get("deletionTimestamp"):
        return "Terminating"
    return (pod.get("status") or {}).get("phase") or "Pending"


def _pod_detail(pod: dict) -> str:
    """Why a pod's container ended, as the kubelet reports it (for the event), or ""."""
    status = pod.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        ended = (cs.get("state") or {}).get("terminated")
        if ended:
            parts = [f"exit code {ended.get('exitCode')}", ended.get("reason"), ended.get("message")]
            return ", ".join(str(p) for p in parts if p)
    return ", ".join(p for p in (status.get("reason"), status.get("message")) if p)


def _last_scale(status: dict) -> api.ScaleRecord | None:
    """status.lastScale (for the retry back-off); one that does not parse is logged and ignored."""
    raw = status.get("lastScale")
    if not raw:
        return None
    try:
        return api.ScaleRecord.model_validate(raw)
    except pydantic.ValidationError as exc:  # e.g. written by an operator with another outcome vocabulary
        logger.warning("ignoring status.lastScale that does not parse: %s", exc)
        return None


def _scaling_from(memo: kopf.Memo, status: dict) -> api.ScalingStatus | None:
    if "scaling" in memo:
        return memo["scaling"]
    raw = status.get("scaling")
    if raw:
        logger.info("resuming the scale in progress from status: %s", raw)
        return api.ScalingStatus.model_validate(raw)
    return None


@kopf.timer(api.GROUP, api.VERSION, api.PLURAL, id="reconcile", interval=1.0, initial_delay=0)
async def reconcile_timer(body, spec, status, meta, name, namespace, patch, memo, **_) -> None:
    await reconcile_once(dict(body), dict(spec or {}), dict(status or {}), meta.get("generation", 0), name,
                         namespace, patch, memo)


# Status fields that only this operator writes and that each tick rebuilds from the last value.
OWN_FIELDS = ("conditions", "lastScale", "history")


def _as_written(memo: kopf.Memo, status: dict) -> dict:
    """`status` with the fields of OWN_FIELDS as this process last wrote them. NOTE: a timer gets
    kopf's latest copy of the object, which can lag our own last patch (its watch event not in
    yet, seen under load); a history rebuilt from that copy would drop the record written one
    tick before. A fresh operator (empty memo) reads the object's."""
    return status | memo.get("written", {})


def _remember_written(memo: kopf.Memo, patch) -> None:
    memo["written"] = memo.get("written", {}) | {f: patch.status[f] for f in OWN_FIELDS if f in patch.status}


async def reconcile_once(body: dict, spec: dict, status: dict, generation: int, name: str, namespace: str,
                         patch, memo: kopf.Memo) -> None:
    try:
        await _reconcile(body, spec, _as_written(memo, status), generation, name, namespace, patch, memo)
    finally:
        _remember_written(memo, patch)


async def _reconcile(body: dict, spec: dict, status: dict, generation: int, name: str, namespace: str,
                     patch, memo: kopf.Memo) -> None:
    now = _now()
    k = CONFIG.kube
    if k is None:
        raise kopf.TemporaryError("not logged in to the Kubernetes API yet", delay=1)
    try:
        parsed = api.parse_spec(spec)
    except api.SpecError as exc:
        patch.status["observedGeneration"] = generation
        patch.status["phase"] = api.Phase.DEGRADED.value
        patch.status["conditions"] = reconcile.merge_conditions(
            status.get("conditions") or [], reconcile.invalid_spec_conditions(exc), generation, now)
        if memo.get("invalid") != str(exc):
            memo["invalid"] = str(exc)
            logger.warning("%s/%s: invalid spec, nothing created: %s", namespace, name, exc)
            kopf.event(body, type="Warning", reason="InvalidSpec", message=str(exc))
        return
    memo.pop("invalid", None)
    owner = body
    image = parsed.worker.image or CONFIG.image

    # -- observe (and make sure the parts every instance has exist) -----------------------
    if CONFIG.network_peers is not None:  # first: until it exists, every pod is open to all
        await _network_policy(k, owner, CONFIG.network_peers, memo)
    token = await _admin_token(k, owner)
    await k.create(children.config_map(owner, parsed))
    await k.create(children.coordinator_service(owner))
    start_devices = await _start_devices(k, owner, parsed)
    pods, pod_details = {}, {}
    for pod in await k.list("Pod", namespace, children.worker_selector(name)):
        index = children.worker_index(pod)
        if index is not None:
            pods[index] = _pod_phase(pod)
            if pods[index] in reconcile.ENDED_PHASES:
                pod_details[index] = _pod_detail(pod)
    url = coordinator_url(name, namespace)
    coordinator = kube.Coordinator(url, token)
    coord_status, coord_error = None, ""
    try:
        coord_status = await coordinator.status()
        memo.pop("coordinator_error", None)
    except kube.CoordinatorUnavailable as exc:
        coord_error = str(exc)
        # Refused connections while it starts are expected; a body that breaks the contract is not.
        if exc.malformed and memo.get("coordinator_error") != coord_error:
            logger.warning("%s/%s: coordinator unusable: %s", namespace, name, exc)
        else:
            logger.debug("%s/%s: %s", namespace, name, exc)
        memo["coordinator_error"] = coord_error
    tracker, auto = None, None
    if autoscaler.writes_replicas(parsed.autoscaling.mode):
        tracker = autoscaler.tracker(namespace, name, status, now.timestamp())
        # The clock again, not the tick's start: listing the pods and asking the coordinator take a
        # while under load, and an alert received meanwhile must not look evaluated before it came.
        auto = await autoscaler.tick(tracker, k, body, parsed, coord_status, _now().timestamp(),
                                     transport=CONFIG.prometheus_transport)
        if auto.replicas != parsed.devices.desired:  # written now (or our write not yet in the timer's copy)
            parsed = parsed.model_copy(update={"devices": parsed.devices.model_copy(
                update={"replicas": auto.replicas})})
    else:
        autoscaler.forget(namespace, name)  # External or Disabled: the operator writes no replicas
    obs = reconcile.Observed(name=name, spec=parsed, generation=generation, now=now, pods=pods,
                             coordinator=coord_status, coordinator_error=coord_error,
                             scaling=_scaling_from(memo, status), last_scale=_last_scale(status),
                             start_devices=start_devices, desired_reason=tracker.reason if tracker else "",
                             metrics_condition=auto.condition if auto else None, pod_details=pod_details,
                             conditions=list(status.get("conditions") or []),
                             recorded={h.get("scaleId", "") for h in status.get("history") or []})

    # -- decide ------------------------------------------------------------------------------
    d = reconcile.decide(obs)

    # -- act ---------------------------------------------------------------------------------
    for i in d.create_pods:
        logger.info("%s/%s: creating worker pod %s", namespace, name, children.worker_name(name, i))
        await k.create(children.worker_pod(owner, parsed, image, i))
    if d.post_scale is not None:
        request = d.post_scale
        try:
            code, reply = await coordinator.scale(request)
        except kube.CoordinatorUnavailable as exc:  # the scale stays at its stage; the next tick asks again
            logger.warning("%s/%s: scale %s not posted: %s", namespace, name, request.scale_id, exc)
        else:
            if code == 202:
                logger.info("%s/%s: coordinator scaling to %d devices, scale %s (%s)", namespace, name,
                            request.devices, request.scale_id, request.reason)
            elif code == 409:
                logger.info("%s/%s: coordinator busy, will retry: %s", namespace, name, reply)
            else:
                error = reply.get("error")
                message = (error.get("message") if isinstance(error, dict) else error) or str(reply)
                reconcile.refuse(d, obs, f"the coordinator refused the scale (HTTP {code}): {message}")
    for i in d.delete_pods:
        logger.info("%s/%s: deleting worker pod %s (%s)", namespace, name, children.worker_name(name, i),
                    pods.get(i, "gone"))
        await k.delete("Pod", namespace, children.worker_name(name, i))
    for etype, reason, message in (auto.events if auto else []) + d.events:
        logger.info("%s/%s: %s: %s", namespace, name, reason, message)
        kopf.event(body, type=etype, reason=reason, message=message)
    memo["scaling"] = d.scaling

    # -- status ------------------------------------------------------------------------------
    patch.status["observedGeneration"] = generation
    patch.status["phase"] = d.phase
    patch.status["selector"] = children.worker_selector(name)
    patch.status["coordinatorUrl"] = url
    patch.status["devices"] = d.devices.dump()
    patch.status["parallelism"] = d.parallelism.dump()
    patch.status["conditions"] = reconcile.merge_conditions(status.get("conditions") or [], d.conditions,
                                                            generation, now)
    patch.status["scaling"] = d.scaling.dump() if d.scaling is not None else None
    if auto is not None and auto.evaluation is not None:
        patch.status["autoscaler"] = autoscaler.status_patch(tracker, auto.evaluation)
    ended = [r for r in (d.unseen, d.finished) if r is not None]
    for rec in ended:
        if tracker is not None:
            autoscaler.learn(tracker, rec)
    if ended:
        records = [r.dump() for r in ended]
        patch.status["lastScale"] = records[-1]
        patch.status["history"] = ((status.get("history") or []) + records)[-api.HISTORY_LIMIT:]


@kopf.on.delete(api.GROUP, api.VERSION, api.PLURAL, id="forget", optional=True)
def forget(name, namespace, memo, **_) -> None:
    memo.pop("scaling", None)
    autoscaler.forget(namespace, name)
    logger.info("%s/%s deleted; its children go with it (owner references)", namespace, name)

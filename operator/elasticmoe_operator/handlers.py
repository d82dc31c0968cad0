"""kopf handlers: the thin shell around `reconcile.decide`.

One timer per ElasticMoE runs observe -> decide -> act every second (kopf never
overlaps a timer with itself for one object, so there is one writer per object). Spec
changes, `kubectl scale` and HPA/KEDA writes are all just a new desired count that the next
tick sees; nothing branches on which event fired. The scale in progress lives in the
object's memo and in `status.scaling`; a restarted operator resumes from the latter.

Not guaranteed: no finalizer is set (children carry owner references, and Kubernetes' garbage
collector deletes them with the resource); a coordinator that restarts loses its instance
(the worker pods then register again with the new one only if they are recreated).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import logging
import secrets

import kopf

from elasticmoe_operator import api, children, kube, reconcile

logger = logging.getLogger("elasticmoe.operator")

START_DEVICES_ANNOTATION = "elasticmoe.io/start-devices"


@dataclasses.dataclass
class Config:
    image: str = "elasticmoe:0.1.0"
    # Where the operator reaches a coordinator's admin API; {name}, {namespace}, {service} and
    # {port} are filled in. Tests and out-of-cluster runs point it elsewhere.
    coordinator_url: str = "http://{service}.{namespace}.svc:{port}"
    kube: kube.Kube | None = None


CONFIG = Config()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    # Events for the scale decisions are posted explicitly; kopf's own per-handler events would
    # add one per timer tick.
    settings.posting.level = logging.WARNING
    # kopf's own finalizer name under our group (it only sets one if a handler needs it).
    settings.persistence.finalizer = "elasticmoe.io/operator"


@kopf.on.login()
def login(**kwargs) -> kopf.ConnectionInfo | None:
    """kopf's usual login (service account in a pod, else kubeconfig), kept for our own calls."""
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        CONFIG.kube = kube.Kube(info)
    return info


@kopf.on.cleanup()
async def close(**_) -> None:
    if CONFIG.kube is not None:
        await CONFIG.kube.close()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def coordinator_url(name: str, namespace: str) -> str:
    return CONFIG.coordinator_url.format(name=name, namespace=namespace, service=children.coordinator_name(name),
                                         port=children.PORT_HTTP)


async def _token(k: kube.Kube, owner: dict) -> str:
    ns, name = owner["metadata"]["namespace"], owner["metadata"]["name"]
    existing = await k.get("Secret", ns, children.secret_name(name))
    if existing is None:
        token = secrets.token_urlsafe(32)
        if await k.create(children.secret(owner, token)):
            return token
        existing = await k.get("Secret", ns, children.secret_name(name))  # created concurrently
    data = (existing or {}).get("data") or {}
    if children.TOKEN_KEY in data:
        return base64.b64decode(data[children.TOKEN_KEY]).decode()
    string_data = (existing or {}).get("stringData") or {}
    if children.TOKEN_KEY in string_data:
        return string_data[children.TOKEN_KEY]
    raise kopf.TemporaryError(f"Secret {children.secret_name(name)} has no key {children.TOKEN_KEY!r}", delay=5)


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


def _pod_phase(pod: dict) -> str:
    if pod["metadata"].get("deletionTimestamp"):
        return "Terminating"
    return (pod.get("status") or {}).get("phase") or "Pending"


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


async def reconcile_once(body: dict, spec: dict, status: dict, generation: int, name: str, namespace: str,
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
    token = await _token(k, owner)
    await k.create(children.config_map(owner, parsed))
    await k.create(children.coordinator_service(owner))
    start_devices = await _start_devices(k, owner, parsed)
    pods = {}
    for pod in await k.list("Pod", namespace, children.worker_selector(name)):
        index = children.worker_index(pod)
        if index is not None:
            pods[index] = _pod_phase(pod)
    url = coordinator_url(name, namespace)
    coordinator = kube.Coordinator(url, token)
    try:
        coord_status = await coordinator.status()
    except kube.CoordinatorUnavailable as exc:
        logger.debug("%s/%s: %s", namespace, name, exc)
        coord_status = None
    last_scale = api.ScaleRecord.model_validate(status["lastScale"]) if status.get("lastScale") else None
    obs = reconcile.Observed(spec=parsed, generation=generation, now=now, pods=pods, coordinator=coord_status,
                             scaling=_scaling_from(memo, status), last_scale=last_scale,
                             start_devices=start_devices)

    # -- decide ------------------------------------------------------------------------------
    d = reconcile.decide(obs)

    # -- act ---------------------------------------------------------------------------------
    for i in d.create_pods:
        await k.create(children.worker_pod(owner, parsed, image, i))
    if d.post_scale is not None:
        code, reply = await coordinator.scale(d.post_scale, d.scale_reason)
        if code == 202:
            logger.info("%s/%s: coordinator scaling to %d devices (%s)", namespace, name, d.post_scale,
                        d.scale_reason)
        elif code == 409:
            logger.info("%s/%s: coordinator busy, will retry: %s", namespace, name, reply)
        else:
            message = ((reply or {}).get("error") or {}).get("message") or str(reply)
            reconcile.refuse(d, d.scaling, f"the coordinator refused the scale (HTTP {code}): {message}", now)
    for i in d.delete_pods:
        await k.delete("Pod", namespace, children.worker_name(name, i))
    for etype, reason, message in d.events:
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
    if d.finished is not None:
        record = d.finished.dump()
        patch.status["lastScale"] = record
        patch.status["history"] = ((status.get("history") or []) + [record])[-api.HISTORY_LIMIT:]


@kopf.on.delete(api.GROUP, api.VERSION, api.PLURAL, id="forget", optional=True)
def forget(name, namespace, memo, **_) -> None:
    memo.pop("scaling", None)
    logger.info("%s/%s deleted; its children go with it (owner references)", namespace, name)

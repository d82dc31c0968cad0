"""The Slo autoscaler's shell: for each ElasticMoE in mode Slo, read the signal, call the pure
policy (`policy.decide`), and write `spec.devices.replicas` when the target changes.

Who writes `spec.devices.replicas` (one writer per mode, DESIGN 5.1):
- Slo: this module, and nobody else should. A write by someone else (`kubectl scale`) is
  reported (Warning Event `AutoscaleOverridden`) and the policy goes on from the new count.
- External: an HPA or KEDA through the scale subresource; the operator never writes it.
- Disabled: people; the operator never writes it.
Once written, the count is carried out by the ordinary reconcile path (pods, POST /admin/scale),
in the same tick, so "decided" and "scale started" are one timer tick apart at most.

The policy's state lives in memory, one `Tracker` per resource, evaluated every
`autoscaling.evaluationIntervalSeconds` and at once when a firing SLO alert names the resource
(`trigger`, called by the alert receiver). After a restart it is rebuilt conservatively from the
status: the learned time-to-ready from the measured scales of `status.history`, the scale-up
cooldown restarted (the operator may have died just after writing a scale-up), the scale-down
stabilization window restarted (low load must be seen for a whole window again), no smoothing
history.

Every evaluation: a counter on the operator's /metrics (`elasticmoe_operator_autoscale_decisions_total`,
by action and the policy's code), `status.autoscaler.lastEvaluation`, and the MetricsAvailable
condition; every decision that changes the count also an entry of `status.autoscaler.history`
and an Event (`AutoscaleUp` / `AutoscaleDown`) carrying the reason and the signal values.

Not guaranteed: the spec write uses the resourceVersion the timer read (a concurrent writer makes
it fail with 409, and the evaluation is repeated on the next tick); an API server that ignores
the precondition lets the last writer win.
"""

from __future__ import annotations

import dataclasses
import logging

import pydantic

from elasticmoe_worker.contract import admin

from elasticmoe_operator import alerts, api, children, kube, metrics, policy, signals

logger = logging.getLogger("elasticmoe.operator")

KIND = "ElasticMoE"
EVENT_UP, EVENT_DOWN, EVENT_OVERRIDDEN = "AutoscaleUp", "AutoscaleDown", "AutoscaleOverridden"


def writes_replicas(mode: str) -> bool:
    """Whether the operator writes spec.devices.replicas in this autoscaling mode."""
    return mode == api.AutoscalingMode.SLO.value


@dataclasses.dataclass
class Tracker:
    namespace: str
    name: str
    state: policy.State
    next_at: float = 0.0  # when the next periodic evaluation is due (0: at once)
    triggers: list[alerts.Receipt] = dataclasses.field(default_factory=list)  # alerts awaiting evaluation
    written: int | None = None  # the replicas this operator wrote last (or found at its start)
    reason: str = ""  # why it wrote them: the scale they cause carries it
    read_before_write: str | None = None  # resourceVersion the last write was made against
    history: list[dict] = dataclasses.field(default_factory=list)  # status.autoscaler.history, kept here:
    # the timer's copy of the status can lag one write behind
    condition: tuple[str, str, str] = ("Unknown", "NotEvaluated", "the Slo policy evaluates once the coordinator "
                                       "serves")


TRACKERS: dict[tuple[str, str], Tracker] = {}


def tracker(namespace: str, name: str, status: dict, now_s: float) -> Tracker:
    """The resource's tracker; a new one (first sight, or after a restart) rebuilt from status."""
    key = (namespace, name)
    if key not in TRACKERS:
        history = list(((status.get("autoscaler") or {}).get("history") or [])[-api.HISTORY_LIMIT:])
        TRACKERS[key] = Tracker(namespace, name, rebuild(status, now_s), history=history)
    return TRACKERS[key]


def forget(namespace: str, name: str) -> None:
    TRACKERS.pop((namespace, name), None)


def trigger(receipt: alerts.Receipt) -> bool:
    """A firing SLO alert about an instance: evaluate it at the next tick. -> False when no
    instance of that name is in mode Slo here."""
    t = TRACKERS.get((receipt.namespace, receipt.instance))
    if t is None:
        return False
    t.triggers.append(receipt)
    return True


def rebuild(status: dict, now_s: float) -> policy.State:
    """The policy's state from a resource's status (see the module docstring)."""
    state = policy.State(last_up_at=now_s)
    for raw in status.get("history") or []:
        try:
            rec = api.ScaleRecord.model_validate(raw)
        except pydantic.ValidationError:
            continue
        if rec.outcome == admin.Outcome.SUCCEEDED.value and rec.duration_ms > 0:
            state = policy.learn(state, rec.from_devices, rec.to_devices, rec.duration_ms / 1000)
    return state


def config(spec: api.ElasticMoESpec) -> policy.Config:
    a, d, slo = spec.autoscaling, spec.devices, spec.slo
    return policy.Config(min_devices=d.min, max_devices=d.max, ttft_p90_s=slo.ttft_p90_ms / 1000,
                         tpot_p90_s=slo.tpot_p90_ms / 1000, queue_p90_s=slo.queue_p90_ms / 1000, step=d.step,
                         scale_up_cooldown_s=float(a.scale_up_cooldown_seconds),
                         scale_down_stabilization_s=float(a.scale_down_stabilization_seconds),
                         stabilization_ready_multiple=float(a.stabilization_ready_multiple),
                         stale_after_s=max(60.0, 3.0 * a.evaluation_interval_seconds),
                         settle_s=float(a.metrics_window_seconds), learn_tpot=a.learn_tpot)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.4g}"


def record(decision: policy.Decision, current: int, obs: policy.Observation, now_s: float,
           trig: alerts.Receipt | None = None) -> api.AutoscaleDecision:
    """The status entry of one evaluation: the decision, its reason and the signal values."""
    sig = {k: _num(v) for k, v in decision.values.items()}
    for key, value in (("ttftP90Ms", obs.ttft_p90_s), ("tpotP90Ms", obs.tpot_p90_s)):
        if value is not None:
            sig[key] = f"{value * 1000:.0f}"
    return api.AutoscaleDecision(
        **{"from": current, "to": decision.target}, time=alerts.iso_ms(now_s), action=decision.action,
        code=decision.code, reason=decision.reason, signals=sig,
        trigger=None if trig is None else api.AlertTrigger(alertname=trig.alertname, fingerprint=trig.fingerprint,
                                                           starts_at=trig.starts_at,
                                                           received_at=alerts.iso_ms(trig.received_at)))


def condition(decision: policy.Decision) -> tuple[str, str, str]:
    """MetricsAvailable after this decision: (status, the policy's code, its reason)."""
    return ("True" if decision.metrics_available else "False", decision.code, decision.reason)


@dataclasses.dataclass
class Outcome:
    replicas: int  # spec.devices.replicas (or initial) after this tick
    condition: tuple[str, str, str]  # MetricsAvailable
    evaluation: api.AutoscaleDecision | None = None  # None: not evaluated this tick
    events: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (type, reason, message)


async def _bearer_token(k: kube.Kube, namespace: str, spec: api.ElasticMoESpec) -> str:
    ref = spec.autoscaling.prometheus_bearer_token_secret
    if ref is None:
        return ""
    secret = await k.get("Secret", namespace, ref.name)
    value = children.secret_values(secret or {}).get(ref.key, "")
    if not value:
        raise signals.PrometheusError(f"autoscaling.prometheusBearerTokenSecret: Secret {namespace}/{ref.name} "
                                      f"{'has no key ' + repr(ref.key) if secret else 'not found'}")
    return value


async def tick(t: Tracker, k: kube.Kube, body: dict, spec: api.ElasticMoESpec, coord: admin.AdminStatus | None,
               now_s: float, transport=None) -> Outcome:
    """One timer tick of a resource in mode Slo: evaluate when due, write the spec when the
    target changes. `transport`: an httpx transport for Prometheus (tests)."""
    events: list[tuple[str, str, str]] = []
    desired = spec.devices.desired
    if t.written is not None and desired != t.written and body["metadata"].get("resourceVersion") == \
            t.read_before_write:
        desired = t.written  # the timer's copy predates our own write (the watch lags): ours holds
    if t.written is not None and desired != t.written:
        message = (f"spec.devices.replicas changed {t.written} -> {desired} by another writer while "
                   f"autoscaling.mode is Slo (the operator is its one writer); the policy goes on from {desired}")
        logger.warning("%s/%s: %s", t.namespace, t.name, message)
        events.append(("Warning", EVENT_OVERRIDDEN, message))
        t.reason = ""
    t.written = desired
    if coord is None or coord.phase == admin.Phase.STARTING:
        return Outcome(desired, t.condition, events=events)
    if now_s < t.next_at and not t.triggers:
        return Outcome(desired, t.condition, events=events)
    # NOTE: the alerts this evaluation answers are those received by now (now_s); one that comes
    # while Prometheus is queried waits for the next tick, so none looks evaluated before it came.
    triggers, t.triggers = t.triggers, []

    cfg = config(spec)
    a = spec.autoscaling
    selector = a.prometheus_selector or signals.default_selector(t.namespace, t.name)
    try:
        token = await _bearer_token(k, t.namespace, spec)
    except (signals.PrometheusError, kube.KubeError) as exc:
        obs = policy.Observation(at=now_s, active=coord.devices.active, desired=desired, error=str(exc),
                                 warming=max(0, desired - coord.devices.active))
    else:
        prom = signals.Prometheus(a.prometheus_url, token, transport=transport)
        obs = await signals.observe(prom, selector, a.metrics_window_seconds, at=now_s, active=coord.devices.active,
                                    desired=desired, waiting_requests=coord.requests.running + coord.requests.waiting,
                                    decoding=float(coord.requests.running))
    decision, state = policy.decide(obs, t.state, cfg, now_s)
    trig = min(triggers, key=lambda r: r.received_at) if triggers else None
    entry = record(decision, desired, obs, now_s, trig)

    if decision.target != desired:
        patch = {"metadata": {"resourceVersion": body["metadata"].get("resourceVersion")},
                 "spec": {"devices": {"replicas": decision.target}}}
        try:
            await k.merge_patch(KIND, t.namespace, t.name, patch)
        except kube.KubeError as exc:  # 409: written meanwhile; the next tick reads it and evaluates again
            logger.warning("%s/%s: spec.devices.replicas %d -> %d not written (evaluated again next tick): %s",
                           t.namespace, t.name, desired, decision.target, exc)
            t.triggers[:0] = triggers  # evaluated again next tick, for them too
            return Outcome(desired, t.condition, events=events)
        t.written, t.reason = decision.target, decision.reason
        t.read_before_write = patch["metadata"]["resourceVersion"]
        events.append(("Normal", EVENT_UP if decision.target > desired else EVENT_DOWN, decision.reason))
        logger.info("%s/%s: autoscale %s %d -> %d (%s): %s; signals %s", t.namespace, t.name, decision.action,
                    desired, decision.target, decision.code, decision.reason, entry.signals)
    else:
        logger.debug("%s/%s: autoscale hold (%s): %s", t.namespace, t.name, decision.code, decision.reason)
    for r in triggers:
        metrics.ALERT_TO_EVALUATION.observe(max(0.0, now_s - r.received_at))
        logger.info("%s/%s: alert %s (fingerprint %s, startsAt %s) received at %s, evaluated at %s (%.3f s later): "
                    "%s %d -> %d", t.namespace, t.name, r.alertname, r.fingerprint, r.starts_at,
                    alerts.iso_ms(r.received_at), entry.time, now_s - r.received_at, decision.action, desired,
                    decision.target)
    t.state, t.next_at, t.condition = state, now_s + a.evaluation_interval_seconds, condition(decision)
    metrics.AUTOSCALE_DECISIONS.labels(t.namespace, t.name, decision.action, decision.code).inc()
    return Outcome(decision.target, t.condition, entry, events)


def learn(t: Tracker, finished: api.ScaleRecord) -> None:
    """A scale ended: its measured duration refines the time-to-ready of (from, to)."""
    if finished.outcome == admin.Outcome.SUCCEEDED.value and finished.duration_ms > 0:
        t.state = policy.learn(t.state, finished.from_devices, finished.to_devices, finished.duration_ms / 1000)


def status_patch(t: Tracker, evaluation: api.AutoscaleDecision) -> dict:
    """status.autoscaler after an evaluation: lastEvaluation, and history when the count changed."""
    if evaluation.action != policy.HOLD:
        t.history = (t.history + [evaluation.dump()])[-api.HISTORY_LIMIT:]
    return api.AutoscalerStatus(last_evaluation=evaluation).dump() | {"history": list(t.history)}

"""The operator's own metrics (GET /metrics on its HTTP port): what the autoscaler decided and
what the alert receiver heard.

Why a registry of its own: the operator's numbers are apart from any library's default registry,
so a test (or another component in the same process) sees exactly these. Labels are few and fixed:
`reason` is the policy's code (SloBreached, Cooldown, ...), never its free-text sentence.
"""

from __future__ import annotations

import prometheus_client

REGISTRY = prometheus_client.CollectorRegistry(auto_describe=True)
prometheus_client.ProcessCollector(registry=REGISTRY)
prometheus_client.PlatformCollector(registry=REGISTRY)

AUTOSCALE_DECISIONS = prometheus_client.Counter(
    "elasticmoe_operator_autoscale_decisions",
    "Evaluations of the Slo policy by what it decided (up, down, hold) and why (the policy's code).",
    ["namespace", "elasticmoe_instance", "action", "reason"], registry=REGISTRY)
ALERTS_RECEIVED = prometheus_client.Counter(
    "elasticmoe_operator_alerts_received",
    "Alerts in Alertmanager notifications, by alert name, status and what came of them (triggered, "
    "duplicate, resolved, not-slo, unknown-instance).",
    ["alertname", "status", "outcome"], registry=REGISTRY)
NOTIFICATIONS = prometheus_client.Counter(
    "elasticmoe_operator_alert_notifications",
    "Alertmanager notifications by the HTTP status answered (200, 400 malformed, 401 unauthorized).",
    ["code"], registry=REGISTRY)
ALERT_TO_EVALUATION = prometheus_client.Histogram(
    "elasticmoe_operator_alert_to_evaluation_seconds",
    "From receiving a firing SLO alert to the evaluation it triggered.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0), registry=REGISTRY)


def exposition() -> tuple[bytes, str]:
    """-> (body, Content-Type) of GET /metrics."""
    return prometheus_client.generate_latest(REGISTRY), prometheus_client.CONTENT_TYPE_LATEST

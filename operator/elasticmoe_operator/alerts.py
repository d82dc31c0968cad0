"""Alertmanager's webhook (payload version 4) as the operator's receiver takes it.

Why it exists: the chart's SLO alerts (files/rules.yaml) reach the operator through
Alertmanager, and Alertmanager's delivery is at least once — HA peers and retries send the same
notification again, a 5xx or a network error is retried, any 4xx is final — and "resolved" comes
late or never. So a notification is a trigger, never a command: a firing SLO alert about an
instance makes the operator evaluate that instance's Slo policy at once (the policy decides on the
Prometheus signal, as on every periodic evaluation); a resolved one changes nothing; the same alert
(fingerprint, startsAt) seen again in the same status is a duplicate and triggers nothing.

`Receiver.handle` is the whole behaviour, without HTTP (the aiohttp route in `httpserver` only
passes the Authorization header and the body): bearer token compared in constant time on bytes,
401 without it, 400 naming the field of a malformed payload, 200 otherwise. The instance an
alert is about is named by its labels `namespace` and `elasticmoe_instance` (what every rule of
the chart keeps). Pure: no I/O, no clock (`now` is an argument), no kopf, no HTTP library.

Not guaranteed: senders are authenticated, payloads are not (Alertmanager signs nothing); a
duplicate older than the last `remember` alerts is not recognised (it would trigger one more
evaluation, which is harmless).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hmac
import logging
from typing import Callable

import msgspec

logger = logging.getLogger("elasticmoe.operator")

# The chart's alerts that a scale can cure (files/rules.yaml). ElasticMoEUnhealthy is not one:
# more devices do not heal a coordinator that cannot serve.
SLO_ALERTS = frozenset({"ElasticMoETTFTHigh", "ElasticMoETPOTHigh", "ElasticMoEQueueing"})
LABEL_NAMESPACE = "namespace"
LABEL_INSTANCE = "elasticmoe_instance"
FIRING, RESOLVED = "firing", "resolved"
VERSION = "4"

# What became of each alert of a notification (a metric label, a log field).
TRIGGERED = "triggered"  # a firing SLO alert: its instance is evaluated at once
DUPLICATE = "duplicate"  # seen before (fingerprint, startsAt, status): nothing
RESOLVED_NOTED = "resolved"  # noted; never a scale-down by itself
NOT_SLO = "not-slo"  # another alert (e.g. ElasticMoEUnhealthy): noted
UNKNOWN_INSTANCE = "unknown-instance"  # no such instance in Slo mode here, or no labels naming one


class Alert(msgspec.Struct, kw_only=True, rename="camel"):
    status: str
    labels: dict[str, str]
    annotations: dict[str, str] = {}
    starts_at: str
    ends_at: str = ""
    generator_url: str = ""
    fingerprint: str


class Notification(msgspec.Struct, kw_only=True, rename="camel"):
    version: str
    group_key: str
    status: str
    alerts: list[Alert]
    receiver: str = ""
    truncated_alerts: int = 0
    group_labels: dict[str, str] = {}
    common_labels: dict[str, str] = {}
    common_annotations: dict[str, str] = {}
    external_url: str = ""


class PayloadError(ValueError):
    """A notification the receiver cannot use; the message names the field."""


def iso_ms(t: float) -> str:
    """Seconds since the epoch as RFC 3339 UTC with milliseconds (what receipts are logged and kept as)."""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _rfc3339(value: str) -> bool:
    try:
        datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        # Go writes up to nanoseconds; Python before 3.11 reads at most microseconds.
        head, dot, tail = value.partition(".")
        if not dot:
            return False
        digits = len(tail) - len(tail.lstrip("0123456789"))
        return _rfc3339(f"{head}.{tail[:min(digits, 6)]}{tail[digits:]}") if digits > 6 else False
    return True


def parse(body: bytes) -> Notification:
    """The notification, or PayloadError naming the first bad field (`$.alerts[0].fingerprint`)."""
    try:
        n = msgspec.json.decode(body, type=Notification)
    except msgspec.ValidationError as exc:
        raise PayloadError(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise PayloadError(f"the body is not JSON: {exc}") from None
    if n.version != VERSION:
        raise PayloadError(f"expected version {VERSION!r} (Alertmanager's webhook payload), got {n.version!r} - at "
                           "`$.version`")
    if n.status not in (FIRING, RESOLVED):
        raise PayloadError(f"expected 'firing' or 'resolved', got {n.status!r} - at `$.status`")
    for i, a in enumerate(n.alerts):
        if a.status not in (FIRING, RESOLVED):
            raise PayloadError(f"expected 'firing' or 'resolved', got {a.status!r} - at `$.alerts[{i}].status`")
        if not a.fingerprint:
            raise PayloadError(f"expected a non-empty fingerprint - at `$.alerts[{i}].fingerprint`")
        if not _rfc3339(a.starts_at):
            raise PayloadError(f"expected an RFC 3339 time, got {a.starts_at!r} - at `$.alerts[{i}].startsAt`")
    return n


@dataclasses.dataclass(frozen=True)
class Receipt:
    """One alert of one notification, as received."""

    alertname: str
    namespace: str
    instance: str
    status: str
    fingerprint: str
    starts_at: str
    received_at: float  # the receiver's clock (seconds since the epoch)
    outcome: str = ""


def bearer_ok(authorization: str | None, token: bytes | None) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time; never true without a token."""
    if not token or not authorization:
        return False
    scheme, _, presented = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token)


class Receiver:
    """`token()` gives the expected bearer token (None: none configured, everything is refused);
    `trigger(receipt)` asks for an immediate evaluation of the receipt's instance and says
    whether there is such an instance in Slo mode."""

    def __init__(self, token: Callable[[], bytes | None], trigger: Callable[[Receipt], bool],
                 remember: int = 4096) -> None:
        self._token, self._trigger, self._remember = token, trigger, remember
        self._seen: collections.OrderedDict[tuple[str, str, str], Receipt] = collections.OrderedDict()

    def receipt(self, fingerprint: str, starts_at: str, status: str = FIRING) -> Receipt | None:
        """The first receipt of this alert in this status (when the operator first heard of it)."""
        return self._seen.get((fingerprint, starts_at, status))

    def handle(self, authorization: str | None, body: bytes, now: float) -> tuple[int, dict, list[Receipt]]:
        """-> (HTTP status, JSON body, the receipts of this notification)."""
        if not bearer_ok(authorization, self._token()):
            return 401, {"error": "a valid bearer token is required (Authorization: Bearer <token>)"}, []
        try:
            n = parse(body)
        except PayloadError as exc:
            return 400, {"error": f"malformed Alertmanager notification: {exc}"}, []
        receipts = [self._receive(a, now) for a in n.alerts]
        counts = collections.Counter(r.outcome for r in receipts)
        return 200, {"alerts": len(receipts), **counts}, receipts

    def _receive(self, a: Alert, now: float) -> Receipt:
        r = Receipt(alertname=a.labels.get("alertname", ""), namespace=a.labels.get(LABEL_NAMESPACE, ""),
                    instance=a.labels.get(LABEL_INSTANCE, ""), status=a.status, fingerprint=a.fingerprint,
                    starts_at=a.starts_at, received_at=now)
        key = (a.fingerprint, a.starts_at, a.status)
        if key in self._seen:
            self._seen.move_to_end(key)
            return dataclasses.replace(r, outcome=DUPLICATE)
        if a.status == RESOLVED:
            outcome = RESOLVED_NOTED
        elif r.alertname not in SLO_ALERTS:
            outcome = NOT_SLO
        elif r.namespace and r.instance and self._trigger(r):
            outcome = TRIGGERED
        else:
            outcome = UNKNOWN_INSTANCE
        r = dataclasses.replace(r, outcome=outcome)
        if outcome == UNKNOWN_INSTANCE:
            return r  # not remembered: once the instance is known (a restarted operator), a retry triggers
        self._seen[key] = r
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        return r

"""The scaling policies the autoscaling benchmark and the simulator compare, behind one face.

Why it exists: `elasticmoe simulate` and `elasticmoe bench autoscale` must run the *same*
policies, the simulator on its own clock, the benchmark on the wall clock. Each controller is
pure: `decide(signals, now) -> (target devices, reason)` and `scaled(from, to, seconds)` for
a finished scale; no I/O, no clock reads.

- `Slo`: ours, `elasticmoe_operator.policy.decide` with its learned time-to-ready (the same
  function the operator and `serve --autoscale` call).
- `Static`: a fixed device count (the static minimum and maximum baselines).
- `Hpa`: the Kubernetes HorizontalPodAutoscaler's default behaviour on a per-device load metric
  (requests in flight per device against a target value): every sync period,
  desired = ceil(current x metric / target) unless within the 10 % tolerance; scale-up at most
  max(+100 %, +4) per period and no stabilization; scale-down to the highest recommendation of
  the stabilization window (300 s by default; scale both to a short run's length). It counts
  no warming devices and learns nothing.

Not guaranteed: the HPA model follows the documented algorithm, not kube-controller-manager's
code (no readiness or missing-pod corrections, which only apply to resource metrics).
"""

from __future__ import annotations

import dataclasses
import math

from elasticmoe_operator import policy


@dataclasses.dataclass(frozen=True)
class Signals:
    """What a controller sees at one evaluation: the SLO policy's observation plus the load
    gauge an HPA would scale on."""

    observation: policy.Observation
    inflight: float | None = None  # requests running + waiting on the whole instance


class Slo:
    name = "slo"

    def __init__(self, config: policy.Config) -> None:
        self.config = config
        self.state = policy.State()
        self.last: policy.Decision | None = None

    def decide(self, signals: Signals, now: float) -> tuple[int, str]:
        self.last, self.state = policy.decide(signals.observation, self.state, self.config, now)
        return self.last.target, self.last.reason

    def scaled(self, from_devices: int, to_devices: int, seconds: float) -> None:
        self.state = policy.learn(self.state, from_devices, to_devices, seconds)


class Static:
    def __init__(self, devices: int, name: str = "static") -> None:
        self.devices = devices
        self.name = name

    def decide(self, signals: Signals, now: float) -> tuple[int, str]:
        return self.devices, f"static: {self.devices} devices"

    def scaled(self, from_devices: int, to_devices: int, seconds: float) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class HpaConfig:
    min_devices: int
    max_devices: int
    target_inflight_per_device: float
    sync_period_s: float = 15.0
    stabilization_s: float = 300.0  # scale-down only, as the HPA default
    tolerance: float = 0.1
    max_up_percent: float = 100.0
    max_up_devices: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.min_devices <= self.max_devices:
            raise ValueError(f"hpa min/max devices: got {self.min_devices}/{self.max_devices}, expected 1 <= min <= max")
        if not self.target_inflight_per_device > 0:
            raise ValueError(f"hpa target_inflight_per_device: got {self.target_inflight_per_device}, expected > 0")
        if not self.sync_period_s > 0:
            raise ValueError(f"hpa sync_period_s: got {self.sync_period_s}, expected > 0")


class Hpa:
    name = "hpa"

    def __init__(self, config: HpaConfig) -> None:
        self.config = config
        self.last_sync: float | None = None
        self.recommendations: list[tuple[float, int]] = []  # (time, desired before stabilization)
        self.target: int | None = None

    def decide(self, signals: Signals, now: float) -> tuple[int, str]:
        cfg = self.config
        obs = signals.observation
        current = obs.desired if obs.desired is not None else obs.active + obs.warming
        if self.target is None:
            self.target = current
        if self.last_sync is not None and now - self.last_sync < cfg.sync_period_s:
            return self.target, f"hpa: between syncs, {self.target} devices"
        self.last_sync = now
        if signals.inflight is None or obs.error is not None:
            return self.target, "hpa: metric unavailable, holding"
        # NOTE: the metric is averaged over the ready devices, as an HPA averages over ready pods.
        metric = signals.inflight / max(obs.active, 1)
        ratio = metric / cfg.target_inflight_per_device
        if abs(ratio - 1) <= cfg.tolerance:
            desired = current
        else:
            desired = math.ceil(current * ratio)
        desired = min(max(desired, cfg.min_devices), cfg.max_devices)
        self.recommendations = [(t, d) for t, d in self.recommendations if now - t < cfg.stabilization_s]
        self.recommendations.append((now, desired))
        if desired < current:
            # scale-down stabilization: the highest recommendation of the window
            desired = max(d for _, d in self.recommendations)
        if desired > current:
            limit = max(math.floor(current * (1 + cfg.max_up_percent / 100)), current + cfg.max_up_devices)
            desired = min(desired, limit)
        self.target = desired
        return desired, (f"hpa: {metric:.2f} in flight per device / target {cfg.target_inflight_per_device:g}: "
                         f"{current} -> {desired} devices")

    def scaled(self, from_devices: int, to_devices: int, seconds: float) -> None:
        pass

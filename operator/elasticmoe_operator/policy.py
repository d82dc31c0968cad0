"""The SLO autoscaling policy: `decide(observation, state, config, now) -> (decision, state)`.

Why it exists: one pure decision, shared by the operator (metrics from Prometheus, alerts from
Alertmanager as triggers) and by `elasticmoe serve --autoscale` (the server's own metrics), and
unit-tested with a fake clock. No I/O, no clock reads, no kopf, no torch.

The signal is s = max(p90 TTFT / target, p90 TPOT / target, p90 queueing / target) over the
latencies that have samples (llm-d's SLO recipe), smoothed with an exponential moving average.
- Scale up when the smoothed signal, projected onto the capacity already on its way (devices
  still warming count: llm-d), is above `up_threshold`, the scale-up cooldown has passed, and
  no earlier scale is still within its learned time-to-ready (its effect cannot be seen yet:
  acting again would overshoot). The step is proportional to the signal, bounded by `step`
  and `max_devices`.
- Scale down when fewer devices, taking over the load (x N/n, as NVIDIA Dynamo's planner
  projects it for n = N-1), would stay under `down_threshold`. With a measured decode model
  (`decode_step_s`: the step time per device count and batch per device, from a profile) the
  time per output token is projected by the model instead: its observed value x step(n, C/n) /
  step(N, C/N) for the C sequences decoding now (Dynamo's planner interpolates its profile the
  same way); a step has a floor that does not shrink with more devices, and on some hardware
  more devices step slower (collectives), so x N/n overstated what fewer devices would see.
  TTFT and queueing keep x N/n. Each evaluation recommends the
  fewest such devices n (N when none fewer would do), and the instance goes down to the largest
  recommendation of the whole stabilization window (the HorizontalPodAutoscaler's rule), so a
  load that fell far removes several devices at once after one window, never below `min_devices`.
  The window is `stabilization_ready_multiple` x the learned time to scale back up, within one
  metrics window and `scale_down_stabilization_s`: when a device comes back in a second, holding
  an idle one for the HorizontalPodAutoscaler's minutes only costs device-seconds.
- TPOT does not always fall with more devices (a decode step has a floor that more devices do
  not shrink; devices that share cores, or collectives between them, make it slower). The policy
  learns the p90 TPOT it saw at each device count and batch per device (`tpot_seen`, from
  settled windows) and projects fewer devices' TPOT by it where the profile (`decode_step_s`)
  has no count. On a breach, by what was seen only (a profile's decode step leaves out the
  prefill chunks that share a step under load), it (a) goes to fewer devices when every
  evaluation of one metrics window projected them to see at most `FEWER_BETTER_BY` of the
  signal (code FewerDevicesFaster: the last scale-up made TPOT worse; without the window the
  simulator's bursts moved it back and forth 8-10 times where 3-5 scales did), and (b) holds instead of adding devices seen not to lower
  the signal to `FEWER_BETTER_BY` of it, or, where the next count was never seen, when the
  devices added last did not lower TPOT by that margin at this load (ScaleUpWouldNotHelp).
  TTFT and queueing keep x N/n, so a breach of those still adds devices.
- Between the two thresholds nothing happens (the dead band): stationary noise does not flap.
- After the active count changes, nothing is decided until one metrics window (`settle_s`)
  holds only the new count's latencies: the window before mixes in the old count and the
  switch itself, and acting on it scaled up again on a scale's own disruption. The moving
  average then restarts from that first window.
- Missing or stale metrics hold the count and say so (`metrics_available=False` and why). An
  instance with no traffic at all is not "missing metrics": its signal is 0.

Time-to-ready is learned per (from, to) from measured scales (`learn`) and used as the delay
before the effect of a scale-up can be judged, and to size the stabilization window.

Not guaranteed: latency is not linear in devices; the proportional step is a first estimate,
corrected on the next evaluations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

UP, DOWN, HOLD = "up", "down", "hold"
# On a TPOT breach, fewer devices are gone to at once when projected to see at most this share of
# the signal now, and devices are added only where not seen to leave more than this share (a
# margin over the noise of two measured TPOTs, both ways: with none, values seen a minute apart
# under a changing load sent the simulator 3 -> 2 -> 3 -> 2 on a ramp).
FEWER_BETTER_BY = 0.8
# Learned TPOT points per device count: one per half-octave of batch per device, at most this many
# (the newest batch's nearest are kept), used within a half-octave beyond the batches seen.
LEARNED_POINTS = 12
LEARNED_REACH = math.sqrt(2)
# A TPOT seen is forgotten after this many metrics windows (`settle_s`; 30 s where that is 0; 30
# minutes with serve's default window): the load's mix (prompt lengths, arrivals) moves TPOT as
# much as the batch does. A count that was forgotten is tried again on the next breach (one
# window of its TPOT), so not much sooner.
TPOT_MEMORY_WINDOWS = 60


@dataclasses.dataclass(frozen=True)
class Config:
    min_devices: int
    max_devices: int
    ttft_p90_s: float
    tpot_p90_s: float
    queue_p90_s: float | None = None
    step: int = 1
    scale_up_cooldown_s: float = 30.0
    scale_down_stabilization_s: float = 300.0
    # Smoothed signal above which capacity is added: below 1, because latency grows steeply near a
    # device's saturation and a device takes seconds to add (llm-d's recipe scales up at 0.55).
    up_threshold: float = 0.8
    down_threshold: float = 0.5  # fewer devices' projected signal below which they may suffice
    smoothing: float = 0.5  # weight of the newest sample in the moving average
    stale_after_s: float = 60.0  # older metrics are not acted on
    # The metrics' window. After the active count changes, an observation whose window began
    # before the change mixes the old count's latencies (and the switch's own disruption) with
    # the new one's: it is not acted on until a whole window of the new count has passed. 0: the
    # first observation at a new count is acted on (metrics taken at an instant).
    settle_s: float = 0.0
    default_time_to_ready_s: float = 30.0  # before any scale was measured
    # The stabilization window is this many times the learned time to scale back up (n-1 -> n),
    # at least one metrics window (`settle_s`) and at most `scale_down_stabilization_s`. A wrong
    # scale-down costs about one time-to-ready to undo: an instance that adds a device in a
    # second need not hold idle devices for minutes (the HorizontalPodAutoscaler's 300 s default
    # is ~10 x a pod's start of tens of seconds). Until a scale-up was measured the default
    # time-to-ready applies (30 s x 10: the configured window). 0: always the configured window.
    stabilization_ready_multiple: float = 10.0
    # Measured decode step seconds of one device, per device count, at each batch per device
    # ((batch, seconds) ascending; a profile's decode points): projects the time per output token
    # of fewer devices. Empty: x N/n for every latency. Counts not in it fall back to x N/n.
    decode_step_s: Mapping[int, tuple[tuple[float, float], ...]] = dataclasses.field(default_factory=dict)
    # Learn the p90 TPOT per device count and batch per device from settled observations
    # (`State.tpot_seen`) and project TPOT by it where `decode_step_s` lacks a count.
    learn_tpot: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.min_devices <= self.max_devices:
            raise ValueError(f"min_devices/max_devices: got {self.min_devices}/{self.max_devices}, expected "
                             f"1 <= min <= max")
        for name in ("ttft_p90_s", "tpot_p90_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: got {getattr(self, name)!r}, expected a positive number of seconds")
        if self.queue_p90_s is not None and not self.queue_p90_s > 0:
            raise ValueError(f"queue_p90_s: got {self.queue_p90_s!r}, expected a positive number of seconds or None")
        if not 0 < self.down_threshold < self.up_threshold:
            raise ValueError(f"down_threshold/up_threshold: got {self.down_threshold}/{self.up_threshold}, "
                             f"expected 0 < down < up (the dead band lies between)")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing: got {self.smoothing}, expected a weight in (0, 1]")
        if not self.stabilization_ready_multiple >= 0:
            raise ValueError(f"stabilization_ready_multiple: got {self.stabilization_ready_multiple!r}, expected a "
                             f"number >= 0 (0: always scale_down_stabilization_s)")
        if not self.settle_s >= 0:
            raise ValueError(f"settle_s: got {self.settle_s!r}, expected the metrics' window in seconds (>= 0)")
        if self.step < 1:
            raise ValueError(f"step: got {self.step}, expected an integer >= 1")
        for n, points in self.decode_step_s.items():
            if n < 1 or not points or any(b <= 0 or sec <= 0 for b, sec in points) or \
                    [b for b, _ in points] != sorted(b for b, _ in points):
                raise ValueError(f"decode_step_s[{n}]: got {points!r}, expected (batch, seconds) pairs of positive "
                                 f"numbers with batches ascending, for a device count >= 1")


@dataclasses.dataclass(frozen=True)
class Observation:
    """What the metrics said, sampled at `at` (same clock as `now`)."""

    at: float
    active: int  # devices serving
    warming: int = 0  # devices joining in a scale that runs now
    desired: int | None = None  # the count currently asked for (spec); None: active + warming
    ttft_p90_s: float | None = None  # None: no sample in the window
    tpot_p90_s: float | None = None
    queue_p90_s: float | None = None
    requests_per_s: float | None = None  # arrivals in the window; 0 = idle, None = unknown
    decoding: float | None = None  # sequences decoding on the instance now (None: unknown)
    error: str | None = None  # the metrics could not be read: why


@dataclasses.dataclass(frozen=True)
class State:
    smoothed: float | None = None
    smoothed_active: int | None = None  # the active device count the smoothed signal was measured at
    last_up_at: float | None = None
    # (time, devices) of the evaluations within the stabilization window (and the newest before
    # it, which shows the window is covered): how few devices each found enough.
    recommendations: tuple[tuple[float, int], ...] = ()
    recommended_at: int | None = None  # the device count they were made at; another count starts afresh
    pending: tuple[int, float] | None = None  # (target, time its effect becomes visible)
    settle_until: float | None = None  # the active count changed: its latencies fill the window until then
    time_to_ready_s: Mapping[tuple[int, int], float] = dataclasses.field(default_factory=dict)
    # p90 TPOT seen per active device count: ((batch per device, seconds, when last seen), ...)
    # ascending by batch
    tpot_seen: Mapping[int, tuple[tuple[float, float, float], ...]] = dataclasses.field(default_factory=dict)
    # since when every evaluation found fewer devices faster (FewerDevicesFaster waits one metrics window)
    fewer_since: float | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    target: int
    action: str  # up | down | hold
    reason: str
    signal: float | None  # smoothed
    raw_signal: float | None
    metrics_available: bool
    metrics_reason: str  # why not, or "ok"
    values: Mapping[str, float] = dataclasses.field(default_factory=dict)  # the inputs, for the record
    # A CamelCase word for `reason`, few and fixed (a metric label, an Event reason): SloBreached,
    # SurvivorsUnderTarget, FewerDevicesFaster, OutOfBounds, AtMaximum, WaitingForScale, Cooldown,
    # ScaleUpWouldNotHelp, Stabilizing, WithinDeadBand, MetricsUnavailable, MetricsStale, NoSamples.
    code: str = ""


def raw_signal(obs: Observation, cfg: Config) -> tuple[float | None, dict[str, float]]:
    """-> (s, the ratios it came from); s is None when nothing can be said."""
    ratios: dict[str, float] = {}
    if obs.ttft_p90_s is not None:
        ratios["ttft"] = obs.ttft_p90_s / cfg.ttft_p90_s
    if obs.tpot_p90_s is not None:
        ratios["tpot"] = obs.tpot_p90_s / cfg.tpot_p90_s
    if obs.queue_p90_s is not None and cfg.queue_p90_s is not None:
        ratios["queue"] = obs.queue_p90_s / cfg.queue_p90_s
    if ratios:
        return max(ratios.values()), ratios
    if obs.requests_per_s == 0:
        return 0.0, ratios  # idle: no latency samples because nothing arrived
    return None, ratios


def _interpolate(points: tuple[tuple[float, float], ...], batch: float) -> float:
    if batch <= points[0][0]:
        return points[0][1]
    for (b0, s0), (b1, s1) in zip(points, points[1:]):
        if batch <= b1:
            return s0 + (s1 - s0) * (batch - b0) / (b1 - b0)
    return points[-1][1]


def decode_step(cfg: Config, devices: int, batch: float) -> float | None:
    """The model's step seconds of `devices` at `batch` sequences per device (linear between
    measured batches, the end values beyond them); None when that count was not measured."""
    points = cfg.decode_step_s.get(devices)
    return _interpolate(points, batch) if points else None


def seen_tpot(state: State, devices: int, batch: float) -> float | None:
    """The p90 TPOT seen at `devices` and `batch` per device (linear between the batches seen);
    None when that count was not seen within `LEARNED_REACH` of this batch."""
    points = state.tpot_seen.get(devices)
    if not points or not points[0][0] / LEARNED_REACH <= batch <= points[-1][0] * LEARNED_REACH:
        return None
    return _interpolate(tuple((b, sec) for b, sec, _ in points), batch)


def learn_tpot(state: State, devices: int, batch: float, tpot_s: float, at: float, weight: float = 0.5) -> State:
    """Fold one settled window's p90 TPOT at `devices` and `batch` per device, seen at `at`, into
    `tpot_seen` (a moving average per half-octave of batch)."""
    if devices < 1 or batch <= 0 or tpot_s <= 0:
        return state
    key = round(2 * math.log2(batch))
    points = {round(2 * math.log2(b)): (b, sec, t) for b, sec, t in state.tpot_seen.get(devices, ())}
    if key in points:
        b0, s0, _ = points[key]
        points[key] = (weight * batch + (1 - weight) * b0, weight * tpot_s + (1 - weight) * s0, at)
    else:
        points[key] = (batch, tpot_s, at)
    kept = sorted(sorted(points, key=lambda k: abs(k - key))[:LEARNED_POINTS])
    return dataclasses.replace(state, tpot_seen={**state.tpot_seen,
                                                 devices: tuple(points[k] for k in kept)})


def forget_tpot(state: State, before: float) -> State:
    """`tpot_seen` without the points last seen before `before`."""
    if not any(t < before for points in state.tpot_seen.values() for _, _, t in points):
        return state
    kept = {n: tuple(p for p in points if p[2] >= before) for n, points in state.tpot_seen.items()}
    return dataclasses.replace(state, tpot_seen={n: points for n, points in kept.items() if points})


def tpot_factor(cfg: Config, state: State | None, obs: Observation, current: int, n: int,
                profile: bool = True) -> tuple[float, str, float, float] | None:
    """TPOT on `n` devices over TPOT on `current`, for the sequences decoding now: (factor, its
    source: "profile" or "seen", TPOT-like seconds at current, at n); None when neither the
    profile (unless `profile` is False) nor what was seen has both counts at these batches, or
    the decoding count is unknown."""
    if obs.decoding is None:
        return None
    c = max(obs.decoding, 1.0)
    here, there = (decode_step(cfg, current, c / current), decode_step(cfg, n, c / n)) if profile else (None, None)
    if here and there:
        return there / here, "profile", here, there
    if cfg.learn_tpot and state is not None:
        here, there = seen_tpot(state, current, c / current), seen_tpot(state, n, c / n)
        if here and there:
            return there / here, "seen", here, there
    return None


def projection(ratios: Mapping[str, float], obs: Observation, cfg: Config, current: int, n: int,
               state: State | None = None, profile: bool = True) -> float:
    """How much larger the raw signal would be on `n` devices carrying the load of `current`
    (1 at n == current): TTFT and queueing x current/n; TPOT by the decode model (the profile,
    else the TPOT seen in `state`) where it has both counts and the decoding count is known, else
    x current/n too."""
    raw = max(ratios.values(), default=0.0)
    if raw <= 0:
        return current / n
    factors = {k: current / n for k in ratios}
    if "tpot" in ratios:
        f = tpot_factor(cfg, state, obs, current, n, profile)
        if f is not None:
            factors["tpot"] = f[0]
    return max(ratios[k] * factors[k] for k in ratios) / raw


def time_to_ready(state: State, cfg: Config, from_devices: int, to_devices: int) -> float:
    """Learned seconds from asking for (from -> to) to serving at `to`; scaled from the nearest
    measured step when this exact one was never measured."""
    learned = state.time_to_ready_s
    if (from_devices, to_devices) in learned:
        return learned[(from_devices, to_devices)]
    ups = [(t - f, s) for (f, t), s in learned.items() if t > f]
    if to_devices > from_devices and ups:
        per_device = sum(s / n for n, s in ups) / len(ups)
        return per_device * (to_devices - from_devices)
    return cfg.default_time_to_ready_s


def _seconds(x: float) -> str:
    """A duration for a reason: whole seconds from 10 s, two significant digits below (an elastic
    scale takes a fraction of a second: "0.12 s", not "0 s")."""
    return f"{x:.0f} s" if x >= 10 else f"{max(x, 0.0):.2g} s"


def stabilization_s(state: State, cfg: Config, devices: int) -> float:
    """The scale-down stabilization window at `devices`: `stabilization_ready_multiple` x the
    learned time-to-ready of (devices - 1 -> devices), within [settle_s, scale_down_stabilization_s]."""
    return _stabilization(state, cfg, devices)[0]


def _stabilization(state: State, cfg: Config, devices: int) -> tuple[float, str]:
    """-> (the window, where a window shorter than the configured one came from, for the reason)."""
    if cfg.stabilization_ready_multiple <= 0 or devices <= 1:
        return cfg.scale_down_stabilization_s, ""
    undo = time_to_ready(state, cfg, devices - 1, devices)
    window = min(cfg.scale_down_stabilization_s, max(cfg.settle_s, cfg.stabilization_ready_multiple * undo))
    if window >= cfg.scale_down_stabilization_s:
        return window, ""
    return window, (f" (stabilization {cfg.stabilization_ready_multiple:g} x the {_seconds(undo)} a scale {devices - 1} "
                    f"-> {devices} takes, at least one {cfg.settle_s:g} s metrics window)")


def learn(state: State, from_devices: int, to_devices: int, seconds: float, weight: float = 0.5) -> State:
    """Fold one measured scale into the time-to-ready estimates."""
    if seconds <= 0 or from_devices == to_devices:
        return state
    key = (from_devices, to_devices)
    old = state.time_to_ready_s.get(key)
    new = seconds if old is None else weight * seconds + (1 - weight) * old
    return dataclasses.replace(state, time_to_ready_s={**state.time_to_ready_s, key: new})


def _tpot_text(f: tuple[float, str, float, float], a: int, b: int) -> str:
    """"1 device 24 ms, 2 devices 44 ms (p90 seen)" from a seen `tpot_factor` of a -> b (the
    breach rules use no other)."""
    _, _, here, there = f
    return f"{_devices(a)} {here * 1000:.0f} ms, {_devices(b)} {there * 1000:.0f} ms (p90 seen)"


def _devices(n: int) -> str:
    return f"{n} device{'' if n == 1 else 's'}"


def _futile(ratios: Mapping[str, float], obs: Observation, cfg: Config, state: State, current: int, target: int,
            smoothed: float, raw: float) -> str:
    """Why adding devices (current -> target) would not lower the signal to `FEWER_BETTER_BY` of
    it, or "" when they may: by the TPOT seen at the count nearest `target` seen above `current`
    (counts beyond it are assumed no better), or, where none above was seen, because the largest
    fewer count seen stepped almost as fast as `current` at this load (the devices added since
    did not lower TPOT by the margin; more are assumed not to either). Seen TPOT only, not the
    profile: a profile's decode step leaves out what else shares the step under load (prefill
    chunks: `bench autoscale` held a breach at 1 device on TPOT p90 246 ms where the profile's
    steps were 57 ms at 1 device, 60 ms at 2)."""
    above = next(((n, f) for n in range(target, current, -1)
                  if (f := tpot_factor(cfg, state, obs, current, n, profile=False)) is not None), None)
    if above is not None:  # the count nearest the target known: what lies beyond is assumed no better
        n, f = above
        factor, why = f[0], (f"at {obs.decoding:.0f} sequences decoding, TPOT {_tpot_text(f, current, n)}: "
                             f"{target} devices would not lower it by {1 - FEWER_BETTER_BY:.0%}")
    else:
        fewer = next(((m, g) for m in range(current - 1, 0, -1)
                      if (g := tpot_factor(cfg, state, obs, current, m, profile=False)) is not None), None)
        if fewer is None or fewer[1][0] * FEWER_BETTER_BY > 1.0:
            return ""
        m, g = fewer
        factor, why = 1.0, (f"at {obs.decoding:.0f} sequences decoding, TPOT {_tpot_text(g, current, m)}: "
                            f"the devices added since {m} did not lower it by {1 - FEWER_BETTER_BY:.0%}, and "
                            f"{target} was never seen")
    there = max(ratios[k] * (factor if k == "tpot" else current / target) for k in ratios) / raw * smoothed
    return why if there > FEWER_BETTER_BY * smoothed else ""


def _fmt(ratios: Mapping[str, float], obs: Observation, cfg: Config) -> str:
    parts = []
    if "ttft" in ratios:
        parts.append(f"TTFT p90 {obs.ttft_p90_s * 1000:.0f} ms / {cfg.ttft_p90_s * 1000:.0f}")
    if "tpot" in ratios:
        parts.append(f"TPOT p90 {obs.tpot_p90_s * 1000:.0f} ms / {cfg.tpot_p90_s * 1000:.0f}")
    if "queue" in ratios:
        parts.append(f"queue p90 {obs.queue_p90_s * 1000:.0f} ms / {cfg.queue_p90_s * 1000:.0f}")
    return ", ".join(parts) or "no requests"


def decide(obs: Observation, state: State, cfg: Config, now: float) -> tuple[Decision, State]:
    current = obs.desired if obs.desired is not None else obs.active + obs.warming
    bounded = min(max(current, cfg.min_devices), cfg.max_devices)

    def hold(reason: str, available: bool, why: str, code: str, smoothed=None, raw=None, values=None, st=state):
        target = bounded
        if target != current:
            reason = f"{reason}; {current} devices is outside [{cfg.min_devices}, {cfg.max_devices}]: -> {target}"
            code = "OutOfBounds"
        action = HOLD if target == current else (UP if target > current else DOWN)
        return Decision(target, action, reason, smoothed, raw, available, why, values or {}, code), st

    if obs.error is not None:
        return hold(f"holding {current} devices: metrics unavailable ({obs.error})", False, obs.error,
                    "MetricsUnavailable")
    age = now - obs.at
    if age > cfg.stale_after_s:
        why = f"metrics are {age:.0f} s old (stale after {cfg.stale_after_s:.0f} s)"
        return hold(f"holding {current} devices: {why}", False, why, "MetricsStale")
    raw, ratios = raw_signal(obs, cfg)
    if raw is None:
        why = "no latency samples and no request rate in the window"
        return hold(f"holding {current} devices: {why}", False, why, "NoSamples")

    previous = state.smoothed
    settle_until = state.settle_until
    if previous is not None and state.smoothed_active and state.smoothed_active != obs.active and obs.active > 0:
        # The capacity changed: what was measured before spreads over the new count. Without
        # this the average remembers the old overload and scales up again: overshoot.
        previous = previous * state.smoothed_active / obs.active
        if cfg.settle_s > 0:
            settle_until = now + cfg.settle_s
    settling = settle_until is not None and now < settle_until
    # The first observation after settling is the first whose window holds only the new count: the
    # average restarts from it. What was carried over (x old/new count) was a guess made without
    # the decode model; blended in, it outlived the settling (bench autoscale's simulation: 3 -> 1
    # at a projected 0.35, then 1 -> 2 at once on 0.5 x 0.34 measured + 0.5 x 1.29 carried over).
    fresh = not settling and settle_until is not None
    # NOTE: while settling, the window still holds the old count's latencies and the switch's: a
    # scale-up right after one measured its own disruption (bench autoscale: 1 -> 2 at TPOT 234
    # ms, then 2 -> 3 at once on the 957 ms of the switch) and a scale-down the old capacity.
    smoothed = previous if settling and previous is not None else (
        raw if previous is None or fresh else cfg.smoothing * raw + (1 - cfg.smoothing) * previous)
    values = {**{f"{k}Ratio": round(v, 4) for k, v in ratios.items()}, "signal": round(smoothed, 4),
              "rawSignal": round(raw, 4), "active": obs.active, "warming": obs.warming}
    if obs.requests_per_s is not None:
        values["requestsPerS"] = round(obs.requests_per_s, 4)
    # the window before was measured at this count too (or this is the first: nothing says otherwise)
    steady = state.smoothed_active in (None, obs.active)
    state = dataclasses.replace(state, smoothed=smoothed, smoothed_active=obs.active,
                                settle_until=settle_until if settling else None)
    if cfg.learn_tpot and steady and not settling and obs.warming == 0 and obs.active > 0 and \
            obs.tpot_p90_s is not None and obs.decoding is not None and obs.decoding >= 1:
        state = learn_tpot(state, obs.active, obs.decoding / obs.active, obs.tpot_p90_s, now)
    state = forget_tpot(state, now - TPOT_MEMORY_WINDOWS * (cfg.settle_s or 30.0))
    what = _fmt(ratios, obs, cfg)
    capacity = obs.active + obs.warming
    # Capacity already on its way takes load off: judge what it will leave.
    projected = smoothed * obs.active / capacity if capacity > 0 and obs.active > 0 else smoothed
    pending = state.pending
    if pending is not None and (obs.active >= pending[0] or now >= pending[1]):
        pending = None  # the scale's effect is visible now (or it should be)
        state = dataclasses.replace(state, pending=None)

    window, why_window = _stabilization(state, cfg, current)
    window_start = now - window
    values["stabilizationS"] = round(window, 3)

    def recommend(devices: int, st: State) -> State:
        kept = (st.recommendations if st.recommended_at == current else ()) + ((now, devices),)
        first = max((i for i, (t, _) in enumerate(kept) if t <= window_start), default=0)
        return dataclasses.replace(st, recommendations=kept[first:], recommended_at=current)

    if settling:
        state = recommend(current, state)
        return hold(f"SLO signal {raw:.2f} now ({what}), measured partly before the change to {obs.active} active "
                    f"devices: waiting {settle_until - now:.0f} s more for a whole window of the new count",
                    True, "ok", "WaitingForScale", smoothed, raw, values, state)

    def seen_by(n: int, profile: bool = True) -> float:  # the smoothed signal carried over to n devices
        return smoothed * projection(ratios, obs, cfg, current, n, state, profile)

    if projected > cfg.up_threshold:
        state = recommend(max(current, bounded), state)
        cooling = state.last_up_at is not None and now - state.last_up_at < cfg.scale_up_cooldown_s
        if "tpot" in ratios and pending is None and obs.warming == 0 and not cooling:
            # Fewer devices seen to step faster for a whole metrics window: go there (a move for the
            # SLO: it starts a cooldown).
            known = [(seen_by(n, profile=False), n, f) for n in range(max(cfg.min_devices, 1), current)
                     if (f := tpot_factor(cfg, state, obs, current, n, profile=False)) is not None]
            faster = bool(known) and min(known)[0] <= FEWER_BETTER_BY * smoothed
            since = (state.fewer_since if state.fewer_since is not None else now) if faster else None
            state = dataclasses.replace(state, fewer_since=since)
            if faster and now - since >= cfg.settle_s:
                there, target, f = min(known)
                state = dataclasses.replace(state, last_up_at=now, recommendations=((now, target),),
                                            recommended_at=current, fewer_since=None)
                reason = (f"SLO signal {smoothed:.2f} ({what}) above {cfg.up_threshold:.2f}, and {_devices(target)} "
                          f"would see {there:.2f}: at {obs.decoding:.0f} sequences decoding, TPOT "
                          f"{_tpot_text(f, current, target)}: {current} -> {target} devices")
                return Decision(target, DOWN, reason, smoothed, raw, True, "ok", values, "FewerDevicesFaster"), state
        if current >= cfg.max_devices:
            return hold(f"SLO signal {smoothed:.2f} ({what}) above {cfg.up_threshold:.2f} but already at the "
                        f"maximum of {cfg.max_devices} devices", True, "ok", "AtMaximum", smoothed, raw, values,
                        state)
        if pending is not None:
            return hold(f"SLO signal {smoothed:.2f} ({what}): waiting for the scale to {pending[0]} devices to "
                        f"take effect (about {_seconds(pending[1] - now)} more)", True, "ok", "WaitingForScale", smoothed,
                        raw, values, state)
        if cooling:
            left = cfg.scale_up_cooldown_s - (now - state.last_up_at)
            return hold(f"SLO signal {smoothed:.2f} ({what}): scale-up cooldown, {left:.0f} s left", True, "ok",
                        "Cooldown", smoothed, raw, values, state)
        needed = math.ceil(capacity * projected / cfg.up_threshold)
        target = min(max(needed, current + 1), current + cfg.step, cfg.max_devices)
        futile = _futile(ratios, obs, cfg, state, current, target, smoothed, raw) if "tpot" in ratios else ""
        if futile:
            return hold(f"SLO signal {smoothed:.2f} ({what}) above {cfg.up_threshold:.2f}, but {futile}: holding "
                        f"{_devices(current)}", True, "ok", "ScaleUpWouldNotHelp", smoothed, raw, values, state)
        ready_at = now + time_to_ready(state, cfg, current, target)
        state = recommend(target, dataclasses.replace(state, last_up_at=now, pending=(target, ready_at)))
        reason = (f"SLO signal {smoothed:.2f} ({what}) above {cfg.up_threshold:.2f} with {obs.active} active + "
                  f"{obs.warming} warming: {current} -> {target} devices (ready in about {_seconds(ready_at - now)})")
        return Decision(target, UP, reason, smoothed, raw, True, "ok", values, "SloBreached"), state

    if current > cfg.min_devices and pending is None and obs.warming == 0:
        survivors = seen_by(current - 1)
        values["survivorsSignal"] = round(survivors, 4)
        # The fewest devices n whose projected signal is under down_threshold, within [min, current].
        enough = next((n for n in range(max(cfg.min_devices, 1), current) if seen_by(n) < cfg.down_threshold),
                      current)
        state = recommend(enough, state)
        if enough < current:
            history = state.recommendations
            covered = history[0][0] <= window_start
            target = max(n for _, n in history)
            low_from = now
            for t, n in reversed(history):  # the newest run of evaluations that found fewer enough
                if n >= current:
                    break
                low_from = t
            low_for = now - max(low_from, window_start) if covered else now - low_from
            if covered and target < current:
                state = dataclasses.replace(state, recommendations=((now, target),))
                reason = (f"SLO signal {smoothed:.2f} ({what}); {target} devices would see "
                          f"{seen_by(target):.2f} < {cfg.down_threshold:.2f}, and no evaluation of the "
                          f"last {window:.0f} s{why_window} asked for more (the "
                          f"{current - 1} survivors of one removal would see {survivors:.2f}): {current} -> {target} "
                          f"devices")
                return (Decision(target, DOWN, reason, smoothed, raw, True, "ok", values, "SurvivorsUnderTarget"),
                        state)
            return hold(f"SLO signal {smoothed:.2f} ({what}): {enough} devices would do (survivors of one removal "
                        f"would see {survivors:.2f}); low for {low_for:.0f} of {window:.0f} "
                        f"s{why_window}", True, "ok", "Stabilizing", smoothed, raw,
                        values, state)
    else:
        state = recommend(current, state)
    return hold(f"SLO signal {smoothed:.2f} ({what}) within the dead band: {current} devices", True, "ok",
                "WithinDeadBand", smoothed, raw, values, state)

"""A measured service profile of one instance kind: what `elasticmoe simulate` models an
instance with, and what `elasticmoe bench profile` writes.

Why it exists: the simulator must not guess the hardware. A profile holds, per device count
n (each device's numbers, measured with the load spread over n devices):
- decode: tokens/s of one device at each batch size (requests decoding at once on it);
- prefill: prompt tokens/s of one device at each number of prompt tokens per engine step;
- context (optional): seconds one decode step of a device takes longer per token of context
  its decoding sequences hold together (attention reads every cached token: a batch decoding
  with 500-token contexts steps slower than one with 8-token contexts);
and the time-to-ready of each measured scale step (from -> to devices, elastic, on a live
instance) and the cold start of a whole instance of n devices (for "add a replica").

The format (JSON, `"format": "elasticmoe-profile/v1"`)::

    {"format": "elasticmoe-profile/v1",
     "measured": {"date": "...", "model": "...", "backend": "cpu", "cpuPerDevice": 0.45, ...},
     "engine": {"maxNumSeqs": 64, "maxNumBatchedTokens": 512, "maxWaiting": 256},
     "service": [{"devices": 1, "decode": [[1, 80.0], [4, 250.0], ...],
                  "prefill": [[64, 900.0], [512, 2400.0]], "contextStepS": 2.5e-07}, ...],
     "scale": [{"from": 1, "to": 2, "seconds": 6.1}, ...],
     "start": [{"devices": 1, "seconds": 14.0}, ...]}

Lookups interpolate linearly between measured points and hold the end values beyond them (a
device count above the largest measured one serves like a device of the largest). Pure: no
clock, no torch; reading and writing the file is the caller's.

Not guaranteed: per-device rates measured on a few devices are extrapolated flat to many;
interference between decode and prefill in one step is modelled as additive.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

import numpy as np

FORMAT = "elasticmoe-profile/v1"


@dataclasses.dataclass(frozen=True)
class Service:
    devices: int
    decode: tuple[tuple[float, float], ...]  # (batch per device, tokens/s of the device)
    prefill: tuple[tuple[float, float], ...]  # (prompt tokens per step per device, tokens/s of the device)
    # seconds a decode step of the device gains per context token of its decoding sequences
    # (the decode points were measured at short contexts); 0 = not measured
    context_step_s: float = 0.0

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"service.devices: got {self.devices}, expected >= 1")
        if not self.context_step_s >= 0:
            raise ValueError(f"service[{self.devices}].contextStepS: got {self.context_step_s!r}, expected >= 0")
        for name in ("decode", "prefill"):
            points = getattr(self, name)
            if not points:
                raise ValueError(f"service[{self.devices}].{name}: no points, expected [[x, tokens_per_s], ...]")
            xs = [x for x, _ in points]
            if xs != sorted(xs) or len(set(xs)) != len(xs) or xs[0] <= 0:
                raise ValueError(f"service[{self.devices}].{name}: x values {xs}, expected positive and increasing")
            if any(not r > 0 for _, r in points):
                raise ValueError(f"service[{self.devices}].{name}: rates {[r for _, r in points]}, expected > 0")


@dataclasses.dataclass(frozen=True)
class Step:
    from_devices: int
    to_devices: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class Profile:
    service: tuple[Service, ...]
    scale: tuple[Step, ...] = ()
    start: tuple[tuple[int, float], ...] = ()  # (devices, seconds to start an instance of them)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_waiting: int = 256
    measured: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.service:
            raise ValueError("service: empty, expected the rates of at least one device count")
        counts = [s.devices for s in self.service]
        if counts != sorted(set(counts)):
            raise ValueError(f"service: device counts {counts}, expected increasing and distinct")
        for s in self.scale:
            if s.from_devices < 1 or s.to_devices < 1 or s.from_devices == s.to_devices or not s.seconds > 0:
                raise ValueError(f"scale: {s}, expected 1 <= from != to and seconds > 0")

    # -- lookups ---------------------------------------------------------------------------------
    def _service(self, devices: int) -> Service:
        best = self.service[0]
        for s in self.service:
            if s.devices <= devices:
                best = s
        return best

    def decode_step_s(self, devices: int, batch: float) -> float:
        """Seconds per decode step of one device with `batch` requests decoding on it
        (at least one: an idle step costs what a step of one costs), at the short contexts the
        decode rates were measured at (`context_step_s` adds the rest)."""
        xs, rates = _xy(self._service(devices).decode)
        b = max(float(batch), 1.0)
        return b / float(np.interp(b, xs, rates))

    def decode_model(self) -> dict[int, tuple[tuple[float, float], ...]]:
        """Per measured device count, (batch per device, seconds per decode step) at each measured
        batch: what the SLO policy projects the time per output token of fewer devices with."""
        return {s.devices: tuple((b, b / r) for b, r in s.decode) for s in self.service}

    def context_step_s(self, devices: int) -> float:
        """Seconds a decode step of one device gains per token of context its sequences hold."""
        return self._service(devices).context_step_s

    def prefill_s(self, devices: int, tokens_per_step: float) -> float:
        """Seconds one device spends on `tokens_per_step` prompt tokens in one step."""
        if tokens_per_step <= 0:
            return 0.0
        xs, rates = _xy(self._service(devices).prefill)
        return tokens_per_step / float(np.interp(tokens_per_step, xs, rates))

    def scale_s(self, from_devices: int, to_devices: int) -> float:
        """Time-to-ready of an elastic scale: the measured step, else a line through the
        measured steps of the same direction over the devices added (removed)."""
        for s in self.scale:
            if (s.from_devices, s.to_devices) == (from_devices, to_devices):
                return s.seconds
        up = to_devices > from_devices
        same = [(abs(s.to_devices - s.from_devices), s.seconds) for s in self.scale
                if (s.to_devices > s.from_devices) == up]
        if not same:
            return 30.0 if up else 5.0
        k = abs(to_devices - from_devices)
        if len({d for d, _ in same}) < 2:
            return float(np.mean([sec for _, sec in same]))
        d, sec = np.array(same, dtype=float).T
        slope, intercept = np.polyfit(d, sec, 1)
        return float(max(intercept + slope * k, min(sec)))

    def start_s(self, devices: int) -> float:
        """Cold start of an instance of `devices` devices (model load, engines up)."""
        if not self.start:
            return 60.0
        xs, ys = _xy(self.start)
        return float(np.interp(devices, xs, ys))

    # -- the file --------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "measured": self.measured,
            "engine": {"maxNumSeqs": self.max_num_seqs, "maxNumBatchedTokens": self.max_num_batched_tokens,
                       "maxWaiting": self.max_waiting},
            "service": [{"devices": s.devices, "decode": [list(p) for p in s.decode],
                         "prefill": [list(p) for p in s.prefill], "contextStepS": s.context_step_s}
                        for s in self.service],
            "scale": [{"from": s.from_devices, "to": s.to_devices, "seconds": s.seconds} for s in self.scale],
            "start": [{"devices": d, "seconds": s} for d, s in self.start],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Profile":
        if data.get("format") != FORMAT:
            raise ValueError(f"profile format: got {data.get('format')!r}, expected {FORMAT!r} "
                             f"(written by `elasticmoe bench profile`)")
        engine = data.get("engine", {})
        try:
            return cls(
                service=tuple(Service(int(s["devices"]), _points(s["decode"]), _points(s["prefill"]),
                                      float(s.get("contextStepS", 0.0))) for s in data["service"]),
                scale=tuple(Step(int(s["from"]), int(s["to"]), float(s["seconds"])) for s in data.get("scale", [])),
                start=tuple((int(s["devices"]), float(s["seconds"])) for s in data.get("start", [])),
                max_num_seqs=int(engine.get("maxNumSeqs", 64)),
                max_num_batched_tokens=int(engine.get("maxNumBatchedTokens", 512)),
                max_waiting=int(engine.get("maxWaiting", 256)), measured=dict(data.get("measured", {})))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"profile: malformed ({type(exc).__name__}: {exc}); see the format in "
                             f"elasticmoe_worker.bench.profile") from None


def load(path: str | pathlib.Path) -> Profile:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--profile {path}: no such file; write one with `elasticmoe bench profile`")
    return Profile.from_json(json.loads(path.read_text()))


def save(profile: Profile, path: str | pathlib.Path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_json(), indent=1) + "\n")


def _points(raw: Sequence[Sequence[float]]) -> tuple[tuple[float, float], ...]:
    return tuple((float(x), float(y)) for x, y in raw)


def _xy(points) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(points, dtype=float)
    return a[:, 0], a[:, 1]

"""A discrete-time model of one elastic instance serving a trace under a scaling controller.

Why it exists: `elasticmoe simulate` answers "what would this policy do with this trace on
this hardware" for traces and device counts no machine here can run (1 000 devices, 24 hours),
in seconds, with the measured profile of `elasticmoe bench profile` as the hardware and the
very controllers the real benchmark runs (`bench.controllers`).

The model (continuous batching, data-parallel devices that step together):
- Arrivals join one FIFO queue. A request is refused (a failed request, as the router's 429)
  when the queue already holds `max_waiting` per serving device; it is admitted while fewer
  than `max_num_seqs` per device run.
- Prefill is FIFO over prompt tokens. An engine step gives each device's decoding requests one
  token each and prompt tokens up to `max_num_batched_tokens`; its duration is the profile's
  decode step at that batch, plus the profile's cost per token of context times the context
  the decoding requests hold (prompt and tokens so far), plus the profile's time for those
  prompt tokens. A request's first
  token comes when the cumulative prefilled tokens pass the end of its prompt.
- Every decoding request gains one token per step, so one "decode clock" G (tokens a decoding
  request has received since t=0) describes them all: a request that starts decoding at G0
  finishes at G0 + output - 1. Finishing requests wait in a calendar indexed by G.
- Time advances in ticks of `tick_s`; within a tick the state is fluid (fractional steps),
  which is what makes a day of a thousand devices a ~1e5-step loop of a few numpy calls.
  Per-request TTFT and TPOT are read back at the end by inverting the recorded cumulative
  prefill and G curves (numpy, a chunk of requests at a time).
- Every `eval_period_s` the controller sees what a server's metrics would show over the last
  `window_s` (p90 TTFT of first tokens in the window, p90 of the time per output token over
  the window's decode steps, arrival rate, requests in flight) and returns a device target.
  "devices" mode scales this instance elastically: capacity arrives after the profile's
  time-to-ready for (from, to), one scale at a time, the old devices serve throughout.
  "replica" mode adds and removes whole replicas of `replica_devices` devices, each serving
  after the profile's cold start; replicas share the load evenly (a pooled queue).
- Device-seconds count every device from the moment it is asked for until it is released.

Not guaranteed: the KV cache is not modelled (no preemption); prefill and decode costs add
within a step; a scale causes no slowdown of the old devices; the TPOT the controller sees is a
per-token p90 (the server's is per request), the reported TPOT is per request.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np

from elasticmoe_operator import policy
from elasticmoe_worker.bench import controllers
from elasticmoe_worker.bench import profile as profile_mod
from elasticmoe_worker.bench import report
from elasticmoe_worker.bench import workload

DEVICES, REPLICA = "devices", "replica"
_LATENCY_CHUNK = 1 << 18  # requests per pass of the per-request latencies
_INDEX_STEPS = 8  # _Index: linear steps before a binary search


@dataclasses.dataclass(frozen=True)
class Setup:
    initial_devices: int
    ttft_slo_s: float
    tpot_slo_s: float
    mode: str = DEVICES
    replica_devices: int = 1
    eval_period_s: float = 5.0
    window_s: float = 30.0
    tick_s: float | None = None  # None: about 1e5 ticks over the trace, within [0.02 s, 1 s]
    drain_s: float | None = None  # after the last arrival; None: 10 % of the trace, at least 60 s

    def __post_init__(self) -> None:
        if self.mode not in (DEVICES, REPLICA):
            raise ValueError(f"mode: got {self.mode!r}, expected {DEVICES!r} or {REPLICA!r}")
        if self.initial_devices < 1 or self.replica_devices < 1:
            raise ValueError(f"initial_devices/replica_devices: got {self.initial_devices}/{self.replica_devices}, "
                             f"expected >= 1")
        for name in ("ttft_slo_s", "tpot_slo_s", "eval_period_s", "window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: got {getattr(self, name)!r}, expected > 0")


@dataclasses.dataclass
class ScaleEvent:
    at_s: float
    from_devices: int
    to_devices: int
    ready_s: float  # when the new capacity serves (scale-up) or the devices are released (down)
    reason: str


@dataclasses.dataclass
class Result:
    name: str
    trace: workload.Trace
    setup: Setup
    ttft_s: np.ndarray  # per request, NaN when refused or unfinished
    tpot_s: np.ndarray  # per request, 0 for one output token, NaN when refused or unfinished
    refused: np.ndarray  # bool per request
    tick_s: float
    active: np.ndarray  # per tick: devices serving
    billed: np.ndarray  # per tick: devices held (serving, warming, draining)
    events: list[ScaleEvent]
    wall_s: float

    def summary(self) -> dict[str, Any]:
        ups = [e for e in self.events if e.to_devices > e.from_devices]
        held = self.billed[:max(1, int(math.ceil(self.trace.duration_s / self.tick_s)))]
        return {
            "name": self.name, "mode": self.setup.mode,
            **report.summarise(self.trace.arrival_s, self.ttft_s, self.tpot_s, self.refused, self.setup.ttft_slo_s,
                               self.setup.tpot_slo_s),
            # over the trace, as the benchmark counts them (the drain after the last arrival is not billed)
            "device_seconds": round(float(held.sum()) * self.tick_s, 1),
            "mean_devices": round(float(held.mean()), 3) if len(held) else 0.0,
            "max_devices": int(self.billed.max()) if len(self.billed) else 0,
            "scale_events": len(self.events), "scale_ups": len(ups),
            "time_to_capacity_s": round(float(np.mean([e.ready_s - e.at_s for e in ups])), 2) if ups else None,
            "wall_s": round(self.wall_s, 3),
        }

    def timeline(self, end_s: float, bins: int) -> dict[str, list]:
        change = np.flatnonzero(np.diff(self.billed, prepend=-1))
        return report.timeline(self.trace.arrival_s, self.ttft_s, self.tpot_s, self.refused, self.setup.ttft_slo_s,
                               self.setup.tpot_slo_s, change * self.tick_s, self.billed[change].astype(float), end_s,
                               bins)


class _Rates:
    """The profile's step costs for one device count, on grids, for the inner loop."""

    def __init__(self, prof: profile_mod.Profile, devices: int) -> None:
        self.budget = prof.max_num_batched_tokens
        self.context_s = prof.context_step_s(devices)  # per token of context on a device
        batch = np.arange(0, prof.max_num_seqs + 2, dtype=float)
        self.decode = [prof.decode_step_s(devices, b) for b in batch]  # index 0: an idle step (batch 1)
        chunk = np.arange(0, self.budget + 1, dtype=float)
        alone = np.array([prof.prefill_s(devices, c) for c in chunk])
        # A step's fixed cost (the intercept of prefill time over tokens) is paid once per step:
        # prompt tokens riding on a decode step add only their marginal cost.
        slope, intercept = np.polyfit(chunk[1:], alone[1:], 1)
        self.prefill = list(alone)  # a step of prompt tokens alone
        self.prefill_extra = list(np.maximum(alone - max(intercept, 0.0), chunk * max(slope, 0.0)))

    def decode_s(self, b: float) -> float:
        if b >= len(self.decode) - 1:
            return self.decode[-1] * b / (len(self.decode) - 1)
        lo = int(b)
        return self.decode[lo] + (self.decode[lo + 1] - self.decode[lo]) * (b - lo)

    def prefill_s(self, p: float, with_decode: bool) -> float:
        table = self.prefill_extra if with_decode else self.prefill
        lo = min(int(p), self.budget - 1)
        return table[lo] + (table[lo + 1] - table[lo]) * (p - lo)


def auto_tick_s(duration_s: float) -> float:
    return min(max(duration_s / 100_000, 0.02), 1.0)


def simulate(trace: workload.Trace, prof: profile_mod.Profile, controller, setup: Setup,
             name: str | None = None) -> Result:
    started = time.perf_counter()
    n_req = len(trace)
    dt = setup.tick_s or auto_tick_s(max(trace.duration_s, 1.0))
    drain = setup.drain_s if setup.drain_s is not None else max(60.0, 0.1 * trace.duration_s)
    num_ticks = int(math.ceil((trace.duration_s + drain) / dt))
    arrival = trace.arrival_s
    prompt = trace.prompt_tokens
    output = trace.output_tokens
    arrived_by = np.searchsorted(arrival, (np.arange(num_ticks) + 1) * dt, side="left")
    max_seqs, max_waiting, budget = prof.max_num_seqs, prof.max_waiting, prof.max_num_batched_tokens

    # accepted requests, in FIFO order: positions index these arrays
    acc = np.empty(n_req, dtype=np.int64)
    cum = np.empty(n_req + 1)  # cum[k + 1]: prompt tokens of accepted positions 0..k
    cum[0] = 0.0
    g_fin = np.empty(n_req)  # written when a position gets its first token, read only after
    refused = np.zeros(n_req, dtype=bool)
    n_arr = n_acc = n_adm = n_pref = n_fin = 0
    dec = 0  # decoding requests
    C = G = 0.0
    rec_C = np.zeros(num_ticks + 1)
    rec_G = np.zeros(num_ticks + 1)
    rec_P = np.zeros(num_ticks + 1, dtype=np.int64)
    rec_dsteps = np.zeros(num_ticks)
    rec_dec = np.zeros(num_ticks, dtype=np.int64)
    active_rec = np.zeros(num_ticks, dtype=np.int32)
    billed_rec = np.zeros(num_ticks, dtype=np.int32)

    rates_cache: dict[int, _Rates] = {}

    def rates_for(n: int) -> _Rates:
        key = setup.replica_devices if setup.mode == REPLICA else min(n, prof.service[-1].devices)
        if key not in rates_cache:
            rates_cache[key] = _Rates(prof, key)
        return rates_cache[key]

    min_step = min(min(rates_for(n).decode[1:]) for n in {setup.initial_devices, setup.replica_devices,
                                                             prof.service[-1].devices})
    ring_size = int(output.max() if n_req else 1) + int(dt / min_step) + 16
    ring = np.zeros(ring_size, dtype=np.int64)
    # the context the decoding requests hold: sum(prompt) + dec * G - sum(G at their start),
    # with both sums also kept per finishing bucket, to take out when they finish
    ring_prompt = np.zeros(ring_size)
    ring_g0 = np.zeros(ring_size)
    dec_prompt = dec_g0 = 0.0
    cal_done = 0  # buckets <= this were consumed
    step_p, step_left = 0.0, 0.0  # the prefill step in progress: tokens per device, tokens of all left

    # scaling state
    events: list[ScaleEvent] = []
    R = setup.replica_devices
    if setup.mode == REPLICA:
        ready = max(1, math.ceil(setup.initial_devices / R))
        starting: list[float] = []  # ready times of replicas starting
        active = ready * R
    else:
        active = setup.initial_devices
    scale: tuple[int, int, float, float] | None = None  # (from, to, requested at, ready at)
    next_eval = setup.eval_period_s
    window_ticks = max(1, int(round(setup.window_s / dt)))

    for i in range(num_ticks):
        t = i * dt
        # -- scaling: finish what is due, then evaluate -------------------------------------------
        if setup.mode == DEVICES:
            if scale is not None and scale[3] <= t:
                controller.scaled(scale[0], scale[1], scale[3] - scale[2])
                active, scale = scale[1], None
        else:
            due = [s for s in starting if s <= t]
            if due:
                before = active
                starting = [s for s in starting if s > t]
                ready += len(due)
                active = ready * R
                controller.scaled(before, active, prof.start_s(R))
        if t >= next_eval:
            next_eval += setup.eval_period_s
            signals = _signals(i, t, dt, window_ticks, active, setup, scale, starting if setup.mode == REPLICA
                               else None, R, rec_C, rec_P, rec_dsteps, rec_dec, cum, acc, arrival, arrived_by,
                               n_acc - n_fin, n_acc)
            target, reason = controller.decide(signals, t)
            if setup.mode == DEVICES:
                if scale is None and target != active:
                    scale = (active, target, t, t + prof.scale_s(active, target))
                    events.append(ScaleEvent(t, active, target, scale[3], reason))
            else:
                want = max(1, math.ceil(target / R))
                have = ready + len(starting)
                if want > have:
                    ready_at = t + prof.start_s(R)
                    starting += [ready_at] * (want - have)
                    events.append(ScaleEvent(t, have * R, want * R, ready_at, reason))
                elif want < have:
                    drop = have - want
                    cancel = min(drop, len(starting))
                    starting = sorted(starting)[:len(starting) - cancel]
                    ready -= drop - cancel
                    active = ready * R
                    events.append(ScaleEvent(t, have * R, want * R, t, reason))
        if setup.mode == DEVICES:
            billed = max(active, scale[1]) if scale is not None else active
        else:
            billed = (ready + len(starting)) * R
        active_rec[i] = active
        billed_rec[i] = billed
        rates = rates_for(active)

        # -- arrivals: accept into the queue or refuse ----------------------------------------------
        j = int(arrived_by[i])
        if j > n_arr:
            # running slots first, then the waiting queue (the router refuses beyond it)
            room = max(0, (max_seqs + max_waiting) * active - (n_acc - n_fin))
            m = min(room, j - n_arr)
            if m:
                acc[n_acc:n_acc + m] = np.arange(n_arr, n_arr + m)
                cum[n_acc + 1:n_acc + m + 1] = cum[n_acc] + np.cumsum(prompt[n_arr:n_arr + m], dtype=np.float64)
                n_acc += m
            if m < j - n_arr:
                refused[n_arr + m:j] = True
            n_arr = j
        # -- admission and one tick of steps ---------------------------------------------------------
        n_adm = min(n_acc, n_adm + max(0, max_seqs * active - (n_adm - n_fin)))
        pending = cum[n_adm] - C
        b = dec / active
        s_dec = rates.decode_s(b) + rates.context_s * (dec_prompt + dec * G - dec_g0) / active if dec else 0.0
        idle_s = s_dec if dec else rates.decode[0]
        left_s, processed, dsteps = dt, 0.0, 0.0
        if pending > 1e-9 and budget - b >= 1:
            if step_left > 1e-9:
                # A step sized in an earlier tick goes on: sizing it again from what is left of it
                # would shrink the chunk and make its tail ever slower.
                s_full = s_dec + rates.prefill_s(step_p, dec > 0)
                per_s = active * step_p / s_full
                need_s = min(step_left, pending) / per_s
                if need_s >= left_s:
                    processed, dsteps, step_left, left_s = left_s * per_s, left_s / s_full, step_left - left_s * per_s, 0.0
                else:
                    processed, dsteps, left_s = min(step_left, pending), need_s / s_full, left_s - need_s
                    step_left = 0.0
            rest = pending - processed
            if left_s > 0 and rest > 1e-9:
                p = min(budget - b, rest / active)
                s_full = s_dec + rates.prefill_s(p, dec > 0)
                steps = rest / (active * p)
                if steps * s_full > left_s:
                    k = left_s / s_full
                    processed += k * active * p
                    dsteps += k
                    step_p, step_left = p, (math.ceil(k) - k) * active * p  # the unfinished step goes on
                    left_s = 0.0
                else:
                    processed = pending  # NOTE: C lands exactly on cum[n_adm] below (no rounding drift)
                    dsteps += steps
                    left_s -= steps * s_full
        dsteps += left_s / idle_s
        C_old, G_old = C, G
        C = cum[n_adm] if processed == pending else C + processed
        G = G + dsteps
        # -- first tokens: requests whose prompt is now all prefilled ---------------------------------
        new_pref = int(np.searchsorted(cum[1:n_adm + 1], C + 1e-6, side="right"))
        if new_pref > n_pref:
            ks = slice(n_pref, new_pref)
            frac = np.minimum(np.maximum((cum[n_pref + 1:new_pref + 1] - C_old) / max(processed, 1e-12), 0.0), 1.0)
            req = acc[ks]
            out = output[req]
            fin = G_old + frac * dsteps + (out - 1)
            g_fin[ks] = fin
            starts = int(np.count_nonzero(out > 1))
            n_fin += len(out) - starts
            if starts:
                p_in = prompt[req]
                if starts < len(out):  # most ticks: all of them decode on
                    longer = out > 1
                    out, fin, p_in = out[longer], fin[longer], p_in[longer]
                buckets = np.ceil(fin).astype(np.int64)
                assert buckets.max() - cal_done < ring_size, "the calendar ring is too small"
                p_in = p_in.astype(np.float64)
                g0 = fin - (out - 1)
                _add_to_rings(buckets, ((ring, None), (ring_prompt, p_in), (ring_g0, g0)))
                dec_prompt += float(p_in.sum())
                dec_g0 += float(g0.sum())
                dec += starts
            n_pref = new_pref
        # -- last tokens -------------------------------------------------------------------------------
        hi = int(G)
        if hi > cal_done and dec:
            lo = cal_done + 1
            if hi - lo + 1 >= ring_size:
                parts = [slice(None)]
            else:
                a, z = lo % ring_size, hi % ring_size
                parts = [slice(a, z + 1)] if a <= z else [slice(a, None), slice(None, z + 1)]
            done = 0
            for part in parts:
                finishing = int(ring[part].sum())
                if finishing:  # most ticks of a small instance finish no one: skip the other sums
                    done += finishing
                    dec_prompt -= float(ring_prompt[part].sum())
                    dec_g0 -= float(ring_g0[part].sum())
                    ring[part] = 0
                    ring_prompt[part] = 0.0
                    ring_g0[part] = 0.0
            dec -= done
            if not dec:
                dec_prompt = dec_g0 = 0.0  # no drift from float sums
            n_fin += done
        cal_done = max(cal_done, hi)
        rec_C[i + 1], rec_G[i + 1], rec_P[i + 1] = C, G, n_pref
        rec_dsteps[i], rec_dec[i] = dsteps, dec

    # -- per-request latencies, a chunk of requests at a time --------------------------------------------
    ttft = np.full(n_req, np.nan)
    tpot = np.full(n_req, np.nan)
    if n_pref:
        own_prefill = _own_prefill_s(prof, int(prompt.max()))
        devices = active_rec if setup.mode == DEVICES else np.full(num_ticks, setup.replica_devices)
        service = _service_row(prof, devices)
        g_index = _Index(rec_G)
    # NOTE: in chunks of positions: every step is per request, and a day of a thousand devices
    # (~1e8 requests) spent more on page faults for whole-trace temporaries than on arithmetic.
    for a in range(0, n_pref, _LATENCY_CHUNK):
        z = min(a + _LATENCY_CHUNK, n_pref)
        t_first = _invert(rec_C, cum[a + 1:z + 1] - 1e-6, dt)
        req = acc[a:z]
        # a request's TTFT is at least its own prefill, alone on a device
        tick = np.clip((t_first / dt).astype(np.int64), 0, len(service) - 1)
        floor = own_prefill[service[tick], prompt[req]]
        ttft[req] = np.maximum(t_first - arrival[req], floor)
        out = output[req].astype(np.float64)
        fin = g_fin[a:z]
        done = (out == 1) | (fin <= G)
        t_end = np.where(out > 1, _invert(rec_G, np.minimum(fin, G), dt, g_index), t_first)
        with np.errstate(invalid="ignore", divide="ignore"):
            per = np.where(out > 1, (t_end - t_first) / np.maximum(out - 1, 1), 0.0)
        tpot[req] = np.where(done, per, np.nan)
        ttft[req[~done]] = np.nan
    return Result(name or getattr(controller, "name", "policy"), trace, setup, ttft, tpot, refused, dt, active_rec,
                  billed_rec, events, time.perf_counter() - started)


def _add_to_rings(buckets: np.ndarray, rings) -> None:
    """For each (ring, weights) of `rings` (rings of one length): ring[b % len(ring)] += weight
    (1 without weights) for every b in `buckets`, which span less than the ring (the caller's
    calendar assertion: they lie in (cal_done, cal_done + ring size)).
    NOTE: one bincount over the buckets' span, not `np.add.at` (per element, much slower): a
    day of a thousand devices starts ~1 000 requests per tick."""
    size = len(rings[0][0])
    lo = int(buckets.min())
    span = int(buckets.max()) - lo + 1
    assert span <= size, "the calendar ring is too small"
    offsets = buckets - lo
    start = lo % size
    # a slice where the span does not wrap around the ring's end (all but one fill in a lap)
    where = slice(start, start + span) if start + span <= size else (lo + np.arange(span)) % size
    for ring, weights in rings:
        ring[where] += np.bincount(offsets, weights=weights, minlength=span).astype(ring.dtype, copy=False)


def _invert(curve: np.ndarray, values: np.ndarray, dt: float, index: _Index | None = None) -> np.ndarray:
    """Times at which a non-decreasing per-tick curve (curve[i] at i * dt) reaches `values`
    (`index`: the curve's, for many unsorted values)."""
    found = index.search(values) if index is not None else np.searchsorted(curve, values, side="left")
    idx = np.minimum(np.maximum(found, 1), len(curve) - 1)
    lo, hi = curve[idx - 1], curve[idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(hi > lo, (values - lo) / (hi - lo), 1.0)
    return (idx - 1 + np.minimum(np.maximum(frac, 0.0), 1.0)) * dt


class _Index:
    """`np.searchsorted(curve, values, side="left")` for a long non-decreasing curve from >= 0 and
    many unsorted finite values.
    NOTE: numpy's binary search costs ~300 ns per unsorted value here (cache misses over the
    curve). A table over cells of width 1 / scale (a power of two: values * scale and the cells'
    bounds are exact) brackets each answer: for k = floor(v * scale) it lies in
    [first[k], first[k + 1]], a step or two apart where the curve rises about a cell per point."""

    def __init__(self, curve: np.ndarray) -> None:
        self.curve = curve
        top = float(curve[-1])
        self.scale = 2.0 ** math.ceil(math.log2(len(curve) / top)) if top > 0 else 1.0
        cells = int(top * self.scale) + 1  # the last cell's start lies above the curve
        bounds = np.arange(cells + 1) / self.scale
        self.first = np.append(np.searchsorted(curve, bounds, side="left"), len(curve))

    def search(self, values: np.ndarray) -> np.ndarray:
        k = np.minimum(np.maximum(values * self.scale, 0.0), len(self.first) - 2).astype(np.int64)
        idx = self.first[k]
        hi = self.first[k + 1]
        todo = np.flatnonzero(idx < hi)
        for _ in range(_INDEX_STEPS):
            if not len(todo):
                return idx
            todo = todo[self.curve[idx[todo]] < values[todo]]
            idx[todo] += 1
            todo = todo[idx[todo] < hi[todo]]
        # a flat stretch of the curve (many points in one cell): search those values
        idx[todo] = np.searchsorted(self.curve, values[todo], side="left")
        return idx


def _own_prefill_s(prof: profile_mod.Profile, max_prompt: int) -> np.ndarray:
    """[row of prof.service, prompt tokens]: a prompt's prefill alone on a device."""
    budget = prof.max_num_batched_tokens
    prompt = np.arange(max_prompt + 1)
    chunk = np.minimum(prompt, budget).astype(np.float64)
    steps = np.ceil(prompt / budget)
    table = np.empty((len(prof.service), max_prompt + 1))
    for w, service in enumerate(prof.service):
        xs, rates = np.asarray(service.prefill, dtype=float).T
        table[w] = chunk / np.interp(chunk, xs, rates) * steps
    return table


def _service_row(prof: profile_mod.Profile, devices: np.ndarray) -> np.ndarray:
    """Per entry of `devices`: the row of prof.service that serves that many devices."""
    counts = np.array([s.devices for s in prof.service])
    return np.clip(np.searchsorted(counts, devices, side="right") - 1, 0, len(counts) - 1)


def _signals(i, t, dt, window_ticks, active, setup, scale, starting, R, rec_C, rec_P, rec_dsteps, rec_dec, cum,
             acc, arrival, arrived_by, inflight, n_acc) -> controllers.Signals:
    """What the server's metrics would show now over the last window."""
    lo = max(0, i - window_ticks)
    a, z = int(rec_P[lo]), int(rec_P[i])
    ttft_p90 = None
    if z > a:
        stride = max(1, (z - a) // 2000)
        pos = np.arange(a, z, stride)
        # first tokens in the window came in its ticks: search those only
        t_first = lo * dt + _invert(rec_C[lo:i + 1], cum[pos + 1] - 1e-6, dt)
        ttft_p90 = float(np.percentile(np.maximum(t_first - arrival[acc[pos]], 0.0), 90))
    tpot_p90 = None
    dec = rec_dec[lo:i]
    if dec.any():
        steps = rec_dsteps[lo:i]
        per_token = dt / steps
        weight = dec * steps
        order = np.argsort(per_token)
        cw = np.cumsum(weight[order])
        tpot_p90 = float(per_token[order][np.searchsorted(cw, 0.9 * cw[-1])])
    # the queue now: how long the accepted requests without a first token have waited (FIFO:
    # the first rec_P[i] accepted have one), nearest-rank p90 as the server's gauge; none: None.
    # NOTE: positions are accepted in arrival order, so waits fall with position: the k-th
    # shortest wait is the k-th from the end, no sort (a long queue holds ~1e5 requests).
    queued = n_acc - int(rec_P[i])
    queue_p90 = float(t - arrival[acc[n_acc - math.ceil(0.9 * queued)]]) if queued else None
    window = max((i - lo) * dt, dt)
    rate = (int(arrived_by[i - 1]) - (int(arrived_by[lo - 1]) if lo else 0)) / window if i else 0.0
    if setup.mode == DEVICES:
        warming = scale[1] - scale[0] if scale is not None and scale[1] > scale[0] else 0
        desired = scale[1] if scale is not None else active
    else:
        warming = len(starting) * R
        desired = active + warming
    obs = policy.Observation(at=t, active=active, warming=warming, desired=desired, ttft_p90_s=ttft_p90,
                             tpot_p90_s=tpot_p90, queue_p90_s=queue_p90, requests_per_s=rate,
                             decoding=float(rec_dec[i - 1]) if i else 0.0)
    return controllers.Signals(obs, float(inflight))

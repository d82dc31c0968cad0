"""Request traces for the autoscaling benchmark and the simulator: a seeded bursty generator and
a reader for the Azure LLM inference trace format.

Why it exists: `elasticmoe bench autoscale` (real devices) and `elasticmoe simulate` (a model)
must replay the same requests, so a trace is plain arrays (arrival second, prompt tokens,
output tokens) made here once. Pure Python + numpy: no torch, no clock, no I/O except reading
a CSV the user names.

The generator superposes `clients` independent clients. Each sends Poisson arrivals at its
share of the base rate, times an envelope that ramps from `low` up to 1 at mid-run and back
down (a raised cosine: a day's shape over 24 hours, a ramp and a plateau over minutes); each
client alternates between quiet and bursting (exponential durations; while bursting it sends
`burst_factor` times its rate). A superposition of Poisson processes is Poisson with the
summed rate, so arrivals are drawn per time bin from the summed rate: 20 million requests take
seconds. Prompt and output lengths are log-normal (heavy right tail), clipped to bounds.

Not guaranteed: the Azure reader keeps only the three columns it needs (TIMESTAMP,
ContextTokens, GeneratedTokens) and assumes one request per row; rows with zero tokens are
dropped. A trace is sorted by arrival; ties keep file order.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import pathlib

import numpy as np

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_BLOCK_BINS = 1 << 16  # bins per pass when placing arrivals in their bins


@dataclasses.dataclass(frozen=True)
class Trace:
    """Requests sorted by arrival. arrival_s: float64 seconds from 0; prompt_tokens and
    output_tokens: int32, >= 1."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    source: str = "generated"

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if not (len(self.prompt_tokens) == len(self.output_tokens) == n):
            raise ValueError(f"trace arrays: lengths {n}/{len(self.prompt_tokens)}/{len(self.output_tokens)}, "
                             f"expected equal")
        if n and (np.any(self.arrival_s[1:] < self.arrival_s[:-1]) or self.arrival_s[0] < 0):
            raise ValueError("trace arrival_s: expected non-negative and sorted")
        if n and (self.prompt_tokens.min() < 1 or self.output_tokens.min() < 1):
            raise ValueError("trace tokens: expected >= 1 prompt and output token per request")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self) else 0.0

    def summary(self) -> dict:
        if not len(self):
            return {"requests": 0, "source": self.source}
        return {
            "source": self.source, "requests": len(self), "duration_s": round(self.duration_s, 3),
            "mean_rate_per_s": round(len(self) / max(self.duration_s, 1e-9), 4),
            "prompt_tokens": {"p50": int(np.median(self.prompt_tokens)),
                              "p99": int(np.percentile(self.prompt_tokens, 99)),
                              "mean": round(float(self.prompt_tokens.mean()), 1)},
            "output_tokens": {"p50": int(np.median(self.output_tokens)),
                              "p99": int(np.percentile(self.output_tokens, 99)),
                              "mean": round(float(self.output_tokens.mean()), 1)},
        }


@dataclasses.dataclass(frozen=True)
class BurstySpec:
    duration_s: float
    rate_per_s: float  # summed base rate of all clients at the top of the ramp, before bursts
    clients: int = 16
    low: float = 0.2  # the envelope's value at the start and the end (1 at mid-run)
    burst_factor: float = 4.0  # a bursting client sends this many times its rate
    burst_s: float = 0.0  # mean burst length; 0: duration / 40
    burst_fraction: float = 0.1  # share of time a client spends bursting
    prompt_median: int = 64
    prompt_sigma: float = 1.0  # of log(length): ~1 is a heavy tail (p99 ~ 10x median)
    prompt_max: int = 1024
    output_median: int = 32
    output_sigma: float = 0.8
    output_max: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("duration_s", "rate_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: got {getattr(self, name)!r}, expected > 0")
        if self.clients < 1:
            raise ValueError(f"clients: got {self.clients}, expected >= 1")
        if not 0 <= self.low <= 1:
            raise ValueError(f"low: got {self.low}, expected in [0, 1]")
        if self.burst_factor < 1:
            raise ValueError(f"burst_factor: got {self.burst_factor}, expected >= 1")
        if not 0 <= self.burst_fraction < 1:
            raise ValueError(f"burst_fraction: got {self.burst_fraction}, expected in [0, 1)")
        for name in ("prompt_median", "prompt_max", "output_median", "output_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected >= 1")


def envelope(t_s: np.ndarray, duration_s: float, low: float) -> np.ndarray:
    """low at 0 and at the end, 1 at mid-run, smooth (raised cosine)."""
    return low + (1 - low) * np.sin(np.pi * np.clip(t_s / duration_s, 0, 1)) ** 2


def bursty(spec: BurstySpec) -> Trace:
    rng = np.random.default_rng(spec.seed)
    # Bins short against a burst and the ramp; at most ~2 million of them.
    bin_s = min(max(spec.duration_s / 2_000_000, 0.01), 1.0)
    num_bins = int(np.ceil(spec.duration_s / bin_s))
    starts = np.arange(num_bins) * bin_s
    per_client = spec.rate_per_s / spec.clients
    # Extra rate from bursting clients, per bin: a difference array over each client's bursts.
    extra = np.zeros(num_bins + 1)
    burst_s = spec.burst_s or spec.duration_s / 40
    if spec.burst_fraction > 0 and spec.burst_factor > 1:
        quiet_s = burst_s * (1 - spec.burst_fraction) / spec.burst_fraction
        for _ in range(spec.clients):
            t = rng.exponential(quiet_s)
            n = int(spec.duration_s / (burst_s + quiet_s) * 2) + 4
            on = rng.exponential(burst_s, n)
            off = rng.exponential(quiet_s, n)
            begin = t + np.concatenate([[0.0], np.cumsum(on + off)[:-1]])
            end = begin + on
            keep = begin < spec.duration_s
            lo = np.minimum((begin[keep] / bin_s).astype(np.int64), num_bins)
            hi = np.minimum((end[keep] / bin_s).astype(np.int64), num_bins)
            np.add.at(extra, lo, per_client * (spec.burst_factor - 1))
            np.add.at(extra, hi, -per_client * (spec.burst_factor - 1))
    extra = np.cumsum(extra)[:num_bins]
    rate = envelope(starts + bin_s / 2, spec.duration_s, spec.low) * (spec.rate_per_s + extra)
    counts = rng.poisson(rate * bin_s)
    # NOTE: in place, the bins' starts added a block of bins at a time, the tail cut by a search
    # of the sorted arrivals: a day at a thousand devices' rate is ~1e8 arrivals, and each
    # whole-trace temporary costs a GB of fresh pages (seconds of page faults here).
    arrival = rng.random(int(counts.sum()))
    arrival *= bin_s
    ends = np.cumsum(counts)
    for lo in range(0, num_bins, _BLOCK_BINS):
        hi = min(lo + _BLOCK_BINS, num_bins)
        arrival[ends[lo] - counts[lo]:ends[hi - 1]] += np.repeat(starts[lo:hi], counts[lo:hi])
    arrival.sort()
    arrival = arrival[:np.searchsorted(arrival, spec.duration_s, side="left")]
    n = len(arrival)
    prompt = _lognormal(rng, n, spec.prompt_median, spec.prompt_sigma, spec.prompt_max)
    output = _lognormal(rng, n, spec.output_median, spec.output_sigma, spec.output_max)
    return Trace(arrival, prompt, output, source=f"bursty(seed={spec.seed})")


def _lognormal(rng: np.random.Generator, n: int, median: int, sigma: float, upper: int) -> np.ndarray:
    # float32 throughout: tens of millions of lengths in well under a second
    x = rng.standard_normal(n, dtype=np.float32)
    x *= np.float32(sigma)
    x += np.float32(np.log(median))
    np.exp(x, out=x)
    x += np.float32(0.5)
    np.clip(x, 1, upper, out=x)
    return x.astype(np.int32)


def read_azure_csv(path: str | pathlib.Path, time_scale: float = 1.0, max_requests: int | None = None) -> Trace:
    """A CSV in the Azure LLM inference trace format (TIMESTAMP, ContextTokens,
    GeneratedTokens, e.g. AzureLLMInferenceTrace_conv.csv); arrivals from the first row,
    divided by `time_scale` (2 replays the trace twice as fast)."""
    path = pathlib.Path(path)
    if time_scale <= 0:
        raise ValueError(f"time_scale: got {time_scale}, expected > 0")
    stamps, prompt, output = [], [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in AZURE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing}; expected the Azure LLM inference trace format "
                             f"with columns {list(AZURE_COLUMNS)}, got {reader.fieldnames}")
        for row in reader:
            stamps.append(row["TIMESTAMP"])
            prompt.append(int(row["ContextTokens"]))
            output.append(int(row["GeneratedTokens"]))
            if max_requests is not None and len(stamps) >= max_requests:
                break
    if not stamps:
        raise ValueError(f"{path}: no rows")
    when = np.array(stamps, dtype="datetime64[us]")
    arrival = (when - when.min()).astype(np.float64) / 1e6 / time_scale
    prompt_a, output_a = np.array(prompt, dtype=np.int64), np.array(output, dtype=np.int64)
    keep = (prompt_a >= 1) & (output_a >= 1)
    order = np.argsort(arrival[keep], kind="stable")
    return Trace(arrival[keep][order], prompt_a[keep][order].astype(np.int32),
                 output_a[keep][order].astype(np.int32), source=str(path))


def clip_lengths(trace: Trace, max_prompt: int, max_output: int) -> Trace:
    """Bound the lengths (a small model's context, a CPU run's patience); a trace within the
    bounds comes back as it is (no copies of its arrays)."""
    if not len(trace) or (trace.prompt_tokens.max() <= max_prompt and trace.output_tokens.max() <= max_output):
        return trace
    return dataclasses.replace(trace, prompt_tokens=np.minimum(trace.prompt_tokens, max_prompt),
                               output_tokens=np.minimum(trace.output_tokens, max_output))


def add_arguments(p: argparse.ArgumentParser, *, duration_s: float, rate_per_s: float, prompt_median: int,
                  output_median: int, prompt_max: int, output_max: int) -> None:
    g = p.add_argument_group("trace (the bursty generator, or --trace-csv)")
    g.add_argument("--trace-csv", type=pathlib.Path, default=None,
                   help="replay a CSV in the Azure LLM inference trace format (columns TIMESTAMP, ContextTokens, "
                        "GeneratedTokens) instead of generating a trace; no trace file ships with the project")
    g.add_argument("--trace-time-scale", type=float, default=1.0,
                   help="with --trace-csv: replay this many times faster (default: %(default)s)")
    g.add_argument("--trace-max-requests", type=int, default=None, help="with --trace-csv: read at most this many rows")
    g.add_argument("--duration-s", type=float, default=duration_s, help="generated trace length (default: %(default)s)")
    g.add_argument("--rate", type=float, default=rate_per_s,
                   help="generated: requests/s of all clients together at the top of the ramp, before bursts "
                        "(default: %(default)s)")
    g.add_argument("--clients", type=int, default=16, help="generated: independent clients (default: %(default)s)")
    g.add_argument("--low", type=float, default=0.2,
                   help="generated: the ramp's start and end as a share of its top (default: %(default)s)")
    g.add_argument("--burst-factor", type=float, default=4.0,
                   help="generated: a bursting client sends this many times its rate (default: %(default)s)")
    g.add_argument("--burst-fraction", type=float, default=0.1,
                   help="generated: share of time each client bursts (default: %(default)s)")
    g.add_argument("--prompt-median", type=int, default=prompt_median,
                   help="generated: median prompt tokens, log-normal (default: %(default)s)")
    g.add_argument("--output-median", type=int, default=output_median,
                   help="generated: median output tokens, log-normal (default: %(default)s)")
    g.add_argument("--max-prompt", type=int, default=prompt_max,
                   help="prompt tokens are clipped to this, in a CSV too (default: %(default)s)")
    g.add_argument("--max-output", type=int, default=output_max,
                   help="output tokens are clipped to this, in a CSV too (default: %(default)s)")
    g.add_argument("--trace-seed", type=int, default=0, help="generated: random seed (default: %(default)s)")


def from_args(args: argparse.Namespace) -> Trace:
    if args.trace_csv is not None:
        trace = read_azure_csv(args.trace_csv, args.trace_time_scale, args.trace_max_requests)
    else:
        trace = bursty(BurstySpec(
            duration_s=args.duration_s, rate_per_s=args.rate, clients=args.clients, low=args.low,
            burst_factor=args.burst_factor, burst_fraction=args.burst_fraction, prompt_median=args.prompt_median,
            prompt_max=args.max_prompt, output_median=args.output_median, output_max=args.max_output,
            seed=args.trace_seed))
    return clip_lengths(trace, args.max_prompt, args.max_output)

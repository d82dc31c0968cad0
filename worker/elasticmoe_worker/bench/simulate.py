"""`elasticmoe simulate`: replay a trace through the scaling policies on a model of an instance.

Why it exists: the real benchmark (`elasticmoe bench autoscale`) needs minutes per policy and
cannot go beyond this machine's few devices; the simulator runs the same controllers
(`bench.controllers`: our SLO policy, static minimum and maximum, HPA-style) on the measured
profile (`elasticmoe bench profile`) in seconds, for any trace length and device count, and
compares "add devices to this instance" (elastic, the profile's time-to-ready per scale step)
with "add a whole replica" (the profile's cold start of an instance of --replica-devices).

Writes JSON (summaries, scale events, series over time), prints a table, draws a PNG of devices,
load and p90 latency over time. Never imports torch.

Not guaranteed: see `bench.sim` for what the model leaves out; a profile measured on a few
devices is extrapolated flat (each further device serves like the largest measured one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import time

import numpy as np

from elasticmoe_worker.bench import controllers, report, sim, workload
from elasticmoe_worker.bench import profile as profile_mod

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Replay a trace (the bursty generator, or an Azure LLM inference trace CSV) through the scaling policies on a "
    "discrete-time model of an instance whose service rates per batch size and time-to-ready per scale step come "
    "from a measured profile (`elasticmoe bench profile`). Runs our SLO autoscaler, static minimum, static maximum "
    "and an HPA-default-style policy, plus our autoscaler adding whole replicas instead of devices; prints SLO "
    "attainment, p90 TTFT/TPOT, device-seconds, scale events and time to capacity; writes JSON and a PNG of "
    "devices, load and p90 latency over time. Never loads torch."
)
POLICIES = ("slo", "static-min", "static-max", "hpa", "slo-replica")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", type=pathlib.Path, default=pathlib.Path("bench-results/profile.json"),
                   help="measured profile (default: %(default)s, written by `elasticmoe bench profile`)")
    p.add_argument("--service-scale", type=float, default=1.0,
                   help="what-if: devices this many times as fast as the profile's (0.1: a model ten times as "
                        "heavy) (default: %(default)s)")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"comma-separated, from {', '.join(POLICIES)} (default: all)")
    workload.add_arguments(p, duration_s=240.0, rate_per_s=4.0, prompt_median=64, output_median=32,
                           prompt_max=1024, output_max=256)
    p.add_argument("--target-peak-devices", type=int, default=None,
                   help="size the generated trace's --rate so that its peak needs about this many devices of the "
                        "profile at the SLO (e.g. 1000 with --duration-s 86400)")
    g = p.add_argument_group("policy (as `serve --autoscale`)")
    g.add_argument("--min-devices", type=int, default=1, help="(default: %(default)s)")
    g.add_argument("--max-devices", type=int, default=4, help="(default: %(default)s)")
    g.add_argument("--slo-decode-model", action="store_true",
                   help="our policy projects the time per output token of fewer devices from the profile's decode "
                        "steps (as `serve --autoscale-profile` with this profile)")
    g.add_argument("--initial-devices", type=int, default=None, help="autoscaled runs start here (default: min)")
    g.add_argument("--slo-ttft-p90-ms", type=float, default=2000.0, help="(default: %(default)s)")
    g.add_argument("--slo-tpot-p90-ms", type=float, default=100.0, help="(default: %(default)s)")
    g.add_argument("--slo-queue-p90-ms", type=float, default=1000.0,
                   help="target p90 wait of the requests still without a first token (default: %(default)s)")
    g.add_argument("--scale-up-cooldown-s", type=float, default=30.0, help="(default: %(default)s)")
    g.add_argument("--scale-down-stabilization-s", type=float, default=300.0,
                   help="the most the stabilization window lasts (default: %(default)s)")
    g.add_argument("--stabilization-ready-multiple", type=float, default=10.0,
                   help="the stabilization window is this many times the time-to-ready of a scale back up, at least "
                        "--autoscale-window-s; 0: always --scale-down-stabilization-s (default: %(default)s)")
    g.add_argument("--step", type=int, default=1, help="most devices added in one scale-up (default: %(default)s)")
    g.add_argument("--autoscale-interval-s", type=float, default=5.0,
                   help="seconds between two evaluations (default: %(default)s)")
    g.add_argument("--autoscale-window-s", type=float, default=30.0,
                   help="latencies and rates over this many last seconds (default: %(default)s)")
    g.add_argument("--replica-devices", type=int, default=None,
                   help="devices per replica for slo-replica (default: --min-devices)")
    g = p.add_argument_group("HPA-style baseline")
    g.add_argument("--hpa-target-inflight", type=float, default=4.0,
                   help="target requests in flight per device (default: %(default)s)")
    g.add_argument("--hpa-sync-period-s", type=float, default=15.0, help="(default: %(default)s, the HPA's)")
    g.add_argument("--hpa-stabilization-s", type=float, default=300.0,
                   help="scale-down stabilization window (default: %(default)s, the HPA's)")
    p.add_argument("--tick-s", type=float, default=None,
                   help="model time step (default: the trace's length / 1e5, within [0.02, 1])")
    p.add_argument("--bins", type=int, default=120, help="points of the series over time (default: %(default)s)")
    p.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("bench-results"),
                   help="simulate.json and simulate.png go here (default: %(default)s)")


def scaled_profile(prof: profile_mod.Profile, factor: float) -> profile_mod.Profile:
    if factor == 1.0:
        return prof
    if not factor > 0:
        raise ValueError(f"--service-scale: got {factor}, expected > 0")
    service = tuple(dataclasses.replace(s, decode=tuple((x, r * factor) for x, r in s.decode),
                                        prefill=tuple((x, r * factor) for x, r in s.prefill),
                                        context_step_s=s.context_step_s / factor) for s in prof.service)
    return dataclasses.replace(prof, service=service)


def device_capacity_per_s(prof: profile_mod.Profile, tpot_slo_s: float, prompt_mean: float, output_mean: float) -> float:
    """Requests/s one device of the largest measured count sustains with its decode step at
    ~70 % of the TPOT target: a sizing estimate, not a promise."""
    n = prof.service[-1].devices
    batch = 1.0
    while batch < prof.max_num_seqs and prof.decode_step_s(n, batch + 1) < 0.7 * tpot_slo_s:
        batch += 1
    step = prof.decode_step_s(n, batch)
    budget = prof.max_num_batched_tokens
    prefill_per_token = prof.prefill_s(n, budget) / budget
    return 1.0 / (output_mean * step / batch + prompt_mean * prefill_per_token)


def build(name: str, args: argparse.Namespace, slo_config) -> tuple[object, sim.Setup]:
    initial = args.initial_devices or args.min_devices
    common = dict(ttft_slo_s=args.slo_ttft_p90_ms / 1000, tpot_slo_s=args.slo_tpot_p90_ms / 1000,
                  eval_period_s=args.autoscale_interval_s, window_s=args.autoscale_window_s, tick_s=args.tick_s)
    if name == "slo":
        return controllers.Slo(slo_config), sim.Setup(initial_devices=initial, **common)
    if name == "slo-replica":
        r = args.replica_devices or args.min_devices
        cfg = dataclasses.replace(slo_config, step=max(slo_config.step, r))
        return controllers.Slo(cfg), sim.Setup(initial_devices=max(initial, r), mode=sim.REPLICA,
                                               replica_devices=r, **common)
    if name == "static-min":
        return controllers.Static(args.min_devices, name), sim.Setup(initial_devices=args.min_devices, **common)
    if name == "static-max":
        return controllers.Static(args.max_devices, name), sim.Setup(initial_devices=args.max_devices, **common)
    if name == "hpa":
        cfg = controllers.HpaConfig(min_devices=args.min_devices, max_devices=args.max_devices,
                                    target_inflight_per_device=args.hpa_target_inflight,
                                    sync_period_s=args.hpa_sync_period_s, stabilization_s=args.hpa_stabilization_s)
        return controllers.Hpa(cfg), sim.Setup(initial_devices=initial, **common)
    raise ValueError(f"--policies: got {name!r}, expected some of {', '.join(POLICIES)}")


def run(args: argparse.Namespace) -> int:
    from elasticmoe_operator import policy

    started = time.perf_counter()
    prof = scaled_profile(profile_mod.load(args.profile), args.service_scale)
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    for n in names:
        if n not in POLICIES:
            raise ValueError(f"--policies: got {n!r}, expected some of {', '.join(POLICIES)}")
    slo_config = policy.Config(
        min_devices=args.min_devices, max_devices=args.max_devices, ttft_p90_s=args.slo_ttft_p90_ms / 1000,
        tpot_p90_s=args.slo_tpot_p90_ms / 1000, queue_p90_s=args.slo_queue_p90_ms / 1000, step=args.step, scale_up_cooldown_s=args.scale_up_cooldown_s,
        scale_down_stabilization_s=args.scale_down_stabilization_s,
        stabilization_ready_multiple=args.stabilization_ready_multiple, settle_s=args.autoscale_window_s,
        decode_step_s=prof.decode_model() if args.slo_decode_model else {})
    if args.target_peak_devices is not None:
        if args.trace_csv is not None:
            raise ValueError("--target-peak-devices sizes the generated trace; it cannot change a --trace-csv")
        prompt_mean = args.prompt_median * math.exp(1.0 / 2)  # log-normal means, sigma 1.0 and 0.8
        output_mean = args.output_median * math.exp(0.8 ** 2 / 2)
        per_device = device_capacity_per_s(prof, args.slo_tpot_p90_ms / 1000, prompt_mean, output_mean)
        peak_factor = 1 + (args.burst_factor - 1) * args.burst_fraction
        args.rate = args.target_peak_devices * per_device / peak_factor
        logger.info("--target-peak-devices %d: %.3f requests/s per device -> --rate %.1f", args.target_peak_devices,
                    per_device, args.rate)
    t = time.perf_counter()
    trace = workload.from_args(args)
    trace_s = time.perf_counter() - t
    if not len(trace):
        raise ValueError("the trace has no requests (raise --rate or --duration-s)")
    end_s = trace.duration_s
    results, rows, series = [], [], {}
    for name in names:
        controller, setup = build(name, args, slo_config)
        result = sim.simulate(trace, prof, controller, setup, name=name)
        summary = result.summary()
        results.append({"summary": summary, "events": [dataclasses.asdict(e) for e in result.events]})
        rows.append(summary)
        series[name] = result.timeline(end_s, args.bins)
        logger.info("%s: simulated %d requests in %.2f s", name, len(trace), result.wall_s)
    comparison = _devices_vs_replica({r["summary"]["name"]: r["summary"] for r in results})
    out = {
        "trace": trace.summary(), "trace_generation_s": round(trace_s, 3),
        "profile": {"path": str(args.profile), "service_scale": args.service_scale, "measured": prof.measured},
        "policy": dataclasses.asdict(slo_config),
        "config": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items() if k != "func"},
        "runs": results, "devices_vs_replica": comparison, "series": series,
        "wall_s": round(time.perf_counter() - started, 3),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out_dir / "simulate.json", args.out_dir / "simulate.png"
    json_path.write_text(json.dumps(out, indent=1, default=_json_default) + "\n")
    title = (f"elasticmoe simulate: {len(trace)} requests over {end_s / 3600:.2f} h, SLO p90 TTFT "
             f"{args.slo_ttft_p90_ms:g} ms, TPOT {args.slo_tpot_p90_ms:g} ms")
    report.plot(series, png_path, title, args.slo_ttft_p90_ms / 1000, args.slo_tpot_p90_ms / 1000)
    report.print_table(title, rows, caption=f"profile {args.profile} (x{args.service_scale:g}); devices "
                                            f"{args.min_devices}-{args.max_devices}")
    from rich import console as rich_console

    console = rich_console.Console()
    if comparison:
        console.print(f"add devices vs add a replica of {args.replica_devices or args.min_devices}: "
                      f"time to capacity {comparison['time_to_capacity_s']['devices']} s vs "
                      f"{comparison['time_to_capacity_s']['replica']} s, device-seconds "
                      f"{comparison['device_seconds']['devices']:.0f} vs {comparison['device_seconds']['replica']:.0f}, "
                      f"attainment {comparison['slo_attainment']['devices']} vs {comparison['slo_attainment']['replica']}",
                      highlight=False)
    console.print(f"wall time: {out['wall_s']:.2f} s (trace {trace_s:.2f} s, simulation "
                  f"{sum(r['wall_s'] for r in rows):.2f} s for {len(rows)} run(s) of {len(trace)} requests, "
                  f"peak {max(r['max_devices'] for r in rows)} devices); wrote {json_path}, {png_path}",
                  highlight=False)
    return 0


def _devices_vs_replica(by_name: dict) -> dict | None:
    if "slo" not in by_name or "slo-replica" not in by_name:
        return None
    d, r = by_name["slo"], by_name["slo-replica"]
    return {key: {"devices": d[key], "replica": r[key]}
            for key in ("time_to_capacity_s", "device_seconds", "slo_attainment", "scale_ups", "mean_devices")}


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    raise TypeError(f"not JSON: {type(x).__name__}")

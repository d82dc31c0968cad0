"""`elasticmoe bench autoscale`: one trace, four scaling policies, real CPU devices of fixed capacity.

Why it exists: issue 10's target, "SLO attainment >= 0.95 x static maximum's at <= 0.7 x its
device-seconds", has to be measured on real devices, not asserted. For each policy this starts
`elasticmoe serve --devices N --cpu-per-device Q` (every device under a CPU quota, so adding
one adds capacity) and replays the same trace (`bench.workload`: the bursty generator, or an
Azure LLM inference trace CSV) open-loop as streaming /v1/completions:
- slo: our autoscaler, `serve --autoscale` (the policy of the operator, on the server's own
  metrics), with its windows scaled to the run's length;
- static-min, static-max: fixed device counts;
- hpa: the HorizontalPodAutoscaler's default behaviour (`bench.controllers.Hpa`, requests in
  flight per device against a target) driven from here through /metrics and the admin API, its
  15 s sync period and 300 s stabilization scaled by the same factor.
Per request it measures TTFT and TPOT on the client; every 0.5 s it reads the devices from
/admin/status. Reports SLO attainment (TTFT and TPOT both within target, failed requests
count as misses), p90s, device-seconds (devices asked for, over the trace), scale events and
failed requests; writes JSON, a table and a PNG of devices, load and p90 latency over time.
With a profile (`elasticmoe bench profile`) it also runs the simulator on the same trace and
reports how far its p90 TTFT and device-seconds are from the measured ones (target: 25 %).

Not guaranteed: the server and this load generator share the machine with the devices (only
the devices are under the quota); on a machine shared with other work, results vary from run
to run. The instance's warm spare (one idle worker ready for the next scale-up) is not counted
in device-seconds; its count is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import pathlib
import random
import secrets
import sys
import time
import uuid
from typing import Any

import numpy as np

from elasticmoe_worker import cliargs
from elasticmoe_worker.bench import controllers, report, serve_bench, workload

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Replay one trace (bursty generator or an Azure LLM inference trace CSV) against four scaling policies on real "
    "CPU devices of fixed capacity (--cpu-per-device cores each, through the cgroup CPU controller): our SLO "
    "autoscaler (serve --autoscale), static minimum, static maximum, and an HPA-default-style policy; print SLO "
    "attainment, p90 TTFT/TPOT, device-seconds, scale events and failed requests, check the target (attainment >= "
    "0.95 x static maximum's at <= 0.7 x its device-seconds), write JSON and a PNG of devices, load and p90 latency "
    "over time; with --profile, also run `elasticmoe simulate` on the same trace and compare."
)
POLICIES = ("slo", "static-min", "static-max", "hpa")
TARGET_ATTAINMENT_RATIO, TARGET_DEVICE_SECONDS_RATIO = 0.95, 0.7
_QUICK = {"duration_s": 40.0, "rate": 3.0, "max_devices": 2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: generated from --family/--preset)")
    p.add_argument("--family", default="qwen3_moe", choices=["qwen3_moe", "deepseek_v2", "mixtral"])
    p.add_argument("--preset", default="small", choices=["tiny", "small", "bench"], help="(default: %(default)s)")
    p.add_argument("--cpu-per-device", type=float, default=None,
                   help="CPU quota of each device in cores (default: 0.8 x the cores / --max-devices, so that the "
                        "largest count fits and leaves room for the server and this load generator)")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"from {', '.join(POLICIES)} (default: all)")
    workload.add_arguments(p, duration_s=240.0, rate_per_s=4.0, prompt_median=64, output_median=32, prompt_max=512,
                           output_max=128)
    g = p.add_argument_group("policy (passed to `serve --autoscale`)")
    g.add_argument("--min-devices", type=cliargs.positive_int, default=1, help="(default: %(default)s)")
    g.add_argument("--max-devices", type=cliargs.positive_int, default=3, help="(default: %(default)s)")
    g.add_argument("--slo-ttft-p90-ms", type=float, default=1500.0, help="(default: %(default)s)")
    g.add_argument("--slo-tpot-p90-ms", type=float, default=250.0, help="(default: %(default)s)")
    g.add_argument("--time-scale", type=float, default=None,
                   help="windows are the defaults x this: autoscaler cooldown 30 s, stabilization 300 s, interval "
                        "5 s (at least 1), window 30 s (at least 5); HPA sync 15 s, stabilization 300 s "
                        "(default: --duration-s / 1200, a 20-minute day in the run's length)")
    g.add_argument("--autoscale-profile", type=pathlib.Path, default=None, metavar="PATH",
                   help="our policy projects the time per output token of fewer devices from this profile's decode "
                        "steps (`serve --autoscale-profile`); the other policies have no use for one (default: none)")
    g.add_argument("--hpa-target-inflight", type=float, default=6.0,
                   help="HPA target: requests in flight per device (default: %(default)s)")
    p.add_argument("--profile", type=pathlib.Path, default=None,
                   help="also simulate the same runs on this profile and compare (default: "
                        "bench-results/profile.json if it exists)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: tiny preset, {_QUICK['duration_s']:g} s at {_QUICK['rate']:g}/s, at most "
                        f"{_QUICK['max_devices']} devices (options given explicitly still win)")
    p.add_argument("--server-start-timeout-s", type=float, default=300.0, help="(default: %(default)s)")
    p.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("bench-results"),
                   help="autoscale.json, autoscale.png and the servers' logs go here (default: %(default)s); with "
                        "--repeats, one folder repeat-K per repeat and autoscale-summary.json")
    p.add_argument("--repeats", type=cliargs.positive_int, default=1,
                   help="run every policy this many times (each repeat runs them all, side by side) and report the "
                        "median of each figure, its spread and the ratio of medians (default: %(default)s)")
    p.add_argument("--combine", type=pathlib.Path, nargs="+", default=None, metavar="JSON",
                   help="run nothing: combine the autoscale.json of earlier repeats (same trace and devices) into "
                        "--out-dir/autoscale-summary.json and print the medians and the ratio of medians")


def windows(args: argparse.Namespace) -> dict[str, float]:
    f = args.time_scale if args.time_scale is not None else args.duration_s / 1200
    return {"scale_up_cooldown_s": round(30 * f, 3), "scale_down_stabilization_s": round(300 * f, 3),
            "interval_s": round(max(1.0, 5 * f), 3), "window_s": round(max(5.0, 30 * f), 3),
            "hpa_sync_period_s": round(15 * f, 3), "hpa_stabilization_s": round(300 * f, 3), "factor": f}


# ---------------------------------------------------------------- one run


def slo_flags(a, win: dict[str, float]) -> list[str]:
    """The `serve` options of our SLO autoscaler's run (the simulator reads its policy from the same)."""
    return ["--autoscale", "--min-devices", str(a.min_devices), "--max-devices", str(a.max_devices),
            "--slo-ttft-p90-ms", f"{a.slo_ttft_p90_ms:g}", "--slo-tpot-p90-ms", f"{a.slo_tpot_p90_ms:g}",
            "--scale-up-cooldown-s", f"{win['scale_up_cooldown_s']:g}",
            "--scale-down-stabilization-s", f"{win['scale_down_stabilization_s']:g}",
            "--autoscale-interval-s", f"{win['interval_s']:g}", "--autoscale-window-s", f"{win['window_s']:g}",
            *(["--autoscale-profile", str(a.autoscale_profile)] if getattr(a, "autoscale_profile", None) else [])]


def slo_config(a, win: dict[str, float], num_experts: int):
    """The policy config `serve` builds from `slo_flags` (its own parser and defaults)."""
    from elasticmoe_worker.server import autoscale

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--devices", type=int)
    autoscale.add_arguments(parser)
    config, _, _ = autoscale.config_from_args(
        parser.parse_args(["--devices", str(a.min_devices), *slo_flags(a, win)]), num_experts)
    return config


class _Run:
    """One server, one policy, the trace replayed against it."""

    def __init__(self, name: str, args, model_dir: pathlib.Path, trace: workload.Trace, prompts: list[list[int]],
                 win: dict[str, float], token: str) -> None:
        self.name, self.args, self.trace, self.prompts, self.win, self.token = name, args, trace, prompts, win, token
        self.model_dir = model_dir
        n = len(trace)
        self.ttft = np.full(n, np.nan)
        self.tpot = np.full(n, np.nan)
        self.failed = np.zeros(n, dtype=bool)
        self.errors: dict[str, int] = {}
        self.devices: list[tuple[float, int, int, int]] = []  # (t, held, active, registered)
        self.scales: list[dict[str, Any]] = []
        self.records: dict[str, dict] = {}  # the server's finished scales, by scale id
        self.t0 = 0.0

    def argv(self, port: int, token_file: pathlib.Path) -> list[str]:
        a = self.args
        initial = a.max_devices if self.name == "static-max" else a.min_devices
        argv = [sys.executable, "-m", "elasticmoe_worker.cli", "--log-level", "info", "serve",
                "--model", str(self.model_dir), "--host", "127.0.0.1", "--port", str(port), "--devices", str(initial),
                "--cpu-per-device", f"{a.cpu_per_device:g}", "--admin-token-file", str(token_file),
                *serve_bench.engine_flags(a, a.dtype)]
        if self.name == "slo":
            argv += slo_flags(a, self.win)
        return argv

    async def request(self, client, i: int, model: str) -> None:
        await asyncio.sleep(max(0.0, self.t0 + float(self.trace.arrival_s[i]) - time.perf_counter()))
        sent = self.t0 + float(self.trace.arrival_s[i])  # TTFT counts from when it was due
        body = serve_bench.completion_body(model, self.prompts[i], int(self.trace.output_tokens[i]))
        try:
            sample = await serve_bench.stream_completion(client, "/v1/completions", body, sent_s=sent)
            self.ttft[i], self.tpot[i] = sample.ttft_s, sample.tpot_s
        except Exception as exc:  # noqa: BLE001 - a failed request is data here
            self.failed[i] = True
            key = f"{type(exc).__name__}: {exc}"[:100]
            self.errors[key] = self.errors.get(key, 0) + 1

    async def poll(self, client, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                s = (await client.get("/admin/status", headers=self.headers)).json()
                d = s["devices"]
                t = time.perf_counter() - self.t0
                held = max(d["active"], d["desired"])
                if not self.devices or held != self.devices[-1][1]:
                    if self.devices:
                        self.scales.append({"at_s": round(t, 2), "from": self.devices[-1][1], "to": held})
                self.devices.append((t, held, d["active"], len(d.get("registered", []))))
                for rec in [s.get("lastScale"), *s.get("history", [])]:
                    if rec and rec.get("outcome") not in (None, "Running"):
                        self.records[rec["scaleId"]] = rec
            except Exception as exc:  # noqa: BLE001 - a missed sample is not fatal
                logger.debug("status poll failed: %s", exc)
            await asyncio.sleep(0.5)

    async def hpa(self, client, stop: asyncio.Event) -> None:
        from elasticmoe_operator import policy

        a, w = self.args, self.win
        hpa = controllers.Hpa(controllers.HpaConfig(
            min_devices=a.min_devices, max_devices=a.max_devices, target_inflight_per_device=a.hpa_target_inflight,
            sync_period_s=w["hpa_sync_period_s"], stabilization_s=w["hpa_stabilization_s"]))
        while not stop.is_set():
            await asyncio.sleep(w["hpa_sync_period_s"])
            try:
                status = (await client.get("/admin/status", headers=self.headers)).json()
                inflight = _gauges((await client.get("/metrics")).text)
            except Exception as exc:  # noqa: BLE001
                logger.warning("hpa: metrics unavailable: %s", exc)
                continue
            d = status["devices"]
            now = time.perf_counter() - self.t0
            obs = policy.Observation(at=now, active=d["active"], warming=d["warming"], desired=d["desired"])
            target, reason = hpa.decide(controllers.Signals(obs, inflight), now)
            if target != d["desired"] and status.get("currentScale") is None:
                r = await client.post("/admin/scale", headers=self.headers,
                                      json={"devices": target, "reason": reason, "scaleId": f"hpa-{uuid.uuid4().hex[:8]}"})
                logger.info("hpa: %s (%s)", reason, r.status_code)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def go(self, port: int, progress) -> None:
        import httpx

        async def main():
            limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits,
                                         timeout=httpx.Timeout(600.0, connect=30.0)) as client:
                model = (await client.get("/v1/models")).json()["data"][0]["id"]
                vocab_prompt = self.prompts[0][:8]
                await asyncio.gather(*(client.post("/v1/completions", json={
                    "model": model, "prompt": vocab_prompt, "max_tokens": 8, "ignore_eos": True}) for _ in range(4)))
                await asyncio.sleep(3)  # the warm spare comes up, as it would between scales in service
                stop = asyncio.Event()
                self.t0 = time.perf_counter()
                side = [asyncio.create_task(self.poll(client, stop))]
                if self.name == "hpa":
                    side.append(asyncio.create_task(self.hpa(client, stop)))
                tasks = [asyncio.create_task(self.request(client, i, model)) for i in range(len(self.trace))]
                for t in asyncio.as_completed(tasks):
                    await t
                    progress()
                self.end_s = time.perf_counter() - self.t0
                stop.set()
                await asyncio.gather(*side, return_exceptions=True)

        asyncio.run(main())

    def summary(self) -> dict[str, Any]:
        a = self.args
        s = report.summarise(self.trace.arrival_s, self.ttft, self.tpot, self.failed, a.slo_ttft_p90_ms / 1000,
                             a.slo_tpot_p90_ms / 1000)
        t, held = self.device_series()
        duration = self.trace.duration_s
        ups = [r["durationMs"] / 1000 for r in self.records.values()
               if r["outcome"] == "Succeeded" and r["to"] > r["from"]]
        s.update(name=self.name, device_seconds=round(report.device_seconds(t, held, duration), 1),
                 mean_devices=round(report.device_seconds(t, held, duration) / duration, 3),
                 max_devices=int(held.max()) if len(held) else None, scale_events=len(self.scales),
                 time_to_capacity_s=round(float(np.mean(ups)), 2) if ups else None,
                 failed_scales=sum(1 for r in self.records.values() if r["outcome"] != "Succeeded"),
                 warm_spares_max=max((r - h for _, h, _, r in self.devices), default=0),
                 errors=self.errors, wall_s=round(self.end_s, 1))
        return s

    def device_series(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.devices:
            return np.zeros(0), np.zeros(0)
        t = np.array([d[0] for d in self.devices])
        held = np.array([d[1] for d in self.devices], dtype=float)
        t[0] = 0.0  # the first sample stands for the start
        return t, held


def _gauges(text: str) -> float:
    """Requests running + waiting, from the Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        name = line.split(" ", 1)[0].split("{", 1)[0]
        if name in ("elasticmoe_num_requests_running", "elasticmoe_num_requests_waiting"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> int:
    try:
        with serve_bench.signals_as_interrupt():
            if args.combine:
                return _summarise(args.combine, args.out_dir)
            if args.repeats == 1:
                return _run(args)
            base, paths = args.out_dir, []
            for k in range(1, args.repeats + 1):
                args.out_dir = base / f"repeat-{k}"
                logger.warning("bench autoscale: repeat %d of %d into %s", k, args.repeats, args.out_dir)
                status = _run(args)
                if status:
                    return status
                paths.append(args.out_dir / "autoscale.json")
            return _summarise(paths, base)
    except serve_bench.BenchError as exc:
        logger.error("%s", exc)
        return 1


def _summarise(paths: list[pathlib.Path], out_dir: pathlib.Path) -> int:
    from rich import console as rich_console

    from elasticmoe_worker.bench import autoscale_summary

    summary = autoscale_summary.combine(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "autoscale-summary.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    console = rich_console.Console(width=max(rich_console.Console().width, 140))  # the spreads need room
    autoscale_summary.print_summary(summary, console)
    console.print(f"wrote {path}", highlight=False)
    return 0


def _run(args: argparse.Namespace) -> int:
    from rich import console as rich_console
    from rich import progress as rich_progress

    from elasticmoe_worker.bench import profile_bench

    if args.quick:
        if args.preset == "small":
            args.preset = "tiny"
        args.duration_s = min(args.duration_s, _QUICK["duration_s"])
        args.rate = min(args.rate, _QUICK["rate"])
        args.max_devices = min(args.max_devices, _QUICK["max_devices"])
    if args.min_devices > args.max_devices:
        raise ValueError(f"--min-devices {args.min_devices} is above --max-devices {args.max_devices}")
    cores = os.cpu_count() or 1
    if args.cpu_per_device is None:
        args.cpu_per_device = round(0.8 * cores / args.max_devices, 3)
    if args.cpu_per_device * args.max_devices > cores:
        raise ValueError(f"--cpu-per-device {args.cpu_per_device:g} x --max-devices {args.max_devices} = "
                         f"{args.cpu_per_device * args.max_devices:g} cores, more than this machine's {cores}: "
                         f"the largest device count must fit for devices to have fixed capacity")
    if args.profile is not None and not args.profile.is_file():
        raise FileNotFoundError(f"--profile {args.profile}: no such file; write one with `elasticmoe bench profile`")
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    for n in names:
        if n not in POLICIES:
            raise ValueError(f"--policies: got {n!r}, expected some of {', '.join(POLICIES)}")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    console = rich_console.Console()
    model_dir = profile_bench.model_dir_of(args)
    dtype = serve_bench.resolve_dtype(args.dtype, model_dir)
    args.dtype = dtype
    trace = workload.from_args(args)
    if not len(trace):
        raise ValueError("the trace has no requests (raise --rate or --duration-s)")
    from elasticmoe_worker.engine import engine as engine_mod

    vocab = len(engine_mod.load_tokenizer(model_dir))
    rng = random.Random(args.trace_seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(int(p))] for p in trace.prompt_tokens]
    win = windows(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    token_file = args.out_dir / "autoscale.admin-token"
    token = secrets.token_urlsafe(24)
    token_file.write_text(token)
    console.print(f"[bold]bench autoscale[/bold]: {len(trace)} requests over {trace.duration_s:.0f} s on "
                  f"{model_dir.name}, devices {args.min_devices}-{args.max_devices}, CPU quota "
                  f"{args.cpu_per_device:g} cores per device ({cores} cores here); windows x{win['factor']:.3g}",
                  highlight=False)
    runs = []
    for name in names:
        r = _Run(name, args, model_dir, trace, prompts, win, token)
        port = serve_bench.free_port()
        server = serve_bench.ServerProcess(r.argv(port, token_file), args.out_dir / f"autoscale.{name}.server.log")
        try:
            server.wait_healthy(f"http://127.0.0.1:{port}/health", args.server_start_timeout_s)
            with rich_progress.Progress(console=rich_console.Console(stderr=True),
                                        disable=not sys.stderr.isatty()) as bar:
                task = bar.add_task(name, total=len(trace))
                r.go(port, lambda: bar.advance(task))
        finally:
            server.stop()
        runs.append(r)
        s = r.summary()
        console.print(f"{name}: attainment {s['slo_attainment']}, {s['device_seconds']:.0f} device-s, "
                      f"{s['failed']} failed", highlight=False)
    return _report(args, trace, runs, win, console, cores, model_dir)


def _report(args, trace: workload.Trace, runs: list[_Run], win, console, cores: int,
            model_dir: pathlib.Path) -> int:
    duration = trace.duration_s
    summaries = {r.name: r.summary() for r in runs}
    series = {}
    for r in runs:
        t, held = r.device_series()
        series[r.name] = report.timeline(trace.arrival_s, r.ttft, r.tpot, r.failed, args.slo_ttft_p90_ms / 1000,
                                         args.slo_tpot_p90_ms / 1000, t, held, duration, bins=60)
    target = None
    if "slo" in summaries and "static-max" in summaries:
        ours, top = summaries["slo"], summaries["static-max"]
        att = ours["slo_attainment"] / top["slo_attainment"] if top["slo_attainment"] else None
        dev = ours["device_seconds"] / top["device_seconds"] if top["device_seconds"] else None
        target = {"attainment_over_static_max": round(att, 3) if att is not None else None,
                  "device_seconds_over_static_max": round(dev, 3) if dev is not None else None,
                  "min_attainment_ratio": TARGET_ATTAINMENT_RATIO, "max_device_seconds_ratio": TARGET_DEVICE_SECONDS_RATIO,
                  "met": att is not None and dev is not None and att >= TARGET_ATTAINMENT_RATIO
                  and dev <= TARGET_DEVICE_SECONDS_RATIO}
    validation = _validate(args, trace, summaries, win, model_dir)
    out = {"trace": trace.summary(), "cpu_per_device": args.cpu_per_device, "cores": cores,
           "load_average": [round(x, 2) for x in os.getloadavg()], "windows": win,
           "config": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items() if k != "func"},
           "runs": {r.name: {"summary": summaries[r.name], "scales": r.scales,
                             "devices": [list(map(lambda x: round(x, 3), d)) for d in r.devices]} for r in runs},
           "series": series, "target": target, "simulator": validation}
    json_path, png_path = args.out_dir / "autoscale.json", args.out_dir / "autoscale.png"
    json_path.write_text(json.dumps(out, indent=1) + "\n")
    title = (f"elasticmoe bench autoscale: {len(trace)} requests over {duration:.0f} s, {args.cpu_per_device:g} "
             f"cores per device, SLO p90 TTFT {args.slo_ttft_p90_ms:g} ms, TPOT {args.slo_tpot_p90_ms:g} ms")
    report.plot(series, png_path, title, args.slo_ttft_p90_ms / 1000, args.slo_tpot_p90_ms / 1000)
    report.print_table(title, list(summaries.values()),
                       caption=f"CPU quota {args.cpu_per_device:g} cores per device on {cores} cores; load average "
                               f"{out['load_average'][0]}")
    if target is not None:
        console.print(f"target: attainment ≥ {TARGET_ATTAINMENT_RATIO} × static max's at ≤ "
                      f"{TARGET_DEVICE_SECONDS_RATIO} × its device-seconds: {'met' if target['met'] else 'not met'} "
                      f"({target['attainment_over_static_max']} ×, {target['device_seconds_over_static_max']} ×)",
                      highlight=False)
    if validation:
        for name, v in validation["runs"].items():
            console.print(f"simulator vs measured, {name}: p90 TTFT {v['ttft_p90_ms']['simulated']} vs "
                          f"{v['ttft_p90_ms']['measured']} ms ({v['ttft_p90_ms']['error']:+.0%}), device-s "
                          f"{v['device_seconds']['simulated']:.0f} vs {v['device_seconds']['measured']:.0f} "
                          f"({v['device_seconds']['error']:+.0%})", highlight=False)
    console.print(f"wrote {json_path}, {png_path}", highlight=False)
    return 0


def _validate(args, trace: workload.Trace, summaries: dict, win, model_dir: pathlib.Path) -> dict | None:
    """The simulator on the same trace, policies and windows; errors relative to the measurement."""
    path = args.profile or pathlib.Path("bench-results/profile.json")
    if not path.is_file():
        return None
    from elasticmoe_worker.bench import profile as profile_mod
    from elasticmoe_worker.bench import sim
    from elasticmoe_worker.models import config as model_config

    prof = profile_mod.load(path)
    slo_cfg = slo_config(args, win, model_config.load_spec(model_dir).num_experts)
    common = dict(ttft_slo_s=args.slo_ttft_p90_ms / 1000, tpot_slo_s=args.slo_tpot_p90_ms / 1000,
                  eval_period_s=win["interval_s"], window_s=win["window_s"])
    out = {"profile": str(path), "runs": {}}
    for name in summaries:
        if name == "slo":
            ctl, n0 = controllers.Slo(slo_cfg), args.min_devices
        elif name == "hpa":
            ctl = controllers.Hpa(controllers.HpaConfig(args.min_devices, args.max_devices, args.hpa_target_inflight,
                                                        win["hpa_sync_period_s"], win["hpa_stabilization_s"]))
            n0 = args.min_devices
        else:
            n0 = args.max_devices if name == "static-max" else args.min_devices
            ctl = controllers.Static(n0, name)
        s = sim.simulate(trace, prof, ctl, sim.Setup(initial_devices=n0, **common), name=name).summary()
        m = summaries[name]

        def pair(simulated, measured):
            err = (simulated - measured) / measured if simulated is not None and measured else math.nan
            return {"simulated": simulated, "measured": measured, "error": round(err, 3),
                    "within_25_percent": bool(abs(err) <= 0.25)}

        out["runs"][name] = {"ttft_p90_ms": pair(s["ttft_ms"]["p90"], m["ttft_ms"]["p90"]),
                             "device_seconds": pair(s["device_seconds"], m["device_seconds"]),
                             "slo_attainment": {"simulated": s["slo_attainment"], "measured": m["slo_attainment"]}}
    return out

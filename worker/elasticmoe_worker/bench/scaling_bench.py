"""`elasticmoe bench scaling`: the same scales performed several ways under the same open-loop
load, side by side in one run, repeated.

Strategies (A -> B devices, every scale of `--scales`, up and down):
- elastic: ours; `Instance.scale(B)` on the live instance, with `--warm-workers` started ahead.
- cold restart: stop the A instance, start a B instance loading from disk (no warm pool).
- extravagant: start a B instance on fresh workers beside A (from disk), then switch traffic.
- horizontal: a second A instance from disk beside the first (only when B == 2A).

Every device of every strategy runs under the same CPU quota (`--cpu-per-device`, a cgroup
like a Kubernetes CPU limit), so a device is a fixed amount of capacity on any machine.

The "during" window: from the moment the scale is requested until the new capacity serves its
first request (elastic: the switch; cold restart and extravagant: the new instance is up;
horizontal: the replica is up); latencies, failures and the peak memory are taken in it.
Throughput during scaling is counted over a window of the same length for every strategy,
`--throughput-window-s` from the request (default 20 s, about a cold restart here): an elastic
scale of 0.3 s holds one or no completion at a few requests per second, so a ratio over each
strategy's own window measured nothing; over the same interval it is what a client sees in
the first seconds after the scale was asked for. The load runs at least that long. Memory: the summed
proportional set size (PSS) of each device's processes, sampled every 100 ms (a device whose
processes and their resident pages did not change since the last sample keeps its last PSS:
reading PSS walks page tables, ~4 ms a process here); "staying" devices are those in both
configurations (for elastic scale-down: the devices that gain experts).

The physical floor of an elastic scale: the bytes it moved ÷ the idle bandwidth of the same
transport (two processes, measured in the same repeat while nothing else runs: one copy of as
many bytes from a region the other granted, when the scale moved them through shared memory;
one gloo send/recv otherwise) plus one decode step (TPOT p50 of the run's requests). Figures are medians
over `--repeats`; ratios are ratios of medians.

Where the time goes: each strategy's action is timed on the thread that performs it, with the
CPU the whole machine used meanwhile (/proc/stat) and each process's CPU time by the kind of
process it was at the start (its cgroup: serving executors, standbys + spares, HMMs; this
process: the coordinator and the load).

Not guaranteed: the quota caps CPU time, it does not reserve it: on a busy machine a device
gets less. Compare ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pathlib
import random
import time

import msgspec

from elasticmoe_worker import cliargs
from elasticmoe_worker.bench import process_meter, scaling_report

DESCRIPTION = ("Scale a live instance A -> B devices (several scales, up and down) four ways (elastic, cold restart, "
               "extravagant, horizontal) under one open-loop load, each device under a CPU quota, --repeats times; "
               "print medians, ratios of medians, the physical floor, the CPU the machine used while each scale ran "
               "(by kind of process) and the targets; write JSON, markdown and a PNG.")
logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: generated from --family/--preset)")
    p.add_argument("--family", default="qwen3_moe", choices=["qwen3_moe", "deepseek_v2", "mixtral"])
    p.add_argument("--preset", default="bench", choices=["tiny", "small", "bench"])
    p.add_argument("--scales", default=None,
                   help="scales to measure, FROM:TO, comma-separated (default: 1:2,2:4,2:1,4:2; --quick: 1:2)")
    p.add_argument("--repeats", type=int, default=3, help="every scale and strategy, interleaved (default: %(default)s)")
    p.add_argument("--cpu-per-device", type=float, default=None,
                   help="CPU quota of each device in cores (cgroup; needs root); 0: none (default: 0.9 x cores / "
                        "the most devices held at once: 2 x the largest device count, so that extravagant's A + B "
                        "fit, or 1 + the largest --steps if more)")
    p.add_argument("--warm-workers", type=int, default=1,
                   help="workers the elastic instance starts ahead of a scale (default: %(default)s)")
    p.add_argument("--warm-reserve", action=argparse.BooleanOptionalAction, default=True,
                   help="the elastic instance's warm workers reserve the memory of the scale that takes them "
                        "(serve --warm-reserve) (default: on)")
    p.add_argument("--scale-down-reserve-mb", type=cliargs.mebibytes, default=0, metavar="N",
                   dest="scale_down_reserve_bytes",
                   help="the elastic instance's serving devices keep up to N MiB allocated for experts a "
                        "scale-down would bring them (serve --scale-down-reserve-mb); it counts in their steady "
                        "memory (default: 0)")
    p.add_argument("--rate", type=float, default=2.0, help="open-loop arrivals per second (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--before-s", type=float, default=8.0,
                   help="load before the scale (default: %(default)s)")
    p.add_argument("--after-s", type=float, default=8.0, help="load after new capacity (default: %(default)s)")
    p.add_argument("--throughput-window-s", type=float, default=20.0,
                   help="throughput during scaling is completions per second over this many seconds from the "
                        "scale request, the same window for every strategy; the load runs at least this long "
                        "after the request (default: %(default)s; --quick: 4)")
    p.add_argument("--strategies", default="elastic,cold,extravagant,horizontal")
    p.add_argument("--steps", default="1,2,4", help="elastic scale-up sizes to time (+k devices) (default: %(default)s)")
    p.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("bench-results"))
    p.add_argument("--quick", action="store_true", help="tiny model, one scale (1:2), one repeat, short windows (tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _started(model_dir, devices: int, cfg, cpu_per_device: float | None):
    """A baseline instance: no warm pool (it would not have one)."""
    from elasticmoe_worker.instance import coordinator

    return coordinator.Instance(model_dir, devices, cfg, warm_workers=0, cpu_per_device=cpu_per_device).start()


class _Load:
    """Open-loop Poisson arrivals sent to whatever `target()` returns at arrival time."""

    def __init__(self, rate: float, prompts: list[list[int]], params, seed: int = 0) -> None:
        self.rate = rate
        self.prompts = prompts
        self.params = params
        self.rng = random.Random(seed)
        self.records: list[dict] = []
        self.target = None
        self.n = 0

    async def one(self, t0: float) -> None:
        from elasticmoe_worker.engine import types

        rec = {"sent": time.monotonic() - t0, "ok": False}
        self.n += 1
        inst = self.target() if self.target else None
        first = None
        tokens = 0
        try:
            if inst is None:
                raise types.EngineDead("no instance serving")
            async for out in inst.generate(f"b{self.n}-{id(self)}", self.prompts[self.n % len(self.prompts)], self.params):
                if out.token_ids and first is None:
                    first = time.monotonic() - t0
                tokens += len(out.token_ids)
                if out.finish_reason is types.FinishReason.ERROR:
                    raise RuntimeError(out.error)
            rec.update(ok=True, first=first, done=time.monotonic() - t0, tokens=tokens)
        except Exception as exc:  # noqa: BLE001 - a failed request is data here
            rec.update(error=f"{type(exc).__name__}: {exc}", done=time.monotonic() - t0)
        self.records.append(rec)

    async def run(self, t0: float, stop: asyncio.Event) -> None:
        tasks = []
        while not stop.is_set():
            tasks.append(asyncio.create_task(self.one(t0)))
            await asyncio.sleep(self.rng.expovariate(self.rate))
        await asyncio.gather(*tasks)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def _summarise(records, window: tuple[float, float], end: float, output_len: int,
               throughput_window_s: float | None = None) -> dict:
    start, stop = window
    ok = [r for r in records if r["ok"]]
    failed = [r for r in records if not r["ok"]]
    during = [r for r in ok if start <= r["sent"] < stop]

    def completed(a, b):
        return sum(1 for r in ok if a <= r["done"] < b)

    def rate(a, b):
        return completed(a, b) / (b - a) if b > a else None

    ttft = [(r["first"] - r["sent"]) * 1000 for r in during if r.get("first") is not None]
    tpot = [(r["done"] - r["first"]) * 1000 / max(1, r["tokens"] - 1) for r in during if r.get("first") is not None]
    # downtime: longest gap inside the window between admitted-and-completed request arrivals
    sent_ok = sorted([start] + [r["sent"] for r in ok if start <= r["sent"] < stop] + [stop])
    gaps = [b - a for a, b in zip(sent_ok, sent_ok[1:])]
    fails_in = [r["sent"] for r in failed if start <= r["sent"] <= stop + 1]
    downtime = (max(fails_in) - min(fails_in)) if fails_in else 0.0
    every = [(r["done"] - r["first"]) * 1000 / (r["tokens"] - 1) for r in ok
             if r.get("first") is not None and r["tokens"] > 1]
    return {
        "requests": len(records), "failed": len(failed),
        "completed_during": completed(start, stop),
        "tpot_all_p50_ms": _pct(every, 50),  # one decode step under this load, every request of the run
        "completed_per_s": {"before": rate(0, start), "during": rate(start, stop), "after": rate(stop, end)},
        # the same length for every strategy (see the module docstring)
        **({"throughput_window": {"seconds": throughput_window_s,
                                  "completed": (n := completed(start, start + throughput_window_s)),
                                  "completed_per_s": n / throughput_window_s}}
           if throughput_window_s else {}),
        "ttft_ms": {q: _pct(ttft, q) for q in (50, 90, 99)},
        "tpot_ms": {q: _pct(tpot, q) for q in (50, 90, 99)},
        "downtime_s": round(downtime, 3), "longest_gap_s": round(max(gaps), 3) if gaps else None,
        "errors": sorted({r.get("error", "")[:120] for r in failed})[:5],
    }


def _run_strategy(name: str, args, a: int, b: int, model_dir, cfg, prompts, params) -> dict:
    """One scale A -> B performed by strategy `name` under the open-loop load."""
    from elasticmoe_worker.instance import coordinator

    load = _Load(args.rate, prompts, params, seed=1)
    instances: list = []
    mem = process_meter.Memory(lambda: process_meter.device_pids(instances))
    result: dict = {"strategy": name, "from": a, "to": b,
                    "warm_workers": args.warm_workers if name == "elastic" else 0}
    inst = coordinator.Instance(model_dir, a, cfg, warm_workers=result["warm_workers"],
                                cpu_per_device=args.cpu_per_device, warm_reserve=args.warm_reserve,
                                scale_down_reserve_bytes=args.scale_down_reserve_bytes).start()
    instances.append(inst)
    active = [inst]
    load.target = lambda: active[0] if active else None
    rr = [0]

    def horizontal_target():
        rr[0] += 1
        return active[rr[0] % len(active)] if active else None

    async def main():
        t0 = time.monotonic()
        stop = asyncio.Event()
        runner = asyncio.create_task(load.run(t0, stop))
        mem.start()
        await asyncio.sleep(args.before_s)
        if result["warm_workers"]:
            await asyncio.to_thread(_wait_warm, inst, a, result["warm_workers"])
        steady = mem.total()

        # NOTE: each strategy's action runs on a thread, timed there: from its first call to its
        # last call's return. Timed from this loop, a scale-up under load also counted the thread's
        # dispatch and this loop noticing the return (70-190 ms beyond the scale's own duration in
        # s20b, for 2 -> 4; the coordinator and the load share this process)
        def timed(action):
            cpu = process_meter.cpu_snapshot(instances)
            t_req = time.monotonic()
            out = action()
            t_cap = time.monotonic()
            return t_req, t_cap, process_meter.cpu_during(
                cpu, process_meter.cpu_snapshot(instances, also=cpu["procs"])), out

        dispatched = time.monotonic()
        if name == "elastic":
            requested_abs, capacity_abs, cpu, record = await asyncio.to_thread(timed, lambda: inst.scale(b, "benchmark"))
            result["phases"] = {k: v / 1000 for k, v in record.phases_ms.items()}
            # the rest of the window, outside the scale's own record: taking the instance's lock to
            # start it, and waking up once it ended (so the phases add up to the window)
            result["phases"]["call"] = round(max(0.0, capacity_abs - requested_abs - record.duration_ms / 1000), 4)
            result["outcome"] = record.outcome.value
            result["bytes_transferred"] = record.bytes_transferred
            result["transfer_data_seconds"] = record.transfer_data_ms / 1000
            result["transfer_devices"] = msgspec.to_builtins(record.transfer_devices)
            result["transport"] = record.transport
        elif name == "cold":
            active.clear()

            def restart():
                started = time.monotonic()
                inst.shutdown()
                stopped = time.monotonic()
                instances.remove(inst)
                instances.append(new := _started(model_dir, b, cfg, args.cpu_per_device))
                return new, {"stop": round(stopped - started, 4), "restart": round(time.monotonic() - stopped, 4)}

            requested_abs, capacity_abs, cpu, (new, result["phases"]) = await asyncio.to_thread(timed, restart)
            active.append(new)
        elif name in ("extravagant", "horizontal"):
            def beside():  # a new instance beside the serving one (in `instances`: measured from the start)
                instances.append(new := _started(model_dir, b if name == "extravagant" else a, cfg,
                                                 args.cpu_per_device))
                return new

            requested_abs, capacity_abs, cpu, new = await asyncio.to_thread(timed, beside)
            result["phases"] = {("start_beside" if name == "extravagant" else "replica_start"):
                                round(capacity_abs - requested_abs, 4)}
            if name == "extravagant":
                active[0] = new
                asyncio.get_running_loop().run_in_executor(None, _drain_and_stop, inst, instances)
            else:
                load.target = horizontal_target
                active.append(new)
        result["cpu_during"] = cpu
        result["bench_overhead_s"] = {"dispatch": round(requested_abs - dispatched, 4),
                                      "notice": round(time.monotonic() - capacity_abs, 4)}
        requested, capacity = requested_abs - t0, capacity_abs - t0
        await asyncio.sleep(max(args.after_s, requested_abs + args.throughput_window_s - time.monotonic()))
        peak = mem.total(requested_abs, capacity_abs)
        stop.set()
        await runner
        staying = {f"0/{d}" for d in range(min(a, b))} if name == "elastic" else {f"0/{d}" for d in range(a)}
        per_device = mem.per_device_ratio(requested_abs, staying)
        end = time.monotonic() - t0
        result.update(requested_at_s=round(requested, 3), new_capacity_at_s=round(capacity, 3),
                      time_to_new_capacity_s=round(capacity - requested, 3),
                      memory={"steady_bytes": steady, "peak_bytes": peak,
                              "total_peak_over_steady": round(peak / steady, 3) if steady else None,
                              # the measure of the target: devices that stay, peak ÷ their own steady state
                              # (before or after the scale, the larger)
                              "peak_over_steady": round(per_device, 3) if per_device else None},
                      **_summarise(load.records, (requested, capacity), end, args.output_len,
                                   throughput_window_s=args.throughput_window_s),
                      timeline=[{"sent": r["sent"], "done": r.get("done"), "ok": r["ok"]} for r in load.records])

    try:
        asyncio.run(main())
    finally:
        mem.stop = True
        for i in instances:
            i.shutdown()
    return result


def _wait_warm(inst, active: int, warm: int, timeout_s: float = 300.0) -> None:
    """Until `warm` idle workers have registered beside the `active` serving devices (the pool a
    scale-up takes from) and every one of them has a spare executor that finished importing, as
    the pool stands between scales in service; RuntimeError past `timeout_s`.

    NOTE: registered is not ready: at 0.225 cores a worker's spare imports for ~11 s after it
    registers, and a scale that took a warm worker before then waited for it (the staying
    device's standby "group 3285 ms" for the new one: 1 -> 2 in 3.7 s instead of ~0.4 s)."""
    deadline = time.monotonic() + timeout_s
    want = min(active + warm, inst.members.max_devices)  # the pool stands on ids below the device limit
    while len(inst.registered_devices) < want or set(inst.registered_devices) - inst.spares_ready:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm pool did not come up within {timeout_s:.0f} s: "
                               f"{inst.registered_devices} registered, {want} expected, spares ready on "
                               f"{sorted(inst.spares_ready)}")
        time.sleep(0.1)


def _drain_and_stop(old, instances) -> None:
    deadline = time.monotonic() + 60
    while old.stats().num_running + old.stats().num_waiting > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    old.shutdown()
    if old in instances:
        instances.remove(old)


def _p2p_vs_plain(total_bytes: int) -> dict:
    """Plain torch.distributed (gloo) send/recv of the same bytes between two processes."""
    import subprocess
    import sys

    from elasticmoe_worker.instance import procutil

    port = procutil.free_port()
    code = (
        "import datetime,sys,time,torch,torch.distributed as d\n"
        "r=int(sys.argv[1]);n=int(sys.argv[2])\n"
        f"d.init_process_group('gloo',init_method='tcp://127.0.0.1:{port}',rank=r,world_size=2,"
        "timeout=datetime.timedelta(seconds=60))\n"
        "t=torch.ones(n,dtype=torch.uint8);d.barrier();s=time.perf_counter()\n"
        "(d.send(t,1) if r==0 else d.recv(t,0));d.barrier()\n"
        "print(time.perf_counter()-s) if r==1 else None\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(total_bytes)], stdout=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    seconds = float(outs[1].strip())
    return {"transport": "gloo", "bytes": total_bytes, "seconds": seconds, "bytes_per_s": total_bytes / seconds}


def _peer_copy_idle(total_bytes: int) -> dict:
    """The HMMs' shared-memory transport (`copy_from_peer`) between two processes, of as many bytes,
    into a region whose pages exist and are mapped (`populate`, as a warm worker's reserve is; as
    the gloo measurement's receive buffer: a floor, where a transition's fresh regions also pay
    for their pages)."""
    import subprocess
    import sys

    import msgspec

    from elasticmoe_worker.backends import cpu
    from elasticmoe_worker.contract import wire

    code = ("import sys,msgspec,torch\n"
            "from elasticmoe_worker.backends import cpu,fdpass\n"
            "r=cpu.CpuBackend().allocate(int(sys.argv[1]),'idle.src');r.tensor(torch.uint8,(r.size_bytes,)).fill_(1)\n"
            "fdpass.server().grant(r.handle.fd_token)\n"
            "print(msgspec.json.encode(r.handle).decode(),flush=True);sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(total_bytes)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        handle = msgspec.json.decode(proc.stdout.readline().encode(), type=wire.MemoryHandle)
        backend = cpu.CpuBackend()
        with backend.allocate(total_bytes, "idle.dst") as dst:
            backend.populate(dst)
            started = time.perf_counter()
            backend.copy_from_peer(dst, 0, handle, 0, total_bytes)
            seconds = time.perf_counter() - started
    finally:
        proc.communicate(timeout=60)
    return {"transport": "shared memory", "bytes": total_bytes, "seconds": seconds,
            "bytes_per_s": total_bytes / seconds}


def parse_scales(text: str) -> list[tuple[int, int]]:
    """'1:2,2:4,2:1' -> [(1, 2), (2, 4), (2, 1)]; ValueError naming the bad item."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        a, sep, b = item.partition(":")
        if not (sep and a.isdigit() and b.isdigit() and int(a) >= 1 and int(b) >= 1 and a != b):
            raise ValueError(f"--scales: got {item!r}, expected FROM:TO with two different positive device counts "
                             "(e.g. 1:2 or 4:2)")
        out.append((int(a), int(b)))
    if not out:
        raise ValueError("--scales: no scale given")
    return out


def _default_quota(scales: list[tuple[int, int]], steps: list[int] = ()) -> float:
    """Cores per device so that the most devices the run holds at once fit the machine's cores:
    the extravagant strategy holds A + B, a --steps scale 1 + k (beyond the machine, k devices
    added at once share its cores and are no longer k devices' capacity: +4 at 0.45 cores per
    device on 2 cores took 2.6x +1, at 0.2 cores 1.1-1.25x)."""
    cores = len(os.sched_getaffinity(0))
    most = max(2 * max(max(a, b) for a, b in scales), 1 + max(steps, default=0))
    return round(min(1.0, 0.9 * cores / most), 3)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from elasticmoe_worker import cliargs, modelgen
    from elasticmoe_worker.engine import engine as engine_mod
    from elasticmoe_worker.engine import types

    if args.quick:
        args.preset, args.before_s, args.after_s, args.rate, args.steps = "tiny", 3.0, 3.0, 4.0, "1"
        args.throughput_window_s = 4.0
        args.output_len, args.repeats = 16, 1
        args.scales = args.scales or "1:2"
    if not args.throughput_window_s > 0:
        raise ValueError(f"--throughput-window-s: got {args.throughput_window_s}, expected seconds > 0")
    scales = parse_scales(args.scales or "1:2,2:4,2:1,4:2")
    if args.cpu_per_device is None:
        args.cpu_per_device = _default_quota(scales, [int(x) for x in args.steps.split(",") if x])
    elif args.cpu_per_device == 0:
        args.cpu_per_device = None
    console = Console(stderr=True)
    model_dir = pathlib.Path(args.model) if args.model else cliargs.cache_dir() / "models" / f"{args.family}-{args.preset}-bench"
    if not (model_dir / "config.json").is_file():
        modelgen.make_model(args.family, args.preset, model_dir, progress=True)
    cfg = cliargs.engine_config_from_args(args)
    vocab = len(engine_mod.load_tokenizer(model_dir))
    rng = random.Random(0)
    prompts = [[rng.randrange(1, vocab) for _ in range(args.prompt_len)] for _ in range(32)]
    params = types.SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    wanted = [s for s in args.strategies.split(",") if s]
    plan = [(r, a, b, name) for r in range(args.repeats) for a, b in scales for name in wanted
            if name != "horizontal" or b == 2 * a]
    step_sizes = [int(x) for x in args.steps.split(",") if x]
    runs: list[dict] = []
    floors: list[dict] = []
    steps: list[dict] = []
    with Progress(console=console, disable=args.no_progress) as bar:
        task = bar.add_task("scaling", total=len(plan) + args.repeats * (len(step_sizes) + 1))
        for r in range(args.repeats):
            for _, a, b, name in [p for p in plan if p[0] == r]:
                bar.update(task, description=f"repeat {r + 1}/{args.repeats}: {name} {a} -> {b}")
                res = _run_strategy(name, args, a, b, model_dir, cfg, prompts, params)
                res["repeat"] = r
                runs.append(res)
                bar.advance(task)
            bar.update(task, description=f"repeat {r + 1}/{args.repeats}: idle transport bandwidth")
            mine = [x for x in runs if x["repeat"] == r and x["strategy"] == "elastic" and x.get("bytes_transferred")]
            if mine:
                most = max(x["bytes_transferred"] for x in mine)
                idle = {"shared memory": _peer_copy_idle(most), "gloo": _p2p_vs_plain(most)}
                for x in mine:  # the transport the scale used (both, when it used both: the slower)
                    used = [idle[t] for t in x.get("transport", "gloo").split(" + ") if t in idle] or [idle["gloo"]]
                    floors.append(scaling_report.floor(x, min(used, key=lambda i: i["bytes_per_s"])))
            bar.advance(task)
            for k in step_sizes:
                bar.update(task, description=f"repeat {r + 1}/{args.repeats}: elastic 1 -> {1 + k}")
                steps.append({**_step(model_dir, cfg, k, args), "repeat": r})
                bar.advance(task)
    summary = scaling_report.summarise_repeats(runs, floors, steps)
    report = {"config": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()
                         if k != "func"}, "model_dir": str(model_dir), "cores": len(os.sched_getaffinity(0)),
              "summary": summary, "targets": scaling_report.targets(summary), "runs": runs, "floors": floors, "steps": steps,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "scaling.json").write_text(json.dumps(report, indent=1))
    md = scaling_report.report(report, args)
    (args.out_dir / "scaling.md").write_text(md)
    scaling_report.plot(runs, args.out_dir / "scaling.png")
    console.print(f"wrote {args.out_dir / 'scaling.json'}, scaling.md, scaling.png")
    return 0


def _step(model_dir, cfg, k: int, args) -> dict:
    """Elastic 1 -> 1 + k with the warm pool the elastic strategy gets (its spares ready), no load."""
    from elasticmoe_worker.instance import coordinator

    inst = coordinator.Instance(model_dir, 1, cfg, warm_workers=args.warm_workers,
                                cpu_per_device=args.cpu_per_device, warm_reserve=args.warm_reserve,
                                scale_down_reserve_bytes=args.scale_down_reserve_bytes).start()
    try:
        # NOTE: the pool with its spares ready: a scale right after start-up measured the spares'
        # imports (standby_start 4.6 s of +1's 4.9 s), not a pool as it stands between scales
        _wait_warm(inst, 1, args.warm_workers)
        cpu = process_meter.cpu_snapshot([inst])
        rec = inst.scale(1 + k, "benchmark step")
        used = process_meter.cpu_during(cpu, process_meter.cpu_snapshot([inst], also=cpu["procs"]))
        return {"added": k, "seconds": rec.duration_ms / 1000, "outcome": rec.outcome.value,
                "phases": {n: ms / 1000 for n, ms in rec.phases_ms.items()}, "cpu_during": used}
    finally:
        inst.shutdown()

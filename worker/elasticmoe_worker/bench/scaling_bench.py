"""`elasticmoe bench scaling`: the same scale performed four ways under the same open-loop
load, side by side in one run.

Strategies (A -> B devices):
- elastic: ours; `Instance.scale(B)` on the live instance.
- cold restart: stop the A instance, start a B instance loading from disk.
- extravagant: start a B instance on fresh workers beside A (from disk), then switch traffic.
- horizontal: a second A instance from disk beside the first (only when B == 2A).

The "during" window, the same for every strategy: from the moment the scale is requested
until the new capacity serves its first request (elastic: the switch; cold restart and
extravagant: the new instance is up; horizontal: the replica is up). Downtime: the longest
interval inside that window in which requests could not be admitted. Memory: the summed
proportional set size (PSS) of all worker processes, sampled every 100 ms.

Not guaranteed: timings on a shared 2-core machine are noisy; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import pathlib
import random
import threading
import time

DESCRIPTION = ("Scale a live instance A -> B devices four ways (elastic, cold restart, extravagant, horizontal) "
               "under one open-loop load; print a table, write JSON, markdown and a PNG.")
logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: generated from --family/--preset)")
    p.add_argument("--family", default="qwen3_moe", choices=["qwen3_moe", "deepseek_v2", "mixtral"])
    p.add_argument("--preset", default="bench", choices=["tiny", "small", "bench"])
    p.add_argument("--from-devices", type=int, default=2, help="A (default: %(default)s)")
    p.add_argument("--to-devices", type=int, default=3, help="B (default: %(default)s)")
    p.add_argument("--rate", type=float, default=2.0, help="open-loop arrivals per second (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--before-s", type=float, default=8.0, help="load before the scale (default: %(default)s)")
    p.add_argument("--after-s", type=float, default=8.0, help="load after new capacity (default: %(default)s)")
    p.add_argument("--strategies", default="elastic,cold,extravagant,horizontal")
    p.add_argument("--steps", default="1,2,4", help="elastic scale-up sizes to time (+k devices) (default: %(default)s)")
    p.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("bench-results"))
    p.add_argument("--quick", action="store_true", help="tiny model, short windows (for tests)")


class _Memory(threading.Thread):
    """Samples the PSS of every device (its HMM plus its executors), every 100 ms."""

    def __init__(self, devices_fn) -> None:
        super().__init__(daemon=True)
        self.devices_fn = devices_fn
        self.samples: list[tuple[float, dict]] = []
        self.stop = False

    def total(self, t_from: float = 0.0) -> int:
        return max((sum(d.values()) for t, d in self.samples if t >= t_from), default=0)

    def per_device_ratio(self, t_steady: float, t_from: float, active: set[str]) -> float | None:
        """Largest peak ÷ steady over the devices that served before the scale (`active`;
        a warm worker holds no weights yet, so its growth is the new device, not overhead)."""
        steady = [d for t, d in self.samples if t <= t_steady]
        if not steady:
            return None
        base = steady[-1]
        ratios = []
        for key, value in base.items():
            if key not in active:
                continue
            peak = max((d.get(key, 0) for t, d in self.samples if t >= t_from), default=0)
            if value:
                ratios.append(peak / value)
        return max(ratios) if ratios else None

    @staticmethod
    def _pss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except OSError:
            return 0

    def run(self) -> None:
        while not self.stop:
            self.samples.append((time.monotonic(),
                                 {key: sum(self._pss(p) for p in pids) for key, pids in self.devices_fn().items()}))
            time.sleep(0.1)


def _started(model_dir, devices: int, cfg):
    """A baseline instance: no warm pool (it would not have one)."""
    from elasticmoe_worker.instance import coordinator

    return coordinator.Instance(model_dir, devices, cfg, warm_workers=0).start()


def _device_pids(instances) -> dict[str, list[int]]:
    """'<instance>/<device>' -> the HMM and its executor processes (warm spares included)."""
    out = {}
    for n, inst in enumerate(instances):
        for d, pid in inst.fleet.pids().items():
            out[f"{n}/{d}"] = _tree(pid)
    return out


def _tree(root: int) -> list[int]:
    import pathlib as pl

    roots = [root]
    children: dict[int, list[int]] = {}
    for stat in pl.Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], list(roots)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


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


def _summarise(records, window: tuple[float, float], end: float, output_len: int) -> dict:
    start, stop = window
    ok = [r for r in records if r["ok"]]
    failed = [r for r in records if not r["ok"]]
    during = [r for r in ok if start <= r["sent"] < stop]

    def rate(a, b):
        n = sum(1 for r in ok if a <= r["done"] < b)
        return n / (b - a) if b > a else None

    ttft = [(r["first"] - r["sent"]) * 1000 for r in during if r.get("first") is not None]
    tpot = [(r["done"] - r["first"]) * 1000 / max(1, r["tokens"] - 1) for r in during if r.get("first") is not None]
    # downtime: longest gap inside the window between admitted-and-completed request arrivals
    sent_ok = sorted([start] + [r["sent"] for r in ok if start <= r["sent"] < stop] + [stop])
    gaps = [b - a for a, b in zip(sent_ok, sent_ok[1:])]
    fails_in = [r["sent"] for r in failed if start <= r["sent"] <= stop + 1]
    downtime = (max(fails_in) - min(fails_in)) if fails_in else 0.0
    return {
        "requests": len(records), "failed": len(failed),
        "completed_per_s": {"before": rate(0, start), "during": rate(start, stop), "after": rate(stop, end)},
        "ttft_ms": {q: _pct(ttft, q) for q in (50, 90, 99)},
        "tpot_ms": {q: _pct(tpot, q) for q in (50, 90, 99)},
        "downtime_s": round(downtime, 3), "longest_gap_s": round(max(gaps), 3) if gaps else None,
        "errors": sorted({r.get("error", "")[:120] for r in failed})[:5],
    }


def _run_strategy(name: str, args, model_dir, cfg, prompts, params) -> dict:
    from elasticmoe_worker.instance import coordinator

    a, b = args.from_devices, args.to_devices
    load = _Load(args.rate, prompts, params, seed=1)
    instances: list = []
    mem = _Memory(lambda: _device_pids(instances))
    result: dict = {"strategy": name, "from": a, "to": b}
    inst = coordinator.Instance(model_dir, a, cfg, warm_workers=1 if name == "elastic" else 0).start()
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
        steady = mem.total()
        requested_abs = time.monotonic()
        requested = requested_abs - t0
        if name == "elastic":
            record = await asyncio.to_thread(inst.scale, b, "benchmark")
            result["phases"] = {k: v / 1000 for k, v in record.phases_ms.items()}
            result["outcome"] = record.outcome.value
            result["bytes_transferred"] = record.bytes_transferred
            result["transfer_data_seconds"] = record.transfer_data_ms / 1000
        elif name == "cold":
            active.clear()
            await asyncio.to_thread(inst.shutdown)
            instances.remove(inst)
            started = time.perf_counter()
            new = await asyncio.to_thread(_started, model_dir, b, cfg)
            instances.append(new)
            active.append(new)
            result["phases"] = {"restart": round(time.perf_counter() - started, 4)}
        elif name == "extravagant":
            started = time.perf_counter()
            new = await asyncio.to_thread(_started, model_dir, b, cfg)
            instances.append(new)
            active[0] = new
            result["phases"] = {"start_beside": round(time.perf_counter() - started, 4)}
            old = inst
            await asyncio.sleep(0)  # the old one drains in the background
            asyncio.get_running_loop().run_in_executor(None, _drain_and_stop, old, instances)
        elif name == "horizontal":
            load.target = horizontal_target
            started = time.perf_counter()
            new = await asyncio.to_thread(_started, model_dir, a, cfg)
            instances.append(new)
            active.append(new)
            result["phases"] = {"replica_start": round(time.perf_counter() - started, 4)}
        capacity = time.monotonic() - t0
        peak = mem.total(requested_abs)
        per_device = mem.per_device_ratio(requested_abs, requested_abs, {f"0/{d}" for d in range(a)})
        await asyncio.sleep(args.after_s)
        stop.set()
        await runner
        end = time.monotonic() - t0
        result.update(requested_at_s=round(requested, 3), new_capacity_at_s=round(capacity, 3),
                      time_to_new_capacity_s=round(capacity - requested, 3),
                      memory={"steady_bytes": steady, "peak_bytes": peak,
                              "total_peak_over_steady": round(peak / steady, 3) if steady else None,
                              # the measure of the target: devices that stay, peak ÷ their own steady state
                              "peak_over_steady": round(per_device, 3) if per_device else None},
                      **_summarise(load.records, (requested, capacity), end, args.output_len),
                      timeline=[{"sent": r["sent"], "done": r.get("done"), "ok": r["ok"]} for r in load.records])

    try:
        asyncio.run(main())
    finally:
        mem.stop = True
        for i in instances:
            i.shutdown()
    return result


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
    return {"bytes": total_bytes, "seconds": seconds, "bytes_per_s": total_bytes / seconds}


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from elasticmoe_worker import cliargs, modelgen
    from elasticmoe_worker.engine import engine as engine_mod
    from elasticmoe_worker.engine import types

    if args.quick:
        args.preset, args.before_s, args.after_s, args.rate, args.steps = "tiny", 3.0, 3.0, 4.0, "1"
        args.output_len = 16
    console = Console()
    model_dir = pathlib.Path(args.model) if args.model else cliargs.cache_dir() / "models" / f"{args.family}-{args.preset}-bench"
    if not (model_dir / "config.json").is_file():
        modelgen.make_model(args.family, args.preset, model_dir, progress=True)
    cfg = cliargs.engine_config_from_args(args)
    vocab = len(engine_mod.load_tokenizer(model_dir))
    rng = random.Random(0)
    prompts = [[rng.randrange(1, vocab) for _ in range(args.prompt_len)] for _ in range(32)]
    params = types.SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    strategies = [s for s in args.strategies.split(",") if s]
    if args.to_devices != 2 * args.from_devices and "horizontal" in strategies:
        strategies.remove("horizontal")
        console.print("horizontal skipped: it needs to-devices == 2 x from-devices")
    results = []
    for name in strategies:
        console.print(f"[bold]{name}[/bold]: {args.from_devices} -> {args.to_devices} devices under "
                      f"{args.rate}/s open-loop load …")
        results.append(_run_strategy(name, args, model_dir, cfg, prompts, params))
    steps = []
    for k in [int(x) for x in args.steps.split(",") if x]:
        from elasticmoe_worker.instance import coordinator

        inst = coordinator.Instance(model_dir, 1, cfg).start()
        try:
            time.sleep(3)  # let the warm worker come up, as it would between scales in service
            rec = inst.scale(1 + k, "benchmark step")
            steps.append({"added": k, "seconds": rec.duration_ms / 1000,
                          "phases": {n: ms / 1000 for n, ms in rec.phases_ms.items()}, "outcome": rec.outcome.value})
        finally:
            inst.shutdown()
    elastic = next((r for r in results if r["strategy"] == "elastic"), None)
    p2p = None
    if elastic and elastic.get("bytes_transferred") and elastic.get("transfer_data_seconds"):
        # ours: the bytes over the time spent moving them (group set-up and allocation are in
        # the transfer phase, reported apart); plain: the same bytes, one send/recv, idle machine
        ours = elastic["bytes_transferred"] / elastic["transfer_data_seconds"]
        plain = _p2p_vs_plain(elastic["bytes_transferred"])
        p2p = {"ours_bytes_per_s": ours, "ours_phase_bytes_per_s": elastic["bytes_transferred"] /
               elastic["phases"]["transfer"], "plain": plain, "ratio": ours / plain["bytes_per_s"]}
    report = {"config": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()
                         if k != "func"}, "model_dir": str(model_dir), "results": results, "steps": steps, "p2p": p2p,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    cold = next((r for r in results if r["strategy"] == "cold"), None)
    if elastic and cold:
        report["targets"] = {
            "cold_over_elastic_time": round(cold["time_to_new_capacity_s"] / elastic["time_to_new_capacity_s"], 2),
            "elastic_failed": elastic["failed"],
            "throughput_during_elastic_over_cold": (
                round(elastic["completed_per_s"]["during"] / cold["completed_per_s"]["during"], 2)
                if cold["completed_per_s"]["during"] else None),
            "p2p_over_plain": round(p2p["ratio"], 2) if p2p else None,
            "elastic_peak_memory_over_steady": elastic["memory"]["peak_over_steady"],
        }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "scaling.json").write_text(json.dumps(report, indent=1))
    table = Table(title=f"scale {args.from_devices} -> {args.to_devices} devices, {model_dir.name}")
    for col in ("strategy", "to capacity s", "downtime s", "failed", "req/s before", "during", "after",
                "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms", "peak/steady mem"):
        table.add_column(col)
    md = ["| " + " | ".join(c.header for c in table.columns) + " |", "|" + "---|" * len(table.columns)]

    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    for r in results:
        c = r["completed_per_s"]
        row = [r["strategy"], f(r["time_to_new_capacity_s"]), f(r["downtime_s"]), str(r["failed"]),
               f(c["before"]), f(c["during"]), f(c["after"]),
               "/".join(f(r["ttft_ms"][q], "{:.0f}") for q in (50, 90, 99)),
               "/".join(f(r["tpot_ms"][q], "{:.0f}") for q in (50, 90, 99)),
               f(r["memory"]["peak_over_steady"])]
        table.add_row(*row)
        md.append("| " + " | ".join(row) + " |")
    console.print(table)
    if steps:
        md.append("")
        md.append("| elastic scale-up | seconds | phases |")
        md.append("|---|---|---|")
        for s in steps:
            md.append(f"| 1 -> {1 + s['added']} | {s['seconds']:.2f} | {s['phases']} |")
    if report.get("targets"):
        console.print(report["targets"])
        md.append("")
        md.append(f"targets: {report['targets']}")
    (args.out_dir / "scaling.md").write_text("\n".join(md) + "\n")
    _plot(results, args.out_dir / "scaling.png")
    console.print(f"wrote {args.out_dir / 'scaling.json'}, scaling.md, scaling.png")
    return 0


def _plot(results, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for r in results:
        done = sorted(t["done"] for t in r["timeline"] if t["ok"] and t["done"] is not None)
        if not done:
            continue
        end = int(max(done)) + 1
        xs = list(range(end))
        ys = [sum(1 for d in done if x <= d < x + 1) for x in xs]
        line, = ax.plot(xs, ys, label=r["strategy"])
        ax.axvspan(r["requested_at_s"], r["new_capacity_at_s"], color=line.get_color(), alpha=0.12)
        ax.axvline(r["requested_at_s"], color=line.get_color(), ls=":")
    ax.set_xlabel("seconds")
    ax.set_ylabel("completed requests / s")
    ax.set_title("throughput while scaling (shaded: request -> new capacity)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

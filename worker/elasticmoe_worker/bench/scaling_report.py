"""`elasticmoe bench scaling`'s arithmetic and report: medians and ratios of medians over the
repeats, the physical floor of each elastic scale, issue 12's targets met or not, the tables
(console and markdown) and the PNG. Pure functions of the runs `scaling_bench` measured."""

from __future__ import annotations

import pathlib
import statistics

def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _spread(values: list[float]) -> list[float] | None:
    values = [v for v in values if v is not None]
    return [min(values), max(values)] if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


_ROLE_FIELDS = ("total_ms", "setup_ms", "bytes_ms", "peers_ms", "hmm_cpu_ms")


def transfer_roles(devices: list[dict]) -> dict:
    """Each device's part of the transfer phase (the scale record's `transferDevices`, over repeats)
    by role — receives, sends, both — -> role: {"transitions", median of each `_ROLE_FIELDS`,
    "throttled_ms" median where known, "throttled_transitions", "told_ms": the median, where known, of its
    `PrepareTransition`'s way from the coordinator, "delivery_ms" and "delivery_max_ms": the median and the
    most of its report's way back}."""
    by: dict[str, list[dict]] = {}
    for d in devices:
        got, sent = d.get("bytesReceived", 0), d.get("bytesSent", 0)
        role = "receives and sends" if got and sent else "receives" if got else "sends" if sent else "moves nothing"
        by.setdefault(role, []).append(d)
    out = {}
    for role, ds in sorted(by.items()):
        known = [d["throttledMs"] for d in ds if d.get("throttledMs", -1) >= 0]
        delivered = [d["deliveryMs"] for d in ds if d.get("deliveryMs", -1) >= 0]
        told = [d["toldMs"] for d in ds if d.get("toldMs", -1) >= 0]
        out[role] = {"transitions": len(ds),
                     **{k: _median([d.get(_camel(k), 0) for d in ds]) for k in _ROLE_FIELDS},
                     "throttled_ms": _median(known) if known else None,
                     "throttled_transitions": sum(1 for t in known if t > 0),
                     "told_ms": _median(told) if told else None,
                     "delivery_ms": _median(delivered) if delivered else None,
                     "delivery_max_ms": max(delivered) if delivered else None}
    return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def summarise_repeats(runs: list[dict], floors: list[dict], steps: list[dict]) -> dict:
    """Medians over repeats of every figure, the ratios of medians the targets are judged on."""
    out: dict = {"scales": {}, "steps": {}}
    for key in sorted({(r["from"], r["to"]) for r in runs}, key=lambda k: (k[0] > k[1], k)):
        a, b = key
        by = {}
        for r in runs:
            if (r["from"], r["to"]) == key:
                by.setdefault(r["strategy"], []).append(r)
        strategies = {}
        for name, rs in by.items():
            t = [r["time_to_new_capacity_s"] for r in rs]
            strategies[name] = {
                "repeats": len(rs), "warm_workers": rs[0]["warm_workers"],
                "time_to_new_capacity_s": {"median": _median(t), "spread": _spread(t)},
                "failed": sum(r["failed"] for r in rs), "requests": sum(r["requests"] for r in rs),
                "completed_during": {"median": _median([r["completed_during"] for r in rs]),
                                     "min": min(r["completed_during"] for r in rs)},
                "completed_per_s_during": _median([r["completed_per_s"]["during"] for r in rs]),
                # over the same window for every strategy (None: runs from before the window existed)
                "throughput_window": _window_summary([r.get("throughput_window") for r in rs]),
                "peak_over_steady_staying": max((r["memory"]["peak_over_steady"] or 0) for r in rs) or None,
                "total_peak_bytes": _median([r["memory"]["peak_bytes"] for r in rs]),
                "phases_s": {p: _median([r["phases"].get(p) for r in rs]) for p in rs[0].get("phases", {})},
                "cpu_during": _cpu_summary([r["cpu_during"] for r in rs if r.get("cpu_during")]),
                "transfer_by_role": transfer_roles([d for r in rs for d in r.get("transfer_devices") or []]),
            }
        scale = {"from": a, "to": b, "strategies": strategies}
        el, cold = strategies.get("elastic"), strategies.get("cold")
        fl = [f for f in floors if (f["from"], f["to"]) == key]
        if el and fl:
            floor_s = _median([f["floor_s"] for f in fl])
            scale["floor"] = {"median_s": floor_s, "spread": _spread([f["floor_s"] for f in fl]),
                              "bytes_moved": _median([f["bytes"] for f in fl]),
                              "idle_bytes_per_s": _median([f["idle_bytes_per_s"] for f in fl]),
                              "idle_transport": " / ".join(sorted({f.get("idle_transport", "gloo") for f in fl})),
                              "decode_step_s": _median([f["decode_step_s"] for f in fl]),
                              "transfer_bytes_per_s": _median([f["transfer_bytes_per_s"] for f in fl])}
            scale["elastic_over_floor"] = _ratio(el["time_to_new_capacity_s"]["median"], floor_s)
            scale["transfer_over_idle"] = _ratio(scale["floor"]["transfer_bytes_per_s"],
                                                 scale["floor"]["idle_bytes_per_s"])
        if el and cold:
            scale["cold_over_elastic"] = _ratio(cold["time_to_new_capacity_s"]["median"],
                                                el["time_to_new_capacity_s"]["median"])
            if el["throughput_window"] and cold["throughput_window"]:
                scale["throughput_during_elastic_over_cold"] = _ratio(el["throughput_window"]["completed_per_s"],
                                                                      cold["throughput_window"]["completed_per_s"])
        out["scales"][f"{a}:{b}"] = scale
    for k in sorted({s["added"] for s in steps}):
        mine = [s for s in steps if s["added"] == k]
        secs = [s["seconds"] for s in mine]
        phases = sorted({n for s in mine for n in s.get("phases", {})})
        out["steps"][str(k)] = {"median_s": _median(secs), "spread": _spread(secs), "repeats": len(secs),
                                "phases_s": {n: _median([s["phases"].get(n, 0.0) for s in mine]) for n in phases},
                                "cpu_during": _cpu_summary([s["cpu_during"] for s in mine if s.get("cpu_during")])}
    if "1" in out["steps"] and "4" in out["steps"]:
        out["steps_4_over_1"] = _ratio(out["steps"]["4"]["median_s"], out["steps"]["1"]["median_s"])
    return out


def _window_summary(windows: list[dict | None]) -> dict | None:
    """Medians over repeats of the completions in the fixed throughput window."""
    if not windows or any(w is None for w in windows):
        return None
    return {"seconds": _median([w["seconds"] for w in windows]),
            "completed": {"median": _median([w["completed"] for w in windows]),
                          "min": min(w["completed"] for w in windows)},
            "completed_per_s": _median([w["completed_per_s"] for w in windows])}


def _cpu_summary(windows: list[dict]) -> dict | None:
    """Medians over repeats of the CPU the machine used while the scale ran (see
    `process_meter.cpu_during`): busy ÷ capacity, and CPU seconds by kind of process."""
    if not windows:
        return None
    kinds = sorted({k for w in windows for k in w["by_kind_s"]})
    return {"busy_fraction": _median([w["busy_s"] / w["capacity_s"] for w in windows if w["capacity_s"] > 0]),
            "busy_s": _median([w["busy_s"] for w in windows]), "wall_s": _median([w["wall_s"] for w in windows]),
            "by_kind_s": {k: _median([w["by_kind_s"].get(k, 0.0) for w in windows]) for k in kinds}}


def targets(summary: dict) -> list[dict]:
    """Issue 12's targets, each met or not with the measured value (None: not measured)."""
    rows = []

    def add(name, value, met, text):
        rows.append({"target": name, "measured": text if value is not None else "not measured",
                     "met": None if value is None else bool(met)})

    for key, s in summary["scales"].items():
        v = s.get("elastic_over_floor")
        add(f"{key}: elastic ÷ physical floor ≤ 3×", v, v is not None and v <= 3, f"{v}×")
        v = s.get("cold_over_elastic")
        add(f"{key}: cold restart ÷ elastic ≥ 10×", v, v is not None and v >= 10, f"{v}×")
        el = s["strategies"].get("elastic")
        if el:
            add(f"{key}: elastic failed requests = 0", el["failed"], el["failed"] == 0,
                f"{el['failed']} of {el['requests']}")
            v = s.get("throughput_during_elastic_over_cold")
            cold = s["strategies"].get("cold")
            ew, cw = el["throughput_window"], cold and cold["throughput_window"]
            if v is None and ew and cw and cw["completed_per_s"] == 0 and ew["completed_per_s"]:
                add(f"{key}: throughput during ≥ 2× cold restart", ew["completed_per_s"], True,
                    f"{ew['completed_per_s']:.2f} req/s vs 0 over the first {ew['seconds']:g} s (cold restart "
                    f"completes none)")
            else:
                add(f"{key}: throughput during ≥ 2× cold restart", v, v is not None and v >= 2,
                    f"{v}× over the first {ew['seconds']:g} s" if ew else f"{v}×")
            n = ew and ew["completed"]["min"]
            add(f"{key}: ≥ 30 completed in the throughput window (elastic)", n, n is not None and n >= 30,
                f"{n} at least (median {ew['completed']['median']:.0f}) in {ew['seconds']:g} s" if ew else "")
            v = s.get("transfer_over_idle")
            add(f"{key}: transfer rate ≥ 0.8× idle transport", v, v is not None and v >= 0.8, f"{v}×")
            v = el["peak_over_steady_staying"]
            add(f"{key}: peak ≤ 1.10× steady memory, staying devices", v, v is not None and v <= 1.10, f"{v}×")
    v = summary.get("steps_4_over_1")
    add("+4 devices ≤ 1.5× (+1)", v, v is not None and v <= 1.5, f"{v}×")
    return rows


def floor(elastic: dict, idle: dict) -> dict:
    """Bytes moved ÷ the transport's idle bandwidth, plus one decode step (the switch cannot
    serve before the new executors ran one)."""
    if elastic["tpot_all_p50_ms"] is None:
        raise RuntimeError(f"elastic {elastic['from']} -> {elastic['to']}: no request completed more than one token; "
                           "no decode step to put in the floor (raise --before-s/--after-s or lower the load)")
    step_s = elastic["tpot_all_p50_ms"] / 1000
    moved = elastic["bytes_transferred"]
    return {"from": elastic["from"], "to": elastic["to"], "repeat": elastic.get("repeat"), "bytes": moved,
            "idle_bytes_per_s": idle["bytes_per_s"], "idle_transport": idle.get("transport", "gloo"),
            "decode_step_s": step_s,
            "floor_s": moved / idle["bytes_per_s"] + step_s,
            "transfer_bytes_per_s": moved / elastic["transfer_data_seconds"] if elastic["transfer_data_seconds"] else None}


def report(report: dict, args) -> str:
    """The tables on the console and as markdown (returned)."""
    from rich.console import Console
    from rich.table import Table

    summary = report["summary"]
    console = Console() if Console().is_terminal else Console(width=160)

    def f(x, fmt="{:.2f}"):
        return "—" if x is None else fmt.format(x)

    window = next((st["throughput_window"]["seconds"] for s in summary["scales"].values()
                   for st in s["strategies"].values() if st.get("throughput_window")), None)
    first = f"first {window:g} s" if window else "to capacity"
    cols = ("scale", "strategy", "warm pool", "to capacity s (min–max)", "completed to capacity",
            f"completed, {first}", f"req/s, {first}", "failed / requests", "peak ÷ steady, staying",
            "total peak MB")
    table = Table(title=f"elasticmoe bench scaling: {pathlib.Path(report['model_dir']).name}, median of "
                        f"{args.repeats} repeat(s), {args.rate:g} req/s open loop, {args.cpu_per_device or 'no'} "
                        f"cores per device")
    for c in cols:
        table.add_column(c)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for key, s in summary["scales"].items():
        for name, st in s["strategies"].items():
            t = st["time_to_new_capacity_s"]
            row = [key.replace(":", " → "), name, str(st["warm_workers"]),
                   f"{f(t['median'])} ({f(t['spread'][0])}–{f(t['spread'][1])})" if t["spread"] else "—",
                   f"{f(st['completed_during']['median'], '{:.0f}')} (min {st['completed_during']['min']})",
                   *((f"{f(tw['completed']['median'], '{:.0f}')} (min {tw['completed']['min']})",
                      f(tw["completed_per_s"])) if (tw := st.get("throughput_window")) else
                     ("—", f(st["completed_per_s_during"]))),
                   f"{st['failed']} / {st['requests']}",
                   f(st["peak_over_steady_staying"]), f(st["total_peak_bytes"] / 1e6 if st["total_peak_bytes"] else None,
                                                         "{:.0f}")]
            table.add_row(*row)
            md.append("| " + " | ".join(row) + " |")
        if "floor" in s:
            fl = s["floor"]
            row = [key.replace(":", " → "), "physical floor", "", f"{f(fl['median_s'])}", "", "", "", "", "", ""]
            table.add_row(*row)
            md.append("| " + " | ".join(row) + " |")
    console.print(table)
    reserves = (f"Elastic's reserves: warm workers {'reserve' if getattr(args, 'warm_reserve', True) else 'do not reserve'} "
                f"what the scale that takes them receives; serving devices keep "
                + (f"{args.scale_down_reserve_bytes / (1 << 20):g} MiB each for experts a scale-down brings them "
                   "(in their steady memory)" if getattr(args, "scale_down_reserve_bytes", 0) else
                   "no reserve for a scale-down (--scale-down-reserve-mb 0)") + ".")
    console.print(reserves)
    md += ["", reserves, ""]
    md.append("| scale | bytes moved | idle transport | elastic transfer rate | decode step s | phases s (median) |")
    md.append("|---|---|---|---|---|---|")
    for key, s in summary["scales"].items():
        if "floor" in s:
            fl, ph = s["floor"], s["strategies"]["elastic"]["phases_s"]
            md.append(f"| {key.replace(':', ' → ')} | {fl['bytes_moved'] / 1e6:.0f} MB | "
                      f"{fl['idle_bytes_per_s'] / 1e6:.0f} MB/s ({fl.get('idle_transport', 'gloo')}) | "
                      f"{f(fl['transfer_bytes_per_s'] / 1e6 if fl['transfer_bytes_per_s'] else None, '{:.0f}')} MB/s | "
                      f"{f(fl['decode_step_s'], '{:.3f}')} | "
                      + ", ".join(f"{p} {f(v)}" for p, v in ph.items()) + " |")
    roles = [(key, role, v) for key, s in summary["scales"].items()
             for role, v in (s["strategies"].get("elastic", {}).get("transfer_by_role") or {}).items()]
    if roles:
        md += ["", "Elastic's transfer phase by device, as each device's HMM measured it (ms, medians over devices "
               "and repeats; set-up + bytes + peers = total: allocation and set-up, moving bytes — its copies "
               "and waiting for its peers' into it —, then waiting until its peers were done with its regions; "
               "throttled: its HMM's CPU group waiting at its quota; told: before it, from the coordinator "
               "sending `PrepareTransition` until the HMM took it up; delivery: after it, from the HMM sending "
               "its report (`TransitionReady`) until the coordinator handled it, median (most)):", "",
               "| scale | device | transitions | total | set-up | bytes | peers | HMM CPU | throttled (transitions) "
               "| told | delivery (most) |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, role, v in roles:
            md.append(f"| {key.replace(':', ' → ')} | {role} | {v['transitions']} | "
                      + " | ".join(f(v[k], '{:.0f}') for k in _ROLE_FIELDS)
                      + f" | {f(v['throttled_ms'], '{:.0f}')} ({v['throttled_transitions']}) | "
                      f"{f(v.get('told_ms'), '{:.0f}')} | {f(v.get('delivery_ms'), '{:.0f}')} "
                      f"({f(v.get('delivery_max_ms'), '{:.0f}')}) |")
    cpu_rows = [(key, name, st["cpu_during"]) for key, s in summary["scales"].items()
                for name, st in s["strategies"].items() if st.get("cpu_during")]
    if cpu_rows:
        kinds = sorted({k for *_, c in cpu_rows for k in c["by_kind_s"]}, key=lambda k: (k == "other", k))
        md.append("")
        md.append("CPU while the scale ran (from the request to new capacity; medians; CPU-seconds by kind of "
                  "process, \"other\": the rest of the machine and processes that exited meanwhile):")
        md.append("")
        md.append("| scale | strategy | wall s | machine busy | " + " | ".join(f"{k} CPU-s" for k in kinds) + " |")
        md.append("|---|---|---|---|" + "---|" * len(kinds))
        for key, name, c in cpu_rows:
            md.append(f"| {key.replace(':', ' → ')} | {name} | {f(c['wall_s'])} | {c['busy_fraction'] * 100:.0f} % | "
                      + " | ".join(f(c["by_kind_s"].get(k)) for k in kinds) + " |")
    if summary["steps"]:
        steps = summary["steps"].values()
        phases = sorted({n for st in steps for n in st.get("phases_s", {})} - {"workers"})
        kinds = sorted({k for st in steps if st.get("cpu_during") for k in st["cpu_during"]["by_kind_s"]},
                       key=lambda k: (k == "other", k))
        md.append("")
        md.append("Elastic scale-up from 1 device, no load (medians; phases in seconds; the CPU the machine used from "
                  "the request to new capacity, CPU-seconds by kind of process):")
        md.append("")
        md.append("| scale-up | seconds, median (min–max) | repeats | " + " | ".join(phases)
                  + " | machine busy | " + " | ".join(f"{k} CPU-s" for k in kinds) + " |")
        md.append("|---|---|---|" + "---|" * (len(phases) + 1 + len(kinds)))
        for k, st in summary["steps"].items():
            c = st.get("cpu_during")
            md.append(f"| +{k} | {f(st['median_s'])} ({f(st['spread'][0])}–{f(st['spread'][1])}) | {st['repeats']} | "
                      + " | ".join(f(st.get("phases_s", {}).get(n), "{:.3f}") for n in phases)
                      + f" | {f(c and c['busy_fraction'] * 100, '{:.0f} %')} | "
                      + " | ".join(f(c and c["by_kind_s"].get(k)) for k in kinds) + " |")
    md.append("")
    md.append("| target | measured | |")
    md.append("|---|---|---|")
    tt = Table(title="targets (issue 12)")
    for c in ("target", "measured", ""):
        tt.add_column(c)
    for t in report["targets"]:
        verdict = "—" if t["met"] is None else ("met" if t["met"] else "**not met**")
        md.append(f"| {t['target']} | {t['measured']} | {verdict} |")
        tt.add_row(t["target"], t["measured"], verdict.replace("**", ""))
    console.print(tt)
    return "\n".join(md) + "\n"


def plot(runs: list[dict], path: pathlib.Path) -> None:
    """Completed requests per second over time, one panel per scale (first repeat), the window
    from request to new capacity shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = [r for r in runs if r.get("repeat", 0) == 0]
    keys = sorted({(r["from"], r["to"]) for r in first}, key=lambda k: (k[0] > k[1], k))
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 3 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for r in (x for x in first if (x["from"], x["to"]) == key):
            done = sorted(t["done"] for t in r["timeline"] if t["ok"] and t["done"] is not None)
            if not done:
                continue
            xs = list(range(int(max(done)) + 1))
            ys = [sum(1 for d in done if x <= d < x + 1) for x in xs]
            line, = ax.plot(xs, ys, label=r["strategy"])
            ax.axvspan(r["requested_at_s"], r["new_capacity_at_s"], color=line.get_color(), alpha=0.12)
            ax.axvline(r["requested_at_s"], color=line.get_color(), ls=":")
        ax.set_ylabel("completed / s")
        ax.set_title(f"{key[0]} → {key[1]} devices (shaded: request → new capacity)")
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""The repeats of `elasticmoe bench autoscale`, combined: medians, spreads, the ratio of medians.

Why it exists: one run of four policies takes ~17 minutes on this machine and varies with
whatever else the machine does; the target (attainment >= 0.95 x static maximum's at <= 0.7 x
its device-seconds) is judged on the ratio of the medians over >= 3 repeats, each repeat having
run every policy side by side on the same trace. Reads the `autoscale.json` of each repeat,
writes `autoscale-summary.json` and prints a table.

It also estimates what a clairvoyant policy with instant scaling would pay on the trace
("oracle"): per 4 s bin of the static-maximum run, the fewest devices n with
p90 ratio x max / n <= 1 (the p90 TTFT and TPOT over their targets, measured at the maximum
count; latency assumed to scale as 1/devices, which is optimistic near saturation), at least
the minimum. It is an estimate of the floor for device-seconds, not a measurement of a policy.

Not guaranteed: repeats taken on a busy machine are combined as they are; the load average of
each is shown.
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
from typing import Any, Sequence

FIGURES = ("slo_attainment", "device_seconds", "failed", "scale_events")


def oracle_device_seconds(series: dict, min_devices: int, max_devices: int, duration_s: float,
                          ttft_slo_ms: float, tpot_slo_ms: float) -> float | None:
    """See the module docstring; None without a static-maximum series."""
    t = series.get("t_s") or []
    if len(t) < 2:
        return None
    width = duration_s / len(t)
    total = 0.0
    for ttft, tpot in zip(series["ttft_p90_ms"], series["tpot_p90_ms"]):
        ratios = [r for r in (ttft / ttft_slo_ms if ttft is not None else None,
                              tpot / tpot_slo_ms if tpot is not None else None) if r is not None and math.isfinite(r)]
        need = math.ceil(max(ratios) * max_devices - 1e-9) if ratios else min_devices
        total += min(max(need, min_devices), max_devices) * width
    return round(total, 1)


def combine(paths: Sequence[pathlib.Path]) -> dict[str, Any]:
    if len(paths) < 1:
        raise ValueError("--combine: expected one or more autoscale.json files")
    repeats = []
    for path in paths:
        try:
            repeats.append(json.loads(pathlib.Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise ValueError(f"--combine {path}: cannot read a bench autoscale result ({exc})") from None
    first = repeats[0]
    for path, r in zip(paths, repeats):
        if r["trace"] != first["trace"] or r["cpu_per_device"] != first["cpu_per_device"]:
            raise ValueError(f"--combine {path}: another trace or CPU quota than {paths[0]}; repeats must replay the "
                             f"same trace on the same devices")
    cfg = first["config"]
    policies = [p for p in first["runs"] if all(p in r["runs"] for r in repeats)]
    per_policy: dict[str, dict[str, Any]] = {}
    for p in policies:
        values = {f: [r["runs"][p]["summary"][f] for r in repeats] for f in FIGURES}
        values["ttft_p90_ms"] = [r["runs"][p]["summary"]["ttft_ms"]["p90"] for r in repeats]
        values["tpot_p90_ms"] = [r["runs"][p]["summary"]["tpot_ms"]["p90"] for r in repeats]
        per_policy[p] = {f: {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}
                         for f, v in values.items()}
    oracle = []
    if "static-max" in policies:
        for r in repeats:
            oracle.append(oracle_device_seconds(r["series"]["static-max"],
                                                cfg["min_devices"], cfg["max_devices"], r["trace"]["duration_s"],
                                                cfg["slo_ttft_p90_ms"], cfg["slo_tpot_p90_ms"]))
    target = None
    if "slo" in per_policy and "static-max" in per_policy:
        ours, top = per_policy["slo"], per_policy["static-max"]
        att = ours["slo_attainment"]["median"] / top["slo_attainment"]["median"]
        dev = ours["device_seconds"]["median"] / top["device_seconds"]["median"]
        per_repeat = [(a / b if b else None, c / d if d else None) for a, b, c, d in zip(
            ours["slo_attainment"]["values"], top["slo_attainment"]["values"], ours["device_seconds"]["values"],
            top["device_seconds"]["values"])]
        target = {"attainment_over_static_max": round(att, 3), "device_seconds_over_static_max": round(dev, 3),
                  "per_repeat": [[round(a, 3) if a else None, round(d, 3) if d else None] for a, d in per_repeat],
                  "met": att >= 0.95 and dev <= 0.7}
        if oracle and all(o is not None for o in oracle):
            target["oracle_device_seconds_over_static_max"] = round(
                statistics.median(oracle) / top["device_seconds"]["median"], 3)
    return {"repeats": [str(p) for p in paths], "requests_per_run": first["trace"]["requests"],
            "trace": first["trace"], "cpu_per_device": first["cpu_per_device"],
            "load_average": [r["load_average"] for r in repeats], "windows": first["windows"],
            "policies": per_policy, "oracle_device_seconds": oracle, "target": target}


def print_summary(summary: dict[str, Any], console) -> None:
    from rich import table as rich_table

    n = len(summary["repeats"])
    t = rich_table.Table(title=f"bench autoscale, {n} repeats x {summary['requests_per_run']} requests per policy: "
                               f"median (min-max)")
    for col in ("policy", "SLO attainment", "device-s", "TTFT p90 ms", "TPOT p90 ms", "failed", "scale events"):
        t.add_column(col, justify="left" if col == "policy" else "right")

    def cell(fig, fmt):
        return f"{fmt.format(fig['median'])} ({fmt.format(fig['min'])}-{fmt.format(fig['max'])})"

    for name, p in summary["policies"].items():
        t.add_row(name, cell(p["slo_attainment"], "{:.3f}"), cell(p["device_seconds"], "{:.0f}"),
                  cell(p["ttft_p90_ms"], "{:.0f}"), cell(p["tpot_p90_ms"], "{:.0f}"), cell(p["failed"], "{:.0f}"),
                  cell(p["scale_events"], "{:.0f}"))
    console.print(t)
    tg = summary["target"]
    if tg:
        oracle = tg.get("oracle_device_seconds_over_static_max")
        console.print(f"ratio of medians, slo / static-max: attainment {tg['attainment_over_static_max']} × "
                      f"(target ≥ 0.95), device-seconds {tg['device_seconds_over_static_max']} × (target ≤ 0.7): "
                      f"{'met' if tg['met'] else 'not met'}; per repeat {tg['per_repeat']}"
                      + (f"; oracle estimate {oracle} × static max's device-seconds" if oracle else ""),
                      highlight=False)
    console.print(f"load average per repeat: {[la[0] for la in summary['load_average']]}", highlight=False)

"""Results of an autoscaling run, real (`bench autoscale`) or simulated (`simulate`), in one shape:
summaries, series over time, a rich table and a PNG of devices, load and p90 latency.

Why it exists: the benchmark and the simulator are compared with each other, so they must
count the same way: SLO attainment is the share of *all* requests (failed ones included) whose
TTFT and TPOT both meet their targets; device-seconds integrate the devices held; p90s are
over requests that finished. Pure numpy except `plot` (matplotlib) and `print_table` (rich),
imported where used.

Not guaranteed: per-bin p90s of bins with few requests are noisy (bins without a finished
request show none).
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Sequence

import numpy as np


def summarise(arrival_s: np.ndarray, ttft_s: np.ndarray, tpot_s: np.ndarray, failed: np.ndarray,
              ttft_slo_s: float, tpot_slo_s: float) -> dict[str, Any]:
    """Per-request arrays (NaN latencies for failed or unfinished requests)."""
    n = len(arrival_s)
    done = ~np.isnan(ttft_s) & ~np.isnan(tpot_s)
    with np.errstate(invalid="ignore"):
        met = (ttft_s <= ttft_slo_s) & (tpot_s <= tpot_slo_s)

    def pcts(x: np.ndarray) -> dict[str, float | None]:
        # NOTE: one partition of one copy for the three (x is ours: overwritten), not a copy and a
        # partition per percentile: a simulated day holds ~1e8 requests.
        qs = (50, 90, 99)
        values = np.percentile(x, qs, overwrite_input=True) if len(x) else (None,) * len(qs)
        return {f"p{q}": round(float(v) * 1000, 2) if v is not None else None for q, v in zip(qs, values)}

    return {
        "requests": n, "failed": int(failed.sum()), "unfinished": int(n - done.sum() - failed.sum()),
        "slo_attainment": round(float(met.sum()) / n, 4) if n else None,
        "ttft_ms": pcts(ttft_s[done]),
        "tpot_ms": pcts(tpot_s[done]),
    }


def device_seconds(t_s: np.ndarray, devices: np.ndarray, end_s: float) -> float:
    """Integral of a step series (devices[i] from t_s[i] to t_s[i + 1], the last to end_s)."""
    if not len(t_s):
        return 0.0
    edges = np.minimum(np.append(t_s, max(end_s, t_s[-1])), end_s)  # nothing after end_s counts
    return float(np.sum(np.diff(edges) * devices))


def timeline(arrival_s: np.ndarray, ttft_s: np.ndarray, tpot_s: np.ndarray, failed: np.ndarray,
             ttft_slo_s: float, tpot_slo_s: float, device_t_s: np.ndarray, devices: np.ndarray, end_s: float,
             bins: int = 120) -> dict[str, list]:
    """Series over `bins` equal bins of [0, end_s]: arrivals/s, mean devices held, p90 TTFT and
    TPOT (ms) and attainment of the requests that arrived in each bin. `arrival_s` sorted."""
    edges = np.linspace(0.0, end_s, bins + 1)
    width = edges[1] - edges[0]
    bounds = np.searchsorted(arrival_s, edges)
    with np.errstate(invalid="ignore"):
        met = (ttft_s <= ttft_slo_s) & (tpot_s <= tpot_slo_s)
    out: dict[str, list] = {"t_s": [], "arrivals_per_s": [], "devices": [], "ttft_p90_ms": [], "tpot_p90_ms": [],
                            "attainment": [], "failed": []}
    # mean devices per bin: the step series integrated over each bin
    step_t = np.append(device_t_s, max(end_s, device_t_s[-1] if len(device_t_s) else end_s))
    cum = np.concatenate([[0.0], np.cumsum(np.diff(step_t) * devices)]) if len(device_t_s) else None
    for b in range(bins):
        a, z = bounds[b], bounds[b + 1]
        out["t_s"].append(round(float(edges[b] + width / 2), 3))
        out["arrivals_per_s"].append(round((z - a) / width, 4))
        if cum is not None:
            lo, hi = (float(np.interp(x, step_t, cum)) for x in (edges[b], edges[b + 1]))
            out["devices"].append(round((hi - lo) / width, 3))
        else:
            out["devices"].append(None)
        tt, tp = ttft_s[a:z], tpot_s[a:z]
        ok = ~np.isnan(tt) & ~np.isnan(tp)
        # tt[ok], tp[ok]: copies, ours to overwrite (a simulated day's bin holds ~1e6 requests)
        out["ttft_p90_ms"].append(round(float(np.percentile(tt[ok], 90, overwrite_input=True)) * 1000, 2)
                                  if ok.any() else None)
        out["tpot_p90_ms"].append(round(float(np.percentile(tp[ok], 90, overwrite_input=True)) * 1000, 2)
                                  if ok.any() else None)
        out["attainment"].append(round(float(met[a:z].mean()), 4) if z > a else None)
        out["failed"].append(int(failed[a:z].sum()))
    return out


def print_table(title: str, rows: Sequence[Mapping[str, Any]], caption: str | None = None) -> None:
    """One row per run: name, attainment, p90s, device-seconds, scale events, failed requests."""
    from rich import console as rich_console
    from rich import table as rich_table

    table = rich_table.Table(title=title, caption=caption)
    for name in ("run", "SLO attainment", "TTFT p90 ms", "TPOT p90 ms", "device-s", "mean devices",
                 "scale events", "to capacity s", "failed", "wall s"):
        table.add_column(name, justify="left" if name == "run" else "right")

    def f(x, fmt="{:.2f}"):
        return "—" if x is None else fmt.format(x)

    for r in rows:
        table.add_row(r["name"], f(r.get("slo_attainment"), "{:.3f}"), f(r["ttft_ms"]["p90"], "{:.0f}"),
                      f(r["tpot_ms"]["p90"], "{:.1f}"), f(r.get("device_seconds"), "{:.0f}"),
                      f(r.get("mean_devices")), str(r.get("scale_events", "—")), f(r.get("time_to_capacity_s")),
                      str(r.get("failed", "—")), f(r.get("wall_s")))
    console = rich_console.Console()
    if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
        console = rich_console.Console(width=140)
    console.print(table)


def plot(series: Mapping[str, Mapping[str, list]], path: pathlib.Path, title: str, ttft_slo_s: float,
         tpot_slo_s: float) -> None:
    """Devices, load and p90 TTFT/TPOT over time, one line per run, four panels sharing x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    scale, unit = (3600.0, "hours") if max((s["t_s"][-1] for s in series.values() if s["t_s"]), default=0) > 7200 \
        else (1.0, "seconds")
    first = next(iter(series.values()))
    axes[1].fill_between(np.array(first["t_s"]) / scale, first["arrivals_per_s"], step="mid", alpha=0.3,
                         color="grey")
    axes[1].plot(np.array(first["t_s"]) / scale, first["arrivals_per_s"], color="grey", lw=1)
    for name, s in series.items():
        t = np.array(s["t_s"]) / scale
        axes[0].plot(t, [np.nan if v is None else v for v in s["devices"]], label=name, drawstyle="steps-mid")
        axes[2].plot(t, [np.nan if v is None else v for v in s["ttft_p90_ms"]], label=name, marker=".", lw=1)
        axes[3].plot(t, [np.nan if v is None else v for v in s["tpot_p90_ms"]], label=name, marker=".", lw=1)
    axes[2].axhline(ttft_slo_s * 1000, color="red", ls="--", lw=1, label="TTFT target")
    axes[3].axhline(tpot_slo_s * 1000, color="red", ls="--", lw=1, label="TPOT target")
    axes[2].set_yscale("log")
    axes[3].set_yscale("log")
    axes[0].set_ylabel("devices held")
    axes[1].set_ylabel("arrivals / s")
    axes[2].set_ylabel("TTFT p90 ms")
    axes[3].set_ylabel("TPOT p90 ms")
    axes[3].set_xlabel(unit)
    axes[0].legend(loc="upper left", fontsize=8)
    axes[2].legend(loc="upper left", fontsize=8)
    axes[0].set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)

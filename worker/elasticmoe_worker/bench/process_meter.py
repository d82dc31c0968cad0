"""What `bench scaling` measures of the instance's processes while it runs: each device's
memory (PSS, sampled) and the CPU the machine and each kind of process used in a window."""

from __future__ import annotations

import os
import pathlib
import threading
import time


class Memory(threading.Thread):
    """Samples the PSS of every device (its HMM plus its executors), every 100 ms."""

    def __init__(self, devices_fn) -> None:
        super().__init__(daemon=True)
        self.devices_fn = devices_fn
        self.samples: list[tuple[float, dict]] = []
        self.stop = False
        self._last: dict[str, tuple[tuple, int]] = {}  # device -> (its processes' resident pages, its PSS)

    def total(self, t_from: float = 0.0, t_to: float = float("inf")) -> int:
        """The most all devices held together in [t_from, t_to]; in a window shorter than the
        sampling interval, the first sample after t_from."""
        inside = [sum(d.values()) for t, d in self.samples if t_from <= t <= t_to]
        return max(inside) if inside else next((sum(d.values()) for t, d in self.samples if t >= t_from), 0)

    def per_device_ratio(self, t_before: float, active: set[str]) -> float | None:
        """Largest peak ÷ steady over the devices that serve before and after the scale
        (`active`; a warm worker holds no weights yet, so its growth is a new device, not
        overhead). Steady: the larger of the device's footprint just before the scale and at the
        end (a staying device of a scale-down gains experts: its steady state grows); peak: the
        most it held from the scale on. Call at the end of the run."""
        before = [d for t, d in self.samples if t <= t_before]
        if not before or not self.samples:
            return None
        after = self.samples[-1][1]
        ratios = []
        for key in active:
            steady = max(before[-1].get(key, 0), after.get(key, 0))
            peak = max((d.get(key, 0) for t, d in self.samples if t >= t_before), default=0)
            if steady:
                ratios.append(peak / steady)
        return max(ratios) if ratios else None

    @staticmethod
    def _pss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except OSError:
            return 0

    @staticmethod
    def _resident(pid: int) -> int:
        """Resident pages (statm): a counter the kernel keeps, read without walking page tables."""
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            return -1

    def run(self) -> None:
        # NOTE: reading a process's PSS walks its page tables (~4 ms for a torch process here: a pass
        # over the 20 processes of 6 devices took ~80 ms of kernel time, ~40 % of a core at 10 Hz,
        # beside the scale being measured). A device whose processes and their resident pages are
        # those of the last sample keeps its last PSS (an idle warm worker, its zygote and spare):
        # approximate only for pages it shares with processes of other devices (libraries)
        last = self._last
        while not self.stop:
            sample = {}
            for key, pids in self.devices_fn().items():
                signature = tuple((p, self._resident(p)) for p in sorted(pids))
                if key in last and last[key][0] == signature:
                    sample[key] = last[key][1]
                else:
                    sample[key] = sum(self._pss(p) for p in pids)
                    last[key] = (signature, sample[key])
            self.samples.append((time.monotonic(), sample))
            time.sleep(0.1)


def device_pids(instances) -> dict[str, list[int]]:
    """'<instance>/<device>' -> the HMM and its executor processes (warm spares included)."""
    out = {}
    for n, inst in enumerate(instances):
        for d, pid in inst.fleet.pids().items():
            out[f"{n}/{d}"] = tree(pid)
    return out


def cpu_snapshot(instances, also: dict | None = None) -> dict:
    """CPU seconds used so far: the machine's (busy time of all CPUs, /proc/stat) and each live
    process's of the instances' devices and of this one (the coordinator, the load and this
    sampling), with the kind of process: by the CPU group it runs in where there are quotas.
    `also`: the `procs` of an earlier snapshot, read again while they live even if their device
    has left the instance since (a scale-down's departing devices work until its end)."""
    with open("/proc/stat") as f:
        lines = f.read().splitlines()
    cpu = [int(x) for x in lines[0].split()[1:9]]  # all CPUs: user nice system idle iowait irq softirq steal
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    tick = os.sysconf("SC_CLK_TCK")
    procs = {pid: kind for pid, (kind, _) in (also or {}).items()}
    procs[os.getpid()] = "coordinator + load"
    for pids in device_pids(instances).values():
        for n, pid in enumerate(pids):
            procs[pid] = _kind(pid, hmm=n == 0)
    used = {}
    for pid, kind in procs.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            used[pid] = (kind, (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
        except (OSError, IndexError, ValueError):
            continue  # it exited meanwhile
    return {"t": time.monotonic(), "cpus": cpus, "busy_s": (sum(cpu) - cpu[3] - cpu[4]) / tick, "procs": used}


def _kind(pid: int, hmm: bool) -> str:
    from elasticmoe_worker.instance import cgroup

    try:
        with open(f"/proc/{pid}/cgroup") as f:
            groups = [line.rstrip("\n").rsplit(":", 1)[-1] for line in f]
    except OSError:
        groups = []
    if any(g.endswith(cgroup.SPARE_SUFFIX) for g in groups):
        return "standbys + spares"  # a scale's standby prepares in the spare's group
    if hmm or any(g.endswith(cgroup.HMM_SUFFIX) for g in groups):
        return "HMMs"
    return "executors"


def cpu_during(before: dict, after: dict) -> dict:
    """CPU seconds used between two snapshots: by the machine and by each kind of process (those
    alive at the end, of the kind they were at the start: a standby that joined its device's group
    at the commit counts as a standby; one that exited in between is counted in "other"), and the
    machine's capacity over the interval (CPUs × wall seconds). Take `after` with
    `cpu_snapshot(..., also=before["procs"])`, or the processes of devices that left the instance
    meanwhile land in "other" too (s22's 4 -> 2: 0.37-0.49 CPU-s there, 2 -> 4: 0.01)."""
    wall = after["t"] - before["t"]
    by_kind: dict[str, float] = {}
    for pid, (kind, seconds) in after["procs"].items():
        kind, was = before["procs"].get(pid, (kind, 0.0))
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds - was
    busy = after["busy_s"] - before["busy_s"]
    by_kind["other"] = max(0.0, busy - sum(by_kind.values()))
    return {"wall_s": round(wall, 3), "capacity_s": round(wall * after["cpus"], 3),
            "busy_s": round(busy, 3), "by_kind_s": {k: round(v, 3) for k, v in sorted(by_kind.items())}}


def tree(root: int) -> list[int]:
    """`root` and its descendants, from each thread's children list in /proc; where the kernel
    keeps none (CONFIG_PROC_CHILDREN off), from a scan of every process's parent."""
    if not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"):
        return tree_by_scan(root)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:  # it exited meanwhile
            continue
    return out


def tree_by_scan(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out

"""CPU quotas for local devices: one cgroup per worker, like a Kubernetes CPU limit.

Why it exists: a CPU "device" has fixed capacity only if it gets a fixed share of the cores.
Without a quota, four local devices on a 2-core machine share the same two cores and adding
devices adds no capacity, which makes every autoscaling measurement meaningless. With
`serve --cpu-per-device 0.45`, each device gets three sibling groups of 0.45 cores each, as a
pod with `limits.cpu: 450m` per container would: the device's own (`device-N-k`), where its
executors serve, the accelerator it stands for; its HMM's (`-hmm`), which the HMM is moved into
right after it is started; and its spare's (`-spare`, `SpareSlot`), where the next standby
waits (and the zygote it is forked from imports), as a warm worker does, until it is given work.
An executor joins the device's group when it serves.

Why the HMM has a group of its own: its work is host work (reading the checkpoint, granting and
copying regions, answering the coordinator), which on an accelerator does not compete with the
device's compute. In the device's group a loaded executor spent the whole quota each period and
the HMM waited for the next one: a source handing out its regions' file descriptors took 67-79 ms
of a scale's transfer under load (0.225 cores) against 1-3 ms idle.

Both cgroup versions: v1 (a `cpu` hierarchy: `cpu.cfs_quota_us` / `cpu.cfs_period_us`,
processes into `cgroup.procs`) and v2 (`cpu.max`, after enabling the `cpu` controller for our
own group's children). Groups live under the cgroup this process runs in, in a parent named
after this process and instance (`elasticmoe-<pid>-<n>`: a process may run several instances,
as `bench scaling` does), and are removed when their worker has stopped and at
`close()`; empty groups left by a coordinator that was killed are removed by the next one.

CPU weights (when the cores are contended, who runs first; a quota only caps): an HMM's group
weighs `HMM_WEIGHT` times a device's or a spare's (`ELASTICMOE_HMM_CPU_WEIGHT`; 1 turns it off).
Its work is short and on the critical path of every scale (grants, fds, copies), while the
standbys preparing beside it are meant to overlap with it: with equal weights, under load, the
HMMs were not throttled but waited for the 2 cores (session 19: a copy ran at a median 0.88 GB/s
against 3.3 idle). On an accelerator the bytes move on copy engines that compute does not use.
NOTE: the parent group keeps the default weight: all of this instance's devices together weigh
one process of the machine's. Weighing it as many processes as it holds groups (tried in session
20) can starve a coordinator on the same machine (the benchmark's process holds it: the rendezvous
store that every transition and every standby's group goes through): in the one run with it a
standby's group took 86 ms to form (median of 45 standbys) against 46 ms without it and 65 ms
(of 90) before either weight, and 2 -> 4 took 0.59 s against 0.30 and 0.47 s.

Not guaranteed: a quota caps CPU time, it does not reserve it: on a busy machine a device may
get less. On cgroup v2 the `cpu` controller can only be handed to child groups when our own
group holds no processes (the "no internal processes" rule) or is the root: inside a container
that runs its processes in its root group that fails, with an error saying so.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import time

logger = logging.getLogger(__name__)

PERIOD_US = 100_000  # the kernel's and Kubernetes' default CFS period
MIN_QUOTA_US = 1_000  # the kernel refuses less
SPARE_SUFFIX = "-spare"  # device-N-k-spare: where device-N-k's spare executor waits (SpareSlot)
HMM_SUFFIX = "-hmm"  # device-N-k-hmm: device-N-k's HMM (its host work; the executors run in device-N-k)
HMM_WEIGHT_ENV = "ELASTICMOE_HMM_CPU_WEIGHT"
HMM_WEIGHT = 4.0  # an HMM's group weighs this many device groups (see the module's docstring)
DEFAULT_WEIGHT = {1: 1024, 2: 100}  # cpu.shares / cpu.weight of a group nobody set
WEIGHT_RANGE = {1: (2, 262_144), 2: (1, 10_000)}


class Unavailable(RuntimeError):
    """No writable cgroup CPU controller here."""


def _mounts() -> list[tuple[str, str, list[str]]]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 4:
                out.append((fields[1], fields[2], fields[3].split(",")))
    return out


def _own_paths() -> dict[str, str]:
    """Controller (v1) or "" (v2) -> this process' cgroup path."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                paths[c] = path
    return paths


def detect() -> tuple[int, pathlib.Path]:
    """-> (cgroup version, the directory our groups go under); Unavailable with what was tried."""
    tried = []
    own = _own_paths()
    for mount, kind, options in _mounts():
        if kind == "cgroup" and "cpu" in options:
            base = pathlib.Path(mount) / own.get("cpu", "/").lstrip("/")
            if not (base / "cpu.cfs_quota_us").exists():
                base = pathlib.Path(mount)  # our own path is not visible here (a container's view)
            if (base / "cpu.cfs_quota_us").exists() and os.access(base, os.W_OK):
                return 1, base
            tried.append(f"cgroup v1 cpu at {base}: {'not writable' if base.exists() else 'missing'}")
    for mount, kind, _ in _mounts():
        if kind == "cgroup2":
            base = pathlib.Path(mount) / own.get("", "/").lstrip("/")
            try:
                controllers = (base / "cgroup.controllers").read_text().split()
            except OSError as exc:
                tried.append(f"cgroup v2 at {base}: {exc.strerror}")
                continue
            if "cpu" not in controllers:
                tried.append(f"cgroup v2 at {base}: no cpu controller (has: {' '.join(controllers) or 'none'})")
            elif not os.access(base, os.W_OK):
                tried.append(f"cgroup v2 at {base}: not writable")
            else:
                return 2, base
    raise Unavailable("; ".join(tried) or "no cgroup file system mounted")


def _read_quota(group: pathlib.Path, version: int) -> float | None:
    """`group`'s own CPU quota in cores, None when it sets none (or it cannot be read)."""
    try:
        if version == 1:
            quota = int((group / "cpu.cfs_quota_us").read_text())
            period = int((group / "cpu.cfs_period_us").read_text())
        else:
            text = (group / "cpu.max").read_text().split()
            if text[0] == "max":
                return None
            quota, period = int(text[0]), int(text[1])
    except (OSError, ValueError, IndexError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpu_limit() -> float | None:
    """The CPU quota this process runs under, in cores: the smallest quota of its own cgroup and
    its ancestors (a device's group under `serve --cpu-per-device`, a pod's `limits.cpu`); None
    when none is set or none is visible. Reads only; needs no privilege."""
    own = _own_paths()
    limits = []
    for mount, kind, options in _mounts():
        if kind == "cgroup" and "cpu" in options:
            version, path = 1, own.get("cpu", "/")
        elif kind == "cgroup2" and "" in own:
            version, path = 2, own[""]
        else:
            continue
        root = pathlib.Path(mount)
        group = root / path.lstrip("/")
        if not group.is_dir():
            group = root  # a container's view: its own group is the mount's root
        while True:
            limit = _read_quota(group, version)
            if limit is not None:
                limits.append(limit)
            if group == root:
                break
            group = group.parent
    return min(limits) if limits else None


def throttling() -> tuple[int, float] | None:
    """(periods in which it was throttled, seconds it waited throttled) of this process' own CPU
    group so far (its quota's cost: a process over its budget waits for the next period); None
    where that cannot be read. Reads only."""
    own = _own_paths()
    for mount, kind, options in _mounts():
        if kind == "cgroup" and "cpu" in options and "cpu" in own:
            path, key, unit = own["cpu"], "throttled_time", 1e-9
        elif kind == "cgroup2" and "" in own:
            path, key, unit = own[""], "throttled_usec", 1e-6
        else:
            continue
        try:
            lines = (pathlib.Path(mount) / path.lstrip("/") / "cpu.stat").read_text().splitlines()
            fields = {k: int(v) for k, v in (line.split() for line in lines)}
        except (OSError, ValueError):
            continue
        return fields.get("nr_throttled", 0), fields.get(key, 0) * unit
    return None


# Set by a fleet whose every worker runs on this machine (the local fleet): the executors of one
# configuration share its cores, each takes its share (executor.set_compute_threads).
SHARED_HOST_ENV = "ELASTICMOE_DEVICES_SHARE_HOST"


def available_cpus() -> tuple[int, str]:
    """-> (how many threads of compute this process can run at once, why): the CPUs it may be
    scheduled on, capped by its CPU quota rounded up (0.45 cores -> 1 thread: more threads than
    the quota only take turns being throttled)."""
    affinity = len(os.sched_getaffinity(0))
    limit = cpu_limit()
    if limit is None or math.ceil(limit) >= affinity:
        return affinity, f"{affinity} CPU{'' if affinity == 1 else 's'} in this process' affinity mask" + (
            "" if limit is None else f" (its CPU quota, {limit:.3g} cores, allows as many)")
    return max(1, math.ceil(limit)), f"CPU quota of {limit:.3g} cores (of {affinity} CPUs in its affinity mask)"


class CpuQuotas:
    """Per-device groups with a quota of `cores` each; `place(device, pid)` after a spawn,
    `release(device)` once its processes have exited."""

    _instances = 0  # in this process: each gets its own parent group

    def __init__(self, cores: float, option: str = "--cpu-per-device") -> None:
        if not cores > 0:
            raise ValueError(f"{option}: got {cores!r}, expected a positive number of cores (e.g. 0.45)")
        try:
            self.version, base = detect()
        except Unavailable as exc:
            raise ValueError(f"{option} {cores:g}: no writable cgroup CPU controller ({exc}); run as root on a "
                             f"machine with cgroup v1 `cpu` or cgroup v2 `cpu.max`, or leave the option out") from None
        self.cores = cores
        self.quota_us = max(MIN_QUOTA_US, round(cores * PERIOD_US))
        _remove_stale(base)
        CpuQuotas._instances += 1
        self.parent = base / f"elasticmoe-{os.getpid()}-{CpuQuotas._instances}"
        self._groups: dict[int, pathlib.Path] = {}
        self._count = 0
        self.hmm_weight = hmm_weight()
        try:
            self.parent.mkdir(exist_ok=True)
            if self.version == 2:
                # Children get the cpu controller only if their parent hands it down.
                (self.parent / "cgroup.subtree_control").write_text("+cpu")
        except OSError as exc:
            self._rmdir(self.parent)
            raise ValueError(f"{option} {cores:g}: cannot set up {self.parent} ({exc.strerror}); the cgroup v"
                             f"{self.version} CPU controller is not usable here") from None
        logger.info("CPU quota per device: %.3g cores (%d/%d us, cgroup v%d under %s)", cores, self.quota_us,
                    PERIOD_US, self.version, self.parent)

    def place(self, device_index: int, pid: int) -> pathlib.Path:
        """Create this device's groups, each with the quota: the device's own (its executors), its
        spare's (`SpareSlot`) and its HMM's; move the HMM (`pid`) into the last. -> the device's."""
        self._count += 1
        group = self.parent / f"device-{device_index}-{self._count}"
        hmm = group.parent / (group.name + HMM_SUFFIX)
        for g in (group, group.parent / (group.name + SPARE_SUFFIX), hmm):
            g.mkdir()
            self._set_quota(g)
        self._set_weight(hmm, self.hmm_weight)
        self._groups[device_index] = group
        (hmm / "cgroup.procs").write_text(str(pid))
        return group

    def _set_weight(self, group: pathlib.Path, factor: float) -> None:
        """`group`'s CPU weight: `factor` times the default (within the kernel's range)."""
        low, high = WEIGHT_RANGE[self.version]
        value = min(high, max(low, round(DEFAULT_WEIGHT[self.version] * factor)))
        try:
            (group / ("cpu.shares" if self.version == 1 else "cpu.weight")).write_text(str(value))
        except OSError as exc:  # a weight is a preference: without it the quotas still hold
            logger.warning("could not set the CPU weight of %s to %d (%s)", group, value, exc.strerror)

    def _set_quota(self, group: pathlib.Path) -> None:
        if self.version == 1:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(self.quota_us))
        else:
            (group / "cpu.max").write_text(f"{self.quota_us} {PERIOD_US}")

    def group(self, device_index: int) -> pathlib.Path | None:
        return self._groups.get(device_index)

    def release(self, device_index: int, group: pathlib.Path | None = None, timeout_s: float = 5.0) -> None:
        """Remove the device's group once its processes are gone; the stragglers (executors
        that outlived their HMM) are killed after `timeout_s`."""
        group = group or self._groups.get(device_index)
        if group is None:
            return
        if self._groups.get(device_index) == group:
            del self._groups[device_index]
        if not group.name.endswith((SPARE_SUFFIX, HMM_SUFFIX)):
            for sibling in (group.parent / (group.name + s) for s in (SPARE_SUFFIX, HMM_SUFFIX)):
                if sibling.is_dir():
                    self.release(device_index, sibling, timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            pids = _pids(group)
            if not pids:
                break
            if time.monotonic() > deadline:
                logger.warning("device %d: processes %s still in %s after %.0f s; killing them", device_index, pids,
                               group, timeout_s)
                for pid in pids:
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + timeout_s
            time.sleep(0.05)
        self._rmdir(group)

    def close(self) -> None:
        for device in list(self._groups):
            self.release(device)
        for leftover in self.parent.glob("device-*"):
            self.release(-1, leftover)
        self._rmdir(self.parent)

    @staticmethod
    def _rmdir(path: pathlib.Path) -> None:
        for _ in range(50):  # a group is busy for a moment after its last process exited
            try:
                path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)
        logger.warning("could not remove cgroup %s", path)


def hmm_weight() -> float:
    """How many device groups an HMM's group weighs: `ELASTICMOE_HMM_CPU_WEIGHT` or `HMM_WEIGHT`."""
    text = os.environ.get(HMM_WEIGHT_ENV)
    if text is None:
        return HMM_WEIGHT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{HMM_WEIGHT_ENV}={text!r}: expected a positive number (how many device groups an "
                         f"HMM's group weighs; 1 weighs them the same)")
    return value


class SpareSlot:
    """Where a device's spare executor waits: the sibling group `<device group>-spare` with the
    same quota (`CpuQuotas.place` makes it), so that its imports (~2.5 CPU-s) take no CPU from
    the device's serving executor; it joins the device's group once given work, or, as a
    scale's standby, once it serves (the HMM's commit).
    NOTE: nice 19 alone did not protect the serving executor: a quota is a budget per period,
    and a niced spare spends it whenever the executor waits (on its peers' collectives in
    every MoE layer), which the executor then lacks later in the period (bench autoscale, 0.3
    cores: TPOT p90 ~1 s for the 5 s the spares of a 1 -> 2 scale imported).
    Only with `serve --cpu-per-device` (a local fleet's groups): a pod's CPU limit holds its
    spare too."""

    def __init__(self, device_group: pathlib.Path, spare_group: pathlib.Path) -> None:
        self.device_group, self.spare_group = device_group, spare_group

    @classmethod
    def find(cls) -> "SpareSlot | None":
        """This process' (an HMM's) slot, or None where its group has none."""
        try:
            _, own = detect()
        except Unavailable:
            return None
        device = own.parent / own.name.removesuffix(HMM_SUFFIX)
        spare = own.parent / (device.name + SPARE_SUFFIX)
        return cls(device, spare) if spare.is_dir() else None

    def wait_here(self, pid: int) -> None:
        (self.spare_group / "cgroup.procs").write_text(str(pid))

    def join_device(self, pid: int) -> None:
        (self.device_group / "cgroup.procs").write_text(str(pid))


def _remove_stale(base: pathlib.Path) -> None:
    """Remove the empty groups of coordinators that are gone (killed before their `close()`):
    their workers died with them (parent-death signal), their groups did not."""
    for parent in base.glob("elasticmoe-*"):
        try:
            os.kill(int(parent.name.split("-")[1]), 0)
            continue  # its coordinator lives
        except ValueError:
            continue  # not one of ours
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # a live process of someone else
        groups = [g for g in parent.glob("device-*") if g.is_dir()]
        if any(_pids(g) for g in groups) or _pids(parent):
            logger.warning("stale cgroup %s still holds processes; left alone", parent)
            continue
        for g in groups:
            CpuQuotas._rmdir(g)
        CpuQuotas._rmdir(parent)
        logger.info("removed the stale cgroup %s of a coordinator that is gone", parent)


def _pids(group: pathlib.Path) -> list[int]:
    try:
        return [int(x) for x in (group / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []

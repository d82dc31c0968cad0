"""Chaos run (issue 11, point 5): a steady streaming load while a seeded schedule SIGKILLs worker
pods' processes, the coordinator's process (its Deployment's pod restarts it) and the operator
(started again), at random moments, one of them while a scale is in progress. On the API-server
emulator with the operator as a real process and real coordinator and worker processes
(`test_operator.environment`), because only the operator brings a lost device back.

The schedule: `schedule(seed, ...)` orders the faults; none starts after `duration_s` (60 s, or
180 s for the slow version; the ones left are printed as not started), and the last one's
recovery is waited for. A worker, coordinator or mid-scale fault waits for the instance to be
Serving at its desired count again before the next one starts: overlapping losses include cases
the README says are not recovered (a worker lost while the others wait for a restarted
coordinator). Operator kills come at random moments of their own, also in the middle of those
recoveries. A mid-scale fault patches `spec.devices.replicas` from 2 to 3, waits until
`status.scaling` shows a random stage of the scale and kills its victim (worker, coordinator or
operator) a random 0-1 s later.

Run it on a tree nobody edits meanwhile: workers live through the whole run, and the executors
and coordinators started later import the code as it is then (a changed wire format between
them fails like a bug).

What counts as a clean, retryable failure of a request (each kind counted apart):
- `status`: an HTTP 503 or 429 with Retry-After (the server said when to come back);
- `connection`: refused, reset or cut mid-stream while the coordinator was down (from its kill
  until the instance served again): the HTTP API ran in the killed process (README "Restarting
  the coordinator");
anything else is not: a request without a complete answer within `DEADLINE_S` (a hang), an SSE
error event, an incomplete stream, a connection failure with the coordinator up, another status.

Invariants checked at the end: every failure clean, none hung, the instance Serving with
ready == active == desired, and after everything was stopped no process that inherited this
run's marker variable is left and no /dev/shm file of any of them. Each run prints (and writes
to `chaos.json` in its tmp dir) per fault kind the failed requests and the recovery times
(fault -> Serving at the desired count again; for an operator kill: -> the restarted operator
answers /healthz with the instance Serving), p50 / p90 / max. Timings are reported, never
asserted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import random
import time
import uuid

import httpx
import pytest

from elasticmoe_operator import reconcile
from elasticmoe_worker import reference
from elasticmoe_worker.bench import serve_bench
import testprocs
import test_operator as top

# A request suspended through a worker loss waits the heartbeat timeout (5 s here) and the
# recovery; one that has no complete answer in this long hangs.
DEADLINE_S = 90.0
RECOVERY_TIMEOUT_S = 240.0
MARKER = "ELASTICMOE_CHAOS_RUN"
STEADY = ("worker", "coordinator")
VICTIMS = ("worker", "coordinator", "operator")


@dataclasses.dataclass
class Fault:
    kind: str  # worker, coordinator, operator, or mid-scale:<victim>
    target: str  # the pod or process killed
    at_s: float  # time.monotonic() of the kill
    desired: int  # the count the instance must serve at again
    scaling: dict | None = None  # status.scaling when the kill came (mid-scale faults)
    recovered_s: float | None = None

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered_s is None else self.recovered_s - self.at_s


def schedule(seed: int, num_steady: int, num_mid_scale: int) -> list[str]:
    """The order of the faults that wait for one another: `num_steady` of each steady kind and
    `num_mid_scale` mid-scale faults, whose victims cycle through every kind from a random
    start, in a random order (seeded)."""
    rng = random.Random(seed)
    first = rng.randrange(len(VICTIMS))
    kinds = [k for k in STEADY for _ in range(num_steady)]
    kinds += [f"mid-scale:{VICTIMS[(first + i) % len(VICTIMS)]}" for i in range(num_mid_scale)]
    rng.shuffle(kinds)
    return kinds


def _serving_at(desired: int, status: dict) -> bool:
    d = status.get("devices") or {}
    return top._serving(desired)(status) and d.get("desired") == d.get("ready") == desired \
        and top._degraded_reason(status) == "AsExpected"


def _ours() -> dict[int, str]:
    """pid -> command line of every process whose environment holds this run's marker."""
    found = {}
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if f"{MARKER}={os.environ[MARKER]}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return found


def _shm_of(pids: set[int]) -> list[str]:
    return [p.name for p in pathlib.Path("/dev/shm").glob("elasticmoe-*") if int(p.name.split("-")[1]) in pids]


class Chaos:
    def __init__(self, env: top.Env, rng: random.Random, operator_port: int) -> None:
        self.env, self.rng, self.operator_port = env, rng, operator_port
        self.faults: list[Fault] = []
        self.pids: set[int] = set()  # every process of ours seen during the run
        self.desired = 2
        self.operator_lock = asyncio.Lock()  # one kill and restart at a time (two kinds of fault do it)

    async def start_operator(self) -> None:
        await self.env.start_operator("--listen", f"127.0.0.1:{self.operator_port}")

    async def operator_up(self) -> bool:
        try:
            async with httpx.AsyncClient(timeout=2) as c:
                return (await c.get(f"http://127.0.0.1:{self.operator_port}/healthz")).status_code == 200
        except httpx.TransportError:
            return False

    async def _status(self) -> dict:
        self.pids |= set(_ours())
        return ((await self.env.cr()) or {}).get("status") or {}

    async def recovered(self, fault: Fault) -> None:
        """Wait until the instance serves at `fault.desired` again, having left that state first
        (the status the operator wrote before it saw the fault must not count)."""
        left = fault.kind.endswith("operator")
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        status: dict = {}
        while time.monotonic() < deadline:
            status = await self._status()
            # an operator kill may come during a mid-scale fault: the count it must serve at then changes
            desired = self.desired if fault.kind == "operator" else fault.desired
            if not _serving_at(desired, status):
                left = True
            elif left and (await self.operator_up() or not fault.kind.endswith("operator")):
                fault.recovered_s = time.monotonic()
                return
            await asyncio.sleep(0.25)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(self.env.kubelet.tmp.glob("*.log")))
        raise AssertionError(f"{fault.kind} fault on {fault.target}: not Serving at {self.desired} devices within "
                             f"{RECOVERY_TIMEOUT_S:g} s; status: {status}\n{logs}")

    async def kill(self, victim: str, rng: random.Random) -> str:
        """SIGKILL the victim (a random running worker pod, the coordinator, the operator, which
        is started again a random 0-2 s later); -> its name."""
        kubelet = self.env.kubelet
        if victim == "worker":
            pods = sorted(name for (kind, name), p in kubelet.procs.items() if kind == "Pod" and p.poll() is None)
            pod = rng.choice(pods)
            kubelet.kill("Pod", pod)
            return pod
        if victim == "coordinator":
            kubelet.kill("Deployment", f"{top.NAME}-coordinator")
            return f"{top.NAME}-coordinator"
        assert victim == "operator", victim
        async with self.operator_lock:
            await self.env.kill_operator()
            await asyncio.sleep(rng.uniform(0, 2))  # the operator is down for a random while
            await self.start_operator()
            return f"operator run {self.env.runs - 1}"

    async def steady(self, kind: str) -> None:
        fault = Fault(kind, "", time.monotonic(), self.desired)
        self.faults.append(fault)
        fault.target = await self.kill(kind, self.rng)
        await self.recovered(fault)

    async def set_replicas(self, desired: int) -> None:
        self.desired = desired
        await self.env.api.request("PATCH", f"{top.CR_PATH}/{top.NAME}", {"spec": {"devices": {"replicas": desired}}})

    async def mid_scale(self, victim: str) -> None:
        """A scale-up 2 -> 3 (after a plain scale-down to 2 first if at 3: a scale-down is often
        over within a poll) whose victim is killed in a random stage of it (`reconcile`'s
        WaitingForWorkers: the new pod starting and registering; Scaling: the coordinator moving
        experts and switching), a random 0-1 s after the stage was seen."""
        if self.desired == 3:
            await self.set_replicas(2)
            await self.env.wait(lambda s: _serving_at(2, s), RECOVERY_TIMEOUT_S, "the scale down to 2")
        stage = self.rng.choice((reconcile.WAITING_FOR_WORKERS, reconcile.SCALING))
        await self.set_replicas(3)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # faster polls than env.wait: a stage can be short
            status = await self._status()
            if (status.get("scaling") or {}).get("stage") == stage or _serving_at(3, status):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(self.rng.uniform(0, 1))
        # the scale may be over by now (or was missed): then `scaling` says None
        fault = Fault(f"mid-scale:{victim}", "", time.monotonic(), 3, (await self._status()).get("scaling"))
        self.faults.append(fault)
        fault.target = await self.kill(victim, self.rng)
        await self.recovered(fault)

    async def operator_kills(self, times_s: list[float], t0_s: float, rng: random.Random) -> None:
        """Operator kills at these moments (seconds after `t0_s`), whatever else is going on;
        `rng` their own (the other faults' draws stay in the seed's order)."""
        for at_s in times_s:
            await asyncio.sleep(max(0.0, t0_s + at_s - time.monotonic()))
            fault = Fault("operator", "", time.monotonic(), self.desired)
            self.faults.append(fault)
            fault.target = await self.kill("operator", rng)
            await self.recovered(fault)


def classify(failure, coordinator_down: list[tuple[float, float]]) -> str:
    """`status`, `connection` (the clean kinds; see the module's docstring) or why it is not clean."""
    if failure.kind == "status":
        if failure.detail.startswith(("HTTP 503", "HTTP 429")) and failure.retry_after:
            return "status"
        return "unclean: a status without Retry-After or not 503/429"
    if failure.kind == "connection":
        if any(start <= failure.ended_s <= end for start, end in coordinator_down):
            return "connection"
        return "unclean: a connection failure while the coordinator was up"
    return f"unclean: {failure.kind}"


def attribute(failure, faults: list[Fault]) -> str:
    """The kind of the latest fault killed before the failed request ended whose recovery it
    ended within (1 s of slack), an operator kill only if no other fault's (the operator is not
    on the request path; its kills overlap the others' recoveries); `none` if none."""
    hits = [f for f in faults if f.at_s <= failure.ended_s <= (f.recovered_s or float("inf")) + 1.0]
    return max(hits, key=lambda f: (f.kind != "operator", f.at_s)).kind if hits else "none"


def report(faults: list[Fault], failures: list, coordinator_down, num_ok: int, seed: int, t0_s: float) -> dict:
    kinds = sorted({f.kind for f in faults})
    table = {}
    for kind in kinds + ["none"]:
        times = [f.recovery_s for f in faults if f.kind == kind and f.recovery_s is not None]
        failed = [x for x in failures if attribute(x, faults) == kind]
        if kind == "none" and not failed:
            continue
        row = {"faults": sum(f.kind == kind for f in faults), "failed_requests": len(failed),
               "failed_by_class": {}}
        for x in failed:
            c = classify(x, coordinator_down)
            row["failed_by_class"][c] = row["failed_by_class"].get(c, 0) + 1
        if times:
            row.update({"recovery_p50_s": round(serve_bench.percentile(times, 50), 1),
                        "recovery_p90_s": round(serve_bench.percentile(times, 90), 1),
                        "recovery_max_s": round(max(times), 1)})
        table[kind] = row
    return {"seed": seed, "requests_ok": num_ok, "requests_failed": len(failures), "by_fault": table,
            "faults": [{"kind": f.kind, "target": f.target, "at_s": round(f.at_s - t0_s, 1),
                        "recovery_s": round(f.recovery_s, 1) if f.recovery_s is not None else None,
                        "scaling": f.scaling} for f in sorted(faults, key=lambda f: f.at_s)],
            "failures": [{"kind": x.kind, "class": classify(x, coordinator_down), "fault": attribute(x, faults),
                          "detail": x.detail[:300]} for x in failures]}


def _print_table(result: dict) -> None:
    print(f"\nchaos run, seed {result['seed']}: {result['requests_ok']} requests ok, "
          f"{result['requests_failed']} failed")
    print(f"{'fault':<24}{'n':>3}{'failed':>8}{'p50 s':>8}{'p90 s':>8}{'max s':>8}  failed by class")
    for kind, row in result["by_fault"].items():
        print(f"{kind:<24}{row['faults']:>3}{row['failed_requests']:>8}{row.get('recovery_p50_s', '-'):>8}"
              f"{row.get('recovery_p90_s', '-'):>8}{row.get('recovery_max_s', '-'):>8}  {row['failed_by_class']}")
    for f in result["faults"]:
        stage = f" (during {f['scaling']['stage']} of {f['scaling']['from']} -> {f['scaling']['to']})" \
            if f["scaling"] else ""
        print(f"  {f['at_s']:6.1f} s  {f['kind']:<22} {f['target']}{stage}: Serving again after {f['recovery_s']} s")


async def run_chaos(tiny_models, tmp_path, monkeypatch, seed: int, duration_s: float, num_steady: int,
                    num_mid_scale: int, num_operator_kills: int) -> dict:
    monkeypatch.setenv(MARKER, uuid.uuid4().hex)  # every process started from here on inherits it
    rng = random.Random(seed)
    kinds = schedule(seed, num_steady, num_mid_scale)
    print(f"\nchaos seed {seed}: schedule {kinds}, {num_operator_kills} operator kill(s) within {duration_s:g} s")
    coordinator_down: list[tuple[float, float]] = []
    skipped: list[str] = []
    async with top.environment(tmp_path) as env:
        chaos = Chaos(env, rng, testprocs.free_port())
        await chaos.start_operator()
        resource = top._resource(tiny_models["qwen3_moe"], initial=2)
        resource["spec"]["engine"]["expertCopies"] = 2  # a lost device's experts come from a survivor
        await env.api.request("POST", top.CR_PATH, resource, "application/json")
        obj = await env.wait(lambda s: _serving_at(2, s), 180, "the instance to serve on 2 devices")
        load = testprocs.StreamingLoad(obj["status"]["coordinatorUrl"], "m", [[5, 6, 7, 8], [9, 10, 11]],
                                       max_tokens=6, clients=2, deadline_s=DEADLINE_S, backoff_s=1.0)
        try:
            t0_s = time.monotonic()
            operator_rng = random.Random(rng.random())
            operator_times = sorted(operator_rng.uniform(0, duration_s) for _ in range(num_operator_kills))
            killer = asyncio.create_task(chaos.operator_kills(operator_times, t0_s, operator_rng))
            try:
                for i, kind in enumerate(kinds):
                    await asyncio.sleep(rng.uniform(0, 4))
                    if time.monotonic() - t0_s > duration_s:  # the bound: no fault starts after it
                        skipped = kinds[i:]
                        break
                    if kind.startswith("mid-scale:"):
                        await chaos.mid_scale(kind.split(":", 1)[1])
                    else:
                        await chaos.steady(kind)
                await killer
            finally:
                killer.cancel()
            final = await chaos._status()
        finally:
            load.stop()
        coordinator_down = [(f.at_s, f.recovered_s or float("inf")) for f in chaos.faults
                            if f.kind.endswith("coordinator")]
        result = report(chaos.faults, load.failures, coordinator_down, len(load.results), seed, t0_s)
        result["chaos_s"] = round(time.monotonic() - t0_s, 1)
        result["skipped"] = skipped  # not started: the time was up
        result["final_status"] = {"phase": final.get("phase"), "devices": final.get("devices")}
        pids = chaos.pids | set(_ours())
        # before the shutdown (kopf's own shutdown of an orphaned timer may log one)
        tracebacks = [p.name for p in sorted(tmp_path.glob("operator-*.log")) if "Traceback" in p.read_text()]
    # everything started is stopped now (the kubelet's pods and the coordinator, the operator)
    left = _ours()
    result["left_processes"], result["left_shm"] = left, _shm_of(pids | set(left))
    _print_table(result)
    (tmp_path / "chaos.json").write_text(json.dumps(result, indent=2))
    if skipped:
        print(f"not started within {duration_s:g} s (a slow machine): {skipped}")
    print(f"written to {tmp_path / 'chaos.json'}")

    assert all(f.recovered_s is not None for f in chaos.faults), result["faults"]
    mid_scale = [f for f in chaos.faults if f.kind.startswith("mid-scale:")]
    assert not mid_scale or any(f.scaling for f in mid_scale), "no fault came while a scale was in progress"
    assert _serving_at(chaos.desired, final), final
    assert final["devices"]["active"] == final["devices"]["ready"] == chaos.desired, final
    assert tracebacks == [], f"the operator logged a Traceback while faults came: {tracebacks}"
    unclean = [x for x in result["failures"] if x["class"].startswith("unclean")]
    assert unclean == [], unclean[:5]
    assert load.results, "no request succeeded"
    assert left == {} and result["left_shm"] == [], (left, result["left_shm"])
    return result


SEED = int(os.environ.get("ELASTICMOE_CHAOS_SEED", "11"))


@pytest.mark.asyncio
@pytest.mark.timeout(420)
@pytest.mark.parametrize("seed", [SEED], ids=lambda s: f"seed{s}")
async def test_chaos_60s(tiny_models, tmp_path, monkeypatch, seed):
    """One worker and one coordinator kill, one mid-scale fault, one operator kill, within 60 s."""
    await run_chaos(tiny_models, tmp_path, monkeypatch, seed, duration_s=60, num_steady=1, num_mid_scale=1,
                    num_operator_kills=1)


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", [SEED], ids=lambda s: f"seed{s}")
async def test_chaos_3min(tiny_models, tmp_path, monkeypatch, seed):
    """Two kills of each steady kind, three mid-scale faults (every victim once), three operator kills."""
    await run_chaos(tiny_models, tmp_path, monkeypatch, seed, duration_s=180, num_steady=2, num_mid_scale=3,
                    num_operator_kills=3)


def test_a_seed_gives_one_schedule_with_every_kind_and_every_mid_scale_victim():
    assert schedule(5, 2, 3) == schedule(5, 2, 3)
    kinds = schedule(5, 2, 3)
    assert sorted(kinds) == sorted(["worker", "worker", "coordinator", "coordinator", "mid-scale:worker",
                                    "mid-scale:coordinator", "mid-scale:operator"])
    assert len({tuple(schedule(seed, 1, 1)) for seed in range(20)}) > 1  # the seed decides the order


def _failure(kind: str, detail: str = "", retry_after: str | None = None, ended_s: float = 10.0):
    return reference.Failure(0, ended_s - 1, ended_s, kind, detail, retry_after)


@pytest.mark.parametrize("failure, expected", [
    (_failure("status", "HTTP 503: engine dead", "5"), "status"),
    (_failure("status", "HTTP 429: overloaded", "1"), "status"),
    (_failure("status", "HTTP 503: engine dead"), "unclean: a status without Retry-After or not 503/429"),
    (_failure("status", "HTTP 500: boom", "5"), "unclean: a status without Retry-After or not 503/429"),
    (_failure("connection", "ConnectError", ended_s=10.0), "connection"),
    (_failure("connection", "ReadError", ended_s=30.0), "unclean: a connection failure while the coordinator was up"),
    (_failure("timeout", "no complete answer within 90 s"), "unclean: timeout"),
    (_failure("error_event", "error event: {}"), "unclean: error_event"),
    (_failure("incomplete", "finish 'abort'"), "unclean: incomplete"),
])
def test_what_counts_as_a_clean_retryable_failure(failure, expected):
    assert classify(failure, coordinator_down=[(5.0, 20.0)]) == expected


def test_a_failure_is_put_on_the_latest_fault_it_ended_in_an_operator_kill_last():
    worker = Fault("worker", "demo-worker-1", at_s=0.0, desired=2, recovered_s=30.0)
    operator = Fault("operator", "operator run 1", at_s=10.0, desired=2, recovered_s=20.0)
    coordinator = Fault("coordinator", "demo-coordinator", at_s=40.0, desired=2, recovered_s=50.0)
    faults = [worker, operator, coordinator]
    assert attribute(_failure("status", ended_s=15.0), faults) == "worker"  # not the operator's, though later
    assert attribute(_failure("status", ended_s=45.0), faults) == "coordinator"
    assert attribute(_failure("status", ended_s=30.5), faults) == "worker"  # 1 s of slack
    assert attribute(_failure("status", ended_s=35.0), faults) == "none"
    assert attribute(_failure("status", ended_s=15.0), [operator]) == "operator"

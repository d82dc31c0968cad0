"""`elasticmoe serve --devices N --autoscale`: the windowed p90 from histogram snapshots, the
autoscaler's loop against a fake instance with a fake clock, its options, and the real command
scaling up under a burst and back down when the load is gone, failing no request."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import subprocess
import threading
import time

import httpx
import msgspec
import pytest

import testprocs
from elasticmoe_operator import policy
from elasticmoe_worker import cli
from elasticmoe_worker.contract import admin
from elasticmoe_worker.engine import types
from elasticmoe_worker.server import autoscale, metrics

INF = float("inf")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- the windowed quantile ---------------------------------------------------------------------
@pytest.mark.parametrize("newer, older, expected", [
    # 90 in the window; rank 81 falls in (0.2, 0.5]: 41 of its 50 -> 0.2 + 0.3 * 41/50
    (((0.1, 10), (0.2, 50), (0.5, 100), (INF, 100)), ((0.1, 10), (0.2, 10), (0.5, 10), (INF, 10)), 0.446),
    # all in the first bucket: interpolated from 0
    (((0.1, 10), (1.0, 10), (INF, 10)), None, 0.09),
    # rank in +Inf: the largest finite bound, as Prometheus answers
    (((0.1, 1), (1.0, 1), (INF, 10)), None, 1.0),
    # what came before the window does not count: only the 10 slow ones are in it
    (((0.1, 1000), (1.0, 1000), (2.0, 1010), (INF, 1010)), ((0.1, 1000), (1.0, 1000), (2.0, 1000), (INF, 1000)),
     1.9),
])
def test_window_quantile_interpolates_inside_the_bucket(newer, older, expected):
    assert autoscale.window_quantile(0.9, newer, older) == pytest.approx(expected)


def test_an_empty_window_has_no_quantile():
    snap = ((0.1, 5), (1.0, 7), (INF, 7))
    assert autoscale.window_quantile(0.9, snap, snap) is None
    assert autoscale.window_quantile(0.9, ((0.1, 0), (INF, 0)), None) is None


def _stats() -> types.EngineStats:
    return types.EngineStats(num_running=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=1,
                             num_preemptions_total=0, healthy=True)


def test_snapshots_of_the_servers_histograms():
    m = metrics.ServerMetrics(_stats)
    before = autoscale.histogram_buckets(m.time_to_first_token_s)
    assert before[-1] == (INF, 0) and [le for le, _ in before[:-1]] == list(metrics.LATENCY_BUCKETS_S)
    for v in [0.004] * 80 + [0.04] * 20:  # 80 in (2.5 ms, 5 ms], 20 in (25 ms, 50 ms]
        m.time_to_first_token_s.observe(v)
    after = autoscale.histogram_buckets(m.time_to_first_token_s)
    assert autoscale.window_quantile(0.9, after, before) == pytest.approx(0.025 + 0.025 * 10 / 20)
    m.finish(types.FinishReason.STOP)
    m.finish(types.FinishReason.LENGTH)
    assert autoscale.counter_total(m.requests_finished) == 2


def _status(active=1, warming=0, desired=None, running=0, waiting=0, scale=None, history=()) -> admin.AdminStatus:
    return admin.AdminStatus(
        phase=admin.Phase.SCALING if scale else admin.Phase.SERVING, healthy=True,
        devices=admin.DeviceCounts(desired=desired or active, active=active, warming=warming),
        parallelism=admin.Parallelism(dp=active, ep=active), requests=admin.RequestCounts(running=running,
                                                                                          waiting=waiting),
        current_scale=scale, last_scale=history[-1] if history else None, history=list(history))


EMPTY = ((0.1, 0), (INF, 0))


def _sample(at, finished, ttft=EMPTY, tpot=EMPTY, itl=EMPTY, queue_p90_s=0.0):
    return autoscale.Sample(at=at, ttft=ttft, tpot=tpot, itl=itl, finished=finished, queue_p90_s=queue_p90_s)


def test_the_window_diffs_against_the_snapshot_one_window_ago():
    w = autoscale.Window(5.0)
    assert w.add(_sample(0, 0)).at == 0
    for t in range(1, 5):
        assert w.add(_sample(t, t)).at == 0, "still filling: against the first"
    assert w.add(_sample(5, 5)).at == 0
    assert w.add(_sample(6, 6)).at == 1
    assert w.add(_sample(8.5, 8)).at == 3


def test_observation_rates_and_idleness():
    o = autoscale.observe(_sample(10, 12), _sample(5, 2), _status(active=2, warming=1, desired=3))
    assert o.requests_per_s == 2.0 and (o.active, o.warming, o.desired) == (2, 1, 3)
    idle = autoscale.observe(_sample(10, 2), _sample(5, 2), _status())
    assert idle.requests_per_s == 0 and idle.ttft_p90_s is None and idle.tpot_p90_s is None
    assert policy.raw_signal(idle, CFG)[0] == 0.0, "nothing arrived: idle, a signal of 0"
    busy = autoscale.observe(_sample(10, 2), _sample(5, 2), _status(running=3))
    assert busy.requests_per_s is None, "requests run but none ended: not idle, nothing known"
    assert busy.decoding == 3.0 and idle.decoding == 0.0


def test_time_per_output_token_comes_from_the_per_token_gaps_when_tokens_streamed():
    # 10 finished requests, all fast; 10 tokens streamed since, all slow: the batch grew.
    slow_tokens = ((0.1, 0), (1.0, 10), (INF, 10))
    fast_requests = ((0.1, 10), (1.0, 10), (INF, 10))
    zero = ((0.1, 0), (1.0, 0), (INF, 0))
    older = _sample(5, 0, tpot=zero, itl=zero)
    o = autoscale.observe(_sample(10, 10, tpot=fast_requests, itl=slow_tokens), older, _status(running=4))
    assert o.tpot_p90_s == pytest.approx(0.1 + 0.9 * 9 / 10), "the per-token gaps, not the finished requests"
    no_tokens = autoscale.observe(_sample(10, 10, tpot=fast_requests, itl=zero), older, _status())
    assert no_tokens.tpot_p90_s == pytest.approx(0.09), "no token streamed in the window: per-request TPOT"


def test_the_queue_now_is_the_queueing_signal():
    o = autoscale.observe(_sample(10, 10, queue_p90_s=2.5), _sample(5, 0), _status(waiting=7))
    assert o.queue_p90_s == 2.5
    cfg = policy.Config(min_devices=1, max_devices=2, ttft_p90_s=10, tpot_p90_s=10, queue_p90_s=1.0)
    assert policy.raw_signal(o, cfg) == (2.5, {"queue": 2.5})
    assert autoscale.observe(_sample(10, 10), _sample(5, 0), _status()).queue_p90_s is None, "nobody waits"


def test_the_server_measures_the_wait_of_requests_still_waiting():
    m = metrics.ServerMetrics(_stats)
    assert m.first_token_wait_p90_s() == 0.0
    now = time.perf_counter()
    for i in range(10):  # waited 0, 1, ..., 9 s so far
        m.waiting(f"r{i}", now - i)
    assert 8.0 <= m.first_token_wait_p90_s() < 8.5, "p90 by nearest rank: the 9th of 10"
    for i in range(5, 10):
        m.not_waiting(f"r{i}")
    m.not_waiting("r9")  # idempotent
    assert 4.0 <= m.first_token_wait_p90_s() < 4.5
    body = m.render()[0].decode()
    assert re.search(r"^elasticmoe_first_token_wait_p90_seconds 4\.\d+", body, re.M), body


# -- the loop, with a fake instance and a fake clock --------------------------------------------
CFG = policy.Config(min_devices=1, max_devices=2, ttft_p90_s=0.1, tpot_p90_s=0.1, scale_up_cooldown_s=2,
                    scale_down_stabilization_s=8)


class FakeInstance:
    """`status()` and `start_scale()` as `coordinator.Instance` has them; scales end on `finish()`."""

    def __init__(self, active: int = 1) -> None:
        self.active = active
        self.scale: admin.ScaleRecord | None = None
        self.history: list[admin.ScaleRecord] = []
        self.calls: list[tuple[int, str]] = []
        self.refuse: Exception | None = None

    def status(self) -> admin.AdminStatus:
        sc = self.scale
        return _status(self.active, warming=max(0, sc.to_devices - self.active) if sc else 0,
                       desired=sc.to_devices if sc else None, scale=sc, history=self.history)

    def start_scale(self, devices: int, reason: str = "manual", timeout_s: float = 300.0, scale_id: str = "") -> str:
        if self.refuse is not None:
            raise self.refuse
        assert self.scale is None
        self.calls.append((devices, reason))
        self.scale = admin.ScaleRecord(from_devices=self.active, to_devices=devices, reason=reason, scale_id=scale_id)
        return scale_id

    def finish(self, duration_ms: int, outcome: admin.Outcome = admin.Outcome.SUCCEEDED) -> None:
        rec = msgspec.structs.replace(self.scale, outcome=outcome, duration_ms=duration_ms)
        if outcome == admin.Outcome.SUCCEEDED:
            self.active = rec.to_devices
        self.history.append(rec)
        self.scale = None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _scaler(inst, cfg=CFG):
    clock, m = Clock(), metrics.ServerMetrics(_stats)
    return autoscale.Autoscaler(inst, m, cfg, interval_s=1, window_s=5, clock=clock), m, clock


def _burst(m, n=20, ttft_s=0.5):
    for _ in range(n):
        m.time_to_first_token_s.observe(ttft_s)
        m.finish(types.FinishReason.STOP)


def _info(caplog, fragment):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and fragment in r.getMessage()]


def test_burst_scales_up_learns_the_duration_and_scales_down_after_stabilization(caplog):
    caplog.set_level(logging.DEBUG, logger="elasticmoe_worker.server.autoscale")
    inst = FakeInstance()
    scaler, m, clock = _scaler(inst)
    clock.now = 1
    _burst(m)
    d = scaler.tick()
    assert (d.action, d.target) == ("up", 2) and inst.calls[0][0] == 2
    assert inst.calls[0][1].startswith("autoscaler: SLO signal") and "TTFT p90" in inst.calls[0][1]
    [line] = _info(caplog, "autoscaler decision: up")
    assert f"scale {inst.scale.scale_id}" in line and "1 -> 2 devices" in line
    clock.now = 2
    assert scaler.tick().action == "hold" and len(inst.calls) == 1, "a scale runs: nothing more"
    inst.finish(duration_ms=4200)
    clock.now = 3
    scaler.tick()
    assert _info(caplog, "scale 1 -> 2 took 4.200 s")

    downs = []
    for t in range(4, 40):
        clock.now = t
        d = scaler.tick()
        if d.action == "down":
            downs.append(t)
            inst.finish(duration_ms=1000)
    # the burst leaves the window at t=6; the survivors' signal must then stay low 8 s
    assert downs and downs[0] >= 6 + 8 and len(downs) == 1, downs
    assert inst.calls[-1][0] == 1 and inst.active == 1
    status = scaler.status()
    assert [h.action for h in status.history if h.action != "hold"] == ["up", "down"]
    up = next(h for h in status.history if h.action == "up")
    assert up.scale_id == inst.history[0].scale_id and up.values["ttftRatio"] > 1 and up.time.endswith("Z")
    assert status.action == "hold" and status.metrics_available and status.evaluations == 39
    body = admin.to_builtins(status)
    assert {"minDevices", "maxDevices", "metricsAvailable", "metricsReason", "history"} <= set(body)
    text = m.render()[0].decode()
    assert 'elasticmoe_autoscaler_decisions_total{action="up"} 1.0' in text
    assert 'elasticmoe_autoscaler_decisions_total{action="down"} 1.0' in text
    assert 'elasticmoe_autoscaler_decisions_total{action="hold"} 37.0' in text


def test_repeated_holds_are_logged_once_at_info(caplog):
    caplog.set_level(logging.DEBUG, logger="elasticmoe_worker.server.autoscale")
    scaler, _, clock = _scaler(FakeInstance())
    for t in range(1, 11):
        clock.now = t
        assert scaler.tick().action == "hold"
    holds = [r for r in caplog.records if "autoscaler decision: hold" in r.getMessage()]
    assert len(holds) == 10 and [r.levelno for r in holds] == [logging.INFO] + [logging.DEBUG] * 9
    assert "within the dead band" in holds[0].getMessage()
    assert len(scaler.status().history) == 1


def test_notable_holds_never_push_a_scale_decision_out_of_the_history():
    scaler, _, _ = _scaler(FakeInstance())

    def decision(action, reason):
        return policy.Decision(target=2, action=action, reason=reason, signal=1.0, raw_signal=1.0,
                               metrics_available=True, metrics_reason="ok")

    scaler._record(decision(policy.UP, "up"), "autoscaler-1", "")
    for letter in "abcdefghijklmnopqrstuvwxyz":  # each hold says something new: each is kept, the last ten
        scaler._record(decision(policy.HOLD, f"hold {letter}"), "", "")
    history = scaler.status().history
    assert [h.action for h in history] == ["up"] + ["hold"] * autoscale.HISTORY_LIMIT
    assert history[-1].reason == "hold z" and history[0].scale_id == "autoscaler-1"


def test_a_refused_scale_costs_no_cooldown_and_is_asked_again(caplog):
    caplog.set_level(logging.INFO, logger="elasticmoe_worker.server.autoscale")
    inst = FakeInstance()
    scaler, m, clock = _scaler(inst)
    inst.refuse = RuntimeError("instance unhealthy, not scaling")
    clock.now = 1
    _burst(m)
    assert scaler.tick().action == "up" and inst.calls == []
    assert _info(caplog, "not started: instance unhealthy")
    inst.refuse = None
    clock.now = 1.5  # within the 2 s cooldown: it would hold, had the refused scale counted
    _burst(m)
    assert scaler.tick().action == "up" and [c[0] for c in inst.calls] == [2]


def test_a_failed_scale_is_not_waited_for(caplog):
    cfg = policy.Config(min_devices=1, max_devices=3, ttft_p90_s=0.1, tpot_p90_s=0.1, scale_up_cooldown_s=2,
                        scale_down_stabilization_s=8, default_time_to_ready_s=600)
    inst = FakeInstance()
    scaler, m, clock = _scaler(inst, cfg)
    clock.now = 1
    _burst(m)
    assert scaler.tick().action == "up"
    inst.finish(duration_ms=3000, outcome=admin.Outcome.ABORTED)
    clock.now = 4
    _burst(m)
    d = scaler.tick()
    assert (d.action, d.target) == ("up", 2), d.reason  # not "waiting for the scale to 2 devices" for 600 s
    assert len(inst.calls) == 2


def test_a_manual_scale_is_the_new_starting_point(caplog):
    """POST /admin/scale while the autoscaler runs: no immediate undo; it is learned from, and
    a scale-down still waits for the stabilization window."""
    caplog.set_level(logging.INFO, logger="elasticmoe_worker.server.autoscale")
    inst = FakeInstance()
    scaler, _, clock = _scaler(inst)
    clock.now = 1
    assert scaler.tick().action == "hold"
    inst.start_scale(2, reason="manual", scale_id="cli-1")
    inst.calls.clear()
    inst.finish(duration_ms=5000)
    actions = []
    for t in range(2, 20):
        clock.now = t
        actions.append(scaler.tick().action)
        if actions[-1] == "down":
            inst.finish(duration_ms=1000)
    assert _info(caplog, "scale 1 -> 2 took 5.000 s")
    assert actions.index("down") + 2 >= 2 + 8, actions
    assert [c[0] for c in inst.calls] == [1]


# -- options -----------------------------------------------------------------------------------
def _args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["serve", *argv])


def test_defaults():
    config, interval_s, window_s = autoscale.config_from_args(_args("--devices", "1", "--autoscale"), 8)
    assert (config.min_devices, config.max_devices, config.ttft_p90_s, config.tpot_p90_s) == (1, 4, 2.0, 0.1)
    assert (config.scale_up_cooldown_s, config.scale_down_stabilization_s, interval_s, window_s) == (30, 300, 5, 30)
    assert autoscale.config_from_args(_args("--devices", "1", "--autoscale"), 2)[0].max_devices == 2
    assert (config.stabilization_ready_multiple, config.settle_s) == (10.0, 30.0)
    off, _, _ = autoscale.config_from_args(
        _args("--devices", "1", "--autoscale", "--stabilization-ready-multiple", "0"), 8)
    assert off.stabilization_ready_multiple == 0
    autoscale.check_arguments(_args())  # no autoscaling, nothing to say


def test_a_profile_gives_the_policy_its_decode_steps(tmp_path):
    from elasticmoe_worker.bench import profile as profile_mod

    prof = profile_mod.Profile(service=(
        profile_mod.Service(devices=1, decode=((1.0, 40.0), (4.0, 200.0)), prefill=((32.0, 900.0),)),
        profile_mod.Service(devices=2, decode=((1.0, 25.0), (4.0, 100.0)), prefill=((32.0, 900.0),))),
        measured={"cpuPerDevice": 0.3})
    path = tmp_path / "profile.json"
    profile_mod.save(prof, path)
    config, _, _ = autoscale.config_from_args(_args("--devices", "1", "--autoscale", "--autoscale-profile", str(path)), 8)
    assert config.decode_step_s == {1: ((1.0, 0.025), (4.0, 0.02)), 2: ((1.0, 0.04), (4.0, 0.04))}
    assert autoscale.config_from_args(_args("--devices", "1", "--autoscale"), 8)[0].decode_step_s == {}
    with pytest.raises(ValueError, match="--autoscale-profile .*missing.json: .*no such file"):
        autoscale.config_from_args(_args("--devices", "1", "--autoscale", "--autoscale-profile",
                                         str(tmp_path / "missing.json")), 8)
    with pytest.raises(ValueError, match="--autoscale-profile is an autoscaling option"):
        autoscale.config_from_args(_args("--devices", "1", "--autoscale-profile", str(path)), 8)


@pytest.mark.parametrize("argv, experts, message", [
    (["--autoscale"], 8, "--autoscale needs --devices N (a multi-device instance)"),
    (["--devices", "2", "--max-devices", "3"], 8, "--max-devices is an autoscaling option: add --autoscale"),
    (["--devices", "2", "--autoscale", "--min-devices", "3", "--max-devices", "2"], 8,
     "--min-devices 3 is above --max-devices 2"),
    (["--devices", "3", "--autoscale", "--min-devices", "3"], 2, "--max-devices 2; expected min <= max"),
    (["--devices", "5", "--autoscale"], 8, "--devices 5 is outside [--min-devices 1, --max-devices 4]"),
    (["--devices", "1", "--autoscale", "--max-devices", "9"], 8, "--max-devices 9: the model has 8 routed experts"),
    (["--devices", "2", "--stabilization-ready-multiple", "5"], 8,
     "--stabilization-ready-multiple is an autoscaling option: add --autoscale"),
    (["--devices", "1", "--autoscale", "--autoscale-window-s", "2"], 8,
     "--autoscale-window-s 2 is shorter than --autoscale-interval-s 5"),
])
def test_bad_options_are_named(argv, experts, message):
    with pytest.raises(ValueError) as err:
        autoscale.config_from_args(_args(*argv), experts)
    assert message in str(err.value)


@pytest.mark.parametrize("argv, message", [
    (["--slo-ttft-p90-ms", "0"], "--slo-ttft-p90-ms: got 0, expected a number > 0"),
    (["--scale-up-cooldown-s", "-1"], "--scale-up-cooldown-s: got -1, expected a number >= 0"),
    (["--min-devices", "x"], "--min-devices: got 'x', expected an integer >= 1"),
])
def test_bad_values_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        _args(*argv)
    assert message in capsys.readouterr().err


def test_the_command_names_the_option_at_once():
    started = time.monotonic()
    out = subprocess.run(testprocs.elasticmoe("serve", "--autoscale"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--autoscale needs --devices N" in out.stderr
    assert time.monotonic() - started < 30, "checked before the model is loaded or generated"


def test_old_status_bodies_still_decode():
    old = admin.AdminStatus(phase=admin.Phase.SERVING, healthy=True, devices=admin.DeviceCounts(desired=1, active=1),
                            parallelism=admin.Parallelism(dp=1, ep=1))
    body = admin.encode(old)
    assert b"autoscaler" in body and admin.decode_status(body).autoscaler is None
    without = msgspec.json.encode({k: v for k, v in msgspec.json.decode(body).items() if k != "autoscaler"})
    assert admin.decode_status(without) == old


def test_serve_sh_adds_devices_and_autoscale_unless_given():
    """The README's main command autoscales; the user's own --devices/--autoscale win."""
    def command(*argv):
        out = subprocess.run(["bash", "scripts/serve.sh", *argv, "--help"], capture_output=True, text=True,
                             timeout=300, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        return re.search(r"starting: elasticmoe serve (.*)", out.stderr).group(1)

    assert command() == "--devices 1 --autoscale --help"
    assert command("--min-devices", "2") == "--devices 2 --autoscale --min-devices 2 --help"
    assert command("--devices", "3") == "--devices 3 --help"


# -- the real command ------------------------------------------------------------------------------
TOKEN = "autoscale-test"


class _Load:
    """`clients` closed-loop clients on a thread until `stop()`; counts what did not succeed."""

    def __init__(self, base: str, model: str, clients: int = 8) -> None:
        self.ok, self.failed = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run(base, model, clients)), daemon=True)
        self._thread.start()

    async def _run(self, base, model, clients):
        async with httpx.AsyncClient(base_url=base, timeout=120) as c:
            async def client(i):
                while not self._stop.is_set():
                    try:
                        r = await c.post("/v1/completions", json={"model": model, "prompt": f"story {i}",
                                                                  "max_tokens": 16, "ignore_eos": True})
                        if r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16:
                            self.ok += 1
                        else:
                            self.failed.append(f"{r.status_code} {r.text[:200]}")
                    except httpx.HTTPError as exc:
                        self.failed.append(repr(exc))

            await asyncio.gather(*(client(i) for i in range(clients)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=180)
        assert not self._thread.is_alive()


def _until(what, pred, timeout_s, proc):
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"the server exited ({proc.returncode}) while waiting for {what}"
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.5)


@pytest.fixture
def autoscaled_server(tiny_models, tmp_path):
    port = testprocs.free_port()
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "ELASTICMOE_ADMIN_TOKEN": TOKEN, "ELASTICMOE_CACHE_DIR": str(tmp_path / "cache")}
    argv = testprocs.elasticmoe(
        "serve", "--model", str(tiny_models["qwen3_moe"]), "--port", str(port), "--devices", "1", "--autoscale",
        "--max-devices", "2", "--slo-ttft-p90-ms", "5", "--autoscale-interval-s", "1", "--autoscale-window-s", "5",
        "--scale-up-cooldown-s", "2", "--scale-down-stabilization-s", "8", "--kv-cache-mb", "32")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=testprocs.die_with_test)
    base = f"http://127.0.0.1:{port}"
    try:
        _until("the server", lambda: testprocs.healthy(base), 120, proc)
        yield proc, base, log_path
    finally:
        testprocs.interrupt(proc)


def test_serve_autoscale_scales_up_under_a_burst_and_back_down_failing_nothing(autoscaled_server):
    proc, base, log_path = autoscaled_server
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=base, headers=auth, timeout=30) as c:
        def status():
            return c.get("/admin/status").json()

        model = c.get("/v1/models").json()["data"][0]["id"]
        assert status()["autoscaler"]["minDevices"] == 1 and status()["devices"]["active"] == 1
        load = _Load(base, model)
        try:
            _until("a scale to 2 devices", lambda: status()["devices"]["active"] == 2, 90, proc)
            time.sleep(2)  # more load on two devices, still at the maximum
        finally:
            load.stop()
        assert load.failed == [] and load.ok > 0, load.failed[:5]

        up = [line for line in log_path.read_text().splitlines() if "autoscaler decision: up" in line]
        assert up and "SLO signal" in up[0] and "TTFT p90" in up[0] and "1 -> 2 devices" in up[0], up

        final = _until("the scale back to 1 device", lambda: (s := status())["devices"]["active"] == 1
                       and s["currentScale"] is None and s, 90, proc)
        scales = [(r["from"], r["to"], r["outcome"]) for r in final["history"]]
        assert scales == [(1, 2, "Succeeded"), (2, 1, "Succeeded")], scales
        assert all(r["reason"].startswith("autoscaler: ") for r in final["history"])
        decisions = final["autoscaler"]["history"]
        up_d = next(d for d in decisions if d["action"] == "up")
        down_d = next(d for d in decisions if d["action"] == "down")
        assert up_d["scaleId"] == final["history"][0]["scaleId"] and up_d["values"]["ttftRatio"] > 1
        assert down_d["scaleId"] == final["history"][1]["scaleId"] and "survivors" in down_d["reason"]
        assert final["autoscaler"]["metricsAvailable"] is True

        # (no request now: its TTFT would break the 5 ms SLO and rightly scale up again)
        assert c.get("/health").status_code == 200
        text = c.get("/metrics").text
        assert 'elasticmoe_autoscaler_decisions_total{action="up"} 1.0' in text
        assert 'elasticmoe_autoscaler_decisions_total{action="down"} 1.0' in text
    log = log_path.read_text()
    down = r"INFO elasticmoe_worker\.server\.autoscale: autoscaler decision: down.*survivors"
    assert re.search(down, log), log[-3000:]

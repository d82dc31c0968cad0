"""`elasticmoe simulate` and its parts: the trace generator and reader, the profile, the
controllers and the instance model, on literal inputs; the command end to end without torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from elasticmoe_operator import policy
from elasticmoe_worker.bench import controllers, sim, workload
from elasticmoe_worker.bench import profile as pm

# One device: decode step 25 ms at batch 1 (40 tok/s) .. 80 ms at 64; prefill 400-2500 tok/s.
PROFILE = pm.Profile(
    service=(pm.Service(1, ((1, 40.0), (4, 140.0), (16, 400.0), (64, 800.0)),
                        ((16, 400.0), (128, 1500.0), (512, 2500.0))),),
    scale=(pm.Step(1, 2, 8.0), pm.Step(1, 3, 10.0), pm.Step(2, 1, 1.0)), start=((1, 20.0), (2, 24.0)))


def trace_of(rows) -> workload.Trace:
    a = np.array(rows, dtype=float).reshape(-1, 3)
    return workload.Trace(a[:, 0], a[:, 1].astype(np.int32), a[:, 2].astype(np.int32))


def setup(**kw) -> sim.Setup:
    return sim.Setup(**{"initial_devices": 1, "ttft_slo_s": 1.0, "tpot_slo_s": 0.1, "tick_s": 0.01, **kw})


# -- traces --------------------------------------------------------------------------------------
def test_the_bursty_trace_is_seeded_ramps_and_has_heavy_tails():
    spec = workload.BurstySpec(duration_s=600, rate_per_s=20, seed=3)
    a, b = workload.bursty(spec), workload.bursty(spec)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.prompt_tokens, b.prompt_tokens)
    assert not np.array_equal(a.arrival_s[:50], workload.bursty(workload.BurstySpec(600, 20, seed=4)).arrival_s[:50])
    counts = np.histogram(a.arrival_s, bins=6, range=(0, 600))[0]
    assert counts[2] + counts[3] > 2 * (counts[0] + counts[5]), f"no ramp up and down: {counts}"
    assert np.percentile(a.prompt_tokens, 99) > 5 * np.median(a.prompt_tokens), "prompt lengths are not heavy-tailed"
    assert a.prompt_tokens.max() <= spec.prompt_max and a.output_tokens.min() >= 1


def test_bursts_raise_the_peak_over_the_smooth_ramp():
    smooth = workload.bursty(workload.BurstySpec(600, 20, burst_fraction=0.0, seed=1))
    bursty = workload.bursty(workload.BurstySpec(600, 20, clients=4, burst_factor=8, burst_fraction=0.2, seed=1))
    peak = lambda t: np.histogram(t.arrival_s, bins=60, range=(0, 600))[0].max()  # noqa: E731
    assert peak(bursty) > 1.5 * peak(smooth)


def test_an_azure_trace_csv_is_replayed_from_its_first_row(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n"
                    "2023-11-16 18:15:50.9951690,396,109\n"
                    "2023-11-16 18:15:48.0000000,0,12\n"
                    "2023-11-16 18:15:47.1805900,879,0\n"
                    "2023-11-16 18:15:47.6805900,120,7\n")
    t = workload.read_azure_csv(path, time_scale=2.0)
    assert len(t) == 3, "rows without prompt or output tokens are dropped"
    assert t.arrival_s == pytest.approx([0.0, 0.5, 2.1572895])
    assert list(t.prompt_tokens) == [374, 120, 396] and list(t.output_tokens) == [44, 7, 109]


def test_a_csv_in_another_format_is_refused_with_the_columns(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("time,prompt\n0,3\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['TIMESTAMP', 'ContextTokens', 'GeneratedTokens'\]"):
        workload.read_azure_csv(path)


# -- the profile ---------------------------------------------------------------------------------
def test_the_profile_round_trips_and_interpolates():
    again = pm.Profile.from_json(json.loads(json.dumps(PROFILE.to_json())))
    assert again == PROFILE
    assert PROFILE.decode_step_s(1, 1) == pytest.approx(1 / 40)
    assert PROFILE.decode_step_s(7, 64) == pytest.approx(64 / 800), "more devices than measured: the largest's rates"
    assert PROFILE.decode_step_s(1, 0) == PROFILE.decode_step_s(1, 1), "an idle step costs a step of one"
    assert PROFILE.prefill_s(1, 512) == pytest.approx(512 / 2500)
    assert PROFILE.scale_s(1, 2) == 8.0 and PROFILE.scale_s(2, 1) == 1.0
    assert PROFILE.scale_s(2, 5) == pytest.approx(12.0), "a line through the measured +1 and +2 steps"
    assert PROFILE.start_s(2) == 24.0


def test_a_profile_of_another_format_is_refused():
    with pytest.raises(ValueError, match="expected 'elasticmoe-profile/v1'"):
        pm.Profile.from_json({"format": "something-else"})
    with pytest.raises(ValueError, match="expected positive and increasing"):
        pm.Service(1, ((4, 10.0), (1, 5.0)), ((16, 1.0),))


# -- the instance model --------------------------------------------------------------------------
def test_a_lone_request_takes_its_prefill_then_one_decode_step_per_token():
    r = sim.simulate(trace_of([1.0, 128, 11]), PROFILE, controllers.Static(1), setup())
    assert r.ttft_s[0] == pytest.approx(128 / 1500, rel=0.15)
    assert r.tpot_s[0] == pytest.approx(1 / 40, rel=0.05), "batch 1: 40 tokens/s"
    assert r.summary()["slo_attainment"] == 1.0 and r.summary()["failed"] == 0


def test_batching_slows_each_token_and_more_devices_speed_it_up():
    rows = [[1.0 + 0.001 * i, 16, 200] for i in range(64)]
    one = sim.simulate(trace_of(rows), PROFILE, controllers.Static(1), setup())
    four = sim.simulate(trace_of(rows), PROFILE, controllers.Static(4), setup(initial_devices=4))
    assert np.median(one.tpot_s) == pytest.approx(64 / 800, rel=0.1), "64 on one device: 80 ms steps"
    assert np.median(four.tpot_s) == pytest.approx(16 / 400, rel=0.1), "16 per device: 40 ms steps"


def test_context_slows_each_decode_step_by_the_profiles_cost_per_context_token():
    # 1 ms per step per 1000 context tokens on the device
    prof = pm.Profile(service=(pm.Service(1, PROFILE.service[0].decode, PROFILE.service[0].prefill, 1e-6),))
    assert prof.decode_step_s(1, 4) + prof.context_step_s(1) * 2000 == pytest.approx(4 / 140 + 0.002)
    assert pm.Profile.from_json(json.loads(json.dumps(prof.to_json()))) == prof
    short = sim.simulate(trace_of([1.0, 8, 101]), prof, controllers.Static(1), setup())
    long = sim.simulate(trace_of([1.0, 2000, 101]), prof, controllers.Static(1), setup())
    # a lone sequence's step: 25 ms + 1 us x (prompt + tokens so far, 50 on average)
    assert short.tpot_s[0] == pytest.approx(0.025 + 1e-6 * 58, rel=0.05)
    assert long.tpot_s[0] == pytest.approx(0.025 + 1e-6 * 2050, rel=0.05)
    # four sequences on the device: each step reads all four contexts
    rows = [[1.0 + 0.001 * i, 1000, 101] for i in range(4)]
    four = sim.simulate(trace_of(rows), prof, controllers.Static(1), setup())
    free = sim.simulate(trace_of(rows), PROFILE, controllers.Static(1), setup())
    assert np.median(four.tpot_s - free.tpot_s) == pytest.approx(1e-6 * 4 * 1050, rel=0.15)
    from elasticmoe_worker.bench import simulate as simulate_cmd

    assert simulate_cmd.scaled_profile(prof, 2.0).context_step_s(1) == pytest.approx(5e-7), \
        "devices twice as fast read their context in half the time"
    with pytest.raises(ValueError, match="contextStepS"):
        pm.Service(1, PROFILE.service[0].decode, PROFILE.service[0].prefill, -1.0)


def test_a_full_queue_refuses_requests_and_they_miss_the_slo():
    prof = pm.Profile(service=PROFILE.service, max_num_seqs=2, max_waiting=3)
    r = sim.simulate(trace_of([[1.0, 16, 100]] * 10), prof, controllers.Static(1), setup())
    s = r.summary()
    assert s["failed"] == 5 and s["unfinished"] == 0, "2 running + 3 waiting are taken, the rest refused"
    assert s["slo_attainment"] <= 0.5


def test_every_request_finishes_once_and_latency_grows_with_load():
    light = workload.bursty(workload.BurstySpec(120, 2, seed=5))
    heavy = workload.bursty(workload.BurstySpec(120, 12, seed=5))
    a = sim.simulate(light, PROFILE, controllers.Static(1), setup(tick_s=None))
    b = sim.simulate(heavy, PROFILE, controllers.Static(1), setup(tick_s=None))
    for r in (a, b):
        assert r.summary()["unfinished"] == 0 and not np.isnan(r.ttft_s).any()
        assert (r.tpot_s >= 1 / 40 * 0.99).all(), "no token faster than a step of one"
    assert b.summary()["ttft_ms"]["p90"] > a.summary()["ttft_ms"]["p90"]
    assert b.summary()["tpot_ms"]["p90"] > a.summary()["tpot_ms"]["p90"]


# NOTE: targets well above the idle latencies (25 ms steps, ~0.1 s prefills): the survivors'
# projection (x N/(N-1)) must be able to fall under 0.6 once the burst is over.
CFG = policy.Config(min_devices=1, max_devices=4, ttft_p90_s=1.0, tpot_p90_s=0.1, scale_up_cooldown_s=10,
                    scale_down_stabilization_s=30)
BURST = workload.bursty(workload.BurstySpec(300, 24, low=0.02, burst_fraction=0.0, seed=2))


def test_the_slo_policy_scales_up_in_the_burst_and_back_down_after_it():
    r = sim.simulate(BURST, PROFILE, controllers.Slo(CFG), setup(tick_s=None))
    ups = [e for e in r.events if e.to_devices > e.from_devices]
    downs = [e for e in r.events if e.to_devices < e.from_devices]
    assert ups and downs and ups[0].at_s < downs[0].at_s, [(e.at_s, e.from_devices, e.to_devices) for e in r.events]
    assert r.billed.max() > 1 and r.billed[-1] < r.billed.max()
    for e in ups:  # capacity only after the profile's time-to-ready, billed from the request
        tick = int(e.at_s / r.tick_s) + 1
        assert r.active[tick] == e.from_devices and r.billed[tick] == e.to_devices
        assert e.ready_s - e.at_s == PROFILE.scale_s(e.from_devices, e.to_devices)
    static_max = sim.simulate(BURST, PROFILE, controllers.Static(4), setup(initial_devices=4, tick_s=None)).summary()
    static_min = sim.simulate(BURST, PROFILE, controllers.Static(1), setup(tick_s=None)).summary()
    s = r.summary()
    assert static_min["slo_attainment"] < s["slo_attainment"] <= static_max["slo_attainment"]
    assert s["device_seconds"] < static_max["device_seconds"]


def test_replicas_arrive_whole_after_a_cold_start():
    r = sim.simulate(BURST, PROFILE, controllers.Slo(CFG),
                     setup(tick_s=None, mode=sim.REPLICA, replica_devices=2, initial_devices=2))
    assert set(np.unique(r.billed)) <= {2, 4}, "whole replicas of 2"
    up = next(e for e in r.events if e.to_devices > e.from_devices)
    assert up.ready_s - up.at_s == PROFILE.start_s(2)
    assert r.summary()["time_to_capacity_s"] == PROFILE.start_s(2)


# -- controllers ---------------------------------------------------------------------------------
def obs(active, desired=None) -> policy.Observation:
    return policy.Observation(at=0, active=active, desired=desired)


def test_hpa_is_proportional_with_a_tolerance_and_a_step_limit():
    hpa = controllers.Hpa(controllers.HpaConfig(1, 20, target_inflight_per_device=4, sync_period_s=15))
    assert hpa.decide(controllers.Signals(obs(2), inflight=8.6), 0)[0] == 2, "within 10 %"
    assert hpa.decide(controllers.Signals(obs(2), inflight=40), 5)[0] == 2, "between syncs"
    assert hpa.decide(controllers.Signals(obs(2), inflight=80), 15)[0] == 6, "at most +4 (or +100 %) per period"


def test_hpa_scales_down_to_the_highest_recommendation_of_its_window():
    hpa = controllers.Hpa(controllers.HpaConfig(1, 20, target_inflight_per_device=4, sync_period_s=15,
                                                stabilization_s=60))
    assert hpa.decide(controllers.Signals(obs(4), inflight=16), 0)[0] == 4
    assert hpa.decide(controllers.Signals(obs(4), inflight=4), 15)[0] == 4, "the recommendation of 4 at t=0 holds"
    assert hpa.decide(controllers.Signals(obs(4), inflight=4), 30)[0] == 4
    assert hpa.decide(controllers.Signals(obs(4), inflight=4), 60)[0] == 1, "t=0 left the window"


# -- the command ---------------------------------------------------------------------------------
def test_simulate_writes_json_and_png_compares_devices_and_replicas_and_loads_no_torch(tmp_path):
    prof = tmp_path / "profile.json"
    pm.save(PROFILE, prof)
    code = ("import sys\nfrom elasticmoe_worker import cli\nrc = cli.main(sys.argv[1:])\n"
            "assert rc == 0, rc\nassert 'torch' not in sys.modules, 'simulate loaded torch'\n")
    out = subprocess.run([sys.executable, "-c", code, "simulate", "--profile", str(prof), "--duration-s", "120",
                          "--rate", "8", "--slo-ttft-p90-ms", "1000", "--slo-tpot-p90-ms", "50",
                          "--scale-down-stabilization-s", "30", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "simulate.json").read_text())
    names = [r["summary"]["name"] for r in report["runs"]]
    assert names == ["slo", "static-min", "static-max", "hpa", "slo-replica"]
    for r in report["runs"]:
        s = r["summary"]
        assert 0 <= s["slo_attainment"] <= 1 and s["device_seconds"] > 0 and s["requests"] == report["trace"]["requests"]
    assert set(report["devices_vs_replica"]) >= {"time_to_capacity_s", "device_seconds"}
    assert len(report["series"]["slo"]["devices"]) == 120
    assert (tmp_path / "simulate.png").stat().st_size > 10_000
    assert "SLO attainment" in out.stdout and "wall time" in out.stdout


def test_target_peak_devices_sizes_the_rate(tmp_path):
    prof = tmp_path / "profile.json"
    pm.save(PROFILE, prof)
    from elasticmoe_worker import cli

    args = cli.build_parser().parse_args(["simulate", "--profile", str(prof), "--target-peak-devices", "40",
                                          "--max-devices", "60", "--policies", "slo", "--duration-s", "600",
                                          "--slo-tpot-p90-ms", "50", "--step", "8", "--scale-up-cooldown-s", "10",
                                          "--out-dir", str(tmp_path)])
    assert args.func(args) == 0
    s = json.loads((tmp_path / "simulate.json").read_text())["runs"][0]["summary"]
    assert 20 <= s["max_devices"] <= 60, s
    assert math.isclose(s["slo_attainment"], s["slo_attainment"])


@pytest.mark.parametrize("span", [(90, 130), (20, 60)], ids=["across-the-wrap", "within-the-ring"])
def test_the_calendar_ring_adds_like_add_at(span):
    rng = np.random.default_rng(5)
    buckets = rng.integers(*span, size=500)  # a ring of 100: (90, 130) spans its end
    weights = rng.random(500)
    for w in (None, weights):
        ring, ref = np.zeros(100), np.zeros(100)
        sim._add_to_rings(buckets, ((ring, w),))
        np.add.at(ref, buckets % 100, 1 if w is None else w)
        np.testing.assert_allclose(ring, ref)
    counts = np.zeros(100, dtype=np.int64)
    sim._add_to_rings(buckets, ((counts, None),))
    assert counts.sum() == 500 and counts.dtype == np.int64


def test_the_curve_index_finds_what_searchsorted_finds():
    rng = np.random.default_rng(6)
    # steep stretches (many cells per point), flat ones (more points in a cell than the index
    # steps through), repeated points, and a long plateau
    rises = np.concatenate([rng.uniform(0, 3, 400), np.zeros(50), rng.uniform(0, 0.01, 300), [0.0] * 5,
                            rng.uniform(5, 40, 100)])
    curve = np.concatenate([[0.0], np.cumsum(rises)])
    values = np.concatenate([rng.uniform(0, curve[-1] * 1.1, 20_000), curve, curve[::7] + 1e-12,
                             np.arange(int(curve[-1]) + 3, dtype=float), [0.0, curve[-1], curve[-1] * 3]])
    rng.shuffle(values)
    found = sim._Index(curve).search(values)
    np.testing.assert_array_equal(found, np.searchsorted(curve, values, side="left"))

"""`elasticmoe bench autoscale` and `elasticmoe bench profile`: their checks and arithmetic fast,
the commands end to end as `slow` (they start four servers / scale an instance: minutes)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import testprocs
from elasticmoe_worker import cli
from elasticmoe_worker.bench import autoscale_bench
from elasticmoe_worker.bench import profile as profile_mod


def test_windows_scale_with_the_run_and_keep_their_floors():
    args = cli.build_parser().parse_args(["bench", "autoscale", "--duration-s", "240"])
    w = autoscale_bench.windows(args)
    assert w["factor"] == pytest.approx(0.2)
    assert (w["hpa_sync_period_s"], w["hpa_stabilization_s"]) == (3.0, 60.0), "the HPA's 15 s and 300 s, x0.2"
    assert (w["scale_up_cooldown_s"], w["scale_down_stabilization_s"]) == (6.0, 60.0)
    assert (w["interval_s"], w["window_s"]) == (1.0, 6.0)
    short = autoscale_bench.windows(cli.build_parser().parse_args(["bench", "autoscale", "--duration-s", "30"]))
    assert (short["interval_s"], short["window_s"]) == (1.0, 5.0), "at least 1 s and 5 s"


def test_in_flight_requests_are_read_from_the_servers_gauges():
    text = ("# HELP elasticmoe_num_requests_running x\n# TYPE elasticmoe_num_requests_running gauge\n"
            "elasticmoe_num_requests_running 5.0\nelasticmoe_num_requests_waiting 2.0\n"
            "elasticmoe_num_requests_running_total 99.0\n")
    assert autoscale_bench._gauges(text) == 7.0


def test_a_quota_that_does_not_fit_the_cores_is_refused():
    out = subprocess.run(testprocs.elasticmoe("bench", "autoscale", "--cpu-per-device", "1.5", "--max-devices", "3"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--cpu-per-device 1.5 x --max-devices 3 = 4.5 cores, more than this machine's" in out.stderr


@pytest.mark.slow
def test_bench_autoscale_quick_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "elasticmoe_worker.cli", "--log-level", "warning", "bench", "autoscale",
                          "--quick", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "autoscale.json").read_text())
    runs = {name: r["summary"] for name, r in report["runs"].items()}
    assert set(runs) == {"slo", "static-min", "static-max", "hpa"}
    n = report["trace"]["requests"]
    for s in runs.values():
        assert s["requests"] == n and 0 <= s["slo_attainment"] <= 1 and s["device_seconds"] > 0
    assert runs["static-max"]["device_seconds"] == pytest.approx(2 * runs["static-min"]["device_seconds"], rel=0.1)
    assert runs["static-max"]["failed"] == 0
    assert report["cpu_per_device"] > 0 and f"{report['cpu_per_device']:g} cores per device" in out.stdout
    assert report["target"] is not None and "target: attainment" in out.stdout
    assert (tmp_path / "autoscale.png").stat().st_size > 10_000


@pytest.mark.slow
def test_bench_profile_quick_writes_a_profile_simulate_reads(tmp_path):
    path = tmp_path / "profile.json"
    out = subprocess.run([sys.executable, "-m", "elasticmoe_worker.cli", "--log-level", "warning", "bench", "profile",
                          "--quick", "--cpu-per-device", "0.5", "--out", str(path)],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    prof = profile_mod.load(path)
    assert [s.devices for s in prof.service] == [1, 2]
    assert {(s.from_devices, s.to_devices) for s in prof.scale} == {(1, 2), (2, 1)}
    assert prof.measured["cpuPerDevice"] == 0.5 and prof.start[0][0] == 1
    sim = subprocess.run([sys.executable, "-m", "elasticmoe_worker.cli", "simulate", "--profile", str(path),
                          "--duration-s", "60", "--max-devices", "2", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert sim.returncode == 0, sim.stderr[-3000:]


def test_device_seconds_integrate_the_devices_held_until_the_end_only():
    from elasticmoe_worker.bench import report

    t, held = [0.0, 10.0, 50.0], [1.0, 3.0, 2.0]
    assert report.device_seconds(np.array(t), np.array(held), 40.0) == 100.0, "10 x 1 + 30 x 3, nothing after 40 s"
    assert report.device_seconds(np.array(t), np.array(held), 60.0) == 10 + 120 + 20


def _result(att_slo, ds_slo, att_max, tpot_max_ms=(100.0, 300.0), load=1.0):
    """The parts of an autoscale.json that --combine reads: two policies, a 2-bin series."""
    def run(att, ds):
        return {"summary": {"slo_attainment": att, "device_seconds": ds, "failed": 0, "scale_events": 2,
                            "ttft_ms": {"p90": 200.0}, "tpot_ms": {"p90": 100.0}}}
    return {"trace": {"requests": 100, "duration_s": 100.0}, "cpu_per_device": 0.5, "load_average": [load, 0, 0],
            "windows": {}, "config": {"min_devices": 1, "max_devices": 4, "slo_ttft_p90_ms": 1000.0,
                                      "slo_tpot_p90_ms": 250.0},
            "runs": {"slo": run(att_slo, ds_slo), "static-max": run(att_max, 400.0)},
            "series": {"static-max": {"t_s": [25.0, 75.0], "ttft_p90_ms": [100.0, None],
                                      "tpot_p90_ms": list(tpot_max_ms)}}}


def test_repeats_combine_into_the_ratio_of_medians_and_an_oracle_estimate(tmp_path):
    from elasticmoe_worker.bench import autoscale_summary

    paths = []
    for k, (att, ds) in enumerate([(0.90, 200.0), (0.99, 260.0), (0.95, 300.0)]):
        paths.append(tmp_path / f"r{k}.json")
        paths[-1].write_text(json.dumps(_result(att, ds, att_max=1.0)))
    s = autoscale_summary.combine(paths)
    assert s["policies"]["slo"]["device_seconds"] == {"median": 260.0, "min": 200.0, "max": 300.0,
                                                      "values": [200.0, 260.0, 300.0]}
    t = s["target"]
    assert t["attainment_over_static_max"] == 0.95 and t["device_seconds_over_static_max"] == 0.65 and t["met"]
    assert t["per_repeat"][0] == [0.9, 0.5]
    # oracle: bin 1 needs ceil(0.4 x 4) = 2 devices, bin 2 ceil(1.2 x 4) = 5 -> the maximum 4; 50 s each
    assert s["oracle_device_seconds"] == [300.0] * 3 and t["oracle_device_seconds_over_static_max"] == 0.75
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**_result(0.9, 200.0, 1.0), "cpu_per_device": 0.25}))
    with pytest.raises(ValueError, match="another trace or CPU quota"):
        autoscale_summary.combine([paths[0], other])


def test_the_simulator_reads_the_slo_policy_from_the_flags_the_measured_run_gets():
    args = cli.build_parser().parse_args(["bench", "autoscale", "--duration-s", "240", "--min-devices", "1",
                                          "--max-devices", "3", "--slo-ttft-p90-ms", "1500", "--slo-tpot-p90-ms",
                                          "250"])
    win = autoscale_bench.windows(args)
    flags = autoscale_bench.slo_flags(args, win)
    cfg = autoscale_bench.slo_config(args, win, num_experts=16)
    assert "--autoscale" in flags and flags[flags.index("--max-devices") + 1] == "3"
    assert (cfg.min_devices, cfg.max_devices, cfg.ttft_p90_s, cfg.tpot_p90_s) == (1, 3, 1.5, 0.25)
    assert cfg.queue_p90_s == 1.0, "serve's default queue target, which the simulator lacked"
    assert (cfg.scale_up_cooldown_s, cfg.scale_down_stabilization_s) == (win["scale_up_cooldown_s"],
                                                                          win["scale_down_stabilization_s"])


def test_the_simulator_is_validated_against_a_measured_run(tiny_models, tmp_path):
    """`_validate` replays the measured run's trace through the simulator with the same policies
    (it was never exercised: only a run with a profile at hand reaches it)."""
    from elasticmoe_worker.bench import workload

    prof = profile_mod.Profile(service=(profile_mod.Service(1, ((1, 40.0), (16, 400.0)), ((16, 400.0), (512, 2500.0))),
                                        profile_mod.Service(2, ((1, 70.0), (16, 700.0)), ((16, 700.0), (512, 4500.0)))),
                               scale=(profile_mod.Step(1, 2, 5.0), profile_mod.Step(2, 1, 1.0)),
                               start=((1, 10.0), (2, 12.0)))
    profile_mod.save(prof, tmp_path / "profile.json")
    args = cli.build_parser().parse_args(["bench", "autoscale", "--duration-s", "60", "--min-devices", "1",
                                          "--max-devices", "2", "--profile", str(tmp_path / "profile.json")])
    trace = workload.Trace(np.arange(0, 60, 0.5), np.full(120, 32, dtype=np.int32), np.full(120, 16, dtype=np.int32))
    measured = {"ttft_ms": {"p90": 500.0}, "device_seconds": 90.0, "slo_attainment": 0.9}
    summaries = {name: measured for name in ("slo", "static-min", "static-max", "hpa")}
    out = autoscale_bench._validate(args, trace, summaries, autoscale_bench.windows(args), tiny_models["qwen3_moe"])
    assert set(out["runs"]) == set(summaries)
    for v in out["runs"].values():
        assert v["device_seconds"]["measured"] == 90.0 and v["device_seconds"]["simulated"] > 0
    assert out["runs"]["static-max"]["device_seconds"]["simulated"] == pytest.approx(120, rel=0.05), "2 devices x 60 s"

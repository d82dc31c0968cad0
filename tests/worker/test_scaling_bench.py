"""`elasticmoe bench scaling`: the summary's arithmetic (medians, ratios of medians, the floor,
the targets) on made-up runs, and `--quick` end to end (slow: four instances started and
scaled; run with `bash scripts/test.sh -m slow`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from elasticmoe_worker.bench import process_meter, scaling_bench, scaling_report


def _run(strategy, a, b, t, failed=0, during=40, per_s=4.0, peak=1.05, repeat=0, in_window=80, **extra):
    return {"strategy": strategy, "from": a, "to": b, "repeat": repeat, "warm_workers": 1 if strategy == "elastic"
            else 0, "time_to_new_capacity_s": t, "failed": failed, "requests": 100, "completed_during": during,
            "completed_per_s": {"before": 4.0, "during": per_s, "after": 4.0},
            "throughput_window": {"seconds": 20.0, "completed": in_window, "completed_per_s": in_window / 20},
            "memory": {"peak_over_steady": peak, "peak_bytes": 2e9}, "phases": {"transfer": t / 2}, **extra}


def test_scales_are_parsed_or_refused_by_name():
    assert scaling_bench.parse_scales("1:2, 4:2") == [(1, 2), (4, 2)]
    for bad in ("1", "2:2", "0:1", "a:b", ""):
        with pytest.raises(ValueError, match="--scales"):
            scaling_bench.parse_scales(bad)


def test_summary_takes_the_ratio_of_medians_and_judges_every_target():
    runs = []
    for r, (el, cold) in enumerate([(2.0, 30.0), (4.0, 20.0), (3.0, 60.0)]):
        runs.append(_run("elastic", 1, 2, el, repeat=r, in_window=(60, 20, 40)[r]))
        runs.append(_run("cold", 1, 2, cold, failed=5, during=0, per_s=0.0, peak=1.0, repeat=r, in_window=(10, 30, 5)[r]))
    floors = [{"from": 1, "to": 2, "floor_s": f, "bytes": 1e9, "idle_bytes_per_s": 1e9, "decode_step_s": 0.1,
               "transfer_bytes_per_s": 5e8} for f in (1.0, 1.5, 2.0)]
    steps = [{"added": 1, "seconds": s} for s in (2.0, 2.0, 3.0)] + [{"added": 4, "seconds": s} for s in (4.0, 5.0)]
    s = scaling_report.summarise_repeats(runs, floors, steps)
    sc = s["scales"]["1:2"]
    assert sc["strategies"]["elastic"]["time_to_new_capacity_s"] == {"median": 3.0, "spread": [2.0, 4.0]}
    assert sc["cold_over_elastic"] == 10.0, "median 30 / median 3, not the median of 15, 5, 20"
    assert sc["elastic_over_floor"] == 2.0 and sc["transfer_over_idle"] == 0.5
    assert s["steps_4_over_1"] == 2.25
    # throughput over the same 20 s window for both: median 40 / median 10 completions
    assert sc["throughput_during_elastic_over_cold"] == 4.0
    assert sc["strategies"]["elastic"]["throughput_window"]["completed"] == {"median": 40, "min": 20}
    verdicts = {t["target"]: t["met"] for t in scaling_report.targets(s)}
    assert verdicts["1:2: elastic ÷ physical floor ≤ 3×"] is True
    assert verdicts["1:2: cold restart ÷ elastic ≥ 10×"] is True
    assert verdicts["1:2: elastic failed requests = 0"] is True
    assert verdicts["1:2: throughput during ≥ 2× cold restart"] is True
    assert verdicts["1:2: ≥ 30 completed in the throughput window (elastic)"] is False  # one repeat had 20
    assert verdicts["1:2: transfer rate ≥ 0.8× idle transport"] is False
    assert verdicts["1:2: peak ≤ 1.10× steady memory, staying devices"] is True
    assert verdicts["+4 devices ≤ 1.5× (+1)"] is False


@pytest.mark.slow
def test_bench_scaling_quick_writes_every_measure(tmp_path):
    out = subprocess.run([sys.executable, "-m", "elasticmoe_worker.cli", "--log-level", "warning", "bench", "scaling",
                          "--quick", "--dtype", "float32", "--no-progress", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "scaling.json").read_text())
    by = {r["strategy"]: r for r in report["runs"]}
    assert set(by) == {"elastic", "cold", "extravagant", "horizontal"}
    assert by["elastic"]["failed"] == 0 and by["elastic"]["outcome"] == "Succeeded"
    assert by["cold"]["failed"] > 0, "a cold restart refuses the requests that arrive while it restarts"
    for r in by.values():
        assert r["time_to_new_capacity_s"] > 0 and r["memory"]["peak_bytes"] > 0
        assert set(r["completed_per_s"]) == {"before", "during", "after"}
        # throughput over the same 4 s from the request for every strategy; the load ran that long
        assert r["throughput_window"]["seconds"] == 4.0
        assert max(t["sent"] for t in r["timeline"]) > r["requested_at_s"] + 3.5
        # the CPU the machine used while the scale ran, by kind; the phases add up to the window
        cpu = r["cpu_during"]
        assert cpu["busy_s"] > 0 and cpu["by_kind_s"]["coordinator + load"] > 0 and "HMMs" in cpu["by_kind_s"]
        assert sum(r["phases"].values()) == pytest.approx(r["time_to_new_capacity_s"], abs=0.02)
    assert by["cold"]["phases"].keys() == {"stop", "restart"}
    assert by["elastic"]["throughput_window"]["completed"] > 0
    scale = report["summary"]["scales"]["1:2"]
    assert scale["cold_over_elastic"] > 0 and scale["elastic_over_floor"] > 0
    assert report["floors"][0]["idle_bytes_per_s"] > 0
    assert any(t["target"].startswith("1:2: elastic ÷ physical floor") for t in report["targets"])
    md = (tmp_path / "scaling.md").read_text()
    assert (tmp_path / "scaling.png").stat().st_size > 1000 and "physical floor" in md and "machine busy" in md
    # each device's part of elastic's transfer, from its HMM, and the summary by role
    assert {d["device"] for d in by["elastic"]["transfer_devices"]} == {0, 1}
    assert set(scale["strategies"]["elastic"]["transfer_by_role"]) == {"receives", "sends"}
    assert "transfer phase by device" in md
    # the scale-up steps (--quick: +1) with their phases and the CPU the machine used meanwhile
    [step] = report["steps"]
    assert step["added"] == 1 and step["phases"]["transfer"] > 0
    assert "HMMs" in step["cpu_during"]["by_kind_s"] and step["cpu_during"]["wall_s"] > 0
    assert report["summary"]["steps"]["1"]["cpu_during"]["wall_s"] > 0
    assert re.search(r"\| \+1 \| [\d.]+ \([\d.]+–[\d.]+\) \| 1 \| .* % \|", md), md


def test_the_transfer_phase_is_summarised_by_device_role():
    def dev(sent, got, total, setup, data, cpu, throttled, delivery=-1):
        return {"device": 0, "bytesSent": sent, "bytesReceived": got, "totalMs": total, "setupMs": setup,
                "bytesMs": data, "peersMs": total - setup - data, "hmmCpuMs": cpu, "throttledMs": throttled,
                "toldMs": delivery // 3 if delivery >= 0 else -1, "deliveryMs": delivery}
    roles = scaling_report.transfer_roles([dev(0, 9, 100, 10, 80, 20, 0, 3), dev(0, 9, 140, 30, 100, 26, 35, 90),
                                           dev(0, 9, 120, 20, 90, 22, 58, -1), dev(9, 0, 110, 1, 100, 10, -1),
                                           dev(0, 0, 5, 5, 0, 1, 0)])
    assert list(roles) == ["moves nothing", "receives", "sends"]
    assert roles["receives"] == {"transitions": 3, "total_ms": 120, "setup_ms": 20, "bytes_ms": 90, "peers_ms": 10,
                                 "hmm_cpu_ms": 22, "throttled_ms": 35, "throttled_transitions": 2,
                                 "told_ms": 15.5, "delivery_ms": 46.5, "delivery_max_ms": 90}
    assert roles["sends"]["throttled_ms"] is None and roles["sends"]["throttled_transitions"] == 0
    assert roles["sends"]["delivery_ms"] is roles["sends"]["told_ms"] is None  # (an HMM on another host)


def test_staying_devices_peak_is_judged_against_their_larger_steady_state():
    mem = process_meter.Memory(lambda: {})
    # device 0 stays and gains experts (scale-down): 100 before, 190 after, 200 at the peak;
    # device 1 leaves; "w" is a warm worker, not a staying device
    mem.samples = [(0.0, {"0/0": 100, "0/1": 100, "w": 10}), (1.0, {"0/0": 100, "0/1": 100, "w": 10}),
                   (2.0, {"0/0": 200, "0/1": 100, "w": 90}), (3.0, {"0/0": 190, "w": 90})]
    assert mem.per_device_ratio(1.0, {"0/0"}) == pytest.approx(200 / 190)
    assert mem.per_device_ratio(-1.0, {"0/0"}) is None, "no sample before the scale"
    assert mem.total(1.0, 2.0) == 390 and mem.total() == 390 and mem.total(2.5, 2.6) == 280, \
        "the most held in the window; in one shorter than the sampling interval, the next sample"


def test_process_tree_holds_children_and_grandchildren():
    # a shell whose child sleeps: the shell is our child, the sleep our grandchild
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(proc.stdout.readline())
        for tree in (process_meter.tree(os.getpid()), process_meter.tree_by_scan(os.getpid())):
            assert tree[0] == os.getpid() and {proc.pid, grandchild} <= set(tree)
        assert process_meter.tree(grandchild) == [grandchild]
    finally:
        subprocess.run(["pkill", "-P", str(proc.pid)])
        proc.kill()
        proc.wait()


def test_memory_reads_pss_again_only_for_a_device_whose_processes_changed(monkeypatch):
    pids = {"idle": [10, 11], "busy": [20]}
    resident = {10: 5, 11: 6, 20: 7}
    read: list[int] = []
    monkeypatch.setattr(process_meter.Memory, "_resident", staticmethod(lambda p: resident[p]))
    monkeypatch.setattr(process_meter.Memory, "_pss", staticmethod(lambda p: read.append(p) or p * 100))
    mem = process_meter.Memory(lambda: pids)
    left = [0]

    def sleep(_):  # between passes: the serving executor's memory moves; stop after the passes asked
        resident[20] += 1
        left[0] -= 1
        mem.stop = left[0] <= 0

    monkeypatch.setattr(process_meter.time, "sleep", sleep)

    def passes(n: int) -> list[int]:
        read.clear()
        left[0], mem.stop = n, False
        mem.run()
        return read

    assert sorted(passes(1)) == [10, 11, 20], "the first pass reads every process"
    assert passes(3) == [20, 20, 20], "an unchanged device keeps its PSS; a changed one is read again"
    resident[11] += 1  # a page more in the idle device: all of its processes again (shares move)
    assert sorted(passes(1)) == [10, 11, 20]
    pids["idle"] = [10, 11, 12]  # a spare forked: the zygote's share changes too
    resident[12] = 1
    assert sorted(passes(1)) == [10, 11, 12, 20]
    assert len(mem.samples) == 6 and mem.samples[-1][1] == {"idle": 3300, "busy": 2000}


def test_cpu_during_a_scale_is_split_by_kind_of_process():
    before = {"t": 10.0, "cpus": 2, "busy_s": 100.0,
              "procs": {1: ("coordinator + load", 5.0), 2: ("executors", 7.0), 3: ("HMMs", 1.0)}}
    # pid 3 exited meanwhile (its CPU goes to "other"); pid 4 started (all its CPU is in the window)
    after = {"t": 10.5, "cpus": 2, "busy_s": 100.9,
             "procs": {1: ("coordinator + load", 5.2), 2: ("executors", 7.3), 4: ("standbys + spares", 0.1),
                       5: ("executors", 2.0)}}
    before["procs"][5] = ("standbys + spares", 1.9)  # a standby that serves now: counted as what it was
    c = process_meter.cpu_during(before, after)
    assert c["wall_s"] == 0.5 and c["capacity_s"] == 1.0 and c["busy_s"] == pytest.approx(0.9)
    assert c["by_kind_s"] == pytest.approx({"coordinator + load": 0.2, "executors": 0.3, "standbys + spares": 0.2,
                                            "other": 0.2})
    summary = scaling_report._cpu_summary([c, {**c, "busy_s": 0.5}])
    assert summary["busy_fraction"] == pytest.approx(0.7) and summary["by_kind_s"]["executors"] == pytest.approx(0.3)


def test_cpu_snapshot_counts_this_process_and_the_machine():
    first = process_meter.cpu_snapshot([])
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    c = process_meter.cpu_during(first, process_meter.cpu_snapshot([]))
    assert first["cpus"] >= 1 and first["procs"][os.getpid()][0] == "coordinator + load"
    assert c["by_kind_s"]["coordinator + load"] > 0 and c["busy_s"] >= c["by_kind_s"]["coordinator + load"] - 0.02


def test_cpu_snapshot_reads_the_earlier_snapshots_processes_again_while_they_live():
    """A scale-down's departing devices leave the instance before the window ends: read again by
    pid, their CPU keeps their kind instead of landing in "other"; a pid that is gone is skipped."""
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time() + 0.3\n"
                              "while time.process_time() < t: pass\nimport sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        first = process_meter.cpu_snapshot([])
        first["procs"][child.pid] = ("HMMs", 0.0)  # as if a device's HMM at the start
        first["procs"][gone.pid] = ("executors", 0.0)
        time.sleep(1.0)
        again = process_meter.cpu_snapshot([], also=first["procs"])
        assert again["procs"][child.pid][0] == "HMMs" and again["procs"][child.pid][1] > 0.2
        assert gone.pid not in again["procs"]
        assert child.pid not in process_meter.cpu_snapshot([])["procs"], "without `also`: devices' pids only"
    finally:
        child.communicate(timeout=10)

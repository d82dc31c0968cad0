"""`elasticmoe bench scaling --quick` end to end (slow: four instances started and scaled;
run with `bash scripts/test.sh -m slow`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_scaling_quick_writes_every_measure(tmp_path):
    out = subprocess.run([sys.executable, "-m", "elasticmoe_worker.cli", "--log-level", "warning", "bench", "scaling",
                          "--quick", "--dtype", "float32", "--from-devices", "1", "--to-devices", "2",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "scaling.json").read_text())
    by = {r["strategy"]: r for r in report["results"]}
    assert set(by) == {"elastic", "cold", "extravagant", "horizontal"}
    assert by["elastic"]["failed"] == 0 and by["elastic"]["outcome"] == "succeeded"
    assert by["cold"]["failed"] > 0, "a cold restart refuses the requests that arrive while it restarts"
    for r in by.values():
        assert r["time_to_new_capacity_s"] > 0 and r["memory"]["peak_bytes"] > 0
        assert set(r["completed_per_s"]) == {"before", "during", "after"}
    assert report["targets"]["cold_over_elastic_time"] > 0
    assert report["p2p"]["ratio"] > 0
    assert (tmp_path / "scaling.png").stat().st_size > 1000 and (tmp_path / "scaling.md").is_file()

"""`elasticmoe bench serve`: the command runs end to end on a tiny model and writes a complete
JSON report; the pieces that turn timings into numbers are checked on literal inputs.

The speed-up itself is not asserted: on a shared 2-core machine it is noise. What is asserted
is what a reader of the report relies on: every side produced exactly the tokens asked for,
every per-request number is there and sane, and the ratios are computed from them.
"""

from __future__ import annotations

import json
import math
import signal
import os
import pathlib
import subprocess
import sys
import time

import pytest

from elasticmoe_worker.bench import serve_bench

SIDES = ("ours", "ours_engine_in_process", "transformers_sequential", "transformers_static_batch")
SUMMARY_KEYS = {"num_output_tokens", "wall_s", "output_tok_per_s", "ttft_p50_ms", "ttft_p90_ms",
                "tpot_p50_ms", "tpot_p90_ms", "e2e_p50_ms", "e2e_p90_ms"}
CONFIG_KEYS = {"model_dir", "family", "preset", "dtype", "num_requests", "concurrency", "prompt_len", "output_len",
               "repeats", "engine_options", "server_argv", "server_log", "torch_num_threads", "git_commit", "date"}


@pytest.mark.parametrize("values,q,expected", [
    ([5.0], 50, 5.0),
    ([5.0], 90, 5.0),
    ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
    ([4.0, 1.0, 3.0, 2.0], 90, 3.7),  # unsorted input; numpy.percentile gives 3.7
    ([0.0, 10.0], 0, 0.0),
    ([0.0, 10.0], 100, 10.0),
])
def test_percentile_interpolates_like_numpy(values, q, expected):
    assert serve_bench.percentile(values, q) == pytest.approx(expected)


def test_tpot_divides_by_gaps_between_tokens_not_tokens():
    assert serve_bench.tpot_s(1.0, 2.0, 11) == pytest.approx(0.1)
    assert serve_bench.tpot_s(1.0, 1.0, 1) == 0.0


def _side(tok_per_s: list[float]) -> list[serve_bench.SideRun]:
    """One repeat per value, 100 tokens each; the wall time chosen to give the wanted tokens/s."""
    return [serve_bench.SideRun([serve_bench.RequestSample(0.1, 0.01, 1.0, 100)], 100 / t) for t in tok_per_s]


def test_speedup_is_the_ratio_of_medians_with_the_paired_ratios_beside_it():
    result = serve_bench.aggregate({
        "ours": _side([300.0, 600.0, 330.0]),
        "transformers_sequential": _side([100.0, 100.0, 110.0]),
        "transformers_static_batch": _side([300.0, 200.0, 330.0]),
    })
    assert result["speedup"]["transformers_sequential"]["per_repeat"] == pytest.approx([3.0, 6.0, 3.0])
    assert result["speedup"]["transformers_sequential"]["spread"] == pytest.approx([3.0, 6.0])
    # median 330 / median 100, not the median of the paired ratios (3.0)
    assert result["speedup"]["transformers_sequential"]["ratio_of_medians"] == pytest.approx(3.3)
    assert result["speedup"]["transformers_static_batch"]["ratio_of_medians"] == pytest.approx(1.1)
    assert result["sides"]["ours"]["median"]["output_tok_per_s"] == pytest.approx(330.0)
    assert "engine_alone_vs_static" not in result  # no in-process side in this run


def test_the_in_process_engine_is_compared_with_the_static_batch_and_with_ours():
    result = serve_bench.aggregate({
        "ours": _side([300.0, 600.0, 330.0]),
        "ours_engine_in_process": _side([400.0, 500.0, 440.0]),
        "transformers_sequential": _side([100.0, 100.0, 110.0]),
        "transformers_static_batch": _side([300.0, 200.0, 330.0]),
    })
    alone = result["engine_alone_vs_static"]
    assert alone["ratio_of_medians"] == pytest.approx(440.0 / 300.0)
    assert alone["per_repeat"] == pytest.approx([400 / 300, 500 / 200, 440 / 330])
    # served over HTTP against the same engine in-process: what HTTP and the client cost
    assert result["speedup"]["ours_engine_in_process"]["ratio_of_medians"] == pytest.approx(330.0 / 440.0)
    assert result["speedup"]["transformers_static_batch"]["ratio_of_medians"] == pytest.approx(1.1)


def test_the_in_process_engine_keeps_the_concurrency_and_times_every_request(tiny_models):
    import transformers

    from elasticmoe_worker.bench import engine_alone
    from elasticmoe_worker.engine import engine as engine_mod

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_models["qwen3_moe"]))
    prompts = serve_bench.build_prompts(tokenizer, 5, 8)
    alone = engine_alone.EngineInProcess(tiny_models["qwen3_moe"], engine_mod.EngineConfig(dtype="float32"))
    in_flight: list[int] = []
    step = alone.engine.step

    def counting_step(*a, **k):
        in_flight.append(alone.engine.stats().num_running + alone.engine.stats().num_waiting)
        return step(*a, **k)

    alone.engine.step = counting_step
    done: list[int] = []
    run = alone.run(prompts, 6, 2, lambda: done.append(1))
    assert max(in_flight) == 2 and len(done) == 5
    assert [s.num_output_tokens for s in run.samples] == [6] * 5
    for s in run.samples:
        assert 0 < s.ttft_s <= s.e2e_s <= run.wall_s and s.tpot_s > 0
    # a second run on the same engine: new request ids, the same results
    assert [s.num_output_tokens for s in alone.run(prompts, 6, 5).samples] == [6] * 5


def test_prompts_are_deterministic_exact_length_and_distinct(tiny_models):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_models["qwen3_moe"]))
    prompts = serve_bench.build_prompts(tokenizer, 16, 64)
    assert [len(p) for p in prompts] == [64] * 16
    assert len({tuple(p) for p in prompts}) == 16
    assert prompts == serve_bench.build_prompts(tokenizer, 16, 64)


def test_a_server_that_dies_at_startup_is_reported_with_its_log(tmp_path):
    server = serve_bench.ServerProcess(
        [sys.executable, "-c", "import sys; print('cannot load the model: boom', flush=True); sys.exit(3)"],
        tmp_path / "server.log",
    )
    try:
        with pytest.raises(serve_bench.BenchError, match=r"(?s)exited with code 3.*cannot load the model: boom"):
            server.wait_healthy(f"http://127.0.0.1:{serve_bench.free_port()}/health", timeout_s=30)
    finally:
        server.stop()


def test_a_server_that_never_answers_times_out_and_is_stopped(tmp_path):
    server = serve_bench.ServerProcess([sys.executable, "-c", "import time; time.sleep(600)"], tmp_path / "server.log")
    try:
        start_s = time.monotonic()
        with pytest.raises(serve_bench.BenchError, match="within 1 s"):
            server.wait_healthy(f"http://127.0.0.1:{serve_bench.free_port()}/health", timeout_s=1)
        assert time.monotonic() - start_s < 10
    finally:
        server.stop(timeout_s=10)
    assert server.proc.returncode is not None


def test_quick_run_writes_a_complete_report(tmp_path):
    out_json = tmp_path / "out" / "serve.json"
    env = {**os.environ, "ELASTICMOE_CACHE_DIR": str(tmp_path / "cache")}
    start_s = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "elasticmoe_worker.cli", "bench", "serve", "--quick", "--family", "qwen3_moe",
         "--preset", "tiny", "--out-json", str(out_json), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=170,
    )
    elapsed_s = time.monotonic() - start_s
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert elapsed_s < 90, f"--quick took {elapsed_s:.0f} s, expected < 90 s"
    assert "target ≥ 3× transformers (sequential generate): " in proc.stdout
    assert "transformers static batch" in proc.stdout

    report = json.loads(out_json.read_text())
    cfg = report["config"]
    assert CONFIG_KEYS <= cfg.keys()
    assert (cfg["family"], cfg["preset"], cfg["dtype"]) == ("qwen3_moe", "tiny", "float32")
    assert (cfg["num_requests"], cfg["prompt_len"], cfg["output_len"], cfg["repeats"]) == (4, 16, 16, 1)
    assert cfg["engine_options"]["dtype"] == "float32"
    n, out_len = cfg["num_requests"], cfg["output_len"]

    for side in SIDES:
        entry = report["sides"][side]
        assert SUMMARY_KEYS <= entry["median"].keys()
        assert len(entry["repeats"]) == cfg["repeats"]
        for rep in entry["repeats"]:
            assert rep["num_output_tokens"] == n * out_len, side
            assert len(rep["requests"]) == n
            for req in rep["requests"]:
                assert req["num_output_tokens"] == out_len, side
                assert 0 < req["ttft_s"] <= req["e2e_s"] <= rep["wall_s"] + 1e-6, (side, req)
                assert req["tpot_s"] > 0, (side, req)
            assert rep["output_tok_per_s"] == pytest.approx(n * out_len / rep["wall_s"])

    for side in SIDES[1:]:
        ratio = report["speedup"][side]["ratio_of_medians"]
        assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0
        medians = {s: report["sides"][s]["median"]["output_tok_per_s"] for s in ("ours", side)}
        assert ratio == pytest.approx(medians["ours"] / medians[side])  # one repeat: ratio of medians
    target = report["target"]
    assert target["min_ratio"] == 3.0
    assert target["met"] == (target["ratio"] >= 3.0)
    assert target["ratio"] == report["speedup"]["transformers_sequential"]["ratio_of_medians"]
    assert [t["min_ratio"] for t in report["engine_targets"]] == [4.0, 1.2]
    alone = report["engine_alone_vs_static"]
    assert alone["ratio_of_medians"] == pytest.approx(
        report["sides"]["ours_engine_in_process"]["median"]["output_tok_per_s"]
        / report["sides"]["transformers_static_batch"]["median"]["output_tok_per_s"])
    assert "our engine in-process ÷ transformers static batch, neither over HTTP (no target): " in proc.stdout
    assert (out_json.parent / "serve.server.log").is_file()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the server process")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupting_the_benchmark_stops_its_server(tmp_path, signum):
    out_json = tmp_path / "serve.json"
    env = {**os.environ, "ELASTICMOE_CACHE_DIR": str(tmp_path / "cache")}
    stderr_path = tmp_path / "bench.stderr"
    with open(stderr_path, "wb") as stderr:  # the child keeps its own copy of the descriptor
        bench = subprocess.Popen(
            [sys.executable, "-m", "elasticmoe_worker.cli", "bench", "serve", "--quick", "--output-len", "200",
             "--repeats", "5", "--out-json", str(out_json), "--no-progress"],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )
    try:
        log = out_json.with_suffix(".server.log")
        deadline = time.monotonic() + 120
        while not (log.is_file() and "listening on" in log.read_text(errors="replace")):
            assert bench.poll() is None, f"the benchmark exited early:\n{stderr_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the server did not start within 120 s"
            time.sleep(0.2)
        servers = _children(bench.pid)
        assert servers, "no server subprocess found"
        bench.send_signal(signum)
        assert bench.wait(timeout=60) == 130
        for pid in servers:
            stat = pathlib.Path(f"/proc/{pid}/stat")
            assert not stat.exists() or ") Z " in stat.read_text(), f"server {pid} still running"
        assert not out_json.exists()  # an interrupted run writes no report
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()

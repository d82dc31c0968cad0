"""`elasticmoe bench decode`: the floor's arithmetic, and one real run on the tiny preset."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from elasticmoe_worker.bench import decode_floor, serve_bench
from elasticmoe_worker.models import config


def test_active_bytes_counts_top_k_experts_and_one_embedding_row(tiny_models):
    model_dir = tiny_models["qwen3_moe"]
    spec = config.load_spec(model_dir)
    w = decode_floor.active_bytes(model_dir)
    itemsize = 4 if spec.torch_dtype == "float32" else 2
    # Independent of the header walk: the routed experts' shapes from the config.
    one_expert = 3 * spec.hidden_size * spec.moe_intermediate_size * itemsize
    assert w.experts_total == spec.num_moe_layers * spec.num_experts * one_expert
    assert w.experts_per_token == spec.num_moe_layers * spec.num_experts_per_tok * one_expert
    assert w.embedding_row == (spec.vocab_size if spec.tie_word_embeddings else 1) * spec.hidden_size * itemsize
    on_disk = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    assert w.per_token < w.total < on_disk  # the headers and alignment are not weights


def test_parse_builds_refuses_what_it_cannot_run(tmp_path):
    with pytest.raises(serve_bench.BenchError, match="expected NAME=WORKER_DIR"):
        decode_floor.parse_builds(["old"])
    with pytest.raises(serve_bench.BenchError, match="holds no elasticmoe_worker/cli.py"):
        decode_floor.parse_builds([f"old={tmp_path}"])
    with pytest.raises(serve_bench.BenchError, match="already used"):
        decode_floor.parse_builds(["this=/x"])


def test_bench_decode_runs_two_builds_and_writes_json_and_png(tiny_models, tmp_path):
    worker_dir = decode_floor.pathlib.Path(decode_floor.__file__).resolve().parents[2]
    out = tmp_path / "decode.json"
    proc = subprocess.run(
        [sys.executable, "-m", "elasticmoe_worker.cli", "bench", "decode", "--model", str(tiny_models["qwen3_moe"]),
         "--num-requests", "2", "--output-len", "8", "--repeats", "2", "--bandwidth-mib", "64",
         "--build", f"same={worker_dir}", "--out-json", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["builds"]) == {"this", "same"}
    for b in result["builds"].values():
        assert len(b["decode_ms_per_token"]["per_repeat"]) == 2
        assert all(len(reqs) == 2 and all(r["num_output_tokens"] == 8 for r in reqs) for reqs in b["requests"])
        assert b["ratio_to_floor"] == pytest.approx(b["decode_ms_per_token"]["median"] / result["floor_ms_per_token"])
    assert result["floor_ms_per_token"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert "÷ floor" in proc.stdout

"""The `elasticmoe` command as a user runs it: help, make-model, and serve with the embedded
default model (generated on first use), stopped by Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
import pytest

import testprocs
from elasticmoe_worker import cli


@pytest.mark.parametrize("argv", [[], ["serve"], ["coordinator"], ["worker"], ["operator"], ["make-model"], ["bench"],
                                  ["bench", "serve"]])
def test_every_command_has_help(argv):
    out = subprocess.run(testprocs.elasticmoe(*argv, "--help"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: elasticmoe" in out.stdout


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["coordinator", "--help"], ["worker", "--help"],
                                  ["bench", "scaling", "--help"], ["scale", "--help"]])
def test_help_loads_no_torch(argv):
    """`elasticmoe --help` is instant: the CLI, its parsers and the benchmarks' parsers import no torch
    (and no ray, which only `--fleet ray` needs)."""
    code = ("import sys\nfrom elasticmoe_worker import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n"
            "    pass\nloaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray'))\n"
            "assert not loaded, loaded[:5]\n")
    import sys

    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]


def test_serve_defaults_are_loopback_8000_and_the_embedded_model():
    args = cli.build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, None)
    assert args.redundant_expert_bytes is None  # no budget: every expert gets its second copy


@pytest.mark.parametrize("argv, policy", [
    (["serve"], None), (["bench", "serve", "--quick"], None), (["bench", "decode"], None),
    (["serve", "--devices", "2"], None), (["serve", "--devices", "2", "--fleet", "ray"], "PASSIVE"),
    (["bench", "scaling"], "PASSIVE"),
    (["worker", "--coordinator", "127.0.0.1:1", "--device-index", "0"], "PASSIVE")])
def test_openmp_waits_passively_only_where_processes_ask_for_more_threads_than_cores(argv, policy, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cli._openmp_wait_policy(cli.build_parser().parse_args(argv))
    assert os.environ.get("OMP_WAIT_POLICY") == policy
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's setting wins
    cli._openmp_wait_policy(cli.build_parser().parse_args(argv))
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_redundancy_budget_is_read_in_mib_fractions_allowed():
    args = cli.build_parser().parse_args(["coordinator", "--devices", "2", "--expert-copies", "2",
                                          "--redundant-expert-mb", "0.140625"])
    assert args.redundant_expert_bytes == 147456


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "70000"], "expected a port number"),
    (["serve", "--max-num-seqs", "0"], "expected an integer >= 1"),
    (["make-model", "--family", "llama", "--preset", "tiny", "--out", "x"], "invalid choice: 'llama'"),
    (["serve", "--devices", "2", "--expert-copies", "2", "--redundant-expert-mb", "-1"],
     "got -1, expected a number of MiB >= 0"),
    (["serve", "--devices", "2", "--redundant-expert-mb", "64"],
     "--redundant-expert-mb needs --expert-copies 2 (it budgets the second copies; got --expert-copies 1)"),
])
def test_bad_arguments_are_named(argv, message):
    out = subprocess.run(testprocs.elasticmoe(*argv), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr


def test_serve_on_one_device_of_a_backend_that_cannot_run_here_says_why(tiny_models):
    from elasticmoe_worker import backends

    reason = backends.unavailable_reason("cuda")
    if reason is None:
        pytest.skip("CUDA runs here: serve --backend cuda would serve")
    out = subprocess.run(testprocs.elasticmoe("serve", "--model", str(tiny_models["qwen3_moe"]), "--backend", "cuda",
                                              "--port", str(testprocs.free_port())),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--backend cuda: device backend 'cuda' is not usable here" in out.stderr, \
        "it used to serve on the CPU whatever --backend said"
    assert reason in out.stderr


def test_make_model_writes_a_loadable_checkpoint(tmp_path):
    out = subprocess.run(testprocs.elasticmoe("make-model", "--family", "mixtral", "--preset", "tiny", "--out",
                                     str(tmp_path / "m"), "--no-progress"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "mixtral"


def test_serve_without_model_generates_default_serves_and_stops_on_ctrl_c(tmp_path):
    port = testprocs.free_port()
    env = {**os.environ, "ELASTICMOE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen(testprocs.elasticmoe("serve", "--port", str(port)), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up in 120 s"
            time.sleep(0.5)
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        r = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 5}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert (tmp_path / "cache" / "models" / model / "config.json").is_file()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        log = proc.stdout.read()
        assert f"http://127.0.0.1:{port}/v1" in log, log
        assert "generating the embedded default" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_keeps_as_many_warm_workers_as_asked_and_a_scale_up_takes_them(tiny_models, tmp_path):
    """--warm-workers 2: two workers wait, started, beside the serving one; a scale to 3 devices
    then waits for no process to start (its workers phase is 0 ms)."""
    port, token = testprocs.free_port(), "t" * 32
    (tmp_path / "token").write_text(token)
    base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(testprocs.elasticmoe("serve", "--model", str(tiny_models["qwen3_moe"]), "--devices", "1",
                                                     "--warm-workers", "2", "--port", str(port), "--admin-token-file",
                                                     str(tmp_path / "token"), "--dtype", "float32"),
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=testprocs.die_with_test)
    try:
        def registered():
            if not testprocs.healthy(base):
                return None
            devices = httpx.get(f"{base}/admin/status", headers=headers, timeout=10).json()["devices"]
            return devices if len(devices["registered"]) == 3 else None
        devices = testprocs.until("1 serving + 2 warm workers", registered, 180, proc, log)
        assert devices["active"] == 1
        r = httpx.post(f"{base}/admin/scale", headers=headers, json={"devices": 3, "reason": "test"}, timeout=30)
        assert r.status_code == 202, r.text

        def finished():
            last = httpx.get(f"{base}/admin/status", headers=headers, timeout=10).json()["lastScale"]
            return last if last and last["outcome"] != "Running" else None
        record = testprocs.until("the scale to 3 devices", finished, 300, proc, log)
        assert record["outcome"] == "Succeeded" and record["phasesMs"]["workers"] == 0, record
    finally:
        testprocs.interrupt(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]


def test_warm_workers_are_refused_for_an_external_fleet():
    out = subprocess.run(testprocs.elasticmoe("coordinator", "--devices", "1", "--warm-workers", "1"),
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "ELASTICMOE_WORKER_SECRET": "s" * 32})
    assert out.returncode == 2 and "--warm-workers 1: the workers of an external fleet" in out.stderr, out.stderr

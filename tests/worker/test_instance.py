"""Multi-device instances of CPU worker processes (HMM + executor per device): greedy outputs
equal `transformers`, requests spread over ranks, zero-copy attach, executor restart from
HMM memory alone, and failures that end in errors rather than hangs."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch
import transformers

import testprocs
from elasticmoe_worker import modelgen
from elasticmoe_worker.engine import engine as engine_mod
from elasticmoe_worker.engine import types
from elasticmoe_worker.instance import coordinator, procutil

MAX_NEW = 16
GREEDY = types.SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
CFG = engine_mod.EngineConfig(dtype="float32", kv_cache_bytes=8 << 20, max_num_batched_tokens=32)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(99)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (3, 9, 14, 22, 31, 40, 6, 17)]


async def _collect(inst, rid, prompt, params=GREEDY, delay_s=0.0):
    await asyncio.sleep(delay_s)
    tokens = []
    async for out in inst.generate(rid, prompt, params):
        tokens += out.token_ids
        last = out
    return tokens, last


def _staggered(inst, prompts):
    async def main():
        return await asyncio.gather(*[_collect(inst, f"r{i}", p, delay_s=0.03 * i) for i, p in enumerate(prompts)])
    return [tokens for tokens, _ in asyncio.run(main())]


def _wait(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def references(tiny_models):
    out = {}
    for family, model_dir in tiny_models.items():
        prompts = _prompts(transformers.AutoConfig.from_pretrained(str(model_dir)).vocab_size)
        out[family] = (prompts, testprocs.hf_greedy(model_dir, prompts, MAX_NEW))
    return out


@pytest.mark.parametrize("devices", [1, 2, 4])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "mixtral"])
def test_instance_equals_transformers(tiny_models, references, family, devices):
    prompts, refs = references[family]
    inst = coordinator.Instance(tiny_models[family], devices, CFG).start()
    try:
        assert _staggered(inst, prompts) == refs
        assert inst.stats().healthy
        _wait(lambda: inst.stats().kv_blocks_used == 0 and inst.stats().num_running == 0, 5,
              "every rank to report its KV blocks freed")
    finally:
        inst.shutdown()


def test_requests_spread_over_ranks(tiny_models):
    inst = coordinator.Instance(tiny_models["mixtral"], 2, CFG).start()
    long = types.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    try:
        async def main():
            tasks = [asyncio.create_task(_collect(inst, f"r{i}", [5, 6, 7], long)) for i in range(4)]
            await asyncio.sleep(0.5)
            spread = inst.inflight_per_rank()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return spread
        assert asyncio.run(main()) == [2, 2]
        _wait(lambda: inst.stats().num_running == 0 and inst.stats().kv_blocks_used == 0, 10, "aborts to free KV")
    finally:
        inst.shutdown()


def test_zero_copy_attach_and_executor_restart_reads_no_checkpoint(tmp_path):
    model_dir = modelgen.make_model("qwen3_moe", "small", tmp_path / "small", progress=False)
    inst = coordinator.Instance(model_dir, 2, engine_mod.EngineConfig(dtype="float32", kv_cache_bytes=16 << 20)).start()
    try:
        for ready in inst.executors.values():
            # Views over HMM memory: reading every weight page adds (almost) nothing private.
            assert ready.weight_bytes > 30e6
            assert ready.attach_private_bytes < 0.05 * ready.weight_bytes, ready
        prompt = list(range(10, 30))
        before = _staggered(inst, [prompt])[0]
        old_pids = {r.pid for r in inst.executors.values()}
        # The checkpoint disappears: a restart must come from the HMMs' memory alone.
        model_dir.rename(tmp_path / "moved-away")
        os.kill(inst.executors[1].pid, signal.SIGKILL)
        _wait(lambda: inst.suspension is not None or inst.config_id > 1, 10, "the instance to notice the dead executor")
        _wait(lambda: inst.config_id > 1 and inst.suspension is None, 120, "the executors to restart")
        assert inst.stats().healthy and inst.num_devices == 2
        assert {r.pid for r in inst.executors.values()}.isdisjoint(old_pids)
        assert all(r.bytes_read_from_checkpoint == 0 for r in inst.executors.values())
        assert _staggered(inst, [prompt])[0] == before
    finally:
        inst.shutdown()


def test_a_lost_worker_whose_experts_exist_nowhere_fails_requests_503_and_says_why(tiny_models, tmp_path):
    """One copy per expert and the checkpoint gone: the survivor cannot get the lost device's
    experts, so the recovery fails, its requests end with 503, and the instance is Degraded
    saying so. (With the checkpoint or a second copy it recovers: test_device_loss.)"""
    from elasticmoe_worker.server import api

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_models["qwen3_moe"], model_dir)
    inst = coordinator.Instance(model_dir, 2, CFG, collective_timeout_s=10).start()
    model_dir.rename(tmp_path / "moved-away")
    server = api.make_server(api.build_app(inst), "127.0.0.1", procutil.free_port(), log_level="warning")
    port = server.config.port
    import threading

    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: _healthy(base), 30, "the server")
        with httpx.Client(timeout=30) as client:
            body = {"model": inst.model_name, "prompt": "x", "max_tokens": 1500, "ignore_eos": True}
            result = {}

            def call():
                result["r"] = client.post(f"{base}/v1/completions", json=body)

            caller = threading.Thread(target=call)
            caller.start()
            _wait(lambda: inst.stats().num_running > 0, 10, "the request to run")
            os.kill(inst.fleet.pids()[1], signal.SIGKILL)
            started = time.monotonic()
            caller.join(timeout=20)
            assert not caller.is_alive(), "the request hung after the worker died"
            assert time.monotonic() - started < 10
            r = result["r"]
            message = r.json()["error"]["message"]
            assert r.status_code == 503 and "device(s) [1] lost" in message and "checkpoint" in message, message
            assert int(r.headers["retry-after"]) >= 1
            health = client.get(f"{base}/health")
            assert health.status_code == 503
            assert "elasticmoe_healthy 0.0" in client.get(f"{base}/metrics").text
            assert client.post(f"{base}/v1/completions", json={**body, "max_tokens": 2}).status_code == 503
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        inst.shutdown()


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_stalled_collective_times_out_with_a_clear_error(tiny_models):
    inst = coordinator.Instance(tiny_models["mixtral"], 2, CFG, collective_timeout_s=3).start()
    stopped = inst.executors[1].pid
    try:
        os.kill(stopped, signal.SIGSTOP)  # rank 1 stops answering; rank 0 waits in the collective
        errors = []

        def suspended():  # its requests wait to be recomputed on restarted executors
            if inst.suspension is not None:
                errors.append(inst.suspension)
            return inst.suspension is not None

        _wait(suspended, 30, "rank 0's collective to time out")
        assert "rank 0" in errors[0] and ("timed out" in errors[0].lower() or "timeout" in errors[0].lower()), errors
        _wait(lambda: inst.config_id > 1 and inst.suspension is None and inst.stats().healthy, 120,
              "the executors to restart")
    finally:
        try:
            os.kill(stopped, signal.SIGKILL)
        except ProcessLookupError:
            pass
        inst.shutdown()


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def test_serve_devices_ctrl_c_stops_every_process_and_leaves_no_shm(tiny_models):
    port = procutil.free_port()
    shm_before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen([sys.executable, "-m", "elasticmoe_worker.cli", "serve", "--model",
                             str(tiny_models["deepseek_v2"]), "--devices", "2", "--port", str(port), "--dtype", "float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: proc.poll() is None and _healthy(base), 120, "serve --devices 2")
        r = httpx.post(f"{base}/v1/completions", json={"model": tiny_models["deepseek_v2"].name, "prompt": "hi",
                                                       "max_tokens": 8}, timeout=60)
        assert r.status_code == 200
        workers = _descendants(proc.pid)
        assert len(workers) >= 4, "2 HMMs and 2 executors"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        _wait(lambda: not any(_alive(p) for p in workers), 20, "workers to exit")
        assert set(os.listdir("/dev/shm")) - shm_before == set()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""A device lost while serving (issue 11): `elasticmoe serve --devices 3` under streaming load,
one worker SIGKILLed; the instance goes on with the two survivors, no request fails, and every
output equals `transformers`' greedy one (the requests that ran during the loss were recomputed
from their prompt and the tokens already streamed).

- `--expert-copies 2`: the lost device's experts have a copy on a survivor, so the checkpoint is
  moved away before the kill: the recovery must not read it.
- one copy per expert: the lost device's experts exist only in the checkpoint: the survivors read
  those (only those) from it; here the worker is stopped (SIGSTOP) rather than killed, and is
  lost once its heartbeats stop for the timeout (in-process instance; the same under streaming
  load through `serve --expert-copies 1` and on the small preset are marked slow).

Each run prints its figures: recovery seconds (first sign of the loss -> serving again),
requests failed, requests and tokens recomputed. Timings are reported, never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess

import httpx
import pytest
import torch

import testprocs
from elasticmoe_worker import hotcopies, modelgen, planner
from elasticmoe_worker.engine import engine as engine_mod
from elasticmoe_worker.engine import types
from elasticmoe_worker.instance import coordinator
from elasticmoe_worker.models import config as config_mod

TOKEN = "device-loss-test"
MAX_NEW = 48
HMM_STARTED = re.compile(r"device (\d+): HMM started \(pid (\d+)\)")
READ_FROM_CHECKPOINT = re.compile(r"device (\d+): read experts \[([\d, ]+)\] from the checkpoint")


def _serve(model_dir, tmp_path, devices: int, copies: int, extra: tuple[str, ...] = ()):
    port = testprocs.free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "ELASTICMOE_ADMIN_TOKEN": TOKEN, "ELASTICMOE_CACHE_DIR": str(tmp_path / "cache")}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            testprocs.elasticmoe("serve", "--model", str(model_dir), "--devices", str(devices), "--expert-copies",
                                 str(copies), "--port", str(port), "--dtype", "float32", "--kv-cache-mb", "8",
                                 "--max-num-batched-tokens", "64", *extra),
            env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=testprocs.die_with_test)
    return proc, f"http://127.0.0.1:{port}", log


def _status(base: str) -> dict:
    return httpx.get(f"{base}/admin/status", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()


def _lose_a_device_under_load(model_dir, tmp_path, *, copies: int, move_checkpoint: bool, lost: int = 1,
                              devices: int = 3, extra: tuple[str, ...] = ()) -> dict:
    """Serve on `devices` devices (`extra`: more serve arguments), stream, SIGKILL device `lost`'s
    worker, stream on; -> the figures, with the admin status before the kill and after the recovery."""
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 2000, (int(n),), generator=g).tolist() for n in torch.randint(3, 40, (8,), generator=g)]
    tokenizer = engine_mod.load_tokenizer(model_dir)
    expected = [tokenizer.decode(t, skip_special_tokens=True) for t in testprocs.hf_greedy(model_dir, prompts, MAX_NEW)]
    proc, base, log = _serve(model_dir, tmp_path, devices, copies, extra)
    try:
        testprocs.until(f"serve --devices {devices}", lambda: testprocs.healthy(base), 180, proc, log)
        before = _status(base)
        if move_checkpoint:  # from here on nothing can read it: the lost experts must come from peers
            model_dir.rename(tmp_path / "moved-away")
        pids = {int(d): int(p) for d, p in HMM_STARTED.findall(log.read_text())}
        load = testprocs.StreamingLoad(base, "model", prompts, MAX_NEW, clients=4)
        try:
            testprocs.until("requests to stream", lambda: len(load.results) >= 4, 60, proc, log)
            os.kill(pids[lost], signal.SIGKILL)

            def recovered():
                s = _status(base)
                last = s.get("lastScale") or {}
                return s if last.get("scaleId", "").startswith("recovery-") and s["phase"] == "Serving" else None

            after = testprocs.until("the recovery", recovered, 120, proc, log)
            served = len(load.results)
            testprocs.until("requests on the survivors", lambda: len(load.results) >= served + 4, 60, proc, log)
        finally:
            load.stop()
        record = after["lastScale"]
        figures = {"recovery_s": record["durationMs"] / 1000, "failed": len(load.failed),
                   "requests": len(load.results) + len(load.failed), "recomputed": record["requestsHandedOver"],
                   "tokens_recomputed": record["tokensRecomputed"], "phases_ms": record["phasesMs"]}
        print(f"\ndevice {lost} of {devices} SIGKILLed, --expert-copies {copies} {' '.join(extra)}: recovered in "
              f"{figures['recovery_s']:.2f} s (phases, ms: {record['phasesMs']}); {figures['requests']} requests, {figures['failed']} failed; "
              f"{figures['recomputed']} requests recomputed, {figures['tokens_recomputed']} tokens")
        assert load.failed == [], load.failed[:5]
        assert [text for _, text in load.results] == [expected[i] for i, _ in load.results]
        assert (record["from"], record["to"], record["outcome"]) == (devices, devices - 1, "Succeeded"), record
        assert f"device {lost}" in record["reason"] and "killed by signal 9" in record["reason"], record["reason"]
        assert (after["devices"]["active"], after["parallelism"]["dp"], after["healthy"]) == (devices - 1, devices - 1,
                                                                                             True)
        assert before["experts"]["copiesPerExpert"] == copies
        assert (before["experts"]["redundantBytes"] > 0) == (copies == 2)
        num_experts = config_mod.load_spec(tmp_path / "moved-away" if move_checkpoint else model_dir).num_experts
        for s in (before, after):
            held = s["experts"]["copiesPerExpert"] * num_experts if s["experts"]["minCopies"] == \
                s["experts"]["copiesPerExpert"] else num_experts + len(s["experts"]["redundantExperts"])
            assert sum(s["experts"]["perDevice"].values()) == held, s["experts"]
        assert sorted(after["experts"]["perDevice"]) == [str(d) for d in range(devices) if d != lost]
        figures["read"] = READ_FROM_CHECKPOINT.findall(log.read_text())
        figures["before"], figures["after"] = before, after
        return figures
    finally:
        testprocs.interrupt(proc)
        if move_checkpoint and (tmp_path / "moved-away").exists():
            (tmp_path / "moved-away").rename(model_dir)


def test_a_killed_worker_with_expert_copies_2_costs_a_pause_not_a_request(tiny_models, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_models["qwen3_moe"], model_dir)
    figures = _lose_a_device_under_load(model_dir, tmp_path, copies=2, move_checkpoint=True)
    assert figures["read"] == []  # every expert of the lost device had a copy on a survivor


def test_with_a_budget_for_some_second_copies_only_the_others_are_read_after_a_loss(tiny_models, tmp_path):
    """`--devices 2 --expert-copies 2 --redundant-expert-mb` with room for 1.5 experts per device:
    3 of the 8 experts get a second copy, before any load the lowest ids. Device 1's worker is
    killed under load: the survivor reads from the checkpoint exactly the experts only device 1
    held, not the ones with a copy on device 0, and serves on with outputs unchanged."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_models["qwen3_moe"], model_dir)
    spec = config_mod.load_spec(model_dir)
    expert_bytes = testprocs.float32_expert_bytes(model_dir)
    figures = _lose_a_device_under_load(model_dir, tmp_path, copies=2, move_checkpoint=False, devices=2,
                                        extra=("--redundant-expert-mb", repr(expert_bytes * 1.5 / (1 << 20))))
    before, after = figures["before"]["experts"], figures["after"]["experts"]
    assert spec.num_experts == 8 and before["bytesPerCopy"] == expert_bytes  # tiny's regions are whole pages
    assert before["budgetBytesPerDevice"] == expert_bytes * 3 // 2
    assert (before["copiesPerExpert"], before["minCopies"], before["redundantExperts"]) == (2, 1, [0, 1, 2])
    assert before["redundantBytes"] == 3 * expert_bytes and sorted(before["perDevice"].values()) == [5, 6]
    assert "fits the second copy of 3 of 8 experts" in before["limitedBy"], before["limitedBy"]
    assert before["chosenBy"] == "lowest expert ids (no routed tokens counted yet)"
    assert sum(after["routedTokens"]) > 0, after  # the executors counted what their routers sent
    assert (after["copiesPerExpert"], after["redundantExperts"], after["redundantBytes"]) == (1, [], 0)
    assert after["limitedBy"].startswith("devices: 1 device(s)"), after["limitedBy"]
    placement = planner.initial_placement(8, [0, 1], hotcopies.hot_copies(8, 2, 3))
    only_on_1 = [e for e, homes in enumerate(placement.homes) if homes == (1,)]
    read = sorted(int(e) for _, experts in figures["read"] for e in experts.split(", "))
    assert read == only_on_1 and len(only_on_1) == 8 - len(placement.experts_on(0)), (read, placement)


@pytest.mark.slow
def test_a_killed_worker_with_one_copy_under_streaming_load(tiny_models, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_models["mixtral"], model_dir)
    figures = _lose_a_device_under_load(model_dir, tmp_path, copies=1, move_checkpoint=False)
    read = sorted(int(e) for _, experts in figures["read"] for e in experts.split(", "))
    num_experts = config_mod.load_spec(model_dir).num_experts
    # device 1 of 3 held the middle block of the contiguous placement; those, and only those, were read
    per = [num_experts // 3 + (i < num_experts % 3) for i in range(3)]
    assert read == list(range(per[0], per[0] + per[1])), figures["read"]


@pytest.mark.slow
@pytest.mark.parametrize("copies", [1, 2])
def test_a_killed_worker_on_the_small_preset(tmp_path, copies):
    model_dir = modelgen.make_model("qwen3_moe", "small", tmp_path / "model", progress=False)
    _lose_a_device_under_load(model_dir, tmp_path, copies=copies, move_checkpoint=copies == 2, lost=2)


def test_a_stopped_worker_is_declared_lost_after_its_heartbeat_timeout_and_its_requests_go_on(tiny_models, capfd):
    """SIGSTOP: the worker is still a process, but silent; after the heartbeat timeout the fleet
    kills it and the instance recovers on the other two, its requests recomputed there, with
    one copy per expert: the lost experts (and only those) are read from the checkpoint."""
    model_dir = tiny_models["qwen3_moe"]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 2000, (int(n),), generator=g).tolist() for n in torch.randint(3, 30, (6,), generator=g)]
    max_new = 400
    expected = testprocs.hf_greedy(model_dir, prompts, max_new)
    cfg = engine_mod.EngineConfig(dtype="float32", kv_cache_bytes=8 << 20, max_num_batched_tokens=64)
    params = types.SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    inst = coordinator.Instance(model_dir, 3, cfg, heartbeat_timeout_s=5.0, warm_workers=0).start()
    stopped = inst.fleet.pids()[1]
    try:
        async def one(i: int) -> list[int] | str:
            tokens = []
            async for out in inst.generate(f"r{i}", prompts[i], params):
                if out.error:
                    return out.error
                tokens += out.token_ids
            return tokens

        async def main():
            tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
            while inst.stats().num_running < len(prompts):
                await asyncio.sleep(0.05)
            os.kill(stopped, signal.SIGSTOP)
            return await asyncio.gather(*tasks)

        got = asyncio.run(main())
        record = inst.last_scale
        read = READ_FROM_CHECKPOINT.findall(capfd.readouterr().err)
        print(f"\ndevice 1 of 3 SIGSTOPped, heartbeat timeout 5 s, --expert-copies 1: recovered in "
              f"{record.duration_ms / 1000:.2f} s after the loss was detected (phases, ms: {record.phases_ms}); "
              f"{record.requests_handed_over} requests recomputed, {record.tokens_recomputed} tokens")
        assert got == expected
        assert record.scale_id.startswith("recovery-") and record.outcome.value == "Succeeded"
        assert "device 1" in record.reason and "no heartbeat" in record.reason, record.reason
        assert (inst.num_devices, inst.state.devices, inst.phase.value) == (2, (0, 2), "Serving")
        assert record.requests_handed_over > 0, "no request spanned the recovery"
        assert sorted(int(e) for _, experts in read for e in experts.split(", ")) == [3, 4, 5], read  # device 1's
    finally:
        with contextlib.suppress(ProcessLookupError):  # the fleet killed it, unless the test failed first
            os.kill(stopped, signal.SIGKILL)
        inst.shutdown()

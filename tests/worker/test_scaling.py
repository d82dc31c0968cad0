"""Elastic scaling of a live instance: zero failed requests and unchanged greedy outputs
under continuous streaming load, weights only from peers, abort before the switch, and
the admin API that drives it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import threading
import time

import httpx
import pytest
import torch

from elasticmoe_worker import modelgen
from elasticmoe_worker.engine import engine as engine_mod
from elasticmoe_worker.engine import types
from elasticmoe_worker.instance import coordinator, procutil
from elasticmoe_worker.server import admin, api

CFG = engine_mod.EngineConfig(dtype="float32", kv_cache_bytes=8 << 20, max_num_batched_tokens=64)
PARAMS = types.SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)


def _reference(model_dir, prompts, params: types.SamplingParams = PARAMS) -> list[list[int]]:
    eng = engine_mod.LLMEngine.from_model_dir(model_dir, CFG)
    out = []
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
        tokens = []
        while eng.has_work():
            for o in eng.step():
                tokens += o.token_ids
        out.append(tokens)
    return out


def _run_with_scaling(inst, prompts, steps, concurrency=4, params: types.SamplingParams = PARAMS):
    """Stream requests without pause (`concurrency` at a time, cycling over `prompts`) from
    before the first scale until after the last; -> ([(prompt index, tokens)], failures,
    scale records)."""
    results: list[tuple[int, list[int]]] = []
    failures: list[str] = []
    records = []
    done = asyncio.Event()

    async def one(n, i):
        tokens = []
        try:
            async for out in inst.generate(f"r{n}", prompts[i], params):
                tokens += out.token_ids
                if out.finish_reason is types.FinishReason.ERROR:
                    failures.append(f"r{n}: {out.error}")
        except Exception as exc:  # noqa: BLE001 - any failure counts
            failures.append(f"r{n}: {type(exc).__name__}: {exc}")
        results.append((i, tokens))

    async def worker(w):
        n = w
        while not done.is_set() or n < len(prompts):
            await one(n, n % len(prompts))
            n += concurrency

    async def main():
        workers = [asyncio.create_task(worker(w)) for w in range(concurrency)]
        for target in steps:
            await asyncio.sleep(0.5)
            records.append(await asyncio.to_thread(inst.scale, target, "test"))
        done.set()
        await asyncio.gather(*workers)

    asyncio.run(main())
    return results, failures, records


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "mixtral"])
def test_scale_1_2_3_4_2_1_under_load_fails_nothing_and_changes_no_output(tiny_models, tmp_path, family):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_models[family], model_dir)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 2000, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 40, (12,), generator=g)]
    refs = _reference(model_dir, prompts)
    inst = coordinator.Instance(model_dir, 1, CFG).start()
    try:
        # From here on nothing can read the checkpoint: new devices must get it from peers.
        model_dir.rename(tmp_path / "moved-away")
        got, failures, records = _run_with_scaling(inst, prompts, [2, 3, 4, 2, 1])
        assert failures == []
        assert [(r.from_devices, r.to_devices, r.outcome.value) for r in records] == [
            (1, 2, "Succeeded"), (2, 3, "Succeeded"), (3, 4, "Succeeded"), (4, 2, "Succeeded"), (2, 1, "Succeeded")]
        assert sum(r.requests_handed_over for r in records) > 0, "no sequence spanned a switch"
        assert [r.kv_fallback for r in records] == [""] * 5, "the departing devices' KV copies all succeeded"
        assert len(got) > len(prompts)
        assert [tokens for i, tokens in got] == [refs[i] for i, _ in got]
        for r in records:
            assert set(r.phases_ms) == {"workers", "transfer", "standby_start", "switch"}
            assert sum(r.phases_ms.values()) == r.duration_ms, "phases are intervals that add up to the total"
            # every device is on this host: bytes move through shared memory, no process group
            assert r.transport == ("shared memory" if r.bytes_transferred else ""), (r.transport, r.bytes_transferred)
            # each device's part of the transfer as its HMM measured it: every byte sent was received
            prof = r.transfer_devices
            assert [p.device for p in prof] == sorted(p.device for p in prof) and prof, r
            assert sum(p.bytes_received for p in prof) == sum(p.bytes_sent for p in prof) == r.bytes_transferred, r
            assert all(p.setup_ms + p.bytes_ms + p.peers_ms == p.total_ms and p.hmm_cpu_ms >= 0 for p in prof), r
            assert max(p.bytes_ms for p in prof) <= r.transfer_data_ms, r
            # ... with its PrepareTransition's and its report's way to and from the coordinator, known here (one
            # host, one clock): both inside the transfer phase (+1: rounding)
            assert all(0 <= p.told_ms + p.total_ms + p.delivery_ms <= r.phases_ms["transfer"] + 2 for p in prof), r
            assert all(p.told_ms >= 0 and p.delivery_ms >= 0 for p in prof), r
    finally:
        inst.shutdown()


def test_scale_over_the_collective_when_peer_copies_are_off(tiny_models, tmp_path, monkeypatch):
    """ELASTICMOE_PEER_COPY=0: the same scales over gloo (the path devices on different hosts take)."""
    monkeypatch.setenv("ELASTICMOE_PEER_COPY", "0")
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_models["qwen3_moe"], model_dir)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1, 2000, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 40, (8,), generator=g)]
    refs = _reference(model_dir, prompts)
    inst = coordinator.Instance(model_dir, 1, CFG).start()
    try:
        model_dir.rename(tmp_path / "moved-away")
        got, failures, records = _run_with_scaling(inst, prompts, [3, 2])
        assert failures == []
        assert [(r.from_devices, r.to_devices, r.outcome.value, r.transport) for r in records] == [
            (1, 3, "Succeeded", "gloo"), (3, 2, "Succeeded", "gloo")]
        assert [tokens for i, tokens in got] == [refs[i] for i, _ in got]
    finally:
        inst.shutdown()


@pytest.mark.parametrize("peer_copy", ["1", "0"], ids=["shared-memory", "collective"])
def test_scale_down_moves_the_departing_sequences_kv_instead_of_recomputing_it(tiny_models, monkeypatch, peer_copy):
    """2 -> 1 under streaming load: the sequences running on device 1 continue on device 0 with
    their KV blocks copied there peer to peer (through shared memory, or over gloo as between
    hosts), so device 0 computes none of their tokens again."""
    monkeypatch.setenv("ELASTICMOE_PEER_COPY", peer_copy)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 2000, (int(n),), generator=g).tolist()
               for n in torch.randint(20, 40, (8,), generator=g)]
    # NOTE: long outputs and 8 streams: requests must still run on device 1 when the switch pauses,
    # after the scale's transfer and standby start (with 120 tokens and 4 streams they sometimes
    # had all finished there: CI failed on "no sequence was running on device 1")
    params = types.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    refs = _reference(tiny_models["deepseek_v2"], prompts, params)  # MLA: keys and values of different widths
    inst = coordinator.Instance(tiny_models["deepseek_v2"], 2, CFG, warm_workers=0).start()
    try:
        got, failures, records = _run_with_scaling(inst, prompts, [1], concurrency=8, params=params)
        assert failures == []
        (rec,) = records
        assert (rec.from_devices, rec.to_devices, rec.outcome.value, rec.kv_fallback) == (2, 1, "Succeeded", "")
        assert rec.transport == {"1": "shared memory", "0": "gloo"}[peer_copy]
        assert rec.sequences_kv_moved > 0 and rec.kv_bytes_moved > 0, "no sequence was running on device 1"
        assert rec.tokens_recomputed == 0
        assert [tokens for i, tokens in got] == [refs[i] for i, _ in got]
        # what the adopting executor itself counted: no token of the moved sequences was computed again
        _wait(lambda: 0 in inst.router.rank_stats and inst.router.rank_stats[0].num_running == 0, 10, "stats")
        stats = inst.router.rank_stats[0]
        assert (stats.num_recomputed_tokens_total, stats.num_preemptions_total) == (0, 0)
    finally:
        inst.shutdown()


def test_killing_a_new_worker_during_the_scale_aborts_safely(tmp_path):
    model_dir = modelgen.make_model("mixtral", "small", tmp_path / "small", progress=False)
    inst = coordinator.Instance(model_dir, 1, engine_mod.EngineConfig(dtype="float32", kv_cache_bytes=8 << 20),
                                collective_timeout_s=20).start()
    prompts = [[5 + i, 6, 7, 8] for i in range(6)]
    refs = _reference(model_dir, prompts)
    try:
        _wait(lambda: 1 in inst.state.warm, 60, "the warm worker")
        new_worker = inst.fleet.pids()[1]

        def kill_when_transferring():
            _wait(lambda: inst.state.scale is not None and inst.state.scale.stage == "transfer", 60, "the transfer")
            os.kill(new_worker, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_transferring)
        killer.start()
        got, failures, records = _run_with_scaling(inst, prompts, [2], concurrency=3)
        killer.join()
        assert failures == []
        assert records[0].outcome.value == "Aborted" and "died" in records[0].message, records[0]
        assert "switch" not in records[0].phases_ms
        assert [tokens for i, tokens in got] == [refs[i] for i, _ in got]
        assert inst.num_devices == 1 and inst.stats().healthy
        status = admin.status_body(inst)
        assert status.last_scale.outcome.value == "Aborted" and status.phase.value == "Serving"
    finally:
        inst.shutdown()


def _wait(pred, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture
def admin_server(tiny_models):
    inst = coordinator.Instance(tiny_models["qwen3_moe"], 1, CFG).start()
    app = api.build_app(inst)
    admin.add_routes(app, inst, "s3cret")
    server = api.make_server(app, "127.0.0.1", procutil.free_port(), log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.config.port}"
    _wait(lambda: _up(base), 30, "the server")
    yield inst, base
    server.should_exit = True
    thread.join(timeout=30)
    inst.shutdown()


def _up(base):
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_admin_api_needs_the_token_and_names_what_is_wrong(admin_server):
    inst, base = admin_server
    ok = {"Authorization": "Bearer s3cret"}
    with httpx.Client(base_url=base, timeout=120) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Bearer s3crét".encode()}):  # non-ASCII: 401, not a crash
            r = c.post("/admin/scale", json={"devices": 2}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert c.get("/admin/status", headers=headers).status_code == 401
        assert inst.num_devices == 1 and inst.last_scale is None, "a refused call changed nothing"

        for body, param, fragment in [({"devices": 0}, "devices", "expected an integer in [1, 8]"),
                                      ({"devices": 9}, "devices", "got 9"),
                                      ({"devices": "2"}, "devices", "Expected `int`, got `str`"),
                                      ({}, "devices", "missing required field `devices`"),
                                      ({"devices": 1}, "devices", "already 1")]:
            r = c.post("/admin/scale", json=body, headers=ok)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert fragment in r.json()["error"]["message"]

        r = c.post("/admin/scale", json={"devices": 2}, headers=ok)
        assert r.status_code == 202 and r.json()["phase"] == "Scaling"
        busy = c.post("/admin/scale", json={"devices": 3}, headers=ok)
        assert busy.status_code == 409 and "in progress" in busy.json()["error"]["message"]
        _wait(lambda: c.get("/admin/status", headers=ok).json()["phase"] == "Serving", 120, "the scale")
        status = c.get("/admin/status", headers=ok).json()
        assert status["devices"]["active"] == 2 and status["lastScale"]["outcome"] == "Succeeded"
        assert set(status["lastScale"]["phasesMs"]) == {"workers", "transfer", "standby_start", "switch"}
        assert status["parallelism"] == {"dp": 2, "ep": 2, "tp": 1}
        r = c.post("/v1/completions", json={"model": inst.model_name, "prompt": "hi", "max_tokens": 4})
        assert r.status_code == 200
        _check_scaling_metrics(c.get("/metrics").text)

    # The CLI wraps the same API: back to one device, phases printed.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "elasticmoe_worker.cli", "scale", "--devices", "1", "--url", base,
                          "--token", "s3cret"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "scale 2 -> 1: Succeeded" in out.stdout and "standby_start" in out.stdout
    assert inst.num_devices == 1
    refused = subprocess.run([sys.executable, "-m", "elasticmoe_worker.cli", "scale", "--devices", "2", "--url",
                              base, "--token", "nope"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "401" in refused.stdout


def _check_scaling_metrics(text: str) -> None:
    """The scaling series after one successful 1 -> 2 scale, and promtool's lint."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found on PATH: install the Debian package `prometheus` (scripts/test.sh does)")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['elasticmoe_devices{state="active"}'] == 2
    assert samples['elasticmoe_devices{state="desired"}'] == 2 and samples['elasticmoe_devices{state="warming"}'] == 0
    assert samples['elasticmoe_scales_total{outcome="Succeeded"}'] == 1
    assert samples['elasticmoe_scales_total{outcome="Aborted"}'] == 0
    assert "elasticmoe_requests_handed_over_total" in samples
    for phase in ("workers", "transfer", "standby_start", "switch"):
        assert samples[f'elasticmoe_scale_phase_duration_seconds_count{{phase="{phase}"}}'] == 1
        assert samples[f'elasticmoe_scale_phase_duration_seconds_bucket{{le="+Inf",phase="{phase}"}}'] == 1


def test_single_engine_server_says_scaling_needs_devices(tiny_models):
    from elasticmoe_worker.engine import async_engine

    engine = async_engine.AsyncEngine.from_model_dir(tiny_models["mixtral"], CFG)
    app = api.build_app(engine)
    admin.add_routes(app, engine, "t")
    from fastapi.testclient import TestClient

    try:
        with TestClient(app) as c:
            r = c.post("/admin/scale", json={"devices": 2}, headers={"Authorization": "Bearer t"})
            assert r.status_code == 400 and "--devices N" in r.json()["error"]["message"]
            assert c.get("/admin/status", headers={"Authorization": "Bearer t"}).json()["scaling"] is False
    finally:
        engine.shutdown()


def test_admin_token_from_env_file_or_generated(tmp_path, monkeypatch):
    monkeypatch.delenv(admin.TOKEN_ENV, raising=False)
    generated = admin.resolve_token(None, tmp_path)
    assert (tmp_path / "admin-token").read_text().strip() == generated
    assert oct((tmp_path / "admin-token").stat().st_mode & 0o777) == "0o600"
    (tmp_path / "mounted").write_text("from-secret\n")
    assert admin.resolve_token(tmp_path / "mounted", tmp_path) == "from-secret"
    monkeypatch.setenv(admin.TOKEN_ENV, "from-env")
    assert admin.resolve_token(tmp_path / "mounted", tmp_path) == "from-env"

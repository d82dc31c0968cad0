"""What a client sees across many switches, and what an abort leaves behind.

- A flood of requests across 20 consecutive switches: every request completes or fails with
  an error (a client-side timeout counts as a failure); the expectation is 0 failures.
- A new worker that never joins (SIGSTOP) with a short scale timeout: the scale aborts, the
  old HMMs' transfer threads leave their rendezvous at once, and the instance is still
  Serving and healthy at 3x the transfer timeout; the next scale succeeds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import torch

from elasticmoe_worker.engine import engine as engine_mod
from elasticmoe_worker.engine import types
from elasticmoe_worker.instance import coordinator

CFG = engine_mod.EngineConfig(dtype="float32", kv_cache_bytes=8 << 20, max_num_batched_tokens=64)
CLIENT_TIMEOUT_S = 120.0


def _wait(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_flood_across_20_switches_loses_no_request(tiny_models):
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 2000, (int(n),), generator=g).tolist() for n in torch.randint(2, 24, (16,), generator=g)]
    inst = coordinator.Instance(tiny_models["qwen3_moe"], 1, CFG).start()
    outcomes: dict[str, str] = {}
    records = []

    async def one(n: int) -> None:
        rid = f"flood-{n}"
        params = types.SamplingParams(max_tokens=4 + n % 24, temperature=0.0, ignore_eos=True)

        async def consume() -> str:
            count = 0
            async for out in inst.generate(rid, prompts[n % len(prompts)], params):
                count += len(out.token_ids)
                if out.finish_reason is types.FinishReason.ERROR:
                    return f"error: {out.error}"
                if out.finished:
                    return "ok" if count == params.max_tokens else f"short: {count} of {params.max_tokens} tokens"
            return "stream ended without a finish"
        try:
            outcomes[rid] = await asyncio.wait_for(consume(), CLIENT_TIMEOUT_S)
        except asyncio.TimeoutError:
            outcomes[rid] = f"hung for {CLIENT_TIMEOUT_S:g} s"
        except Exception as exc:  # noqa: BLE001 - refused up front: a failure too
            outcomes[rid] = f"{type(exc).__name__}: {exc}"

    async def main() -> None:
        stop = asyncio.Event()
        counter = iter(range(10**6))

        async def client() -> None:
            while not stop.is_set():
                await one(next(counter))

        clients = [asyncio.create_task(client()) for _ in range(8)]
        for k in range(20):
            records.append(await asyncio.to_thread(inst.scale, 2 if k % 2 == 0 else 1, f"switch {k}"))
        stop.set()
        await asyncio.gather(*clients)

    try:
        asyncio.run(main())
        failed = {rid: o for rid, o in outcomes.items() if o != "ok"}
        print(f"\n20 switches: {len(outcomes)} requests, {len(failed)} failed, "
              f"{sum(r.requests_handed_over for r in records)} handed over, switch phase ms "
              f"{sorted(r.phases_ms['switch'] for r in records)}")
        assert [r.outcome.value for r in records] == ["Succeeded"] * 20, [(r.outcome, r.message) for r in records]
        assert failed == {}, f"{len(failed)} of {len(outcomes)} requests failed: {list(failed.items())[:5]}"
        assert len(outcomes) >= 100, f"only {len(outcomes)} requests: not a flood"
        assert sum(r.requests_handed_over for r in records) > 0, "no request spanned a switch"
        assert inst.router.flights == {} and inst.stats().healthy
    finally:
        inst.shutdown()


def test_a_new_worker_that_never_joins_aborts_and_leaves_nothing_behind(tiny_models, capfd):
    transfer_timeout_s = 4.0
    inst = coordinator.Instance(tiny_models["mixtral"], 1, CFG).start()
    try:
        _wait(lambda: 1 in inst.state.warm, 60, "the warm worker")
        frozen = inst.fleet.pids()[1]
        os.kill(frozen, signal.SIGSTOP)  # registered, then silent: it never joins the transfer group
        started = time.monotonic()
        record = inst.scale(2, "test: a worker that never joins", timeout_s=transfer_timeout_s)
        assert record.outcome.value == "Aborted", record
        assert "timed out" in record.message and "peer-to-peer transfers" in record.message, record.message
        aborted_config = inst.state.last_config_id
        # The staying HMM's transfer thread was waiting in the rendezvous: it leaves now.
        seen: list[str] = []

        def stopped() -> bool:
            seen.append(capfd.readouterr().err)
            return f"device 0: transition {aborted_config} stopped" in "".join(seen)
        # NOTE: 15 s, not 5: a CI run on a loaded machine missed 5 s once (what the HMMs logged is in
        # the message now, to tell where the thread was)
        try:
            _wait(stopped, 15, "the old HMM's transfer thread to stop")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the workers logged:\n{''.join(seen)[-4000:]}") from None
        time.sleep(max(0.0, started + 3 * transfer_timeout_s - time.monotonic()))
        assert inst.phase.value == "Serving" and inst.stats().healthy, inst.stats()
        assert inst.num_devices == 1
        # The aborted attempt changes nothing later: the next scale (a fresh warm worker) succeeds.
        _wait(lambda: 1 in inst.state.warm, 60, "a fresh warm worker")
        assert inst.scale(2, "test: after the abort").outcome.value == "Succeeded"
        assert inst.stats().healthy
    finally:
        try:
            os.kill(frozen, signal.SIGKILL)
        except (ProcessLookupError, UnboundLocalError):
            pass
        inst.shutdown()

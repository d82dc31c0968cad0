"""A worker's reserve (instance.reserve): memory a warm worker allocates while it waits, and a
serving device keeps for a scale-down (`--scale-down-reserve-mb`), so that the scale copies into
pages that exist; and what the coordinator tells each to reserve."""

from __future__ import annotations

import collections
import dataclasses
import os

import pytest
import torch

from elasticmoe_worker.backends import cpu as cpu_backend
from elasticmoe_worker.contract import wire
from elasticmoe_worker.instance import reconfig, reserve

import testprocs
from reconfigharness import FACTS, Harness


def _resident_bytes(region) -> int:
    return os.fstat(region.fd).st_blocks * 512


def _mapped_bytes(region) -> int:
    """Resident bytes of this process's mapping of `region` (what its PSS counts)."""
    start, lines = f"{region.address:x}-", open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(start):
            return next(int(x.split()[1]) * 1024 for x in lines[i + 1:] if x.startswith("Rss:"))
    raise AssertionError(f"no mapping at {region.address:x}")


def test_reserved_regions_have_their_pages_and_are_handed_out_by_exact_size() -> None:
    backend = cpu_backend.CpuBackend()
    page = backend.page_size_bytes()
    r = reserve.Reserve(backend, 7)
    r.fill([3 * page, page, page], background=False)
    assert r.bytes == 5 * page
    a = r.take(page, "dev7.l1.e0.w2")
    b = r.take(page, "dev7.l1.e1.w2")
    c = r.take(page, "dev7.l1.e2.w2")  # only two of that size were reserved: this one is new
    try:
        assert (r.taken, r.allocated) == (2, 1)
        for region in (a, b):  # populated while waiting: a copy into them allocates nothing, and the
            # owner's memory shows them (mapped: in its PSS)
            assert _resident_bytes(region) >= region.alloc_bytes, region
            assert _mapped_bytes(region) == region.alloc_bytes, region
            assert region.name.startswith("dev7.reserve")
        assert _resident_bytes(c) == 0 and _mapped_bytes(c) == 0 and c.name == "dev7.l1.e2.w2"
        for region in (a, b, c):  # zero-filled, as `allocate` promises
            assert not region.tensor(torch.uint8, (page,)).any()
        assert r.release() == 3 * page  # the one of 3 pages was never taken
        assert r.bytes == 0 and r.taken == 0
        assert r.take(3 * page, "dev7.replicated").name == "dev7.replicated"  # released: nothing reserved now
    finally:
        for region in (a, b, c):
            region.close()


def test_a_reserve_that_cannot_be_filled_leaves_scales_allocating_on_the_spot(caplog) -> None:
    class Full(cpu_backend.CpuBackend):
        def populate(self, region) -> None:
            raise OSError(28, "No space left on device")

    r = reserve.Reserve(Full(), 3)
    r.fill([4096, 4096], background=False)
    assert r.bytes == 0 and "reserving memory for the next scale failed" in caplog.text
    region = r.take(4096, "dev3.replicated")
    assert region.name == "dev3.replicated" and r.allocated == 1
    region.close()


def test_a_warm_worker_is_told_to_reserve_what_the_next_scale_up_gives_it() -> None:
    """Every region the joining device of 2 -> 3 allocates is one of the reserve's sizes, and the
    reserve holds no more than one device more would hold (8 experts on 3 devices: 3 at most)."""
    h = Harness(num_devices=2, warm=[2])
    sizes = reconfig.warm_reserve_bytes(h.state)
    f = h.state.facts
    assert sizes[0] == f.replicated_bytes
    assert collections.Counter(sizes[1:]) == {f.expert_w13_bytes: 3 * len(f.moe_layers),
                                              f.expert_w2_bytes: 3 * len(f.moe_layers)}
    actions = h.scale(3)
    (prep,) = [a.msg for a in actions if isinstance(a, reconfig.Send) and isinstance(a.msg, wire.PrepareTransition)
               and a.dest == reconfig.hmm_dest(2)]
    wanted = collections.Counter([prep.replicated_bytes] + [b for _ in prep.expert_ids for _ in prep.moe_layers
                                                             for b in (prep.expert_w13_bytes, prep.expert_w2_bytes)])
    assert not wanted - collections.Counter(sizes), (wanted, sizes)


def test_populate_before_linux_5_14_allocates_and_maps_every_page(monkeypatch) -> None:
    """Without MADV_POPULATE_WRITE (madvise says EINVAL): fallocate, then a read of each page."""
    import errno

    backend = cpu_backend.CpuBackend()
    monkeypatch.setattr(cpu_backend._libc, "madvise", lambda *args: -1)
    monkeypatch.setattr(cpu_backend.ctypes, "get_errno", lambda: errno.EINVAL)
    region = backend.allocate(3 * backend.page_size_bytes() + 5, "old.kernel")
    try:
        backend.populate(region)
        assert _resident_bytes(region) >= region.alloc_bytes and _mapped_bytes(region) == region.alloc_bytes
        assert not region.tensor(torch.uint8, (region.size_bytes,)).any()
    finally:
        region.close()
    monkeypatch.setattr(cpu_backend.ctypes, "get_errno", lambda: errno.ENOMEM)  # anything else is an error
    region = backend.allocate(4096, "short.of.memory")
    try:
        with pytest.raises(OSError, match="MADV_POPULATE_WRITE"):
            backend.populate(region)
    finally:
        region.close()


def test_resize_keeps_the_regions_it_still_wants_frees_the_rest_and_fills_what_is_missing() -> None:
    backend = cpu_backend.CpuBackend()
    page = backend.page_size_bytes()
    r = reserve.Reserve(backend, 2)
    r.fill([page, page, 2 * page], background=False)
    kept = {id(region) for rs in r._free.values() for region in rs if region.alloc_bytes == page}
    taken = r.take(page, "dev2.l1.e0.w2")  # a scale took one: resize counts afresh
    try:
        freed, missing = r.resize([page, page, 3 * page], why="a test", background=False)
        assert (freed, missing) == (2 * page, 2)  # the 2-page one goes; one page and 3 pages are new
        assert r.bytes == 5 * page and (r.taken, r.allocated) == (0, 0)
        regions = [region for rs in r._free.values() for region in rs]
        assert len({id(x) for x in regions} & kept) == 1  # the one not taken was kept, not made again
        for region in regions:  # what it made is populated like the first fill's
            assert _resident_bytes(region) >= region.alloc_bytes, region
        assert len({x.name for x in regions} | {taken.name}) == 4  # names stay unique across fills
        assert r.resize([], why="off") == (5 * page, 0) and r.bytes == 0
    finally:
        taken.close()
        r.release()


def _commit_scale(h: Harness, target: int) -> list[reconfig.Action]:
    actions = list(h.scale(target))
    while h.state.scale is not None:
        actions += h.complete_stage()
    return actions


def test_serving_devices_are_told_to_keep_what_the_budget_holds_and_a_scale_down_within_it_takes_it() -> None:
    """8 experts: on 4 devices each holds 2, on 3 at most 3. A budget of one expert: each of 4
    devices reserves one (w13 and w2 in both MoE layers), and a scale 4 -> 3 brings none more."""
    f = dataclasses.replace(FACTS, scale_down_reserve_bytes=FACTS.expert_bytes)
    h = Harness(num_devices=2, warm=[2, 3], facts=f)
    actions = _commit_scale(h, 4)
    sent = [(a.dest, a.msg) for a in actions if isinstance(a, reconfig.Send)]
    commits = [(d, m) for d, m in sent if isinstance(m, wire.CommitTransition)]
    reserves = {d: m for d, m in sent if isinstance(m, wire.Reserve)}
    assert commits and all(m.keep_reserve for _, m in commits)
    assert set(reserves) == {reconfig.hmm_dest(d) for d in range(4)}
    one_expert = collections.Counter({f.expert_w13_bytes: len(f.moe_layers), f.expert_w2_bytes: len(f.moe_layers)})
    for d, m in reserves.items():
        assert m.config_id == h.state.config_id and collections.Counter(m.reserve_bytes) == one_expert, (d, m)
        # a Reserve comes after that device's commit (the HMM frees what the commit leaves unused only then)
        assert sent.index((d, m)) > next(i for i, (dd, mm) in enumerate(sent)
                                         if dd == d and isinstance(mm, wire.CommitTransition))
    actions = list(h.scale(3))
    preps = [a for a in actions if isinstance(a, reconfig.Send) and isinstance(a.msg, wire.PrepareTransition)]
    gains = []
    for a in preps:
        d = next(d for d in range(4) if reconfig.hmm_dest(d) == a.dest)
        held_before = {e for e, homes in enumerate(h.state.placement.homes) if d in homes}
        gained = [e for e in a.msg.expert_ids if e not in held_before]
        gains.append(len(gained))
    assert max(gains) == 1, gains  # some device gains an expert, none more than its reserve holds  # within its reserve of one expert


def test_an_aborted_scale_down_has_the_devices_that_stay_fill_their_reserve_again() -> None:
    """The HMM releases an aborted transition's regions, those from its reserve too: the abort
    tells every device of the configuration kept what to reserve (the HMM handles the
    AbortTransition first, on the same channel)."""
    f = dataclasses.replace(FACTS, scale_down_reserve_bytes=FACTS.expert_bytes)
    h = Harness(num_devices=4, facts=f)
    h.scale(3)
    h.to_stage(reconfig.STANDBY)
    actions = h.step(reconfig.AbortRequested("the operator gave up", h.now))
    sent = [(a.dest, a.msg) for a in actions if isinstance(a, reconfig.Send)]
    reserves = {d: m for d, m in sent if isinstance(m, wire.Reserve)}
    assert set(reserves) == {reconfig.hmm_dest(d) for d in range(4)}
    assert all(m.config_id == 1 and len(m.reserve_bytes) == 2 * len(f.moe_layers) for m in reserves.values())
    for d, m in reserves.items():
        assert sent.index((d, m)) > sent.index(next((dd, mm) for dd, mm in sent if dd == d
                                                    and isinstance(mm, wire.AbortTransition)))


def test_without_a_budget_commits_free_the_reserve_and_no_reserve_is_sent() -> None:
    h = Harness(num_devices=1, warm=[1])
    actions = _commit_scale(h, 2)
    sent = [a.msg for a in actions if isinstance(a, reconfig.Send)]
    assert not any(isinstance(m, wire.Reserve) for m in sent)
    assert all(not m.keep_reserve for m in sent if isinstance(m, wire.CommitTransition))
    assert reconfig.reserve_actions(h.state) == []


def test_the_reserve_is_whole_experts_within_the_budget_and_no_more_than_a_scale_to_one_device_brings() -> None:
    """2 devices of 8 experts: a scale to one would bring each 4 experts. A budget of 2.5 experts
    reserves 2; a budget of 100 reserves 4; one device (no scale-down left) keeps nothing."""
    per_expert = 2 * len(FACTS.moe_layers)  # regions: w13 and w2 in each MoE layer
    for budget, experts in ((FACTS.expert_bytes * 5 // 2, 2), (FACTS.expert_bytes * 100, 4), (FACTS.expert_bytes - 1, 0)):
        h = Harness(num_devices=2, facts=dataclasses.replace(FACTS, scale_down_reserve_bytes=budget))
        assert len(reconfig.scale_down_reserve_bytes(h.state, 0)) == experts * per_expert, budget
    f = dataclasses.replace(FACTS, scale_down_reserve_bytes=FACTS.expert_bytes * 100)
    assert reconfig.scale_down_reserve_bytes(Harness(num_devices=1, facts=f).state, 0) == []


def test_a_scale_down_copies_into_the_staying_devices_reserve(tiny_models, capfd) -> None:
    """Real workers: with a budget larger than what a scale to one device brings, each of 2 serving
    devices reserves exactly that; the 2 -> 1 scale takes every expert region device 0 receives
    from the reserve, and at one device (no scale-down left) the reserve is freed."""
    import asyncio
    import re
    import time

    from elasticmoe_worker.engine import engine as engine_mod
    from elasticmoe_worker.engine import types
    from elasticmoe_worker.instance import coordinator

    cfg = engine_mod.EngineConfig(dtype="float32", kv_cache_bytes=8 << 20, max_num_batched_tokens=64)
    inst = coordinator.Instance(tiny_models["qwen3_moe"], 2, cfg, warm_workers=0,
                                scale_down_reserve_bytes=64 << 20).start()
    # NOTE: the logs are read once, after shutdown: reading capfd while workers write can lose a line
    try:
        # 8 experts in 2 MoE layers: at one device, device 0 would hold the 4 it lacks: w13 and w2 of each
        pids = inst.fleet.pids()
        deadline = time.monotonic() + 60
        while any(testprocs.reserve_regions(pids[d], d) < 16 for d in (0, 1)):
            assert time.monotonic() < deadline, {d: testprocs.reserve_regions(pids[d], d) for d in (0, 1)}
            time.sleep(0.05)
        record = inst.scale(1, "test")
        assert record.outcome.value == "Succeeded", record
        # the weights it serves with now came through the reserve's regions: greedy output as the model's
        prompt, params = [5, 17, 33, 2, 9, 41], types.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        ref = engine_mod.LLMEngine.from_model_dir(tiny_models["qwen3_moe"], cfg)
        ref.add_request("ref", prompt, params)
        want = []
        while ref.has_work():
            for o in ref.step():
                want += o.token_ids

        async def served() -> list[int]:
            return [t async for out in inst.generate("r1", prompt, params) for t in out.token_ids]

        assert asyncio.run(served()) == want
    finally:
        inst.shutdown()  # its Shutdown reaches each HMM after the commit's messages, on the same channel
    err = capfd.readouterr().err
    for d in (0, 1):
        assert re.search(rf"device {d}: reserve for a scale-down: [\d.]+ MB in 16 region\(s\)", err), err[-3000:]
        assert re.search(rf"device {d}: reserved [\d.]+ MB in 16 regions for a scale-down from configuration 1", err)
    taken = re.search(r"device 0: configuration 2 committed; [\d.]+ MB of experts released; (\d+) region\(s\) came "
                      r"from its reserve", err)
    assert taken and int(taken.group(1)) == 16, err[-3000:]
    assert re.search(r"device 0: reserve for a scale-down: 0.0 MB in 0 region\(s\) \([\d.]+ MB freed", err), err[-3000:]

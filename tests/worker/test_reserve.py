"""A warm worker's reserve (instance.reserve): memory it allocates while it waits, so that the scale
which takes it copies into pages that exist; and what the coordinator tells it to reserve."""

from __future__ import annotations

import collections
import os

import pytest
import torch

from elasticmoe_worker.backends import cpu as cpu_backend
from elasticmoe_worker.contract import wire
from elasticmoe_worker.instance import reconfig, reserve

from reconfigharness import Harness


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

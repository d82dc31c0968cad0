"""The Ascend backend's release order, checked without an NPU: CANN's aclrtFreePhysical may run
only after every mapping of that memory is unmapped (split out of test_backends.py)."""

from __future__ import annotations

import pytest

from elasticmoe_worker import backends

MiB = 2**20


# --- Ascend: release order (CANN: aclrtFreePhysical only after every unmap of the memory) -----


class AclCallRecorder:
    """Takes `ascend._Acl`'s place where only the order of the runtime calls is under test:
    it records them and touches no device (nothing here runs Ascend)."""

    GRANULE = 2 * MiB

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self._next_address = 0

    def granularity(self) -> int:
        return self.GRANULE

    def make_current(self) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def reserve(self, nbytes: int) -> int:
        self._next_address += 1 << 30
        return self._next_address

    def release_range(self, address: int) -> None:
        self.calls.append(("release_range", address))

    def map(self, address: int, nbytes: int, handle: int) -> None:
        self.calls.append(("map", address, handle))

    def unmap(self, address: int) -> None:
        self.calls.append(("unmap", address))

    def free_physical(self, handle: int) -> None:
        self.calls.append(("free", handle))

    def check_order(self) -> None:
        """Every free comes after the unmap of every mapping of that memory; nothing is freed twice."""
        live: dict[int, int] = {}  # address -> physical handle
        freed: set[int] = set()
        for call in self.calls:
            if call[0] == "map":
                assert call[2] not in freed, f"{call} maps freed memory"
                live[call[1]] = call[2]
            elif call[0] == "unmap":
                live.pop(call[1])
            elif call[0] == "free":
                assert call[1] not in live.values(), f"{call} while still mapped at {live}: {self.calls}"
                assert call[1] not in freed, f"{call} twice"
                freed.add(call[1])


def _ascend_region(acl: AclCallRecorder, phys: int):
    from elasticmoe_worker.backends import ascend

    handle = backends.MemoryHandle(backend="ascend", name=f"expert{phys}", size_bytes=acl.GRANULE, owner_pid=1)
    return ascend.AscendRegion(handle, acl, phys, acl.GRANULE, owned=False)


@pytest.mark.parametrize("order", ["region_first", "slot_first", "pages_first", "remapped"])
def test_ascend_frees_physical_memory_only_after_its_last_unmap(order: str) -> None:
    from elasticmoe_worker.backends import ascend

    acl = AclCallRecorder()
    first, second = _ascend_region(acl, 7), _ascend_region(acl, 8)
    pages = ascend.AscendExpertPages(acl, 2, acl.GRANULE)
    pages.map(1, first)
    if order == "region_first":  # what attach_device does: the slot keeps the memory
        first.close()
        assert ("free", 7) not in acl.calls
        pages.unmap(1)
    elif order == "slot_first":
        pages.unmap(1)
        assert ("free", 7) not in acl.calls
        first.close()
    elif order == "pages_first":
        pages.close()
        first.close()
    else:  # the slot shows another expert: the first one's memory is free once its region closes
        first.close()
        pages.map(1, second)
        assert ("free", 7) in acl.calls
    assert ("free", 7) in acl.calls
    pages.close()
    second.close()
    assert acl.calls.count(("free", 8)) == 1
    acl.check_order()

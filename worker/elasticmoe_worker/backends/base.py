"""The hardware seam of the HBM manager: owned and attached device memory, and expert pages.

Why it exists: per device, one long-lived HMM process owns all device memory (weights, expert
pages, the KV pool). Executors are separate processes that attach to that memory by a
`MemoryHandle` without copying, and experts move between devices by remapping pages inside one
reserved virtual range (`ExpertPages`). Everything that differs between CPU, CUDA and Ascend
sits behind the three abstract classes here; `elasticmoe_worker.backends.get_backend` is the one
factory.

Lifetime rule, shared by every backend: memory stays mapped while any tensor view of it lives.
`Region.close()` and `ExpertPages.close()` give up the object's own references and every
handle they can release now; the address range itself is unmapped when the last view is
garbage collected (CPU and CUDA), so closing never turns a live tensor into a dangling
pointer. (Unmapping under a live `torch.frombuffer` view is a segfault on the next read:
checked on this machine.) The Ascend backend cannot see views and unmaps at `close()`; see its
module.

What this does not guarantee:
- thread safety: remapping a slot while another thread reads it shows old or new pages, or
  faults mid-remap on devices; executors remap between forward steps;
- that an attached region stays valid after its owner process exits on every backend (CPU:
  yes, the pages live while mapped; devices: per the driver);
- any ordering between a write in one process and a read in another: callers synchronise
  (a device stream sync, then a message) exactly as they would between threads.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import os
from typing import Sequence

import torch

from elasticmoe_worker.contract import wire

logger = logging.getLogger(__name__)


class AttachError(RuntimeError):
    """A handle could not be attached: owner gone, handle closed, or no permission."""


# The handle is part of the wire contract (it travels in HMMReady); defined there, torch-free.
MemoryHandle = wire.MemoryHandle


def round_up(n: int, multiple: int) -> int:
    assert multiple > 0, multiple
    return -(-n // multiple) * multiple


def _check_dtype_shape(dtype: object, shape: Sequence[int]) -> tuple[torch.dtype, tuple[int, ...]]:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    shape_t = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape_t):
        raise ValueError(f"shape must not have negative sizes, got {shape_t}")
    return dtype, shape_t


class Region(abc.ABC):
    """One allocation, owned by this process (`allocate`) or attached from another (`attach`).

    `size_bytes` is what was asked for; `alloc_bytes` is that rounded up to the backend's page
    size, which is what exists physically and what `ExpertPages.map` maps.
    """

    def __init__(self, handle: MemoryHandle, alloc_bytes: int, *, owned: bool) -> None:
        assert alloc_bytes >= handle.size_bytes, (alloc_bytes, handle.size_bytes)
        self.handle = handle
        self.size_bytes = handle.size_bytes
        self.alloc_bytes = alloc_bytes
        self.owned = owned
        self._closed = False
        self._bytes: torch.Tensor | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def name(self) -> str:
        return self.handle.name

    def tensor(self, dtype: torch.dtype, shape: Sequence[int], offset_bytes: int = 0) -> torch.Tensor:
        """A view of `shape` elements of `dtype` starting at `offset_bytes`; never a copy.

        Shape: exactly `shape`, contiguous. Raises ValueError if it does not fit in `size_bytes`
        or `offset_bytes` is not a multiple of the element size.
        """
        if self._closed:
            raise ValueError(f"region {self.name!r} is closed")
        dtype, shape_t = _check_dtype_shape(dtype, shape)
        itemsize = dtype.itemsize
        nbytes = math.prod(shape_t) * itemsize
        if offset_bytes < 0 or offset_bytes % itemsize:
            raise ValueError(
                f"offset_bytes={offset_bytes} must be >= 0 and a multiple of {dtype}'s {itemsize} bytes"
            )
        if offset_bytes + nbytes > self.size_bytes:
            raise ValueError(
                f"{dtype}{list(shape_t)} at offset_bytes={offset_bytes} needs "
                f"{offset_bytes + nbytes} bytes; region {self.name!r} has {self.size_bytes}"
            )
        if self._bytes is None:
            self._bytes = self._byte_tensor()
            assert self._bytes.dtype == torch.uint8 and self._bytes.numel() == self.alloc_bytes
        flat = self._bytes[offset_bytes : offset_bytes + nbytes]
        return flat.view(dtype).view(shape_t)

    def close(self) -> None:
        """Give up this object's hold on the memory. Idempotent; never raises for live views.

        Views already handed out stay valid until they are garbage collected (see the module
        docstring for the Ascend exception). An owner's close also ends new attaches.
        """
        if self._closed:
            return
        self._closed = True
        self._bytes = None
        try:
            self._close()
        except Exception:  # a failed release must not take the HMM down with it
            logger.exception("closing region %s failed", self.name)

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("owned" if self.owned else "attached")
        return f"<{type(self).__name__} {self.name!r} {self.size_bytes} bytes {state}>"

    @abc.abstractmethod
    def _byte_tensor(self) -> torch.Tensor:
        """A 1-D uint8 tensor over all `alloc_bytes`, on the region's device; called once."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Drop the backend's references; release now what no view can still need."""


class ExpertPages(abc.ABC):
    """One reserved virtual range of `num_slots` slots of `slot_bytes`, one expert per slot.

    `view()` gives one `[num_slots, *expert_shape]` tensor over the whole range, built once;
    `map(slot, region)` makes a slot show a region's pages without copying, so what the view
    shows changes while the tensor (and its data_ptr) stays the same.

    An unmapped slot has no memory behind it on every backend: touching it faults (SIGSEGV on
    CPU, an illegal-address error on devices). Holding or slicing the view is fine; reading or
    writing an unmapped slot is a bug the CPU backend shows as loudly as the hardware would.
    """

    def __init__(self, num_slots: int, slot_bytes: int, page_size_bytes: int) -> None:
        if not isinstance(num_slots, int) or num_slots <= 0:
            raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
        if not isinstance(slot_bytes, int) or slot_bytes <= 0 or slot_bytes % page_size_bytes:
            raise ValueError(
                f"slot_bytes must be a positive multiple of the page size {page_size_bytes}, "
                f"got {slot_bytes!r} (use backends.round_up(expert_bytes, page_size_bytes))"
            )
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.page_size_bytes = page_size_bytes
        self._closed = False
        self._mapped: dict[int, str] = {}  # slot -> region name, for errors and repr
        self._bytes: torch.Tensor | None = None
        self._views: dict[tuple[torch.dtype, tuple[int, ...]], torch.Tensor] = {}

    @property
    def total_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def closed(self) -> bool:
        return self._closed

    def mapped_slots(self) -> dict[int, str]:
        """slot -> name of the region it shows."""
        return dict(self._mapped)

    def view(self, dtype: torch.dtype, expert_shape: Sequence[int]) -> torch.Tensor:
        """The `[num_slots, *expert_shape]` tensor over the range; the same object per
        (dtype, expert_shape). Slot i starts at byte i * slot_bytes (as_strided when the
        expert is smaller than a slot)."""
        if self._closed:
            raise ValueError("expert pages are closed")
        dtype, shape_t = _check_dtype_shape(dtype, expert_shape)
        key = (dtype, shape_t)
        if key in self._views:
            return self._views[key]
        itemsize = dtype.itemsize
        expert_bytes = math.prod(shape_t) * itemsize
        if expert_bytes > self.slot_bytes:
            raise ValueError(
                f"an expert of {dtype}{list(shape_t)} is {expert_bytes} bytes; slots are {self.slot_bytes}"
            )
        if self.slot_bytes % itemsize:
            raise ValueError(f"slot_bytes={self.slot_bytes} is not a multiple of {dtype}'s {itemsize} bytes")
        if self._bytes is None:
            self._bytes = self._byte_tensor()
            assert self._bytes.dtype == torch.uint8 and self._bytes.numel() == self.total_bytes
        typed = self._bytes.view(dtype)
        inner = [1] * len(shape_t)
        for i in range(len(shape_t) - 2, -1, -1):
            inner[i] = inner[i + 1] * shape_t[i + 1]
        out = typed.as_strided(
            (self.num_slots, *shape_t), (self.slot_bytes // itemsize, *inner), typed.storage_offset()
        )
        self._views[key] = out
        return out

    def map(self, slot: int, region: Region) -> None:
        """Make `slot` show `region`'s pages (replacing what it showed); no copy.

        The slot's bytes past `region.alloc_bytes` are left unmapped.
        """
        self._check_slot(slot)
        if not isinstance(region, Region):
            raise TypeError(f"region must be a Region, got {type(region).__name__}")
        if region.closed:
            raise ValueError(f"region {region.name!r} is closed")
        if region.alloc_bytes > self.slot_bytes:
            raise ValueError(
                f"region {region.name!r} is {region.alloc_bytes} bytes; slots are {self.slot_bytes}"
            )
        self._map(slot, region)
        self._mapped[slot] = region.name
        logger.debug("slot %d now shows %s", slot, region.name)

    def unmap(self, slot: int) -> None:
        """Leave `slot` with no memory behind it (touching it then faults). Idempotent."""
        self._check_slot(slot)
        if slot in self._mapped:
            self._unmap(slot)
            del self._mapped[slot]

    def close(self) -> None:
        """Give up this object's hold on the range. Idempotent; the range is unmapped once no
        view of it lives (Ascend: at once)."""
        if self._closed:
            return
        self._closed = True
        self._views.clear()
        self._bytes = None
        try:
            self._close()
        except Exception:
            logger.exception("closing expert pages failed")
        self._mapped.clear()

    def __enter__(self) -> "ExpertPages":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.num_slots} slots x {self.slot_bytes} bytes, "
            f"mapped {sorted(self._mapped)}{' closed' if self._closed else ''}>"
        )

    def _check_slot(self, slot: int) -> None:
        if self._closed:
            raise ValueError("expert pages are closed")
        if not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot must be an int in [0, {self.num_slots}), got {slot!r}")

    @abc.abstractmethod
    def _byte_tensor(self) -> torch.Tensor:
        """A 1-D uint8 tensor over all `total_bytes` of the range; called once."""

    @abc.abstractmethod
    def _map(self, slot: int, region: Region) -> None: ...

    @abc.abstractmethod
    def _unmap(self, slot: int) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None: ...


class DeviceBackend(abc.ABC):
    """One kind of device. An instance is bound to one device (`device_index`)."""

    name: str
    collective_backend: str  # "gloo" | "nccl" | "hccl"
    # Whether `copy_from_peer` works: a peer process on the same host can hand this backend a
    # region to copy from (CPU: a memfd). Elsewhere transitions go over `collective_backend`,
    # which picks its own path within a node (NCCL: P2P or SHM).
    copies_from_peers: bool = False

    def __init__(self, device_index: int = 0) -> None:
        if not isinstance(device_index, int) or device_index < 0:
            raise ValueError(f"device_index must be an int >= 0, got {device_index!r}")
        self.device_index = device_index

    @abc.abstractmethod
    def torch_device(self, index: int | None = None) -> torch.device:
        """The torch device for `index` (default: this backend's device)."""

    @abc.abstractmethod
    def unavailable_reason(self) -> str | None:
        """None when usable here; otherwise one sentence saying what is missing. Never raises."""

    def is_available(self) -> bool:
        return self.unavailable_reason() is None

    @abc.abstractmethod
    def allocate(self, size_bytes: int, name: str) -> Region:
        """New memory owned by this process, zero-filled, exportable by `region.handle`."""

    def populate(self, region: Region) -> None:
        """Give an owned region its physical memory now, so that writing it later pays for no
        page (`reserve.Reserve`). Here: nothing (an allocation is physical already)."""

    @abc.abstractmethod
    def attach(self, handle: MemoryHandle) -> Region:
        """The memory behind `handle` (usually from another process), mapped without copying.

        Raises AttachError when the owner is gone, closed the region, or denies access.
        """

    def handles_prefetched(self, handles: "list[MemoryHandle]",
                           given: "dict[bytes, int] | None" = None) -> contextlib.AbstractContextManager:
        """A block inside which `attach` and `copy_from_peer` of `handles` skip the per-handle
        round trip to their owners (backends whose handles pass as fds: one request per owner).
        `given`: fds by `fd_token` that came with the handles (`peer_copy`'s mailbox messages);
        the block owns them. Here: no change (`given` is closed)."""
        for fd in (given or {}).values():
            os.close(fd)
        return contextlib.nullcontext()

    def copy_from_peer(self, dst: Region, dst_offset: int, src: MemoryHandle, src_offset: int, nbytes: int) -> None:
        """Copy `nbytes` of another process's region (`src`, granted to peers by its owner) at
        `src_offset` into `dst` at `dst_offset`: one copy, no staging. Only where
        `copies_from_peers`; raises AttachError when the owner refuses or is gone."""
        raise NotImplementedError(f"backend {self.name!r} does not copy from peer regions; use its collectives")

    def copy_to_peer(self, src: Region, src_offset: int, dst: MemoryHandle, dst_offset: int, nbytes: int) -> None:
        """The other direction of `copy_from_peer`: `nbytes` of this process's `src` at `src_offset`
        into another process's region `dst` (granted to peers by its owner) at `dst_offset`. Every
        backend with `copies_from_peers` has both."""
        raise NotImplementedError(f"backend {self.name!r} does not copy into peer regions; use its collectives")

    @abc.abstractmethod
    def expert_pages(self, num_slots: int, slot_bytes: int) -> ExpertPages: ...

    @abc.abstractmethod
    def page_size_bytes(self) -> int:
        """The mapping granularity: slot sizes and mapped regions are multiples of it."""

    def _check_allocate_args(self, size_bytes: int, name: str) -> None:
        if not isinstance(size_bytes, int) or size_bytes <= 0:
            raise ValueError(f"size_bytes must be a positive int, got {size_bytes!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")

    def _check_handle(self, handle: MemoryHandle) -> None:
        if not isinstance(handle, MemoryHandle):
            raise TypeError(f"handle must be a MemoryHandle, got {type(handle).__name__}")
        if handle.backend != self.name:
            raise ValueError(f"handle {handle.name!r} is for backend {handle.backend!r}, not {self.name!r}")

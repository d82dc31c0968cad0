"""The Ascend backend: CANN physical memory mapped into reserved ranges, shared by handle.

Why this shape: as on CUDA, an expert's memory must be mappable into the expert pages' range,
so every region is a CANN physical allocation (`aclrtMallocPhysical`, HBM huge pages), never an
`aclrtMalloc` block:

- allocate: `aclrtMallocPhysical` → `aclrtReserveMemAddress` → `aclrtMapMem`;
  `aclrtMemExportToShareableHandle` (flag DISABLE_PID_VALIDATION, so executors need not be
  whitelisted with `aclrtMemSetPidToShareableHandle` first) gives a 64-bit shareable handle,
  published as `MemoryHandle.ipc` (8 bytes, little-endian);
- attach: `aclrtMemImportFromShareableHandle` → reserve → map;
- expert pages: one `aclrtReserveMemAddress` range; `map` = `aclrtUnmapMem` of the slot (if
  mapped) then `aclrtMapMem` of the region's physical handle at the slot;
- release: CANN's `aclrtFreePhysical` must come only after every `aclrtUnmapMem` of that
  memory in this process, so each physical allocation counts its mappings (the region's own
  and expert slots'); closing a region unmaps its own range and frees the physical memory
  when the last slot showing it is unmapped too (at once if none does);
- tensors: `torch_npu._C._construct_storage_from_data_pointer` +
  `_construct_NPU_Tensor_From_Storage_And_Metadata` (private torch_npu helpers that CANN's own
  shmem package uses); the CANN C API is called through ctypes on `libascendcl.so`.

What it does not guarantee:
- unlike CPU and CUDA, a torch_npu storage built from a pointer does not tell us when its last
  view dies, so `close()` unmaps at once: drop every view first;
- with PID validation off, any process on the host that learns the 64-bit handle can import the
  memory; run HMM and executors in one trust domain;
- it has never run in this repository's development or CI (no NPU there); tests marked
  `ascend` run it where one exists. Only the release ordering is unit-tested (with a recorder
  of the ACL calls in place of `_Acl`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct

import torch

from elasticmoe_worker.backends import base

logger = logging.getLogger(__name__)

# Values from CANN's acl_rt.h.
_ACL_SUCCESS = 0
_ACL_MEM_HANDLE_TYPE_NONE = 0
_ACL_MEM_ALLOCATION_TYPE_PINNED = 0
_ACL_HBM_MEM_HUGE = 4  # aclrtMemAttr: DDR, HBM, DDR_HUGE, DDR_NORMAL, HBM_HUGE, ...
_ACL_MEM_LOCATION_TYPE_DEVICE = 1
_ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM = 0
_ACL_RT_VMM_EXPORT_FLAG_DISABLE_PID_VALIDATION = 0x1
_ACL_FORMAT_ND = 2


class _MemLocation(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("type", ctypes.c_int)]


class _PhysicalMemProp(ctypes.Structure):
    _fields_ = [
        ("handleType", ctypes.c_int),
        ("allocationType", ctypes.c_int),
        ("memAttr", ctypes.c_int),
        ("location", _MemLocation),
        ("reserve", ctypes.c_uint64),
    ]


def _torch_npu_problem() -> str | None:
    """Why torch_npu cannot be imported (absent, or present without CANN's libraries), or None."""
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device with torch)
    except ImportError as exc:
        if getattr(exc, "name", None) == "torch_npu":
            return "the Python package `torch_npu` is not installed (pip install 'elasticmoe[ascend]')"
        return f"`torch_npu` is installed but does not import ({exc}): source CANN's set_env.sh"
    except Exception as exc:  # torch_npu raises other errors when the driver or toolkit is missing
        return f"`torch_npu` is installed but does not import ({type(exc).__name__}: {exc})"
    return None


class _Acl:
    """The CANN runtime calls we need, with errors turned into RuntimeError."""

    def __init__(self, device_index: int) -> None:
        self.device_index = device_index
        lib = ctypes.CDLL("libascendcl.so")  # already loaded by torch_npu: same handle
        vp, sz, u64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64
        sigs = {
            "aclrtMallocPhysical": [ctypes.POINTER(vp), sz, ctypes.POINTER(_PhysicalMemProp), u64],
            "aclrtFreePhysical": [vp],
            "aclrtReserveMemAddress": [ctypes.POINTER(vp), sz, sz, vp, u64],
            "aclrtReleaseMemAddress": [vp],
            "aclrtMapMem": [vp, sz, sz, vp, u64],
            "aclrtUnmapMem": [vp],
            "aclrtMemGetAllocationGranularity": [
                ctypes.POINTER(_PhysicalMemProp), ctypes.c_int, ctypes.POINTER(sz)
            ],
            "aclrtMemExportToShareableHandle": [vp, ctypes.c_int, u64, ctypes.POINTER(u64)],
            "aclrtMemImportFromShareableHandle": [u64, ctypes.c_int32, ctypes.POINTER(vp)],
            "aclrtSynchronizeDevice": [],
        }
        for fn, argtypes in sigs.items():
            f = getattr(lib, fn)
            f.argtypes = argtypes
            f.restype = ctypes.c_int
        lib.aclGetRecentErrMsg.restype = ctypes.c_char_p
        lib.aclGetRecentErrMsg.argtypes = []
        self.lib = lib
        self._granularity: int | None = None

    def check(self, what: str, ret: int) -> None:
        if ret != _ACL_SUCCESS:
            msg = self.lib.aclGetRecentErrMsg()
            text = msg.decode(errors="replace") if msg else ""
            raise RuntimeError(f"{what} failed on npu:{self.device_index}: error {ret} {text}".rstrip())

    def make_current(self) -> None:
        torch.npu.set_device(self.device_index)  # aclrtSetDevice for this thread

    def prop(self) -> _PhysicalMemProp:
        return _PhysicalMemProp(
            _ACL_MEM_HANDLE_TYPE_NONE, _ACL_MEM_ALLOCATION_TYPE_PINNED, _ACL_HBM_MEM_HUGE,
            _MemLocation(self.device_index, _ACL_MEM_LOCATION_TYPE_DEVICE), 0,
        )

    def granularity(self) -> int:
        if self._granularity is None:
            self.make_current()
            out = ctypes.c_size_t()
            prop = self.prop()
            self.check("aclrtMemGetAllocationGranularity", self.lib.aclrtMemGetAllocationGranularity(
                ctypes.byref(prop), _ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM, ctypes.byref(out)
            ))
            self._granularity = int(out.value)
        return self._granularity

    def malloc_physical(self, nbytes: int) -> int:
        handle = ctypes.c_void_p()
        prop = self.prop()
        self.check("aclrtMallocPhysical", self.lib.aclrtMallocPhysical(
            ctypes.byref(handle), nbytes, ctypes.byref(prop), 0
        ))
        return int(handle.value)

    def free_physical(self, handle: int) -> None:
        self.check("aclrtFreePhysical", self.lib.aclrtFreePhysical(handle))

    def export(self, handle: int) -> int:
        out = ctypes.c_uint64()
        self.check("aclrtMemExportToShareableHandle", self.lib.aclrtMemExportToShareableHandle(
            handle, _ACL_MEM_HANDLE_TYPE_NONE, _ACL_RT_VMM_EXPORT_FLAG_DISABLE_PID_VALIDATION,
            ctypes.byref(out),
        ))
        return int(out.value)

    def import_(self, shareable: int) -> int:
        handle = ctypes.c_void_p()
        self.check("aclrtMemImportFromShareableHandle", self.lib.aclrtMemImportFromShareableHandle(
            shareable, self.device_index, ctypes.byref(handle)
        ))
        return int(handle.value)

    def reserve(self, nbytes: int) -> int:
        out = ctypes.c_void_p()
        self.check("aclrtReserveMemAddress", self.lib.aclrtReserveMemAddress(
            ctypes.byref(out), nbytes, self.granularity(), None, 0
        ))
        return int(out.value)

    def release_range(self, address: int) -> None:
        self.check("aclrtReleaseMemAddress", self.lib.aclrtReleaseMemAddress(address))

    def map(self, address: int, nbytes: int, handle: int) -> None:
        self.check("aclrtMapMem", self.lib.aclrtMapMem(address, nbytes, 0, handle, 0))

    def unmap(self, address: int) -> None:
        self.check("aclrtUnmapMem", self.lib.aclrtUnmapMem(address))

    def synchronize(self) -> None:
        self.check("aclrtSynchronizeDevice", self.lib.aclrtSynchronizeDevice())

    def byte_tensor(self, address: int, nbytes: int) -> torch.Tensor:
        import torch_npu

        device = torch.device("npu", self.device_index)
        storage = torch_npu._C._construct_storage_from_data_pointer(address, device, nbytes)
        metadata = {
            "data_ptr": address, "device": device, "nbytes": nbytes, "dtype": torch.uint8,
            "size": torch.Size([nbytes]), "stride": (1,), "storage_offset": 0,
            "npu_format": _ACL_FORMAT_ND, "layout": torch.strided,
            "memory_format": torch.contiguous_format, "requires_grad": False,
        }
        return torch_npu._C._construct_NPU_Tensor_From_Storage_And_Metadata(metadata, storage)


class _Physical:
    """One physical allocation in this process and how many mappings of it exist.

    NOTE: `aclrtFreePhysical` only after every mapping is unmapped (CANN's rule): the memory is
    freed when its region has released it and the last mapping goes, whichever comes last.
    """

    def __init__(self, acl: _Acl, handle: int) -> None:
        self.acl = acl
        self.handle = handle
        self.num_mappings = 0
        self.released = False
        self.freed = False

    def mapped(self) -> None:
        assert not self.freed, "mapping freed physical memory"
        self.num_mappings += 1

    def unmapped(self) -> None:
        assert self.num_mappings > 0, "unmapped more often than mapped"
        self.num_mappings -= 1
        self._free_if_unused()

    def release(self) -> None:
        self.released = True
        self._free_if_unused()

    def _free_if_unused(self) -> None:
        if self.released and self.num_mappings == 0 and not self.freed:
            self.freed = True
            self.acl.free_physical(self.handle)


class AscendRegion(base.Region):
    def __init__(
        self, handle: base.MemoryHandle, acl: _Acl, phys: int, alloc_bytes: int, *, owned: bool
    ) -> None:
        super().__init__(handle, alloc_bytes, owned=owned)
        self._acl = acl
        self._phys = _Physical(acl, phys)
        self.address = acl.reserve(alloc_bytes)
        try:
            acl.map(self.address, alloc_bytes, phys)
        except BaseException:
            acl.release_range(self.address)
            raise
        self._phys.mapped()

    @property
    def physical(self) -> _Physical:
        if self._closed:
            raise ValueError(f"region {self.name!r} is closed")
        return self._phys

    def _byte_tensor(self) -> torch.Tensor:
        return self._acl.byte_tensor(self.address, self.alloc_bytes)

    def _close(self) -> None:
        # NOTE: unmaps under any live view (see module docstring): callers drop views first.
        acl = self._acl
        acl.make_current()
        acl.synchronize()
        acl.unmap(self.address)
        self._phys.unmapped()
        acl.release_range(self.address)
        # Freed now, or when the last expert slot showing it is unmapped (see _Physical).
        self._phys.release()


class AscendExpertPages(base.ExpertPages):
    def __init__(self, acl: _Acl, num_slots: int, slot_bytes: int) -> None:
        super().__init__(num_slots, slot_bytes, acl.granularity())
        self._acl = acl
        acl.make_current()
        self.address = acl.reserve(self.total_bytes)
        self._slot_physical: dict[int, _Physical] = {}

    def _byte_tensor(self) -> torch.Tensor:
        return self._acl.byte_tensor(self.address, self.total_bytes)

    def _map(self, slot: int, region: base.Region) -> None:
        if not isinstance(region, AscendRegion):
            raise TypeError(f"Ascend expert pages map Ascend regions, got {type(region).__name__}")
        self._unmap(slot)
        phys = region.physical
        self._acl.map(self.address + slot * self.slot_bytes, region.alloc_bytes, phys.handle)
        phys.mapped()
        self._slot_physical[slot] = phys

    def _unmap(self, slot: int) -> None:
        phys = self._slot_physical.pop(slot, None)
        if phys is not None:
            self._acl.make_current()
            self._acl.synchronize()  # no kernel may be reading the slot as it goes
            self._acl.unmap(self.address + slot * self.slot_bytes)
            phys.unmapped()  # frees it if its region was closed before

    def _close(self) -> None:
        for slot in list(self._slot_physical):
            self._unmap(slot)
        self._acl.release_range(self.address)


class AscendBackend(base.DeviceBackend):
    name = "ascend"
    collective_backend = "hccl"

    def __init__(self, device_index: int = 0) -> None:
        super().__init__(device_index)
        self._acl: _Acl | None = None

    def torch_device(self, index: int | None = None) -> torch.device:
        return torch.device("npu", self.device_index if index is None else index)

    def unavailable_reason(self) -> str | None:
        """Everything missing, in one sentence: the package, CANN's runtime, the device."""
        missing = []
        problem = _torch_npu_problem()
        if problem is not None:
            missing.append(problem)
        try:
            ctypes.CDLL("libascendcl.so")
        except OSError as exc:
            missing.append(f"CANN's runtime libascendcl.so cannot be loaded ({exc}): install the CANN toolkit and "
                           "source its set_env.sh (the NPU driver comes from the host)")
        if missing:
            return "; ".join(missing)
        if not torch.npu.is_available():
            return "torch_npu sees no Ascend NPU (torch.npu.is_available() is False; check npu-smi and the driver)"
        if self.device_index >= torch.npu.device_count():
            return f"npu:{self.device_index} does not exist ({torch.npu.device_count()} devices visible)"
        return None

    def _runtime(self) -> _Acl:
        if self._acl is None:
            reason = self.unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"device backend 'ascend' is not usable here: {reason}")
            self._acl = _Acl(self.device_index)
        return self._acl

    def page_size_bytes(self) -> int:
        return self._runtime().granularity()

    def allocate(self, size_bytes: int, name: str) -> AscendRegion:
        self._check_allocate_args(size_bytes, name)
        acl = self._runtime()
        acl.make_current()
        alloc_bytes = base.round_up(size_bytes, acl.granularity())
        phys = acl.malloc_physical(alloc_bytes)
        try:
            shareable = acl.export(phys)
            handle = base.MemoryHandle(
                backend=self.name, name=name, size_bytes=size_bytes, owner_pid=os.getpid(),
                ipc=struct.pack("<Q", shareable), device_index=self.device_index,
            )
            region = AscendRegion(handle, acl, phys, alloc_bytes, owned=True)
        except BaseException:
            acl.free_physical(phys)
            raise
        region._byte_tensor().zero_()  # physical memory is not zeroed; the interface promises it
        acl.synchronize()
        logger.debug("allocated %s on npu:%d: %d bytes", name, self.device_index, size_bytes)
        return region

    def attach(self, handle: base.MemoryHandle) -> AscendRegion:
        self._check_handle(handle)
        if len(handle.ipc) != 8:
            raise ValueError(f"handle {handle.name!r} has no 8-byte Ascend shareable handle in ipc")
        acl = self._runtime()
        acl.make_current()
        (shareable,) = struct.unpack("<Q", handle.ipc)
        try:
            phys = acl.import_(shareable)
        except RuntimeError as exc:
            raise base.AttachError(f"cannot attach {handle.name!r}: {exc}") from exc
        alloc_bytes = base.round_up(handle.size_bytes, acl.granularity())
        try:
            return AscendRegion(handle, acl, phys, alloc_bytes, owned=False)
        except BaseException:
            acl.free_physical(phys)
            raise

    def expert_pages(self, num_slots: int, slot_bytes: int) -> AscendExpertPages:
        return AscendExpertPages(self._runtime(), num_slots, slot_bytes)

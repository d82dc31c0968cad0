"""The CUDA backend: every region is a CUDA VMM allocation, shared by POSIX file descriptor.

Why VMM for everything: an expert's memory must be mappable into another virtual range (the
expert pages), and only `cuMemCreate` allocations can be (`cudaMalloc` / torch caching-allocator
blocks cannot, and legacy `cuIpcGetMemHandle` does not work on VMM memory). So one mechanism
serves weights, experts and the KV pool:

- allocate: `cuMemCreate` (pinned device memory, `requestedHandleTypes` = POSIX fd) →
  `cuMemAddressReserve` → `cuMemMap` → `cuMemSetAccess`; `cuMemExportToShareableHandle` gives an
  fd in the owner, registered with the process's fd server (`fdpass`);
- attach: the owner sends the fd over a Unix socket (SCM_RIGHTS: no `pidfd_getfd`, no ptrace
  permission, no capability), then `cuMemImportFromShareableHandle` → reserve / map / set
  access in this process;
- expert pages: one `cuMemAddressReserve` range; `map` = `cuMemUnmap` of the slot (if mapped),
  `cuMemMap` of the region's allocation handle at the slot, `cuMemSetAccess`. torch asks the
  driver which device a pointer is on when it wraps it, so while the view is built an unmapped
  slot 0 briefly shows one scratch granule (one per backend, never freed);
- tensors: a `__cuda_array_interface__` object over the mapped address; torch keeps a reference
  to it, and a finalizer on it unmaps and frees the range when the last view dies.

What it does not guarantee:
- the attaching process must be the owner or its child, of the same user, in the same network
  namespace (see `fdpass`);
- both processes must see the device under the same index (same CUDA_VISIBLE_DEVICES);
- remapping synchronises the context first (`cuCtxSynchronize`) so no in-flight kernel reads a
  slot as it changes, but kernels launched by other threads during the remap are the caller's
  problem;
- it has never run in this repository's development or CI (no GPU there); tests marked `cuda`
  and `scripts/device-check.sh` run it where a GPU exists.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import weakref
from typing import Any, Callable

import torch

from elasticmoe_worker.backends import base, fdpass

logger = logging.getLogger(__name__)

def _import_driver() -> Any | None:
    """cuda-python's driver module, or None when the package is absent."""
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6

        return driver
    except ImportError:
        pass
    try:
        from cuda import cuda as driver  # older cuda-python

        return driver
    except ImportError:
        return None


class _DevicePointer:
    """Hands a device address to torch without copying (and is the address range's lifetime)."""

    def __init__(self, address: int, nbytes: int, device_index: int) -> None:
        self.device_index = device_index
        self.__cuda_array_interface__ = {
            "data": (address, False),
            "shape": (nbytes,),
            "typestr": "|u1",
            "strides": None,
            "version": 3,
        }


class _Driver:
    """The few cuda-python calls we need, with errors turned into RuntimeError."""

    def __init__(self, drv: Any, device_index: int) -> None:
        self.drv = drv
        self.device_index = device_index
        self._ctx: Any = None
        self._granularity: int | None = None

    def check(self, what: str, ret: Any) -> Any:
        err, *rest = ret if isinstance(ret, tuple) else (ret,)
        if err != self.drv.CUresult.CUDA_SUCCESS:
            _, msg = self.drv.cuGetErrorString(err)
            text = msg.decode() if isinstance(msg, bytes) else str(msg)
            raise RuntimeError(f"{what} failed on cuda:{self.device_index}: {err} ({text})")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else tuple(rest)

    def make_current(self) -> None:
        # The primary context is the one torch uses; making it current per call is cheap and
        # covers finalizers that run on another thread.
        if self._ctx is None:
            self.check("cuInit", self.drv.cuInit(0))
            dev = self.check("cuDeviceGet", self.drv.cuDeviceGet(self.device_index))
            self._ctx = self.check("cuDevicePrimaryCtxRetain", self.drv.cuDevicePrimaryCtxRetain(dev))
        self.check("cuCtxSetCurrent", self.drv.cuCtxSetCurrent(self._ctx))

    def prop(self) -> Any:
        drv = self.drv
        prop = drv.CUmemAllocationProp()
        prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.device_index
        prop.requestedHandleTypes = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        return prop

    def granularity(self) -> int:
        if self._granularity is None:
            self.make_current()
            flag = self.drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
            self._granularity = int(self.check(
                "cuMemGetAllocationGranularity", self.drv.cuMemGetAllocationGranularity(self.prop(), flag)
            ))
        return self._granularity

    def create(self, nbytes: int) -> int:
        return int(self.check("cuMemCreate", self.drv.cuMemCreate(nbytes, self.prop(), 0)))

    def export_fd(self, alloc_handle: int) -> int:
        kind = self.drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        return int(self.check(
            "cuMemExportToShareableHandle", self.drv.cuMemExportToShareableHandle(alloc_handle, kind, 0)
        ))

    def import_fd(self, fd: int) -> int:
        kind = self.drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        return int(self.check(
            "cuMemImportFromShareableHandle", self.drv.cuMemImportFromShareableHandle(fd, kind)
        ))

    def reserve(self, nbytes: int) -> int:
        return int(self.check(
            "cuMemAddressReserve", self.drv.cuMemAddressReserve(nbytes, self.granularity(), 0, 0)
        ))

    def map(self, address: int, nbytes: int, alloc_handle: int) -> None:
        self.check("cuMemMap", self.drv.cuMemMap(address, nbytes, 0, alloc_handle, 0))
        desc = self.drv.CUmemAccessDesc()
        desc.location.type = self.drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = self.device_index
        desc.flags = self.drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.check("cuMemSetAccess", self.drv.cuMemSetAccess(address, nbytes, [desc], 1))

    def unmap(self, address: int, nbytes: int) -> None:
        self.check("cuMemUnmap", self.drv.cuMemUnmap(address, nbytes))

    def free_range(self, address: int, nbytes: int) -> None:
        self.check("cuMemAddressFree", self.drv.cuMemAddressFree(address, nbytes))

    def release(self, alloc_handle: int) -> None:
        self.check("cuMemRelease", self.drv.cuMemRelease(alloc_handle))

    def synchronize(self) -> None:
        self.check("cuCtxSynchronize", self.drv.cuCtxSynchronize())


def _free_mappings(cu: _Driver, address: int, total_bytes: int, mapped: dict[int, int]) -> None:
    """Finalizer: unmap `mapped` (offset -> bytes) inside the range, then free the range."""
    try:
        cu.make_current()
        cu.synchronize()
        for offset, nbytes in list(mapped.items()):
            cu.unmap(address + offset, nbytes)
        mapped.clear()
        cu.free_range(address, total_bytes)
        logger.debug("freed cuda range %#x (%d bytes)", address, total_bytes)
    except Exception:
        logger.exception("freeing cuda range %#x failed", address)


class CudaRegion(base.Region):
    def __init__(
        self, handle: base.MemoryHandle, cu: _Driver, alloc_handle: int, alloc_bytes: int,
        *, owned: bool, export_fd: int = -1,
    ) -> None:
        super().__init__(handle, alloc_bytes, owned=owned)
        self._cu = cu
        self._alloc_handle = alloc_handle
        self._export_fd = export_fd
        self._token = handle.fd_token if owned else b""  # registered with this process's fd server
        address = cu.reserve(alloc_bytes)
        mapped = {0: alloc_bytes}
        try:
            cu.map(address, alloc_bytes, alloc_handle)
        except BaseException:
            try:
                cu.unmap(address, alloc_bytes)
            except RuntimeError:
                pass  # the map itself failed: nothing to unmap
            cu.free_range(address, alloc_bytes)
            raise
        self.address = address
        self._holder: _DevicePointer | None = _DevicePointer(address, alloc_bytes, cu.device_index)
        fin = weakref.finalize(self._holder, _free_mappings, cu, address, alloc_bytes, mapped)
        fin.atexit = False  # the driver frees everything at exit; it may be gone by then

    @property
    def alloc_handle(self) -> int:
        if self._closed:
            raise ValueError(f"region {self.name!r} is closed")
        return self._alloc_handle

    def _byte_tensor(self) -> torch.Tensor:
        assert self._holder is not None
        t = torch.as_tensor(self._holder, device=torch.device("cuda", self._cu.device_index))
        assert t.data_ptr() == self.address, "torch copied device memory it should have viewed"
        return t

    def _close(self) -> None:
        self._holder = None  # the range goes when the last view does
        self._cu.make_current()
        # Releasing the handle now is safe: the physical memory lives while any mapping
        # (ours, expert slots, other processes) does.
        self._cu.release(self._alloc_handle)
        if self._token:
            fdpass.server().unregister(self._token)  # before the fd number can be reused
        if self._export_fd >= 0:
            os.close(self._export_fd)
            self._export_fd = -1


class CudaExpertPages(base.ExpertPages):
    def __init__(self, cu: _Driver, num_slots: int, slot_bytes: int, probe: Callable[[], int]) -> None:
        super().__init__(num_slots, slot_bytes, cu.granularity())
        self._cu = cu
        self._probe = probe
        cu.make_current()
        self.address = cu.reserve(self.total_bytes)
        self._slot_mapped: dict[int, int] = {}  # byte offset -> mapped bytes; shared with finalizer
        self._holder: _DevicePointer | None = _DevicePointer(self.address, self.total_bytes, cu.device_index)
        fin = weakref.finalize(
            self._holder, _free_mappings, cu, self.address, self.total_bytes, self._slot_mapped
        )
        fin.atexit = False

    def _byte_tensor(self) -> torch.Tensor:
        assert self._holder is not None
        device = torch.device("cuda", self._cu.device_index)
        if 0 in self._slot_mapped:
            return torch.as_tensor(self._holder, device=device)
        # torch asks the driver which device the first byte is on, and an unmapped address
        # has none: show a scratch granule there just while the tensor is built.
        granule = self._cu.granularity()
        self._cu.make_current()
        self._cu.map(self.address, granule, self._probe())
        try:
            return torch.as_tensor(self._holder, device=device)
        finally:
            self._cu.unmap(self.address, granule)

    def _map(self, slot: int, region: base.Region) -> None:
        if not isinstance(region, CudaRegion):
            raise TypeError(f"CUDA expert pages map CUDA regions, got {type(region).__name__}")
        self._cu.make_current()
        self._unmap(slot)
        offset = slot * self.slot_bytes
        self._cu.map(self.address + offset, region.alloc_bytes, region.alloc_handle)
        self._slot_mapped[offset] = region.alloc_bytes

    def _unmap(self, slot: int) -> None:
        offset = slot * self.slot_bytes
        nbytes = self._slot_mapped.pop(offset, 0)
        if nbytes:
            self._cu.make_current()
            self._cu.synchronize()  # no kernel may be reading the slot as it goes
            self._cu.unmap(self.address + offset, nbytes)

    def _close(self) -> None:
        self._holder = None


class CudaBackend(base.DeviceBackend):
    name = "cuda"
    collective_backend = "nccl"

    def __init__(self, device_index: int = 0) -> None:
        super().__init__(device_index)
        self._cu: _Driver | None = None
        self._probe_handle: int | None = None

    def torch_device(self, index: int | None = None) -> torch.device:
        return torch.device("cuda", self.device_index if index is None else index)

    def unavailable_reason(self) -> str | None:
        """Everything missing, in one sentence: torch's CUDA build, the package, the driver, the device."""
        if not sys.platform.startswith("linux"):
            return f"the CUDA backend shares memory by POSIX fd and needs Linux; this is {sys.platform}"
        missing = []
        if torch.version.cuda is None:
            missing.append(f"this torch ({torch.__version__}) is a build without CUDA: install a CUDA build "
                           "(pip install torch --index-url https://download.pytorch.org/whl/cu128)")
        drv = _import_driver()
        if drv is None:
            missing.append("the Python package `cuda-python` is not installed (pip install 'elasticmoe[cuda]')")
        try:
            ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            missing.append(f"the NVIDIA driver library libcuda.so.1 cannot be loaded ({exc}): no driver on this "
                           "machine, or not mounted into the container")
        else:
            if drv is not None:
                err, *_ = drv.cuInit(0)
                if err != drv.CUresult.CUDA_SUCCESS:
                    missing.append(f"the NVIDIA driver is loaded but cuInit fails with {err!r} (no GPU visible: "
                                   "check nvidia-smi and CUDA_VISIBLE_DEVICES)")
        if missing:
            return "; ".join(missing)
        if not torch.cuda.is_available():
            return "torch sees no NVIDIA GPU (torch.cuda.is_available() is False; check CUDA_VISIBLE_DEVICES)"
        if self.device_index >= torch.cuda.device_count():
            return f"cuda:{self.device_index} does not exist ({torch.cuda.device_count()} devices visible)"
        return None

    def _driver(self) -> _Driver:
        if self._cu is None:
            reason = self.unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"device backend 'cuda' is not usable here: {reason}")
            self._cu = _Driver(_import_driver(), self.device_index)
        return self._cu

    def page_size_bytes(self) -> int:
        return self._driver().granularity()

    def allocate(self, size_bytes: int, name: str) -> CudaRegion:
        self._check_allocate_args(size_bytes, name)
        cu = self._driver()
        cu.make_current()
        alloc_bytes = base.round_up(size_bytes, cu.granularity())
        alloc_handle = cu.create(alloc_bytes)
        try:
            fd = cu.export_fd(alloc_handle)
        except BaseException:
            cu.release(alloc_handle)
            raise
        server = fdpass.server()
        token = server.register(fd)
        handle = base.MemoryHandle(
            backend=self.name, name=name, size_bytes=size_bytes, owner_pid=os.getpid(),
            fd=fd, device_index=self.device_index, fd_socket=server.name, fd_token=token,
        )
        try:
            region = CudaRegion(handle, cu, alloc_handle, alloc_bytes, owned=True, export_fd=fd)
        except BaseException:
            server.unregister(token)
            os.close(fd)
            cu.release(alloc_handle)
            raise
        # cuMemCreate does not zero; the interface promises zeroed memory.
        region._byte_tensor().zero_()
        torch.cuda.synchronize(self.torch_device())
        logger.debug("allocated %s on cuda:%d: %d bytes", name, self.device_index, size_bytes)
        return region

    def handles_prefetched(self, handles: list[base.MemoryHandle], given: dict[bytes, int] | None = None):
        return fdpass.prefetched(handles, given)

    def attach(self, handle: base.MemoryHandle) -> CudaRegion:
        self._check_handle(handle)
        cu = self._driver()
        cu.make_current()
        fd = fdpass.receive(handle)
        try:
            alloc_handle = cu.import_fd(fd)
        finally:
            os.close(fd)  # the imported handle holds its own reference
        alloc_bytes = base.round_up(handle.size_bytes, cu.granularity())
        try:
            region = CudaRegion(handle, cu, alloc_handle, alloc_bytes, owned=False)
        except BaseException:
            cu.release(alloc_handle)
            raise
        logger.debug("attached %s from pid %d on cuda:%d", handle.name, handle.owner_pid, self.device_index)
        return region

    def expert_pages(self, num_slots: int, slot_bytes: int) -> CudaExpertPages:
        return CudaExpertPages(self._driver(), num_slots, slot_bytes, self._probe)

    def _probe(self) -> int:
        """One granule of physical memory, shared by all expert pages, never released."""
        if self._probe_handle is None:
            cu = self._driver()
            cu.make_current()
            self._probe_handle = cu.create(cu.granularity())
        return self._probe_handle

"""The CPU backend: shared-memory files standing in for device memory, and real page remapping.

Why it exists: on machines without an accelerator a CPU worker process is the device, and the
HMM / executor split, zero-copy attach and expert remapping must work for real there (tests and
the embedded default run on it).

How: `allocate` creates a memfd (`memfd_create`; an unlinked file in /dev/shm where memfd is
missing), sizes it to whole pages, maps it MAP_SHARED and registers the fd with the process's
fd server (`fdpass`). `attach` receives the owner's fd over that Unix socket (SCM_RIGHTS: no
/proc reopening, no ptrace permission, no capability) and maps it MAP_SHARED too: both
processes' tensors are views of the same physical pages. `ExpertPages` reserves one PROT_NONE
anonymous range with libc `mmap` and puts each expert's file into a slot with
`mmap(MAP_SHARED | MAP_FIXED)`; a single `torch.frombuffer` view over the range keeps working
across remaps because the kernel swaps the pages under an unchanged virtual address.

Cleanup: nothing stays in /dev/shm. memfds have no name there, and the fallback file is
unlinked right after creation, so the memory goes back to the kernel when the last fd and the
last mapping of it close, a crash included. An unmapped expert slot is PROT_NONE: touching it
is a SIGSEGV, as an unmapped device address is a fault on the accelerators.

What it does not guarantee:
- attaching needs the owner alive with the region open (this is why the HMM outlives
  executors), and the attaching process must be the owner or its child, of the same user, in
  the same network namespace (see `fdpass`); once attached, the pages stay valid even if the
  owner exits;
- Linux only (memfd, abstract Unix sockets, MAP_FIXED).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import secrets
import sys
import weakref

import torch

from elasticmoe_worker.backends import base, fdpass

logger = logging.getLogger(__name__)

_PROT_NONE = 0
_MAP_FIXED = 0x10  # same value on x86_64 and aarch64 (asm-generic/mman-common.h)
_MAP_NORESERVE = 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value
_MEMFD_NAME_MAX = 240  # bytes; the kernel allows 249 (it shows in /proc/<pid>/maps)


def _load_libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
    ]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.restype = ctypes.c_int
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault every page of a range in, writable, in one call


_libc = _load_libc() if sys.platform.startswith("linux") else None


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int = 0) -> int:
    assert _libc is not None
    res = _libc.mmap(addr, length, prot, flags, fd, offset)
    if res is None or res == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap({length} bytes, prot={prot:#x}, flags={flags:#x}): {os.strerror(err)}")
    if addr is not None:
        assert res == addr, (hex(res), hex(addr))  # MAP_FIXED never moves
    return res


def _munmap(addr: int, length: int) -> None:
    assert _libc is not None
    if _libc.munmap(addr, length) != 0:
        err = ctypes.get_errno()
        logger.error("munmap(%#x, %d) failed: %s", addr, length, os.strerror(err))
    else:
        logger.debug("unmapped expert range %#x (%d bytes)", addr, length)


def _create_file(name: str, use_memfd: bool) -> int:
    if use_memfd and hasattr(os, "memfd_create"):
        try:
            short = name.encode()[:_MEMFD_NAME_MAX].decode(errors="ignore")
            return os.memfd_create(short, os.MFD_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
                raise
            logger.warning("memfd_create unavailable (%s); using /dev/shm", exc)
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:100]
    path = f"/dev/shm/elasticmoe-{os.getpid()}-{secrets.token_hex(6)}-{safe}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    # Unlinked at once: the file lives exactly as long as fds and mappings of it do.
    os.unlink(path)
    return fd


class CpuRegion(base.Region):
    def __init__(self, handle: base.MemoryHandle, fd: int, alloc_bytes: int, *, owned: bool) -> None:
        super().__init__(handle, alloc_bytes, owned=owned)
        self._fd = fd
        self._token = handle.fd_token if owned else b""  # registered with this process's fd server
        self.populated = False  # every page mapped in this process (`CpuBackend.populate`)
        # NOTE: the mmap object is the memory's lifetime. torch.frombuffer keeps a reference
        # to it (not an exported buffer), so mm.close() under a live view would succeed and
        # leave the view dangling; we never call it. Dropping our reference unmaps once the
        # last view is gone.
        self._mm: mmap.mmap | None = mmap.mmap(
            fd, alloc_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        # where this process maps the region (its tensors start here: no copy)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._mm))

    @property
    def fd(self) -> int:
        """This process's fd of the region's file (what `ExpertPages.map` maps)."""
        if self._closed:
            raise ValueError(f"region {self.name!r} is closed")
        return self._fd

    def _byte_tensor(self) -> torch.Tensor:
        return torch.frombuffer(self._mapping(), dtype=torch.uint8)

    def _mapping(self) -> mmap.mmap:
        if self._mm is None:
            raise ValueError(f"region {self.name!r} is closed")
        return self._mm

    def _close(self) -> None:
        self._mm = None
        if self._token:
            fdpass.server().unregister(self._token)  # before the fd number can be reused
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        logger.debug("closed %s region %s", "owned" if self.owned else "attached", self.name)


class CpuExpertPages(base.ExpertPages):
    def __init__(self, num_slots: int, slot_bytes: int, page_size_bytes: int) -> None:
        super().__init__(num_slots, slot_bytes, page_size_bytes)
        total = self.total_bytes
        self._addr = _mmap(
            None, total, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1
        )
        # NOTE: the ctypes array over the range is its lifetime: torch views keep a reference
        # to it, and the finalizer munmaps the whole range (slots included) when it dies.
        self._array: ctypes.Array | None = (ctypes.c_char * total).from_address(self._addr)
        fin = weakref.finalize(self._array, _munmap, self._addr, total)
        fin.atexit = False  # process exit unmaps anyway
        logger.debug("reserved expert range %#x: %d slots x %d bytes", self._addr, num_slots, slot_bytes)

    @property
    def address(self) -> int:
        return self._addr

    def _byte_tensor(self) -> torch.Tensor:
        assert self._array is not None
        return torch.frombuffer(self._array, dtype=torch.uint8)

    def _map(self, slot: int, region: base.Region) -> None:
        if not isinstance(region, CpuRegion):
            raise TypeError(f"CPU expert pages map CPU regions, got {type(region).__name__}")
        start = self._addr + slot * self.slot_bytes
        _mmap(start, region.alloc_bytes, mmap.PROT_READ | mmap.PROT_WRITE,
              mmap.MAP_SHARED | _MAP_FIXED, region.fd, 0)
        tail = self.slot_bytes - region.alloc_bytes
        if tail:  # a smaller region must not leave the previous expert's tail visible
            self._reserve(start + region.alloc_bytes, tail)

    def _unmap(self, slot: int) -> None:
        self._reserve(self._addr + slot * self.slot_bytes, self.slot_bytes)

    def _reserve(self, addr: int, length: int) -> None:
        _mmap(addr, length, _PROT_NONE,
              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED, -1)

    def _close(self) -> None:
        self._array = None  # unmaps now, or when the last view dies


def _peer_file(fd: int, offset: int, nbytes: int, name: str, role: str) -> None:
    """The peer's file holds `nbytes` at `offset` (a read past its end would come back short, a write
    past it would grow the peer's file)."""
    size = os.fstat(fd).st_size
    if offset + nbytes > size:
        raise base.AttachError(f"peer copy of {name!r}: {nbytes} bytes at {role} offset {offset} do not fit in the "
                               f"{size} bytes of the file its owner sent")


def _read_from(fd: int, offset: int, into: memoryview, name: str) -> None:
    """All of `into` from the file at `offset` (preadv: the kernel copies the file's pages into this
    process's mapping, the GIL released)."""
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], offset + done)
        if n == 0:
            raise base.AttachError(f"copy from {name!r}: the source ended after {done} of {len(into)} bytes")
        done += n


def _copy_file(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int, src_name: str) -> bool:
    """`nbytes` from one memfd into another by copy_file_range. -> False where the kernel cannot
    (ENOSYS, EXDEV, EINVAL, EOPNOTSUPP: an old kernel or another file system) and copied nothing."""
    done = 0
    while done < nbytes:
        try:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
        except OSError as exc:
            if done or exc.errno not in (errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            logger.debug("copy_file_range unavailable (%s): copying %s by preadv", exc, src_name)
            return False
        if n == 0:
            raise base.AttachError(f"copy from {src_name!r}: the source ended after {done} of {nbytes} bytes")
        done += n
    return True


def _write_to(fd: int, offset: int, data: memoryview) -> None:
    """All of `data` into the file at `offset` (pwrite: the kernel copies into its pages)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class CpuBackend(base.DeviceBackend):
    """Shared-memory files as device memory. `use_memfd=False` forces the /dev/shm fallback."""

    name = "cpu"
    collective_backend = "gloo"
    copies_from_peers = True

    def __init__(self, device_index: int = 0, *, use_memfd: bool = True) -> None:
        super().__init__(device_index)
        self.use_memfd = use_memfd

    def torch_device(self, index: int | None = None) -> torch.device:
        return torch.device("cpu")

    def unavailable_reason(self) -> str | None:
        if not sys.platform.startswith("linux"):
            return f"the CPU backend needs Linux (memfd, abstract Unix sockets, MAP_FIXED); this is {sys.platform}"
        return None

    def page_size_bytes(self) -> int:
        return mmap.PAGESIZE

    def allocate(self, size_bytes: int, name: str) -> CpuRegion:
        self._check_allocate_args(size_bytes, name)
        alloc_bytes = base.round_up(size_bytes, mmap.PAGESIZE)
        fd = _create_file(name, self.use_memfd)
        server = fdpass.server()
        token = b""
        try:
            os.ftruncate(fd, alloc_bytes)
            token = server.register(fd)
            handle = base.MemoryHandle(
                backend=self.name, name=name, size_bytes=size_bytes, owner_pid=os.getpid(),
                fd=fd, device_index=self.device_index, fd_socket=server.name, fd_token=token,
            )
            region = CpuRegion(handle, fd, alloc_bytes, owned=True)
        except BaseException:
            server.unregister(token)
            os.close(fd)
            raise
        logger.debug("allocated %s: %d bytes, fd %d", name, size_bytes, fd)
        return region

    def populate(self, region: base.Region) -> None:
        """The memfd's pages, allocated, zeroed and mapped in this process now: a copy into them
        later costs the copy only (48 MB here: 19 ms of CPU against 33 ms into a fresh memfd; 46 ms
        to populate). Mapped, not only allocated (`fallocate`: 18 ms, then a 14 ms copy), so that
        they show in this process's memory (PSS) as an accelerator's reserved memory does in its
        tools. Kernels before 5.14 (no MADV_POPULATE_WRITE): fallocate, then a read of each page."""
        if not isinstance(region, CpuRegion) or not region.owned or region.closed:
            raise ValueError(f"populate: expected an open CPU region this process owns, got {region!r}")
        if _libc.madvise(region.address, region.alloc_bytes, _MADV_POPULATE_WRITE) == 0:
            region.populated = True
            return
        err = ctypes.get_errno()
        if err != errno.EINVAL:
            raise OSError(err, f"populate {region.name!r}: madvise(MADV_POPULATE_WRITE): {os.strerror(err)}")
        os.posix_fallocate(region.fd, 0, region.alloc_bytes)
        region._byte_tensor()[::mmap.PAGESIZE].sum()  # a read maps each page that exists now
        region.populated = True

    def handles_prefetched(self, handles: list[base.MemoryHandle], given: dict[bytes, int] | None = None):
        return fdpass.prefetched(handles, given)

    def attach(self, handle: base.MemoryHandle) -> CpuRegion:
        self._check_handle(handle)
        fd = fdpass.receive(handle)
        try:
            st = os.fstat(fd)
            alloc_bytes = base.round_up(handle.size_bytes, mmap.PAGESIZE)
            if st.st_size < alloc_bytes:
                raise base.AttachError(
                    f"cannot attach {handle.name!r}: the owner sent a file of {st.st_size} bytes; "
                    f"the handle needs {alloc_bytes}"
                )
            region = CpuRegion(handle, fd, alloc_bytes, owned=False)
        except BaseException:
            os.close(fd)
            raise
        logger.debug("attached %s from pid %d", handle.name, handle.owner_pid)
        return region

    def copy_from_peer(self, dst: base.Region, dst_offset: int, src: base.MemoryHandle, src_offset: int,
                       nbytes: int) -> None:
        """The kernel copies the source memfd's pages into this region: one copy, the peer's file
        not mapped here, the GIL released (parallel sources copy in parallel). Into a region whose
        pages this process has mapped (`populate`: a warm worker's reserve) by `preadv` into the
        mapping; into one it has not by `copy_file_range` between the files, which allocates the
        pages without faulting each into the mapping. Measured here, 48 MB into mapped pages: preadv
        11 ms, copy_file_range 18; into fresh ones: copy_file_range 27 ms, preadv 49."""
        self._check_handle(src)
        self._check_copy("copy_from_peer", dst, dst_offset, src, src_offset, nbytes, "destination", "source")
        assert isinstance(dst, CpuRegion)
        fd = fdpass.receive(src)
        try:
            _peer_file(fd, src_offset, nbytes, src.name, "source")
            if dst.populated or not _copy_file(fd, src_offset, dst.fd, dst_offset, nbytes, src.name):
                with memoryview(dst._mapping()) as whole, whole[dst_offset:dst_offset + nbytes] as into:
                    _read_from(fd, src_offset, into, src.name)
        finally:
            os.close(fd)

    def copy_to_peer(self, src: base.Region, src_offset: int, dst: base.MemoryHandle, dst_offset: int,
                     nbytes: int) -> None:
        """`copy_from_peer` the other way: this region's bytes into a peer's memfd (its owner
        granted it) by `pwrite` from this process's mapping, the GIL released (32 MB: 4.8 ms
        against 7.4 by `copy_file_range`; about the same as it where this process has not mapped
        the region's pages)."""
        self._check_handle(dst)
        self._check_copy("copy_to_peer", src, src_offset, dst, dst_offset, nbytes, "source", "destination")
        fd = fdpass.receive(dst)
        try:
            _peer_file(fd, dst_offset, nbytes, dst.name, "destination")
            with memoryview(src._mapping()) as whole, whole[src_offset:src_offset + nbytes] as data:
                _write_to(fd, dst_offset, data)
        finally:
            os.close(fd)

    @staticmethod
    def _check_copy(op: str, mine: base.Region, mine_offset: int, theirs: base.MemoryHandle, theirs_offset: int,
                    nbytes: int, mine_is: str, theirs_is: str) -> None:
        if not isinstance(mine, CpuRegion) or mine.closed:
            raise ValueError(f"{op}: the {mine_is} must be an open CPU region, got {mine!r}")
        theirs_alloc = base.round_up(theirs.size_bytes, mmap.PAGESIZE)
        for what, off, size in ((theirs_is, theirs_offset, theirs_alloc), (mine_is, mine_offset, mine.alloc_bytes)):
            if off < 0 or off + nbytes > size:
                raise ValueError(f"{op}: {nbytes} bytes at {what} offset {off} do not fit in its {size} bytes")

    def expert_pages(self, num_slots: int, slot_bytes: int) -> CpuExpertPages:
        return CpuExpertPages(num_slots, slot_bytes, mmap.PAGESIZE)

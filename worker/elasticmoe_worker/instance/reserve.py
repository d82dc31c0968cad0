"""A warm worker's reserve: device memory its HMM allocates (and gives physical pages) while it
waits, so that the scale which takes it copies bytes into memory that exists already.

Why it exists: a region a scale allocates on the spot has no pages yet; the copy into it pays
for them. On the CPU backend that is most of the copy's cost: 48 MB by `copy_file_range` took 33 ms
of CPU into a fresh memfd on this machine (session 19), 19 ms into pages that exist and are mapped
(as `bench scaling`'s idle copy's are); a pull into a reserved region now goes by `preadv` into the
mapping, 11 ms (`CpuBackend.copy_from_peer`); and under a device's CPU quota every CPU-millisecond
of it is ~4 ms of the scale. An accelerator's HMM reserving HBM ahead is the
same idea: `cuMemCreate` and zeroing are off the scale too.

How: the coordinator tells a warm worker (with the model's files, `wire.ModelFiles`) the sizes a
device joining the instance would receive into: its replicated region and each expert's `w13`
and `w2` in every MoE layer, for as many experts as one more device would hold. The HMM allocates
and populates them in a thread (`fill`: ~0.25 s at 0.225 cores for the small preset's 48 MB, long
before a scale); `take(size, name)` hands out a reserved region of exactly that size (zero-filled:
never written) or allocates one when none is left. After the first configuration that uses them is
committed the HMM `release`s what is left.

Not guaranteed: the sizes are for the instance as it stood when the worker said hello; a scale to
more devices than that uses fewer (the rest is released at commit), to fewer allocates the rest
on the spot. The reserve is memory: it counts in the worker's (and the warm pool's) footprint.

A serving device keeps one too when the coordinator has `--scale-down-reserve-mb` (`wire.Reserve`,
after every commit or abort and at start-up): regions for as many experts as that budget holds
(at most those a scale to one device would bring it). A scale-down copies into those pages
instead of faulting in fresh ones while the standbys warm up beside it (session 21's profile of
4 -> 2: a staying device's copies ran at 0.28 GB/s of CPU into fresh pages, 2.4 GB/s into reserved
ones; session 22: its HMM's CPU in the transition 97 -> 25 ms). `resize` keeps what it can of the
previous reserve. It is steady memory of the device (its PSS, and `bench scaling`'s steady state).
NOTE: `resize` stops a fill in progress, which looks at its stop flag between regions only.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from elasticmoe_worker.backends import base as backends_base

logger = logging.getLogger("elasticmoe.hmm")


class Reserve:
    """Pre-allocated regions by exact size; safe to use from several threads."""

    def __init__(self, backend: backends_base.DeviceBackend, device_index: int) -> None:
        self.backend = backend
        self.device_index = device_index
        self._lock = threading.Lock()
        self._free: dict[int, list[backends_base.Region]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.taken = 0  # regions handed out from the reserve (not allocated on the spot)
        self.allocated = 0  # regions `take` had to allocate on the spot
        self._serial = 0  # names regions uniquely across fills

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(r.alloc_bytes for rs in self._free.values() for r in rs)

    def fill(self, sizes: list[int], background: bool = True, why: str = "the scale that takes this worker") -> None:
        """Allocate and populate one region of each size (bytes, as `allocate` takes them); in a
        thread unless `background` is False. Regions become available one by one. `why`: for the log."""
        sizes = [s for s in sizes if s > 0]
        if not sizes:
            return
        if background:
            self._thread = threading.Thread(target=self._fill, args=(sizes, why), name="reserve", daemon=True)
            self._thread.start()
        else:
            self._fill(sizes, why)

    def _fill(self, sizes: list[int], why: str) -> None:
        started, made = time.perf_counter(), 0
        try:
            for size in sizes:
                if self._stop.is_set():
                    return
                self._serial += 1
                region = self.backend.allocate(size, f"dev{self.device_index}.reserve{self._serial}")
                try:
                    self.backend.populate(region)
                except BaseException:
                    region.close()
                    raise
                with self._lock:
                    if self._stop.is_set():
                        region.close()
                        return
                    self._free.setdefault(size, []).append(region)
                made += region.alloc_bytes
        except Exception:  # the device is short of memory, say: scales allocate on the spot as before
            logger.exception("device %d: reserving memory for the next scale failed after %.1f MB; the rest is "
                             "allocated when a scale needs it", self.device_index, made / 1e6)
            return
        logger.info("device %d: reserved %.1f MB in %d regions for %s, in %.2f s",
                    self.device_index, made / 1e6, len(sizes), why, time.perf_counter() - started)

    def resize(self, sizes: list[int], why: str, background: bool = True) -> tuple[int, int]:
        """Hold one region of each of `sizes` (a multiset; [] frees everything): regions held
        already are kept, the rest freed, the missing ones allocated and populated in a thread.
        -> (bytes freed, regions to allocate)."""
        self._halt_fill()
        want = collections.Counter(s for s in sizes if s > 0)
        extra: list[backends_base.Region] = []
        with self._lock:
            for size, regions in self._free.items():
                keep = min(len(regions), want.get(size, 0))
                extra += regions[keep:]
                del regions[keep:]
                want[size] -= keep
            self._free = {size: regions for size, regions in self._free.items() if regions}
            self.taken = self.allocated = 0
        for r in extra:
            r.close()
        missing = [size for size, count in sorted(want.items()) for _ in range(count)]
        self.fill(missing, background=background, why=why)
        return sum(r.alloc_bytes for r in extra), len(missing)

    def _halt_fill(self) -> None:
        """Stop a fill in progress (what it made so far stays) and allow new ones."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._thread = None
        self._stop.clear()

    def take(self, size_bytes: int, name: str) -> backends_base.Region:
        """A reserved region of `size_bytes`, else a new one named `name` (both zero-filled)."""
        with self._lock:
            free = self._free.get(size_bytes)
            if free:
                self.taken += 1
                return free.pop()
            self.allocated += 1
        return self.backend.allocate(size_bytes, name)

    def release(self) -> int:
        """Stop filling; free every region not taken. -> bytes freed."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._lock:
            regions = [r for rs in self._free.values() for r in rs]
            self._free.clear()
            self.taken = 0
        freed = sum(r.alloc_bytes for r in regions)
        for r in regions:
            r.close()
        return freed

"""Device backends for the HBM manager: the one place that knows which hardware we run on.

`get_backend(name)` is the only factory: "cpu" (shared-memory files; real, runs everywhere on
Linux), "cuda" (CUDA VMM + POSIX-fd export, needs `cuda-python`) and "ascend" (CANN physical
memory + shareable handles, needs `torch_npu`). Callers use the `base` interfaces only.

It does not pick a backend for you: an unknown name is a ValueError and a known backend whose
hardware or library is missing is a RuntimeError saying what is missing, never a silent
fallback to CPU.
"""

from __future__ import annotations

from elasticmoe_worker.backends import base
from elasticmoe_worker.backends.base import (
    AttachError,
    DeviceBackend,
    ExpertPages,
    MemoryHandle,
    Region,
    round_up,
)

BACKEND_NAMES = ("cpu", "cuda", "ascend")

__all__ = [
    "AttachError",
    "BACKEND_NAMES",
    "DeviceBackend",
    "ExpertPages",
    "MemoryHandle",
    "Region",
    "backend_available",
    "base",
    "unavailable_reason",
    "get_backend",
    "round_up",
]


def _backend_class(name: str) -> type[DeviceBackend]:
    if name == "cpu":
        from elasticmoe_worker.backends import cpu

        return cpu.CpuBackend
    if name == "cuda":
        from elasticmoe_worker.backends import cuda

        return cuda.CudaBackend
    if name == "ascend":
        from elasticmoe_worker.backends import ascend

        return ascend.AscendBackend
    raise ValueError(f"unknown device backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}")


def get_backend(name: str, device_index: int = 0) -> DeviceBackend:
    """The backend `name` bound to device `device_index`.

    Raises ValueError for an unknown name and RuntimeError when the backend cannot run here.
    """
    backend = _backend_class(name)(device_index)
    reason = backend.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"device backend {name!r} is not usable here: {reason}")
    return backend


def backend_available(name: str) -> bool:
    """Whether `get_backend(name)` would succeed (device 0). ValueError for an unknown name."""
    return _backend_class(name)().is_available()


def unavailable_reason(name: str) -> str | None:
    """None when backend `name` can run here (device 0); else everything missing (driver,
    package, device) in one sentence: what tests skip with. ValueError for an unknown name."""
    return _backend_class(name)().unavailable_reason()

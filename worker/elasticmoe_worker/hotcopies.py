"""Which routed experts get a redundant copy, when memory allows only some of them.

Why it exists: `--expert-copies 2` lets a lost device's experts come from a surviving peer
instead of the checkpoint, at the cost of a second copy of every expert. A per-device memory
budget for redundancy (`--redundant-expert-mb`) buys that protection for only some experts;
this module decides how many and which: the hottest (most routed tokens), since losing a hot
expert's only copy stalls the most tokens while the checkpoint is read. The result is one
number of copies per expert, which `planner.plan` places (balanced, move-minimal).

Pure: no I/O, no clock. What it does not guarantee: that the budget holds on every device.
It holds on average: the instance's redundant copies weigh at most devices x budget, but the
planner puts floor or ceil of all copies on each device and does not tell first copies from
redundant ones, so one device may hold one expert more than the budget alone allows.
"""

from __future__ import annotations

import math
from typing import Sequence


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def redundant_within(num_experts: int, num_devices: int, budget_bytes: int | None, expert_bytes: int) -> int:
    """How many experts get a redundant copy when each of `num_devices` devices may spend
    `budget_bytes` on them: min(num_experts, floor(num_devices x budget_bytes / expert_bytes)).
    Every expert when `budget_bytes` is None (no limit) or an expert weighs 0 B."""
    if not _is_int(num_experts) or num_experts < 1:
        raise ValueError(f"num_experts: got {num_experts!r}; expected an int >= 1")
    if not _is_int(num_devices) or num_devices < 1:
        raise ValueError(f"num_devices: got {num_devices!r}; expected an int >= 1")
    if budget_bytes is not None and (not _is_int(budget_bytes) or budget_bytes < 0):
        raise ValueError(f"budget_bytes: got {budget_bytes!r}; expected None (no limit) or an int >= 0")
    if not _is_int(expert_bytes) or expert_bytes < 0:
        raise ValueError(f"expert_bytes: got {expert_bytes!r}; expected an int >= 0")
    if budget_bytes is None or expert_bytes == 0:
        return num_experts
    return min(num_experts, num_devices * budget_bytes // expert_bytes)


def hot_copies(num_experts: int, copies: int, num_hot: int,
               expert_load: Sequence[float] | None = None) -> tuple[int, ...]:
    """Copies per expert: the `num_hot` hottest experts (highest `expert_load`, ties to the
    lowest id) get `copies`, the others one. Without a load, or with an all-zero one (before
    any token was routed), that is the `num_hot` lowest expert ids."""
    if not _is_int(num_experts) or num_experts < 1:
        raise ValueError(f"num_experts: got {num_experts!r}; expected an int >= 1")
    if not _is_int(copies) or copies < 1:
        raise ValueError(f"copies: got {copies!r}; expected an int >= 1")
    if not _is_int(num_hot) or not 0 <= num_hot <= num_experts:
        raise ValueError(f"num_hot: got {num_hot!r}; expected an int in [0, {num_experts}]")
    load = [0.0] * num_experts if expert_load is None else list(expert_load)
    if len(load) != num_experts:
        raise ValueError(f"expert_load: got {len(load)} values; expected one per expert ({num_experts})")
    for e, x in enumerate(load):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ValueError(f"expert_load[{e}]: got {x!r}; expected a finite number >= 0")
    hot = set(sorted(range(num_experts), key=lambda e: (-load[e], e))[:num_hot])
    return tuple(copies if e in hot else 1 for e in range(num_experts))


def wanted(num_experts: int, num_devices: int, copies: int, budget_bytes: int | None, expert_bytes: int,
           expert_load: Sequence[float] | None = None) -> tuple[int, ...]:
    """Copies per expert for a configuration of `num_devices` devices: `copies` (at most one
    per device) for the hottest experts the budget fits (`redundant_within`), one for the rest."""
    per = max(1, min(copies, num_devices))
    hot = 0 if per == 1 else redundant_within(num_experts, num_devices, budget_bytes, expert_bytes * (per - 1))
    return hot_copies(num_experts, per, hot, expert_load)

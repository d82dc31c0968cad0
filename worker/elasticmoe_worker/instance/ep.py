"""Expert parallelism: route each token copy to the rank that holds its expert, compute
there, bring the result back, combine in the reference order.

Per MoE layer every rank runs the same four all-to-alls (counts, expert ids, hidden rows,
results), also with zero tokens. Every tensor lives on the rank's device, the all-to-alls
included (gloo on CPU tensors, NCCL/HCCL on device tensors); the split sizes come back to the
host once per layer (`.tolist()`), which the other three exchanges need as Python lists.
NOTE: all DP ranks enter every MoE collective each step; a rank with nothing to do runs an
empty batch. A rank that skips one deadlocks the others until the group's timeout fires.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from elasticmoe_worker.models import layers


class ExpertParallel:
    """The experts_fn of one MoE layer on one rank."""

    def __init__(self, group, world_size: int, owner: torch.Tensor, local_map: torch.Tensor,
                 w13: torch.Tensor, w2: torch.Tensor, device: torch.device) -> None:
        for name, t in (("owner", owner), ("local_map", local_map), ("w13", w13), ("w2", w2)):
            if t.device != device:
                raise ValueError(f"expert parallel {name}: on {t.device}, expected {device}")
        self.device = device
        self.group = group
        self.world_size = world_size
        self.owner = owner  # [E] global expert -> rank
        self.local_map = local_map  # [E] global expert -> local slot on this rank, -1 elsewhere
        self.w13 = w13
        self.w2 = w2

    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> None:
        # `group` is the collective backend itself (see rendezvous.process_group: groups are not
        # registered with torch.distributed's default world), so its methods are called directly.
        self.group.alltoall_base(out, inp, out_splits, in_splits, dist.AllToAllOptions()).wait()

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x: [T, H], topk_ids/topk_weights: [T, K] on this rank's device -> [T, H] there."""
        num_tokens, k = topk_ids.shape
        hidden = x.shape[1]
        ids, perm = topk_ids.sort(dim=1)
        weights = topk_weights.gather(1, perm).reshape(-1, 1)
        flat = ids.reshape(-1)
        dest = self.owner[flat]
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=self.world_size)
        recv_counts = torch.empty_like(send_counts)
        self._a2a(recv_counts, send_counts, [1] * self.world_size, [1] * self.world_size)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        num_recv = sum(recv_splits)

        recv_ids = torch.empty(num_recv, dtype=torch.int64, device=self.device)
        self._a2a(recv_ids, flat[order].contiguous(), recv_splits, send_splits)
        recv_x = torch.empty(num_recv, hidden, dtype=x.dtype, device=self.device)
        self._a2a(recv_x, x[order // k].contiguous(), recv_splits, send_splits)

        ones = torch.ones(num_recv, 1, dtype=x.dtype, device=self.device)
        y = layers.expert_mlp(recv_x, self.w13, self.w2, recv_ids[:, None], ones, self.local_map)
        back = torch.empty(len(order), hidden, dtype=x.dtype, device=self.device)
        self._a2a(back, y.contiguous(), send_splits, recv_splits)
        ys = torch.empty_like(back)
        ys[order] = back
        return layers.combine_copies(ys, weights, num_tokens, k).to(x.dtype)


def fingerprint(config_id: int, world_size: int, config_json: str, expert_owner: list[int], num_moe_layers: int,
                dtype: torch.dtype) -> dict[str, int]:
    """What every rank of one group must agree on before it serves, as integers (`check_group`)."""
    return {"configuration": config_id, "world size": world_size,
            "model config (crc32)": zlib.crc32(config_json.encode()),
            "expert placement (crc32)": zlib.crc32(",".join(map(str, expert_owner)).encode()),
            "MoE layers": num_moe_layers, "dtype bytes": dtype.itemsize}


def check_group(group, mine: dict[str, int], device: torch.device) -> None:
    """The first collective of a new group, before it serves: one all-reduce (MAX of every value
    and of its negation) that ends on every rank once all have arrived, and shows whether any
    rank holds another value. -> None; RuntimeError naming each field that differs, with the
    range the ranks hold.

    Why one all-reduce and not a forward pass over zero tokens (the warm-up it replaced):
    that ran 4 all-to-alls per MoE layer (16 for the small preset: ~10-20 ms of CPU per rank on
    this 2-core machine, against ~0.5 ms here), and it showed only that the ranks ran as many
    collectives, not that they hold the same model and placement.
    NOTE: on NCCL and HCCL the first collective creates the communicator (lazily): this one
    does, so the first step after the switch does not."""
    values = torch.tensor(list(mine.values()), dtype=torch.int64, device=device)
    both = torch.cat([values, -values])
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    group.allreduce([both], opts).wait()
    n = len(values)
    high, low = both[:n].tolist(), (-both[n:]).tolist()
    differ = [f"{name}: {lo}..{hi} (this rank {mine[name]})" for name, lo, hi in zip(mine, low, high) if lo != hi]
    if differ:
        raise RuntimeError("the ranks of this group disagree on " + "; ".join(differ))

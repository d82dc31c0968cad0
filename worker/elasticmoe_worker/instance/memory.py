"""What one device's memory holds, and how both sides see it.

The HMM side (`load_device`) reads the tensors its device holds from the checkpoint into
regions it owns: one region for all replicated tensors (packed, 64-byte aligned), one
region per routed expert and weight (`w13`, `w2`), one region for the KV pool. The
executor side (`attach_device`) maps the same regions without copying and hands the model
builder a `WeightSource` of views, with each layer's experts side by side in one reserved
range (expert pages), and KV-cache views over the pool.

The replicated region and the KV pool are plain shared regions; only experts get their own
pages, because only experts move between devices.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from elasticmoe_worker.backends import base as backends_base
from elasticmoe_worker.engine import kv_cache
from elasticmoe_worker.contract import wire
from elasticmoe_worker.models import config as config_mod
from elasticmoe_worker.models import registry
from elasticmoe_worker.models import weights as weights_mod

logger = logging.getLogger(__name__)

_ALIGN_BYTES = 64


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kv_block_bytes(spec: config_mod.ModelSpec, block_size: int, dtype: torch.dtype) -> list[int]:
    """Bytes of one block in each view of a KV pool: per layer its keys, then its values. With a
    pool's number of blocks this is its whole layout (`kv_view_offsets`): what an HMM needs to
    copy blocks, without parsing the model's config (which imports `transformers`: seconds on a
    CPU quota, inside a switch's pause)."""
    item = _itemsize(dtype)
    per_token = block_size * spec.num_kv_heads * item
    return [n for _ in range(spec.num_layers) for n in (per_token * spec.qk_head_dim, per_token * spec.v_head_dim)]


def kv_view_offsets(view_block_bytes: list[int], num_blocks: int) -> tuple[list[int], int]:
    """-> the offset of each view (`kv_block_bytes`) in a pool of `num_blocks`, and its total bytes."""
    offsets, offset = [], 0
    for block_bytes in view_block_bytes:
        offsets.append(offset)
        offset += _round_up(num_blocks * block_bytes, _ALIGN_BYTES)
    return offsets, offset


def kv_layout(spec: config_mod.ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype):
    """-> [(k_offset, k_shape, v_offset, v_shape)] per layer, and total bytes."""
    offsets, total = kv_view_offsets(kv_block_bytes(spec, block_size, dtype), num_blocks)
    k_shape = (num_blocks, block_size, spec.num_kv_heads, spec.qk_head_dim)
    v_shape = (num_blocks, block_size, spec.num_kv_heads, spec.v_head_dim)
    return [(offsets[2 * i], k_shape, offsets[2 * i + 1], v_shape) for i in range(spec.num_layers)], total


@dataclasses.dataclass
class DeviceMemory:
    """The regions an HMM owns for its device (kept alive as long as the HMM lives)."""

    replicated: backends_base.Region
    experts: dict[tuple[int, int], tuple[backends_base.Region, backends_base.Region]]
    kv: backends_base.Region
    ready: wire.HMMReady

    def ready_for(self, expert_ids: list[int]) -> wire.HMMReady:
        """Handles for an executor of a configuration holding `expert_ids` on this device."""
        held = set(expert_ids)
        handles = [wire.ExpertRegion(layer, e, w13.handle, w2.handle)
                   for (layer, e), (w13, w2) in sorted(self.experts.items()) if e in held]
        return wire.HMMReady(
            device_index=self.ready.device_index, replicated=self.replicated.handle,
            replicated_layout=self.ready.replicated_layout, experts=handles, kv=self.kv.handle,
            num_kv_blocks=self.ready.num_kv_blocks, bytes_read_from_checkpoint=self.ready.bytes_read_from_checkpoint,
            load_seconds=self.ready.load_seconds)

    def drop_experts_except(self, expert_ids: list[int]) -> int:
        """Free the regions of experts not in `expert_ids`; -> bytes freed. Executors that
        still map them keep the pages until they exit (the kernel counts mappings)."""
        keep, freed = set(expert_ids), 0
        for key in [k for k in self.experts if k[1] not in keep]:
            w13, w2 = self.experts.pop(key)
            freed += w13.alloc_bytes + w2.alloc_bytes
            w13.close()
            w2.close()
        return freed

    def close(self) -> None:
        for w13, w2 in self.experts.values():
            w13.close()
            w2.close()
        self.replicated.close()
        self.kv.close()


def load_device(backend: backends_base.DeviceBackend, device_index: int, plan: wire.LoadPlan) -> DeviceMemory:
    started = time.perf_counter()
    spec = config_mod.load_spec(plan.model_dir)
    fam = registry.family(spec.model_type)
    dtype = registry.resolve_dtype(spec, plan.dtype)
    item = _itemsize(dtype)
    ckpt = weights_mod.Checkpoint(plan.model_dir)

    layout, offset = [], 0
    for name in fam.replicated_names(spec):
        shape = ckpt.shape(name)
        layout.append(wire.TensorSlot(name, _dtype_name(dtype), shape, offset))
        offset += _round_up(int(torch.Size(shape).numel()) * item, _ALIGN_BYTES)
    replicated = backend.allocate(max(offset, 1), f"dev{device_index}.replicated")
    for slot in layout:
        replicated.tensor(dtype, slot.shape, slot.offset_bytes).copy_(ckpt.read(slot.name))

    page = backend.page_size_bytes()
    experts: dict[tuple[int, int], tuple[backends_base.Region, backends_base.Region]] = {}
    handles = []
    for layer, is_moe in enumerate(spec.moe_layers):
        if not is_moe:
            continue
        for e in plan.expert_ids:
            inter, hidden = ckpt.shape(fam.expert_names(layer, e)[0])
            w13 = backend.allocate(_round_up(2 * inter * hidden * item, page), f"dev{device_index}.l{layer}.e{e}.w13")
            w2 = backend.allocate(_round_up(hidden * inter * item, page), f"dev{device_index}.l{layer}.e{e}.w2")
            _fill_expert(ckpt, fam, layer, e, w13, w2, dtype)
            experts[(layer, e)] = (w13, w2)
            handles.append(wire.ExpertRegion(layer, e, w13.handle, w2.handle))

    per_block = kv_cache.KVCachePool.bytes_per_block(
        spec.num_layers, spec.num_kv_heads, spec.qk_head_dim, spec.v_head_dim, plan.block_size, dtype)
    num_blocks = max(1, plan.kv_cache_bytes // per_block)
    _, kv_bytes = kv_layout(spec, num_blocks, plan.block_size, dtype)
    kv = backend.allocate(kv_bytes, f"dev{device_index}.kv")
    ckpt.close()
    seconds = time.perf_counter() - started
    logger.info("device %d: loaded %d replicated tensors and %d experts x %d MoE layers (%.1f MB read) "
                "and a KV pool of %d blocks in %.2f s", device_index, len(layout), len(plan.expert_ids),
                spec.num_moe_layers, ckpt.bytes_read / 1e6, num_blocks, seconds)
    ready = wire.HMMReady(
        device_index=device_index, replicated=replicated.handle, replicated_layout=layout, experts=handles,
        kv=kv.handle, num_kv_blocks=num_blocks, bytes_read_from_checkpoint=ckpt.bytes_read, load_seconds=seconds,
    )
    return DeviceMemory(replicated, experts, kv, ready)


def _fill_expert(ckpt: weights_mod.Checkpoint, fam, layer: int, expert: int, w13: backends_base.Region,
                 w2: backends_base.Region, dtype: torch.dtype) -> None:
    """w13 holds [gate; up] as (2 * inter, hidden), w2 holds down as (hidden, inter)."""
    gate_name, up_name, down_name = fam.expert_names(layer, expert)
    gate, up, down = ckpt.read(gate_name), ckpt.read(up_name), ckpt.read(down_name)
    inter, hidden = gate.shape
    view13 = w13.tensor(dtype, (2 * inter, hidden))
    view13[:inter].copy_(gate)
    view13[inter:].copy_(up)
    w2.tensor(dtype, (hidden, inter)).copy_(down)


def read_experts(mem: DeviceMemory, model_dir: str, dtype_name: str, expert_ids: list[int]) -> int:
    """Fill the regions of `expert_ids` (allocated already, every MoE layer) from the
    checkpoint, reading only those tensors; -> bytes read. Raises (FileNotFoundError, ...)
    when the checkpoint cannot be read."""
    spec = config_mod.load_spec(model_dir)
    fam = registry.family(spec.model_type)
    dtype = registry.resolve_dtype(spec, dtype_name)
    ckpt = weights_mod.Checkpoint(model_dir)
    try:
        for layer, is_moe in enumerate(spec.moe_layers):
            if is_moe:
                for e in expert_ids:
                    w13, w2 = mem.experts[(layer, e)]
                    _fill_expert(ckpt, fam, layer, e, w13, w2, dtype)
    finally:
        ckpt.close()
    return ckpt.bytes_read


class SharedWeights(weights_mod.WeightSource):
    """Executor-side weights: views on HMM regions, nothing read from disk."""

    def __init__(self, replicated: backends_base.Region, layout: list[wire.TensorSlot],
                 experts_by_layer: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.replicated = replicated
        self.layout = {s.name: s for s in layout}
        self.experts_by_layer = experts_by_layer

    def tensor(self, name: str) -> torch.Tensor:
        slot = self.layout.get(name)
        if slot is None:
            raise weights_mod.MissingTensorError(f"tensor {name!r} is not in this device's replicated memory")
        return self.replicated.tensor(weights_mod.parse_dtype(slot.dtype), slot.shape, slot.offset_bytes)

    def experts(self, layer, names):
        return self.experts_by_layer[layer]


@dataclasses.dataclass
class AttachedDevice:
    weights: SharedWeights
    expert_ids: list[int]  # global ids in slot order
    pool: kv_cache.KVCachePool
    regions: list[backends_base.Region]
    pages: list[backends_base.ExpertPages]


def attach_device(backend: backends_base.DeviceBackend, spec: config_mod.ModelSpec, ready: wire.HMMReady,
                  dtype: torch.dtype, block_size: int) -> AttachedDevice:
    with backend.handles_prefetched([ready.replicated, ready.kv] + [h for er in ready.experts
                                                                   for h in (er.w13, er.w2)]):
        return _attach_device(backend, spec, ready, dtype, block_size)


def _attach_device(backend: backends_base.DeviceBackend, spec: config_mod.ModelSpec, ready: wire.HMMReady,
                   dtype: torch.dtype, block_size: int) -> AttachedDevice:
    regions = []
    replicated = backend.attach(ready.replicated)
    regions.append(replicated)
    by_layer: dict[int, list[wire.ExpertRegion]] = {}
    for er in ready.experts:
        by_layer.setdefault(er.layer, []).append(er)
    expert_ids: list[int] = []
    experts_by_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    pages = []
    inter = spec.moe_intermediate_size
    hidden = spec.hidden_size
    for layer, ers in sorted(by_layer.items()):
        ers = sorted(ers, key=lambda r: r.expert_id)
        if not expert_ids:
            expert_ids = [r.expert_id for r in ers]
        assert [r.expert_id for r in ers] == expert_ids, "every MoE layer holds the same experts"
        p13 = backend.expert_pages(len(ers), ers[0].w13.size_bytes)
        p2 = backend.expert_pages(len(ers), ers[0].w2.size_bytes)
        for slot, r in enumerate(ers):
            for p, handle in ((p13, r.w13), (p2, r.w2)):
                region = backend.attach(handle)
                p.map(slot, region)
                region.close()  # the mapping keeps the pages; the handle is no longer needed
        pages += [p13, p2]
        experts_by_layer[layer] = (p13.view(dtype, (2 * inter, hidden)), p2.view(dtype, (hidden, inter)))
    kv = backend.attach(ready.kv)
    regions.append(kv)
    layout, _ = kv_layout(spec, ready.num_kv_blocks, block_size, dtype)
    caches = [(kv.tensor(dtype, ks, ko), kv.tensor(dtype, vs, vo)) for ko, ks, vo, vs in layout]
    pool = kv_cache.KVCachePool(block_size, ready.num_kv_blocks, caches)
    return AttachedDevice(SharedWeights(replicated, ready.replicated_layout, experts_by_layer), expert_ids, pool,
                          regions, pages)

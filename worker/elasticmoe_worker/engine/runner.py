"""Run one engine step on the model: flatten the scheduled sequences into one token batch,
describe their KV placement, run the forward pass, sample.

The runner knows nothing about requests' lifecycles (that is the scheduler's job); it gets
for each sequence the new tokens to compute, where they start, its block table and whether
to sample after them.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from elasticmoe_worker.engine import kv_cache, sampling, types
from elasticmoe_worker.models import layers
from elasticmoe_worker.models import model as model_mod


@dataclasses.dataclass
class SeqWork:
    """One sequence's share of a step."""

    token_ids: list[int]  # tokens to compute now
    start_pos: int  # how many tokens of this sequence are already in the cache
    block_table: list[int]  # covers at least start_pos + len(token_ids) positions
    sample: bool  # True when these tokens reach the end of what is known: pick the next one
    params: types.SamplingParams | None = None
    generator: torch.Generator | None = None


def build_metadata(work: Sequence[SeqWork], block_size: int) -> tuple[torch.Tensor, layers.AttentionMetadata]:
    """-> (input_ids [T], metadata). Pure tensor bookkeeping, no model involved."""
    ids: list[int] = []
    positions: list[torch.Tensor] = []
    slots: list[torch.Tensor] = []
    dec_idx: list[int] = []
    dec_slots: list[torch.Tensor] = []
    prefills: list[layers.PrefillSpan] = []
    offset = 0
    for w in work:
        n = len(w.token_ids)
        assert n > 0, "a scheduled sequence computes at least one token"
        total = w.start_pos + n
        assert len(w.block_table) * block_size >= total, "block table too short for the step"
        table = torch.tensor(w.block_table, dtype=torch.int64)
        all_pos = torch.arange(total)
        all_slots = table[all_pos // block_size] * block_size + all_pos % block_size
        ids.extend(w.token_ids)
        positions.append(all_pos[w.start_pos:])
        slots.append(all_slots[w.start_pos:])
        if n == 1:
            dec_idx.append(offset)
            dec_slots.append(all_slots)
        else:
            prefills.append(layers.PrefillSpan(
                start=offset, end=offset + n, context_len=w.start_pos,
                gather_slots=all_slots if w.start_pos > 0 else None,
            ))
        offset += n

    dec_token_idx = dec_gather = dec_mask = None
    if dec_idx:
        width = max(len(s) for s in dec_slots)
        dec_gather = torch.zeros(len(dec_slots), width, dtype=torch.int64)
        dec_mask = torch.zeros(len(dec_slots), width, dtype=torch.bool)
        for row, s in enumerate(dec_slots):
            dec_gather[row, : len(s)] = s
            dec_mask[row, : len(s)] = True
        dec_token_idx = torch.tensor(dec_idx, dtype=torch.int64)
    meta = layers.AttentionMetadata(
        positions=torch.cat(positions),
        slot_mapping=torch.cat(slots),
        decode_token_idx=dec_token_idx,
        decode_gather=dec_gather,
        decode_mask=dec_mask,
        prefills=prefills,
    )
    return torch.tensor(ids, dtype=torch.int64), meta


class ModelRunner:
    def __init__(self, model: model_mod.CausalLM, pool: kv_cache.KVCachePool) -> None:
        self.model = model
        self.pool = pool

    @torch.inference_mode()
    def execute_empty(self) -> None:
        """A forward pass over zero tokens: attention does nothing, MoE collectives still run."""
        empty = torch.empty(0, dtype=torch.int64)
        meta = layers.AttentionMetadata(positions=empty, slot_mapping=empty, decode_token_idx=None,
                                        decode_gather=None, decode_mask=None, prefills=[])
        self.model.forward(empty, meta, self.pool.caches)

    @torch.inference_mode()
    def execute(self, work: Sequence[SeqWork]) -> list[int | None]:
        """Compute one step; returns the sampled token per sequence (None where not sampled)."""
        if not work:
            return []
        input_ids, meta = build_metadata(work, self.pool.block_size)
        hidden = self.model.forward(input_ids, meta, self.pool.caches)
        ends = torch.tensor([len(w.token_ids) for w in work]).cumsum(0) - 1
        want = [i for i, w in enumerate(work) if w.sample]
        result: list[int | None] = [None] * len(work)
        if not want:
            return result
        logits = self.model.logits(hidden[ends[want]])
        picked = sampling.sample(logits, [work[i].params for i in want], [work[i].generator for i in want])
        for i, tok in zip(want, picked):
            result[i] = tok
        return result

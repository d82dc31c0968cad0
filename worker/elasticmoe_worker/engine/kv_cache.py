"""The paged KV cache: a fixed pool of blocks, allocated up front, handed out per sequence.

`BlockAllocator` is pure bookkeeping (no torch) so the scheduler stays unit-testable;
`KVCachePool` owns the tensors: per layer one key and one value tensor shaped
`[num_blocks, block_size, kv_heads, head_dim]`. A sequence's block table maps its logical
blocks (position // block_size) to pool blocks; blocks are never moved while the sequence
lives, which is what lets a later executor pick up running sequences in place.
"""

from __future__ import annotations

import dataclasses

import torch


class BlockAllocator:
    """Free list over `num_blocks` block ids. Not thread-safe: the engine loop owns it."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: got {num_blocks}, expected >= 1")
        self.num_blocks = num_blocks
        # Pop from the end: low ids first keeps small runs compact.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache: asked for {n} blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def take(self, blocks: list[int]) -> None:
        """Mark specific blocks used: sequences adopted with their KV already in the pool."""
        wanted = set(blocks)
        free = set(self._free)
        missing = wanted - free
        if missing:
            raise ValueError(f"blocks {sorted(missing)[:8]} are not free")
        self._free = [b for b in self._free if b not in wanted]

    def are_free(self, blocks: list[int]) -> bool:
        return len(set(blocks)) == len(blocks) and set(blocks) <= set(self._free)

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        assert len(self._free) <= self.num_blocks, "a block was freed twice"


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclasses.dataclass
class KVCachePool:
    block_size: int
    num_blocks: int
    caches: list[tuple[torch.Tensor, torch.Tensor]]

    @staticmethod
    def bytes_per_block(num_layers: int, kv_heads: int, k_dim: int, v_dim: int, block_size: int,
                        dtype: torch.dtype) -> int:
        return num_layers * block_size * kv_heads * (k_dim + v_dim) * dtype.itemsize

    @classmethod
    def allocate(cls, num_layers: int, kv_heads: int, k_dim: int, v_dim: int, num_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device) -> "KVCachePool":
        """A pool of its own on `device` (an engine without an HMM)."""
        caches = [
            (torch.zeros(num_blocks, block_size, kv_heads, k_dim, dtype=dtype, device=device),
             torch.zeros(num_blocks, block_size, kv_heads, v_dim, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        return cls(block_size, num_blocks, caches)

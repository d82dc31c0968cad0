"""Pick next tokens from logits: greedy, temperature, top-k, top-p, per-request seeds.

Greedy rows take the argmax in one vectorized call; sampled rows are handled one by one
because each may carry its own generator (seeded requests must not share random state, or
one request's output would depend on which others ran beside it).
"""

from __future__ import annotations

from typing import Sequence

import torch

from elasticmoe_worker.engine import types


def _filter(logits: torch.Tensor, params: types.SamplingParams) -> torch.Tensor:
    """logits: [V] float32 -> temperature-scaled logits with cut tokens at -inf."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top one stays.
        drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        logits = logits.scatter(0, sorted_idx, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(
    logits: torch.Tensor,
    params: Sequence[types.SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """logits: [B, V] float32; one params and generator (None: engine-wide) per row."""
    out = torch.argmax(logits, dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = torch.softmax(_filter(logits[i], p), dim=-1)
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out

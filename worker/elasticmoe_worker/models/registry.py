"""Model families by `model_type`, and the one call that loads a checkpoint for serving.

Adding a family = one module with `MODEL_TYPE`, `expert_names`, `replicated_names` and
`build`, registered here.
"""

from __future__ import annotations

import logging
import pathlib
import time
from types import ModuleType
from typing import Sequence

import torch

from elasticmoe_worker.models import config as config_mod
from elasticmoe_worker.models import deepseek_v2, mixtral, qwen3_moe
from elasticmoe_worker.models import model as model_mod
from elasticmoe_worker.models import weights as weights_mod

logger = logging.getLogger(__name__)

FAMILIES: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (qwen3_moe, deepseek_v2, mixtral)}


def family(model_type: str) -> ModuleType:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise config_mod.UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}"
        ) from None


def resolve_dtype(spec: config_mod.ModelSpec, dtype: str) -> torch.dtype:
    """'auto' serves in the checkpoint's dtype; anything else must be a known dtype name."""
    if dtype == "auto":
        return weights_mod.DTYPES.get(spec.torch_dtype, torch.float32)
    return weights_mod.parse_dtype(dtype)


def load_model(
    model_dir: str | pathlib.Path,
    *,
    dtype: str = "auto",
    expert_ids: Sequence[int] | None = None,
    device: torch.device = torch.device("cpu"),
) -> tuple[model_mod.CausalLM, weights_mod.Checkpoint]:
    """Load the tensors this device holds (all replicated ones plus `expert_ids`) onto `device`."""
    spec = config_mod.load_spec(model_dir)
    fam = family(spec.model_type)
    torch_dtype = resolve_dtype(spec, dtype)
    expert_ids = list(range(spec.num_experts)) if expert_ids is None else sorted(expert_ids)
    bad = [e for e in expert_ids if not 0 <= e < spec.num_experts]
    if bad or not expert_ids:
        raise ValueError(f"expert_ids: got {bad or expert_ids}, expected non-empty ids in [0, {spec.num_experts})")
    checkpoint = weights_mod.Checkpoint(model_dir)
    started = time.perf_counter()
    model = fam.build(spec, weights_mod.CheckpointWeights(checkpoint, torch_dtype, expert_ids, device), expert_ids,
                      device)
    checkpoint.close()
    logger.info(
        "loaded %s from %s onto %s: %d layers, %d/%d experts, dtype %s, %.1f MB read in %.2f s",
        spec.model_type, model_dir, device, spec.num_layers, len(expert_ids), spec.num_experts,
        str(torch_dtype).removeprefix("torch."), checkpoint.bytes_read / 1e6, time.perf_counter() - started,
    )
    return model, checkpoint

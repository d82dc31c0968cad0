"""Hot copies end to end (issue 11): an instance with `expert_copies=2` and a redundancy budget
that fits only some experts' second copies counts the tokens its executors route to each
expert, and a scale gives the second copies to the experts with the most. The counts are exact:
every token the MoE layers compute (prompt, then every generated token but the last) goes to
top-k experts in each MoE layer.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

import testprocs
from elasticmoe_worker import hotcopies
from elasticmoe_worker.engine import engine as engine_mod
from elasticmoe_worker.engine import types
from elasticmoe_worker.instance import coordinator
from elasticmoe_worker.models import config as config_mod

MAX_NEW = 12


def _generate(inst: coordinator.Instance, prompts: list[list[int]]) -> list[list[int]]:
    params = types.SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> list[int]:
        tokens = []
        async for out in inst.generate(f"r{i}-{time.monotonic_ns()}", prompts[i], params):
            assert out.error is None, out.error
            tokens += out.token_ids
        return tokens

    async def main():
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    return asyncio.run(main())


def _settled_tokens(inst: coordinator.Instance, want: int) -> tuple[int, ...]:
    """The instance's routed-token counts once they add up to `want` (reports come about once a second)."""
    deadline = time.monotonic() + 30
    while sum(inst.state.expert_tokens) < want and time.monotonic() < deadline:
        time.sleep(0.1)
    return inst.state.expert_tokens


def test_a_scale_gives_the_second_copies_to_the_most_routed_experts(tiny_models):
    model_dir = tiny_models["qwen3_moe"]
    spec = config_mod.load_spec(model_dir)
    expert_bytes = testprocs.float32_expert_bytes(model_dir)
    budget = expert_bytes * 3 // 2  # 3 second copies on 2 devices, 4 on 3
    g = torch.Generator().manual_seed(23)
    prompts = [torch.randint(1, 2000, (int(n),), generator=g).tolist() for n in torch.randint(3, 30, (6,), generator=g)]
    expected = testprocs.hf_greedy(model_dir, prompts, MAX_NEW)
    cfg = engine_mod.EngineConfig(dtype="float32", kv_cache_bytes=8 << 20, max_num_batched_tokens=64)
    inst = coordinator.Instance(model_dir, 2, cfg, expert_copies=2, redundant_expert_bytes=budget).start()
    try:
        assert inst.state.placement.redundant_experts == (0, 1, 2)  # nothing routed yet: the lowest ids
        assert _generate(inst, prompts) == expected
        computed = sum(len(p) + MAX_NEW - 1 for p in prompts)
        routed = _settled_tokens(inst, computed * spec.num_experts_per_tok * spec.num_moe_layers)
        assert sum(routed) == computed * spec.num_experts_per_tok * spec.num_moe_layers, routed
        # the choice goes by the decayed counts: seconds old, they are the counts to within 1 %
        # (they break the counts' ties by recency)
        heat = inst.state.expert_heat
        assert heat == pytest.approx(routed, rel=0.01)
        hottest = hotcopies.hot_copies(spec.num_experts, 2, 4, heat)
        assert hottest != hotcopies.hot_copies(spec.num_experts, 2, 4), "the load must pick other than the lowest ids"

        record = inst.scale(3, "test")
        assert record.outcome.value == "Succeeded", record
        assert inst.state.placement.copy_counts == hottest
        experts = inst.status().experts
        assert experts.redundant_experts == [e for e, c in enumerate(hottest) if c == 2]
        assert (experts.min_copies, experts.copies_per_expert, experts.redundant_bytes) == (1, 2, 4 * expert_bytes)
        assert experts.chosen_by == "routed tokens (the most first)" and experts.routed_tokens == list(routed)
        assert sorted(experts.per_device.values()) == [4, 4, 4]
        assert _generate(inst, prompts) == expected  # the executors route to one holder of each expert
    finally:
        inst.shutdown()

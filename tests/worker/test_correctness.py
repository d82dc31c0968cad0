"""Greedy outputs of our engine equal `transformers` generate token for token (float32,
tiny checkpoints of every family): one request at a time, all at once, staggered arrivals
with chunked prefill, and with a KV pool small enough to force preemption."""

from __future__ import annotations

import pytest
import torch
import transformers

from elasticmoe_worker.engine import engine as engine_mod
from elasticmoe_worker.engine import types

FAMILIES = ("qwen3_moe", "deepseek_v2", "mixtral")
NUM_PROMPTS = 8
MAX_NEW = 24


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    lengths = [3, 7, 12, 19, 26, 33, 41, 5]
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths[:NUM_PROMPTS]]


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tiny_models):
    family = request.param
    model_dir = tiny_models[family]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    prompts = _prompts(hf.config.vocab_size)
    refs = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
            refs.append(out[0, len(p):].tolist())
    return family, model_dir, prompts, refs


def _engine(model_dir, **kw) -> engine_mod.LLMEngine:
    cfg = engine_mod.EngineConfig(dtype="float32", **kw)
    return engine_mod.LLMEngine.from_model_dir(model_dir, cfg)


def _run(engine, prompts, arrival_steps) -> list[list[int]]:
    """Add prompt i at step arrival_steps[i]; step until all finish; -> token ids per prompt."""
    params = types.SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    done: set[str] = set()
    step = 0
    while len(done) < len(prompts):
        for i, at in enumerate(arrival_steps):
            if at == step:
                engine.add_request(str(i), prompts[i], params)
        for out in engine.step():
            got[out.request_id].extend(out.token_ids)
            if out.finished:
                assert out.finish_reason is types.FinishReason.LENGTH
                done.add(out.request_id)
        step += 1
        assert step < 10_000, "engine made no progress"
    return [got[str(i)] for i in range(len(prompts))]


def test_one_at_a_time(case):
    family, model_dir, prompts, refs = case
    engine = _engine(model_dir)
    for i, p in enumerate(prompts):
        assert _run(engine, [p], [0]) == [refs[i]], f"{family} prompt {i}"


def test_concurrent_one_batch(case):
    family, model_dir, prompts, refs = case
    assert _run(_engine(model_dir), prompts, [0] * len(prompts)) == refs


def test_staggered_with_chunked_prefill(case):
    family, model_dir, prompts, refs = case
    # A 16-token budget splits the longer prompts into chunks that share steps with decodes.
    engine = _engine(model_dir, max_num_batched_tokens=16)
    assert _run(engine, prompts, [3 * i for i in range(len(prompts))]) == refs


def test_preemption_keeps_outputs(case):
    family, model_dir, prompts, refs = case
    # 24 blocks of 4 tokens: every prompt fits alone (41 + 24 tokens = 17 blocks), all 8 never do.
    engine = _engine(model_dir, block_size=4, num_kv_blocks=24)
    assert _run(engine, prompts, [0] * len(prompts)) == refs
    assert engine.scheduler.num_preemptions_total > 0, "the pool was meant to force preemption"
    assert engine.scheduler.allocator.num_used == 0, "blocks leaked"

"""Pure scheduler tests: literal inputs, no model."""

from __future__ import annotations

import pytest

from elasticmoe_worker.engine import kv_cache, scheduler, types

GREEDY = types.SamplingParams(max_tokens=8, temperature=0.0)


def _sched(num_blocks=64, **kw) -> scheduler.Scheduler:
    cfg = scheduler.SchedulerConfig(**{"block_size": 4, "max_num_batched_tokens": 32, "max_model_len": 128, **kw})
    return scheduler.Scheduler(cfg, kv_cache.BlockAllocator(num_blocks))


def _req(rid: str, n: int, max_tokens: int = 8) -> scheduler.Request:
    return scheduler.Request(rid, list(range(1, n + 1)), types.SamplingParams(max_tokens=max_tokens, temperature=0.0))


def _commit(batch, sampled_token=7):
    """What the engine does after a step: advance computed tokens, append a sampled one."""
    for s in batch:
        samples = s.samples
        s.request.num_computed += s.num_new_tokens
        if samples:
            s.request.output_token_ids.append(sampled_token)


def test_prefill_then_decode_share_a_step():
    s = _sched()
    s.add(_req("a", 10))
    batch = s.schedule()
    assert [(b.request.request_id, b.num_new_tokens, b.samples) for b in batch] == [("a", 10, True)]
    _commit(batch)
    s.add(_req("b", 6))
    batch = s.schedule()
    assert [(b.request.request_id, b.num_new_tokens) for b in batch] == [("a", 1), ("b", 6)]


def test_long_prompt_is_chunked_within_the_token_budget():
    s = _sched(max_num_batched_tokens=8)
    s.add(_req("a", 20))
    sizes = []
    while True:
        batch = s.schedule()
        sizes.append((batch[0].num_new_tokens, batch[0].samples))
        _commit(batch)
        if sizes[-1][1]:
            break
    assert sizes == [(8, False), (8, False), (4, True)]


def test_blocks_cover_exactly_the_computed_tokens():
    s = _sched()
    s.add(_req("a", 9))  # 9 tokens -> 3 blocks of 4
    _commit(s.schedule())
    assert len(s.requests["a"].block_ids) == 3
    for _ in range(3):  # tokens 10, 11, 12 fit in block 3
        _commit(s.schedule())
    assert len(s.requests["a"].block_ids) == 3
    _commit(s.schedule())  # token 13 needs block 4
    assert len(s.requests["a"].block_ids) == 4


def test_preemption_frees_the_newest_and_requeues_it_first():
    s = _sched(num_blocks=6)
    s.add(_req("old", 8, max_tokens=16))
    s.add(_req("new", 8, max_tokens=16))
    _commit(s.schedule())  # 2 + 2 blocks used, 2 free
    steps = 0
    while s.num_preemptions_total == 0:
        _commit(s.schedule())
        steps += 1
        assert steps < 20
    assert s.requests["new"].status is scheduler.Status.WAITING
    assert s.requests["new"].num_computed == 0 and s.requests["new"].block_ids == []
    assert s.requests["new"].output_token_ids, "outputs survive preemption"
    assert s.waiting[0].request_id == "new"
    assert s.requests["old"].status is scheduler.Status.RUNNING


def test_preempted_request_recomputes_prompt_and_outputs():
    s = _sched(num_blocks=6)
    s.add(_req("old", 8, max_tokens=16))
    s.add(_req("new", 8, max_tokens=16))
    while s.num_preemptions_total == 0:
        _commit(s.schedule())
    new = s.requests["new"]
    s.finish(s.requests["old"])
    batch = s.schedule()
    assert [(b.request.request_id, b.num_new_tokens, b.samples) for b in batch] == [("new", new.num_tokens, True)]


def test_abort_and_finish_return_every_block():
    s = _sched(num_blocks=16)
    for i in range(3):
        s.add(_req(str(i), 10))
    _commit(s.schedule())
    assert s.allocator.num_used == 9
    s.abort("0")
    s.finish(s.requests["1"])
    s.abort("2")
    assert s.allocator.num_used == 0 and not s.running and not s.requests


def test_abort_of_waiting_request_and_unknown_id():
    s = _sched(max_num_seqs=1)
    s.add(_req("a", 4))
    s.add(_req("b", 4))
    s.schedule()
    assert s.abort("b").request_id == "b" and not s.waiting
    assert s.abort("nope") is None


def test_queue_bound_raises_overloaded():
    s = _sched(max_waiting=2)
    s.add(_req("a", 4))
    s.add(_req("b", 4))
    with pytest.raises(types.EngineOverloaded):
        s.add(_req("c", 4))


@pytest.mark.parametrize("prompt_len, max_tokens, message", [
    (128, 1, "prompt: 128 tokens"),
    (10, 200, "max_tokens"),
])
def test_requests_that_can_never_fit_are_refused(prompt_len, max_tokens, message):
    s = _sched(num_blocks=8)  # 32 tokens of KV
    with pytest.raises(ValueError, match=message):
        s.add(_req("a", prompt_len, max_tokens=max_tokens))


def test_duplicate_request_id_is_refused():
    s = _sched()
    s.add(_req("a", 4))
    with pytest.raises(ValueError, match="already in flight"):
        s.add(_req("a", 4))


def test_max_num_seqs_caps_running():
    s = _sched(max_num_seqs=2)
    for i in range(4):
        s.add(_req(str(i), 4))
    s.schedule()
    assert s.num_running == 2 and s.num_waiting == 2


@pytest.mark.parametrize("field", ["block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"])
def test_config_validation_names_the_field(field):
    with pytest.raises(ValueError, match=field):
        scheduler.SchedulerConfig(**{field: 0})


def test_allocator_refuses_overdraw():
    a = kv_cache.BlockAllocator(2)
    a.allocate(2)
    with pytest.raises(MemoryError):
        a.allocate(1)

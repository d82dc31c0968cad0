"""The engine driven as the HTTP server drives it: through AsyncEngine's thread."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from elasticmoe_worker.engine import async_engine, engine as engine_mod, types

GREEDY = types.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture
def make_engine(tiny_models):
    made = []

    def make(**kw):
        cfg = engine_mod.EngineConfig(dtype="float32", **kw)
        e = async_engine.AsyncEngine.from_model_dir(tiny_models["qwen3_moe"], cfg)
        made.append(e)
        return e

    yield make
    for e in made:
        e.shutdown()


async def _collect(engine, rid, prompt, params):
    text, tokens, last = "", [], None
    async for out in engine.generate(rid, prompt, params):
        text += out.text
        tokens += out.token_ids
        last = out
    return text, tokens, last


async def _wait_for(pred, timeout_s=10.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_streams_until_length_and_frees_blocks(make_engine):
    engine = make_engine()

    async def main():
        text, tokens, last = await _collect(engine, "r1", engine.tokenize("hello world"), GREEDY)
        assert len(tokens) == 16 and last.finish_reason is types.FinishReason.LENGTH
        assert last.num_output_tokens == 16
        await _wait_for(lambda: engine.stats().kv_blocks_used == 0)

    asyncio.run(main())


def test_client_going_away_aborts_and_frees_blocks(make_engine):
    engine = make_engine()
    long = types.SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)

    async def main():
        agen = engine.generate("r1", engine.tokenize("a long one"), long)
        first = await agen.__anext__()
        assert not first.finished
        await agen.aclose()  # what a disconnect does to the HTTP handler's iteration
        await _wait_for(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0)

    asyncio.run(main())


def test_seeded_sampling_is_reproducible_alongside_other_requests(make_engine):
    engine = make_engine()
    seeded = types.SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    other = types.SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)

    async def main():
        prompt = engine.tokenize("seeded")
        alone = await _collect(engine, "a", prompt, seeded)
        crowd = await asyncio.gather(
            _collect(engine, "b", prompt, seeded),
            *[_collect(engine, f"o{i}", engine.tokenize(f"noise {i}"), other) for i in range(3)],
        )
        assert crowd[0][1] == alone[1]

    asyncio.run(main())


def test_stop_string_ends_the_request_without_emitting_it(make_engine):
    engine = make_engine()

    async def main():
        prompt = engine.tokenize("stop here")
        full, _, _ = await _collect(engine, "full", prompt, GREEDY)
        stop = full[len(full) // 2:len(full) // 2 + 3]
        assert stop.strip(), f"need a visible stop string, got {full!r}"
        params = types.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop=(stop,))
        text, _, last = await _collect(engine, "stopped", prompt, params)
        assert last.finish_reason is types.FinishReason.STOP
        assert text == full[: full.index(stop)]

    asyncio.run(main())


def test_full_queue_is_refused(make_engine):
    engine = make_engine(max_waiting=0)

    async def main():
        with pytest.raises(types.EngineOverloaded):
            await _collect(engine, "r", [1, 2, 3], GREEDY)

    asyncio.run(main())


def test_failed_step_fails_requests_in_flight_and_marks_unhealthy(make_engine, monkeypatch):
    engine = make_engine()

    def boom(work):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.engine.runner, "execute", boom)

    async def main():
        _, _, last = await _collect(engine, "r", [1, 2, 3], GREEDY)
        assert last.finish_reason is types.FinishReason.ERROR and "device lost" in last.error
        assert not engine.stats().healthy
        with pytest.raises(types.EngineDead):
            await _collect(engine, "r2", [1, 2, 3], GREEDY)

    asyncio.run(main())


def test_handover_to_another_engine_keeps_kv_in_place_and_outputs(tiny_models):
    """What a switch does: engine A stops mid-generation, engine B on the same KV pool adopts
    its sequences (blocks untouched) and finishes them exactly as A alone would have."""
    cfg = engine_mod.EngineConfig(dtype="float32", max_num_batched_tokens=16)
    a = engine_mod.LLMEngine.from_model_dir(tiny_models["deepseek_v2"], cfg)
    prompts = [[5, 6, 7, 8, 9], list(range(20, 50)), [3, 1, 4, 1, 5, 9, 2, 6]]

    def run_alone() -> list[list[int]]:
        ref = engine_mod.LLMEngine(a.model, a.tokenizer, cfg, "ref")
        for i, p in enumerate(prompts):
            ref.add_request(str(i), p, GREEDY)
        out = {str(i): [] for i in range(len(prompts))}
        while ref.has_work():
            for o in ref.step():
                out[o.request_id] += o.token_ids
        return [out[str(i)] for i in range(len(prompts))]

    for i, p in enumerate(prompts):
        a.add_request(str(i), p, GREEDY)
    got = {str(i): [] for i in range(len(prompts))}
    for _ in range(5):  # mid-prefill for the long prompt, mid-decode for the others
        for o in a.step():
            got[o.request_id] += o.token_ids
    used = a.scheduler.allocator.num_used
    states = a.export_requests()
    b = engine_mod.LLMEngine(a.model, a.tokenizer, cfg, "b", pool=a.pool)
    b.adopt_requests(states, keep_kv=True)
    assert b.scheduler.allocator.num_used == used, "adopted sequences keep exactly their blocks"
    computed = sum(r.num_computed for r in b.scheduler.running)
    assert computed > 0, "nothing is recomputed"
    while b.has_work():
        for o in b.step():
            got[o.request_id] += o.token_ids
    assert [got[str(i)] for i in range(len(prompts))] == run_alone()
    assert b.scheduler.allocator.num_used == 0


@pytest.mark.parametrize("mode", ["kv-copied", "recomputed", "blocks-in-use"])
def test_handover_to_an_engine_on_another_pool_with_the_kv_copied_recomputes_nothing(tiny_models, mode):
    """What a scale-down does with a departing device's sequences: engine B, on a pool of its own
    that already holds a sequence of its own, adopts them at other block ids after their blocks
    were copied there (or, without the copy, recomputes them; or, told to keep blocks that its own
    sequence holds, recomputes them too), and finishes them exactly as A alone would have;
    `num_recomputed_tokens_total` says what B computed again."""
    cfg = engine_mod.EngineConfig(dtype="float32", max_num_batched_tokens=16, num_kv_blocks=32)
    a = engine_mod.LLMEngine.from_model_dir(tiny_models["deepseek_v2"], cfg)
    b = engine_mod.LLMEngine(a.model, a.tokenizer, cfg, "b")
    prompts = [[5, 6, 7, 8, 9], list(range(20, 50)), [3, 1, 4, 1, 5, 9, 2, 6]]
    ref = engine_mod.LLMEngine(a.model, a.tokenizer, cfg, "ref")
    for i, p in enumerate(prompts):
        (a if i else b).add_request(str(i), p, GREEDY)  # request 0 lives on B: its blocks are taken there
        ref.add_request(str(i), p, GREEDY)
    want = {str(i): [] for i in range(len(prompts))}
    while ref.has_work():
        for o in ref.step():
            want[o.request_id] += o.token_ids
    got = {str(i): [] for i in range(len(prompts))}
    for _ in range(5):
        for eng in (a, b):
            for o in eng.step():
                got[o.request_id] += o.token_ids
    states = a.export_requests()
    computed = sum(st.num_computed for st in states)
    assert computed > 0
    if mode == "kv-copied":
        used = b.scheduler.running[0].block_ids
        free = [x for x in range(cfg.num_kv_blocks) if x not in used]
        for n, st in enumerate(states):
            new, free = free[:len(st.block_ids)], free[len(st.block_ids):]
            for (ka, va), (kb, vb) in zip(a.pool.caches, b.pool.caches):
                kb[new], vb[new] = ka[st.block_ids], va[st.block_ids]
            states[n] = msgspec.structs.replace(st, block_ids=new)
    elif mode == "blocks-in-use":  # a plan gone wrong: B's own sequence holds them
        own = b.scheduler.running[0].block_ids
        states = [msgspec.structs.replace(st, block_ids=(own * len(st.block_ids))[:len(st.block_ids)]) for st in states]
    b.adopt_requests(states, keep_kv=mode != "recomputed")
    while b.has_work():
        for o in b.step():
            got[o.request_id] += o.token_ids
    assert got == want
    assert b.stats().num_recomputed_tokens_total == (0 if mode == "kv-copied" else computed)


def test_the_engine_is_built_on_the_thread_that_steps_it(tiny_models):
    """NOTE on AsyncEngine: built on one thread and stepped on another, a CPU engine runs two
    OpenMP teams and decodes far slower; so the factory runs on the engine-loop thread."""
    import threading

    seen = []

    def make():
        seen.append(threading.current_thread().name)
        return engine_mod.LLMEngine.from_model_dir(tiny_models["qwen3_moe"], engine_mod.EngineConfig(dtype="float32"))

    e = async_engine.AsyncEngine(make)
    try:
        assert seen == ["engine-loop"] and e.engine.model_name and e.stats().healthy

        async def one():
            return await _collect(e, "r1", [5, 6, 7], GREEDY)
        assert len(asyncio.run(one())[1]) == 16
    finally:
        e.shutdown()


def test_an_engine_that_fails_to_build_raises_in_the_caller(tmp_path):
    with pytest.raises(FileNotFoundError):
        async_engine.AsyncEngine.from_model_dir(tmp_path / "missing", engine_mod.EngineConfig(dtype="float32"))

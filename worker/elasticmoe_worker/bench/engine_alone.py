"""`elasticmoe bench serve`'s in-process side: our engine stepped in the bench process, without
HTTP, the server's threads or a streaming client, as the `transformers` baselines run.

Why: the served side pays for HTTP and for its client on the same cores; this side measures the
same engine, options and requests without them, so a run shows the engine against
`transformers` like for like, and what serving over HTTP costs on this machine.

Requests are added `concurrency` at a time (the next one as soon as one finishes, arriving
then); TTFT and TPOT come from when the step that produced a token returned.
"""

from __future__ import annotations

import pathlib
import time
from typing import Callable

from elasticmoe_worker.bench.serve_bench import BenchError, RequestSample, SideRun, tpot_s


class EngineInProcess:
    def __init__(self, model_dir: pathlib.Path, config) -> None:
        """`config`: the server's `EngineConfig`. Built on the calling thread, which must be the
        one that calls `run` (one OpenMP team; see `AsyncEngine`)."""
        import torch

        from elasticmoe_worker.engine import engine as engine_mod

        self.engine = engine_mod.LLMEngine.from_model_dir(model_dir, config, None, torch.device("cpu"))
        self._runs = 0

    def run(self, prompts: list[list[int]], output_len: int, concurrency: int,
            on_done: Callable[[], None] = lambda: None) -> SideRun:
        """Every prompt, greedy, exactly `output_len` tokens, at most `concurrency` in flight."""
        from elasticmoe_worker.engine import types

        self._runs += 1
        params = types.SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        pending = list(enumerate(prompts))
        arrival: dict[str, float] = {}
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        tokens: dict[str, int] = {}
        samples: list[RequestSample | None] = [None] * len(prompts)
        index: dict[str, int] = {}
        start_s = time.perf_counter()

        def add_next() -> None:
            i, ids = pending.pop(0)
            request_id = f"bench-{self._runs}-{i}"
            index[request_id], arrival[request_id], tokens[request_id] = i, time.perf_counter(), 0
            self.engine.add_request(request_id, ids, params, time.monotonic())

        while pending and len(arrival) < concurrency:
            add_next()
        while self.engine.has_work():
            outputs = self.engine.step()
            now_s = time.perf_counter()
            for out in outputs:
                rid = out.request_id
                if out.token_ids:
                    first.setdefault(rid, now_s)
                    last[rid] = now_s
                    tokens[rid] += len(out.token_ids)
                if not out.finished:
                    continue
                if out.finish_reason is not types.FinishReason.LENGTH or tokens[rid] != output_len:
                    raise BenchError(f"in-process engine: request {rid} ended with {out.finish_reason} after "
                                     f"{tokens[rid]} tokens, expected {output_len} ({out.error or 'no error'})")
                n = tokens[rid]
                samples[index[rid]] = RequestSample(first[rid] - arrival[rid], tpot_s(first[rid], last[rid], n),
                                                    now_s - arrival[rid], n)
                on_done()
                if pending:
                    add_next()
        wall_s = time.perf_counter() - start_s
        missing = [i for i, s in enumerate(samples) if s is None]
        if missing:
            raise BenchError(f"in-process engine: no result for requests {missing}")
        return SideRun([s for s in samples if s is not None], wall_s)

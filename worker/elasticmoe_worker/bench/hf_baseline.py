"""The `transformers` baselines of `elasticmoe bench serve`: the same requests through
`generate`, one after another and as one left-padded static batch, timed per generated step
with a streamer (split out of serve_bench.py)."""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Callable

from elasticmoe_worker.bench.serve_bench import RequestSample, SideRun, tpot_s


def _step_timer():
    """A `transformers` streamer that records when each generated step reaches the host.

    Built on first use so that importing this module (which every `elasticmoe` command does)
    does not import transformers.
    """
    from transformers.generation import streamers

    class StepTimes(streamers.BaseStreamer):
        def __init__(self) -> None:
            self.times_s: list[float] = []
            self._saw_prompt = False

        def put(self, value) -> None:
            if not self._saw_prompt:  # generate() first puts the prompt itself
                self._saw_prompt = True
                return
            self.times_s.append(time.perf_counter())

        def end(self) -> None:
            pass

    return StepTimes()


class TransformersBaseline:
    def __init__(self, model_dir: pathlib.Path, dtype: str) -> None:
        import torch
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=getattr(torch, dtype), local_files_only=True).eval()
        cfg = self.model.generation_config
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else self.model.config.pad_token_id
        self.pad_token_id = 0 if pad is None else int(pad)

    def _generate(self, input_ids, attention_mask, output_len: int, streamer):
        return self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=output_len,
            min_new_tokens=output_len, pad_token_id=self.pad_token_id, streamer=streamer,
        )

    def sequential(self, prompts: list[list[int]], output_len: int,
                   on_done: Callable[[], None] = lambda: None) -> SideRun:
        """One request after another, all considered to arrive at t=0."""
        import torch

        samples = []
        start_s = time.perf_counter()
        for ids in prompts:
            streamer = _step_timer()
            x = torch.tensor([ids])
            out = self._generate(x, torch.ones_like(x), output_len, streamer)
            done_s = time.perf_counter()
            n = out.shape[1] - len(ids)
            assert len(streamer.times_s) == n, "one streamer put per generated token"
            first_s, last_s = streamer.times_s[0], streamer.times_s[-1]
            samples.append(RequestSample(first_s - start_s, tpot_s(first_s, last_s, n), done_s - start_s, n))
            on_done()
        return SideRun(samples, time.perf_counter() - start_s)

    def static_batch(self, prompts: list[list[int]], output_len: int) -> SideRun:
        """All prompts in one left-padded batch; every request shares the batch's step times."""
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.int64)
        mask = torch.zeros((len(prompts), width), dtype=torch.int64)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        streamer = _step_timer()
        start_s = time.perf_counter()
        out = self._generate(ids, mask, output_len, streamer)
        wall_s = time.perf_counter() - start_s
        n = out.shape[1] - width
        assert len(streamer.times_s) == n, "one streamer put per generated step"
        first_s, last_s = streamer.times_s[0], streamer.times_s[-1]
        sample = RequestSample(first_s - start_s, tpot_s(first_s, last_s, n), wall_s, n)
        return SideRun([dataclasses.replace(sample) for _ in prompts], wall_s)

"""What a serving run is checked against: `transformers`' greedy continuations (on any torch
device), and a streaming load whose every request must stream all its tokens.

Why it is in the package: the tests (through tests/testprocs.py) and the device check
(`elasticmoe_worker.devicecheck`, run on GPUs) use the very same references.

Not guaranteed: equal greedy outputs on a device depend on the device's float32 kernels
breaking no argmax tie differently from ours (the generated checkpoints keep ties rare).
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx


def hf_greedy(model_dir, prompts: list[list[int]], max_new_tokens: int, device: str = "cpu") -> list[list[int]]:
    """`transformers`' greedy continuation of each prompt (float32, EOS ignored, one prompt at a
    time on `device`): the reference."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        return [hf.generate(torch.tensor([p], device=device), max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=0)[0, len(p):].tolist() for p in prompts]


class StreamingLoad:
    """`clients` closed-loop clients on a thread until `stop()`, each streaming greedy
    completions of `prompts` (token ids, cycled) from an OpenAI-compatible server. A request
    that does not stream `max_tokens` tokens to a `length` finish counts as failed, whatever
    went wrong (status, error event, broken stream, timeout)."""

    def __init__(self, base: str, model: str, prompts: list[list[int]], max_tokens: int, clients: int = 4,
                 timeout_s: float = 120.0) -> None:
        self.results: list[tuple[int, str]] = []  # (prompt index, streamed text) of each request that succeeded
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                      "stream": True, "stream_options": {"include_usage": True}}
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run(base, prompts, clients, timeout_s)),
                                        daemon=True)
        self._thread.start()

    async def _run(self, base: str, prompts: list[list[int]], clients: int, timeout_s: float) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=timeout_s) as c:
            async def client(n: int) -> None:
                while not self._stop.is_set():
                    i = n % len(prompts)
                    try:
                        outcome = await self._one(c, prompts[i])
                    except (httpx.HTTPError, ValueError, KeyError) as exc:
                        outcome = f"{type(exc).__name__}: {exc}"
                    if isinstance(outcome, str):
                        self.failed.append(f"prompt {i}: {outcome}")
                    else:
                        self.results.append((i, outcome[0]))
                    n += clients

            await asyncio.gather(*(client(n) for n in range(clients)))

    async def _one(self, c: httpx.AsyncClient, prompt: list[int]) -> tuple[str] | str:
        """-> (text,) or what went wrong."""
        text, finish, usage = [], None, None
        async with c.stream("POST", "/v1/completions", json={**self._body, "prompt": prompt}) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    return f"error event: {event['error']}"
                for choice in event["choices"]:
                    text.append(choice["text"])
                    finish = choice.get("finish_reason") or finish
                usage = event.get("usage") or usage
        if finish != "length" or usage is None or usage["completion_tokens"] != self._body["max_tokens"]:
            return f"finish {finish!r}, usage {usage}"
        return ("".join(text),)

    def stop(self, timeout_s: float = 180.0) -> None:
        """Let every client finish its request in flight, then return."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        assert not self._thread.is_alive(), f"the load's clients did not finish within {timeout_s:g} s"

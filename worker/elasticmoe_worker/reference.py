"""What a serving run is checked against: `transformers`' greedy continuations (on any torch
device), and a streaming load whose every request must stream all its tokens.

Why it is in the package: the tests (through tests/testprocs.py) and the device check
(`elasticmoe_worker.devicecheck`, run on GPUs) use the very same references.

Not guaranteed: equal greedy outputs on a device depend on the device's float32 kernels
breaking no argmax tie differently from ours (the generated checkpoints keep ties rare).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time

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


@dataclasses.dataclass(frozen=True)
class Failure:
    """One request of a `StreamingLoad` that did not stream all its tokens. `kind`: `status` (an
    HTTP error answer; `retry_after` is its Retry-After header), `error_event` (an SSE error
    event), `connection` (refused, reset or closed mid-stream), `timeout` (no answer within the
    load's `deadline_s`), `incomplete` (the stream ended without its tokens), `invalid` (an
    answer that is not the protocol). Times are `time.monotonic()`."""

    prompt: int
    started_s: float
    ended_s: float
    kind: str
    detail: str
    retry_after: str | None = None

    def __str__(self) -> str:
        return f"prompt {self.prompt}: {self.detail}"


class _Failed(Exception):
    def __init__(self, kind: str, detail: str, retry_after: str | None = None) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.retry_after = kind, detail, retry_after


class StreamingLoad:
    """`clients` closed-loop clients on a thread until `stop()`, each streaming greedy
    completions of `prompts` (token ids, cycled) from an OpenAI-compatible server. A request
    that does not stream `max_tokens` tokens to a `length` finish counts as failed, whatever
    went wrong (status, error event, broken stream, timeout): `failures` says how and when.

    `timeout_s` bounds each wait for the server (connect, next bytes); `deadline_s`, if set, a
    whole request, so a request that hangs is a failure of kind `timeout`. `backoff_s`, if set,
    makes a client pause after a failed request as a polite client would: for the answer's
    Retry-After if it had one, else `backoff_s` (None: the next request at once)."""

    def __init__(self, base: str, model: str, prompts: list[list[int]], max_tokens: int, clients: int = 4,
                 timeout_s: float = 120.0, deadline_s: float | None = None, backoff_s: float | None = None) -> None:
        self.results: list[tuple[int, str]] = []  # (prompt index, streamed text) of each request that succeeded
        self.failures: list[Failure] = []
        self._stop = threading.Event()
        self._body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                      "stream": True, "stream_options": {"include_usage": True}}
        self._deadline_s, self._backoff_s = deadline_s, backoff_s
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run(base, prompts, clients, timeout_s)),
                                        daemon=True)
        self._thread.start()

    @property
    def failed(self) -> list[str]:
        return [str(f) for f in self.failures]

    async def _run(self, base: str, prompts: list[list[int]], clients: int, timeout_s: float) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=timeout_s) as c:
            async def client(n: int) -> None:
                while not self._stop.is_set():
                    i = n % len(prompts)
                    started_s = time.monotonic()
                    try:
                        async with asyncio.timeout(self._deadline_s):
                            text = await self._one(c, prompts[i])
                    except _Failed as exc:
                        failure = Failure(i, started_s, time.monotonic(), exc.kind, exc.detail, exc.retry_after)
                    except TimeoutError:
                        failure = Failure(i, started_s, time.monotonic(), "timeout",
                                          f"no complete answer within {self._deadline_s:g} s")
                    except httpx.TransportError as exc:
                        kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection"
                        failure = Failure(i, started_s, time.monotonic(), kind, f"{type(exc).__name__}: {exc}")
                    except (httpx.HTTPError, ValueError, KeyError) as exc:
                        failure = Failure(i, started_s, time.monotonic(), "invalid", f"{type(exc).__name__}: {exc}")
                    else:
                        self.results.append((i, text))
                        n += clients
                        continue
                    self.failures.append(failure)
                    n += clients
                    if self._backoff_s is not None:
                        await asyncio.sleep(_retry_after_s(failure.retry_after, self._backoff_s))

            await asyncio.gather(*(client(n) for n in range(clients)))

    async def _one(self, c: httpx.AsyncClient, prompt: list[int]) -> str:
        """-> the streamed text; raises `_Failed` saying what went wrong."""
        text, finish, usage = [], None, None
        async with c.stream("POST", "/v1/completions", json={**self._body, "prompt": prompt}) as r:
            if r.status_code != 200:
                raise _Failed("status", f"HTTP {r.status_code}: {(await r.aread())[:300]!r}",
                              r.headers.get("retry-after"))
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    raise _Failed("error_event", f"error event: {event['error']}")
                for choice in event["choices"]:
                    text.append(choice["text"])
                    finish = choice.get("finish_reason") or finish
                usage = event.get("usage") or usage
        if finish != "length" or usage is None or usage["completion_tokens"] != self._body["max_tokens"]:
            raise _Failed("incomplete", f"finish {finish!r}, usage {usage}")
        return "".join(text)

    def stop(self, timeout_s: float = 180.0) -> None:
        """Let every client finish its request in flight, then return."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        assert not self._thread.is_alive(), f"the load's clients did not finish within {timeout_s:g} s"


def _retry_after_s(header: str | None, default_s: float) -> float:
    """Retry-After in seconds (RFC 9110 also allows an HTTP date, which our servers never send)."""
    try:
        return max(0.0, float(header)) if header is not None else default_s
    except ValueError:
        return default_s

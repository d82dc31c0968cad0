"""Helpers for tests that start real processes: free loopback ports, the `elasticmoe` command
line, a health probe, a parent-death signal so a killed test run takes its processes along,
`transformers`' greedy outputs (the reference), and streaming clients of a running server."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from elasticmoe_worker.instance import procutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(base_url: str) -> bool:
    """Whether the server at `base_url` answers /health with 200 (False while it is not up)."""
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def elasticmoe(*args: str) -> list[str]:
    return [sys.executable, "-m", "elasticmoe_worker.cli", *args]


def until(what: str, pred, timeout_s: float, proc: subprocess.Popen, log=None):
    """Poll `pred` until it returns something true (-> that); fail if `proc` exits first or
    `timeout_s` passes, with the tail of its `log` file (a pathlib.Path) if given."""
    def tail() -> str:
        return f":\n{log.read_text()[-3000:]}" if log is not None else ""

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) while waiting for {what}{tail()}")
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}{tail()}")
        time.sleep(0.3)


def die_with_test() -> None:
    """preexec_fn: workers outlive their parent by design (pods), so nothing else would stop
    them when a test run is killed (a timeout)."""
    procutil.die_with_parent(signal.SIGKILL)


def interrupt(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """Ctrl-C a server and wait for its clean stop; kill it if it takes longer than `timeout_s`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def hf_greedy(model_dir, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """`transformers`' greedy continuation of each prompt (float32, EOS ignored): the reference."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        return [hf.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False,
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

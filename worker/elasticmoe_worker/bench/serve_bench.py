"""`elasticmoe bench serve`: serving throughput and latency of our server vs `transformers`.

Why this exists: DESIGN.md §8 sets the target "serving tokens/s >= 3x `transformers` generate,
16 concurrent requests". This command measures it in one run on one model: the real
`elasticmoe serve` in a subprocess, fed streaming `/v1/completions` requests `--concurrency`
at a time, against two `transformers` baselines on the same checkpoint, dtype and prompts:
the requests one after another (a plain generate server: all arrive at t=0 and queue) and
all prompts in one padded `generate` batch. A fourth side, judged by no target, steps our
engine in the bench process as the baselines run (`engine_alone`: no HTTP, no client on the
same cores), so a run also shows what serving over HTTP costs. Sides are interleaved (ours, ...)
after one untimed warm-up each; the table shows medians over `--repeats`. Every request
yields exactly `--output-len` tokens (`ignore_eos` / `min_new_tokens`); our counts come from
the server's `usage`, not from SSE chunks (a chunk may hold no text mid-character).

What it does not guarantee: the sides never run at the same time, but our server stays up,
idle, while the baseline runs (its CPU time then is in the JSON, to check it stays near 0).
Both use torch's default thread count; nothing pins cores. On a shared 2-core machine the
numbers are noisy: compare ratios within one run, not absolute values across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from elasticmoe_worker import cliargs

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Serving throughput of `elasticmoe serve` vs transformers generate on the same model, dtype and prompts, in "
    "one run: --num-requests streaming /v1/completions sent --concurrency at a time (--prompt-len tokens in, "
    "exactly --output-len out, greedy) against transformers running the same requests one after another (all "
    "arriving at t=0) and as one padded static batch, and against our engine stepped in this process (no HTTP; "
    "no target, it shows what serving over HTTP costs). Interleaved --repeats after a warm-up; prints medians of "
    "output tok/s, TTFT and TPOT p50/p90 and the speed-ups, checks the DESIGN.md target (>= 3x sequential "
    "generate) and writes every raw number to --out-json. Without --model, a random-initialised "
    "--family/--preset checkpoint is generated into the cache directory on first use."
)

TARGET_SPEEDUP = 3.0
ENGINE_TARGET_SEQUENTIAL, ENGINE_TARGET_STATIC = 4.0, 1.2  # issue 13's faster CPU engine
SEQUENTIAL, STATIC = "transformers_sequential", "transformers_static_batch"
ENGINE_ALONE = "ours_engine_in_process"  # informative: not what a target is judged on
SIDES = ("ours", ENGINE_ALONE, SEQUENTIAL, STATIC)
SIDE_LABELS = {"ours": "ours", ENGINE_ALONE: "ours: engine in-process, no HTTP",
               SEQUENTIAL: "transformers sequential", STATIC: "transformers static batch"}
_WARMUP_OUTPUT_LEN = 16
# Full-size and --quick defaults: (num_requests, concurrency, prompt_len, output_len, repeats).
_DEFAULTS = {False: (16, 16, 64, 128, 3), True: (4, 4, 16, 16, 1)}
_PASSAGE = (
    "Mixture-of-experts language models route every token to a few experts out of many, so "
    "each token touches a small share of the weights while the model as a whole stays large. "
    "Serving them well means batching many requests so that every expert sees enough tokens, "
    "keeping the key-value cache in fixed-size blocks, and scaling the devices with the load."
)


class BenchError(RuntimeError):
    """The benchmark cannot go on (server did not start, a request failed, ...)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("benchmark")
    g.add_argument("--model", default=None, help="checkpoint directory (default: generate --family/--preset)")
    g.add_argument("--family", default=None, choices=["qwen3_moe", "deepseek_v2", "mixtral"],
                   help="family to generate when no --model is given (default: qwen3_moe)")
    g.add_argument("--preset", default=None, choices=["tiny", "small", "bench"],
                   help="size to generate when no --model is given (default: small; tiny with --quick)")
    for flag, text in (("--num-requests", "requests per side and repeat (default: 16)"),
                       ("--concurrency", "requests in flight at once against our server (default: 16)"),
                       ("--prompt-len", "prompt length in tokens (default: 64)"),
                       ("--output-len", "tokens generated per request, exactly (default: 128)"),
                       ("--repeats", "timed repeats of each side, interleaved; medians are reported (default: 3)")):
        g.add_argument(flag, type=cliargs.positive_int, default=None, help=text)
    g.add_argument("--quick", action="store_true", help="smoke run for tests: tiny preset, 4 requests of 16 tokens "
                   "in and 16 out, concurrency 4, 1 repeat (options given explicitly still win)")
    g.add_argument("--out-json", type=pathlib.Path, default=pathlib.Path("bench-results/serve.json"),
                   help="raw numbers, medians and configuration go here (default: %(default)s); "
                        "the server's log goes beside it (*.server.log)")
    g.add_argument("--torch-threads", type=cliargs.positive_int, default=None,
                   help="torch threads for both sides (OMP_NUM_THREADS for the server, torch.set_num_threads "
                        "here; default: torch's default, which is what `elasticmoe serve` uses)")
    g.add_argument("--devices", type=cliargs.positive_int, default=None,
                   help="run our server as `elasticmoe serve --devices N`: the multi-device instance (a coordinator "
                        "in the server, the model in executor processes, one per device), what scripts/serve.sh "
                        "runs (default: the one-process server)")
    g.add_argument("--server-start-timeout-s", type=float, default=300.0,
                   help="how long to wait for the server's /health (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------- measurements


@dataclasses.dataclass
class RequestSample:
    """One request's timings. TTFT counts from when the request was sent (ours) or from t=0
    of the batch (transformers: every request is considered to arrive then)."""

    ttft_s: float
    tpot_s: float  # (last token - first token) / (tokens - 1); 0 for a single token
    e2e_s: float
    num_output_tokens: int


@dataclasses.dataclass
class SideRun:
    samples: list[RequestSample]
    wall_s: float

    def summary(self) -> dict[str, float]:
        out_tokens = sum(s.num_output_tokens for s in self.samples)
        result = {"num_output_tokens": out_tokens, "wall_s": self.wall_s,
                  "output_tok_per_s": out_tokens / self.wall_s if self.wall_s > 0 else 0.0}
        for name in ("ttft", "tpot", "e2e"):
            ms = [getattr(s, f"{name}_s") * 1e3 for s in self.samples]
            result.update({f"{name}_p50_ms": percentile(ms, 50), f"{name}_p90_ms": percentile(ms, 90)})
        return result


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); q in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def tpot_s(first_token_s: float, last_token_s: float, num_tokens: int) -> float:
    return (last_token_s - first_token_s) / (num_tokens - 1) if num_tokens > 1 else 0.0


def build_prompts(tokenizer, num_requests: int, prompt_len: int) -> list[list[int]]:
    """Deterministic prompts of exactly `prompt_len` token ids, different per request."""
    words = _PASSAGE.split()
    prompts = []
    for i in range(num_requests):
        k = (7 * i) % len(words)
        text = f"Request {i}: " + " ".join(words[k:] + words[:k])
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        assert ids, "the tokenizer encoded a non-empty text to no tokens"
        while len(ids) < prompt_len:
            ids += ids
        prompts.append(ids[:prompt_len])
    return prompts


# ---------------------------------------------------------------- our server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the server gets SIGTERM if the benchmark is killed hard (SIGKILL skips `finally`).
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerProcess:
    """A server subprocess with its log in a file; `wait_healthy` raises with the log's tail."""

    def __init__(self, argv: Sequence[str], log_path: pathlib.Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")
        # NOTE: its own session, so a Ctrl-C in the terminal reaches only us and we stop it in order.
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def log_tail(self, num_lines: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
        return "\n".join(lines[-num_lines:])

    def wait_healthy(self, url: str, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise BenchError(f"the server exited with code {rc} before it became healthy; "
                                 f"last lines of {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"the server did not answer {url} with 200 within {timeout_s:.0f} s; "
                                 f"last lines of {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.2)

    def cpu_s(self) -> float | None:
        """User + system CPU seconds of the server process so far (Linux), else None."""
        try:
            fields = pathlib.Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("the server did not stop within %.0f s of SIGTERM; killing it", timeout_s)
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _engine_actions() -> list[argparse.Action]:
    scratch = argparse.ArgumentParser(add_help=False)
    cliargs.add_engine_arguments(scratch)
    return [a for a in scratch._actions if a.option_strings]


def engine_options(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    """The engine options as parsed (dest -> value), with the dtype made explicit."""
    return {a.dest: dtype if a.dest == "dtype" else getattr(args, a.dest, a.default) for a in _engine_actions()}


def engine_flags(args: argparse.Namespace, dtype: str) -> list[str]:
    """The same options as `elasticmoe serve` flags."""
    flags: list[str] = []
    options = engine_options(args, dtype)
    for action in _engine_actions():
        value = options[action.dest]
        if action.nargs == 0:
            flags += [action.option_strings[0]] if value and value != action.default else []
        elif value is not None:
            flags += [action.option_strings[0], str(value)]
    return flags


def completion_body(model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """A greedy streaming completion of exactly `max_tokens` tokens, with usage in the last chunk."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}


async def stream_completion(client, url: str, body: dict[str, Any], sent_s: float | None = None,
                            text_times: list[float] | None = None) -> RequestSample:
    """POST one streaming completion and time it; TTFT counts from `sent_s` (default: now);
    `text_times`, when given, gets the arrival time of every chunk that carries text.
    BenchError for an HTTP error, an error event in the stream, or a stream without usage or text."""
    sent_s = time.perf_counter() if sent_s is None else sent_s
    first_s = last_s = usage = None
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise BenchError(f"POST {url} -> {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:500]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now_s = time.perf_counter()
            event = json.loads(data)
            if "error" in event:
                raise BenchError(f"the server failed a streamed request: {event['error']}")
            choices = event.get("choices") or []
            if choices:
                if first_s is None and choices[0].get("text"):
                    first_s = now_s
                if text_times is not None and choices[0].get("text"):
                    text_times.append(now_s)
                last_s = now_s
            if event.get("usage"):
                usage = event["usage"]
    end_s = time.perf_counter()
    if usage is None or first_s is None or last_s is None:
        raise BenchError(f"a streamed request ended without {'usage' if usage is None else 'any text'}")
    n = int(usage["completion_tokens"])
    return RequestSample(first_s - sent_s, tpot_s(first_s, last_s, n), end_s - sent_s, n)


def run_ours(base_url: str, model_name: str, prompts: list[list[int]], output_len: int, concurrency: int,
             on_done: Callable[[], None] = lambda: None) -> SideRun:
    """All prompts as streaming completions, `concurrency` in flight; wall time of the batch."""
    import httpx

    url = f"{base_url}/v1/completions"

    async def one(client, limit: asyncio.Semaphore, ids: list[int]) -> RequestSample:
        async with limit:
            sample = await stream_completion(client, url, completion_body(model_name, ids, output_len))
        on_done()
        return sample

    async def batch() -> SideRun:
        limit = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as client:
            start_s = time.perf_counter()
            samples = await asyncio.gather(*(one(client, limit, ids) for ids in prompts))
            return SideRun(list(samples), time.perf_counter() - start_s)

    return asyncio.run(batch())


# ---------------------------------------------------------------- the run


@dataclasses.dataclass
class Settings:
    num_requests: int
    concurrency: int
    prompt_len: int
    output_len: int
    repeats: int


def resolve_settings(args: argparse.Namespace) -> Settings:
    defaults = _DEFAULTS[bool(args.quick)]
    names = ("num_requests", "concurrency", "prompt_len", "output_len", "repeats")
    return Settings(*(getattr(args, n) if getattr(args, n) is not None else d for n, d in zip(names, defaults)))


def resolve_model(args: argparse.Namespace, progress: bool) -> tuple[pathlib.Path, str | None, str | None]:
    """-> (model dir, family, preset); generates the checkpoint into the cache if needed."""
    if args.model:
        model_dir = pathlib.Path(args.model)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"--model {model_dir}: no config.json, expected a Hugging Face checkpoint dir")
        family = json.loads((model_dir / "config.json").read_text()).get("model_type")
        return model_dir.absolute(), family, None
    from elasticmoe_worker import modelgen

    family = args.family or "qwen3_moe"
    preset = args.preset or ("tiny" if args.quick else "small")
    model_dir = cliargs.cache_dir() / "models" / f"{family}-{preset}-bench"
    # make_model renames a finished directory into place, so config.json means complete.
    if not (model_dir / "config.json").is_file():
        logger.info("generating %s/%s into %s", family, preset, model_dir)
        modelgen.make_model(family, preset, model_dir, progress=progress)
    return model_dir, family, preset


def resolve_dtype(requested: str, model_dir: pathlib.Path) -> str:
    if requested != "auto":
        return requested
    config = json.loads((model_dir / "config.json").read_text())
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return name.removeprefix("torch.")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pathlib.Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def aggregate(runs: dict[str, list[SideRun]]) -> dict[str, Any]:
    """Per-repeat summaries, medians over repeats, and speed-ups: the ratio of the medians (what
    the targets are judged on), with the paired per-repeat ratios and their spread beside it."""
    result: dict[str, Any] = {"sides": {}, "speedup": {}}
    for side, side_runs in runs.items():
        summaries = [r.summary() for r in side_runs]
        result["sides"][side] = {
            "median": {k: statistics.median(s[k] for s in summaries) for k in summaries[0]},
            "repeats": [
                {**s, "requests": [dataclasses.asdict(x) for x in r.samples]} for s, r in zip(summaries, side_runs)
            ],
        }
    for side in (s for s in SIDES if s != "ours" and s in runs):
        result["speedup"][side] = _speedup(runs["ours"], runs[side])
    if ENGINE_ALONE in runs:
        # the engine against the static batch like for like: both in the bench process, no HTTP
        result["engine_alone_vs_static"] = _speedup(runs[ENGINE_ALONE], runs[STATIC])
    return result


def _speedup(ours: list[SideRun], theirs: list[SideRun]) -> dict[str, Any]:
    """Output tokens/s of `ours` over `theirs`: the ratio of the medians, the paired per-repeat ratios."""
    a = [r.summary()["output_tok_per_s"] for r in ours]
    b = [r.summary()["output_tok_per_s"] for r in theirs]
    ratios = [x / y if y > 0 else float("inf") for x, y in zip(a, b)]
    median_b = statistics.median(b)
    return {"ratio_of_medians": statistics.median(a) / median_b if median_b > 0 else float("inf"),
            "per_repeat": ratios, "spread": [min(ratios), max(ratios)]}


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT raise KeyboardInterrupt where the main thread is, so `finally`
    blocks stop the server.

    NOTE: SIGINT too, not Python's default handler: inside `asyncio.run` the default lets
    asyncio *cancel* the main task instead of raising, and a cancellation the awaited code
    absorbs makes `asyncio.run` return normally. CI once saw a SIGINT'd `bench serve` exit 0;
    the cause was not reproduced (3 local runs of that test, 600 scratch SIGINTs into
    `asyncio.run` with httpx streams), so this is a hardening: with a handler installed,
    `asyncio.run` leaves SIGINT alone and Ctrl-C raises where the main thread is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def progress(disabled: bool):
    from rich import console as rich_console
    from rich import progress as rich_progress

    return rich_progress.Progress(
        rich_progress.TextColumn("{task.description}"), rich_progress.BarColumn(),
        rich_progress.MofNCompleteColumn(), rich_progress.TimeElapsedColumn(),
        console=rich_console.Console(stderr=True), disable=disabled,
    )


def run(args: argparse.Namespace) -> int:
    try:
        with signals_as_interrupt():
            return _run(args)
    except BenchError as exc:
        logger.error("%s", exc)
        return 1


def _run(args: argparse.Namespace) -> int:
    import httpx
    import torch
    import transformers

    from elasticmoe_worker.bench import engine_alone, hf_baseline  # import this module: not at its top

    # One INFO line per request from the client library would drown the progress bar.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    settings = resolve_settings(args)
    progress_off = args.no_progress or not sys.stderr.isatty()
    model_dir, family, preset = resolve_model(args, progress=not progress_off)
    dtype = resolve_dtype(args.dtype, model_dir)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "elasticmoe_worker.cli", "serve", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), *engine_flags(args, dtype)]
    if args.devices is not None:
        argv += ["--devices", str(args.devices)]
    n, warm_len = settings.num_requests, min(settings.output_len, _WARMUP_OUTPUT_LEN)
    runs: dict[str, list[SideRun]] = {side: [] for side in SIDES}
    server_cpu_during_baseline_s: list[float | None] = []
    client_cpu_during_ours_s: list[float] = []
    env = dict(os.environ)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    logger.info("starting the server: %s", " ".join(argv))
    server = ServerProcess(argv, args.out_json.with_suffix(".server.log"), env)
    try:
        with progress(progress_off) as bar:
            task = bar.add_task("loading the transformers model", total=settings.repeats * len(SIDES) * n)
            # Loading overlaps the server's start-up: neither is timed.
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
            prompts = build_prompts(tokenizer, n, settings.prompt_len)
            hf = hf_baseline.TransformersBaseline(model_dir, dtype)
            bar.update(task, description="loading our engine in-process")
            alone = engine_alone.EngineInProcess(model_dir, cliargs.engine_config_from_args(
                argparse.Namespace(**engine_options(args, dtype))))
            bar.update(task, description="waiting for the server")
            server.wait_healthy(f"{base_url}/health", args.server_start_timeout_s)
            model_name = httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"]

            bar.update(task, description="warm-up")
            run_ours(base_url, model_name, prompts, warm_len, settings.concurrency)
            alone.run(prompts, warm_len, settings.concurrency)
            hf.sequential(prompts[:1], warm_len)
            hf.static_batch(prompts, warm_len)
            for r in range(settings.repeats):
                label = f"repeat {r + 1}/{settings.repeats}"
                bar.update(task, description=f"{label}: ours")
                client_cpu_before_s = time.process_time()
                runs["ours"].append(run_ours(base_url, model_name, prompts, settings.output_len,
                                             settings.concurrency, lambda: bar.advance(task)))
                client_cpu_during_ours_s.append(time.process_time() - client_cpu_before_s)
                cpu_before_s = server.cpu_s()
                bar.update(task, description=f"{label}: our engine in-process")
                runs[ENGINE_ALONE].append(alone.run(prompts, settings.output_len, settings.concurrency,
                                                    lambda: bar.advance(task)))
                bar.update(task, description=f"{label}: transformers sequential")
                runs[SEQUENTIAL].append(hf.sequential(prompts, settings.output_len, lambda: bar.advance(task)))
                bar.update(task, description=f"{label}: transformers static batch")
                runs[STATIC].append(hf.static_batch(prompts, settings.output_len))
                bar.advance(task, n)
                cpu_after_s = server.cpu_s()
                server_cpu_during_baseline_s.append(
                    None if cpu_before_s is None or cpu_after_s is None else cpu_after_s - cpu_before_s)
            bar.update(task, description="done")
    finally:
        server.stop()

    result = aggregate(runs)
    speedup = result["speedup"][SEQUENTIAL]["ratio_of_medians"]
    result["target"] = {
        "measure": "serving output tokens/s, ours / transformers sequential generate (ratio of medians)",
        "min_ratio": TARGET_SPEEDUP, "ratio": speedup, "met": speedup >= TARGET_SPEEDUP,
    }
    result["engine_targets"] = [  # issue 13: the faster CPU engine
        {"measure": f"ours / {SIDE_LABELS[side]} (ratio of medians)", "min_ratio": least,
         "ratio": result["speedup"][side]["ratio_of_medians"],
         "met": result["speedup"][side]["ratio_of_medians"] >= least}
        for side, least in ((SEQUENTIAL, ENGINE_TARGET_SEQUENTIAL), (STATIC, ENGINE_TARGET_STATIC))]
    result["config"] = {
        "model_dir": str(model_dir), "family": family, "preset": preset, "dtype": dtype,
        **dataclasses.asdict(settings), "engine_options": engine_options(args, dtype),
        "server_argv": argv, "server_log": str(server.log_path), "devices": args.devices,
        "torch_num_threads": torch.get_num_threads(), "omp_num_threads_env": env.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "git_commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    # NOTE: should stay near 0: the server idles while the baseline runs, so they never compete.
    result["server_cpu_during_baseline_s"] = server_cpu_during_baseline_s
    # NOTE: the CPU seconds this process (the streaming HTTP client) spent during each of our runs,
    # on the cores our server computes on; the transformers sides have no client to pay for.
    result["client_cpu_during_ours_s"] = client_cpu_during_ours_s
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(result, indent=2) + "\n")
    _print_report(result, args.out_json)
    return 0


def _print_report(result: dict[str, Any], out_json: pathlib.Path) -> None:
    from rich import console as rich_console
    from rich import table as rich_table

    cfg = result["config"]
    table = rich_table.Table(
        title=f"elasticmoe bench serve: {cfg['family']}/{cfg['preset'] or pathlib.Path(cfg['model_dir']).name}, "
              f"{cfg['dtype']}, ours = serve" + (f" --devices {cfg['devices']}" if cfg.get("devices") else ""),
        caption=f"{cfg['num_requests']} requests x ({cfg['prompt_len']} tokens in, {cfg['output_len']} out), "
                f"concurrency {cfg['concurrency']}, median of {cfg['repeats']} repeat(s), "
                f"{cfg['torch_num_threads']} torch threads")
    table.add_column("side")
    for name in ("output tok/s", "TTFT p50 ms", "TTFT p90 ms", "TPOT p50 ms", "TPOT p90 ms",
                 "ours ÷ this (per-repeat spread)"):
        table.add_column(name, justify="right")
    for side in SIDES:
        m = result["sides"][side]["median"]
        sp = result["speedup"].get(side)
        ratio = "—" if sp is None else f"{sp['ratio_of_medians']:.2f}× ({sp['spread'][0]:.2f}–{sp['spread'][1]:.2f})"
        table.add_row(SIDE_LABELS[side], f"{m['output_tok_per_s']:.1f}", f"{m['ttft_p50_ms']:.1f}",
                      f"{m['ttft_p90_ms']:.1f}", f"{m['tpot_p50_ms']:.2f}", f"{m['tpot_p90_ms']:.2f}", ratio)
    console = rich_console.Console()
    if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
        console = rich_console.Console(width=120)
    console.print(table)
    target = result["target"]
    console.print(f"target ≥ {target['min_ratio']:g}× transformers (sequential generate): "
                  f"{'met' if target['met'] else 'not met'} ({target['ratio']:.2f}×)", highlight=False)
    for t in result["engine_targets"]:
        console.print(f"target {t['measure']} ≥ {t['min_ratio']:g}×: {'met' if t['met'] else 'not met'} "
                      f"({t['ratio']:.2f}×)", highlight=False)
    alone = result.get("engine_alone_vs_static")
    if alone is not None:
        console.print(f"our engine in-process ÷ transformers static batch, neither over HTTP (no target): "
                      f"{alone['ratio_of_medians']:.2f}× ({alone['spread'][0]:.2f}–{alone['spread'][1]:.2f})",
                      highlight=False)
    console.print(f"raw numbers: {out_json}", highlight=False)

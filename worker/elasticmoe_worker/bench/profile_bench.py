"""`elasticmoe bench profile`: measure the service profile `elasticmoe simulate` models an
instance with, on this machine's devices.

Why it exists: the simulator must run on measured numbers, and on the numbers clients see.
This starts `elasticmoe serve --devices 1` (optionally with `--cpu-per-device`) and, through its
HTTP API, for each device count from 1 to --max-devices (scaling up through the admin API)
measures with the load spread evenly over the devices:
- decode: per-device batches of 1, 4, 16, 32, 64 streaming requests decoding at once -> the
  device's tokens/s (batch / median time per output token);
- prefill: one prompt of 32, 128 and 512 tokens per device at once, one output token -> the
  device's prompt tokens/s (tokens / median time to first token);
- context: 16 requests per device decoding after 8-token prompts and after 480-token prompts,
  each step timed only while all of them decode (between the last first token and the first
  last token) -> the seconds a step gains per token of context (`contextStepS`);
then the time-to-ready of each elastic scale step on the way up (1 -> 2 -> ...) and back down
(the server's own scale records), and the cold start of the 1-device server (spawn to
healthy, for "add a replica"). Writes the profile JSON (`bench.profile`) and prints a table.

Not guaranteed: the server and this client are not under the quota; on a machine shared with
other work the rates are lower and noisier than on an idle one (the load average is recorded
with the profile).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import pathlib
import random
import statistics
import sys
import time

from elasticmoe_worker import cliargs
from elasticmoe_worker.bench import profile as profile_mod
from elasticmoe_worker.bench import serve_bench

logger = logging.getLogger(__name__)

DESCRIPTION = ("Measure a service profile for `elasticmoe simulate` on this machine: per device count (1 .. "
               "--max-devices, each device under --cpu-per-device cores) the decode tokens/s at each batch size, "
               "the prefill tokens/s at each prompt size and what a decode step gains per token of context (16 "
               "requests per device after 8- and 480-token prompts), the time-to-ready of each elastic scale step, "
               "and the cold start of an instance; writes the profile JSON and prints a table.")
DECODE_BATCHES = (1, 4, 16, 32, 64)
PREFILL_TOKENS = (32, 128, 512)
CONTEXT_BATCH = 16  # requests per device
CONTEXT_PROMPTS = (8, 480)  # prompt tokens: short (as the decode points) and long


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: generated from --family/--preset)")
    p.add_argument("--family", default="qwen3_moe", choices=["qwen3_moe", "deepseek_v2", "mixtral"])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "bench"], help="(default: %(default)s)")
    p.add_argument("--max-devices", type=cliargs.positive_int, default=3, help="(default: %(default)s)")
    p.add_argument("--cpu-per-device", type=float, default=None,
                   help="CPU quota of each device in cores, as `serve --cpu-per-device` (default: none)")
    p.add_argument("--decode-tokens", type=cliargs.positive_int, default=48,
                   help="tokens generated per decode request (default: %(default)s)")
    p.add_argument("--repeats", type=cliargs.positive_int, default=3, help="per point, median (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 devices, batches 1 and 4, prompts of 32 and "
                   "512, 16 decode tokens, 1 repeat")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results/profile.json"),
                   help="(default: %(default)s)")


def model_dir_of(args: argparse.Namespace) -> pathlib.Path:
    from elasticmoe_worker import modelgen

    if args.model:
        return pathlib.Path(args.model)
    path = cliargs.cache_dir() / "models" / f"{args.family}-{args.preset}-bench"
    if not (path / "config.json").is_file():
        modelgen.make_model(args.family, args.preset, path, progress=False)
    return path


async def _one(client, model: str, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """One streaming completion -> (TTFT s, TPOT s, output tokens)."""
    s = await serve_bench.stream_completion(client, "/v1/completions", serve_bench.completion_body(model, prompt,
                                                                                                   max_tokens))
    return s.ttft_s, s.tpot_s, s.num_output_tokens


def _batch(base_url: str, prompts: list[list[int]], max_tokens: int, one=_one) -> list:
    """All prompts at once, each through `one(client, model, prompt, max_tokens)`."""
    import httpx

    async def main():
        limits = httpx.Limits(max_connections=len(prompts) + 4)
        async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0), limits=limits) as client:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
            return await asyncio.gather(*(one(client, model, p, max_tokens) for p in prompts))
    return asyncio.run(main())


async def _token_times(client, model: str, prompt: list[int], max_tokens: int) -> list[float]:
    """One streaming completion -> the arrival time of each chunk that carries text."""
    times: list[float] = []
    await serve_bench.stream_completion(client, "/v1/completions",
                                        serve_bench.completion_body(model, prompt, max_tokens), text_times=times)
    return times


class _NoWindow(RuntimeError):
    """The requests of a context run never all decoded at once (as the client saw them)."""


def _steady_step(base_url: str, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """Decode the prompts together -> (seconds per step while all of them decode, the mean
    context a sequence held then). The window runs from the last first token to the first
    last token, so no prefill of the batch falls into it."""
    runs = _batch(base_url, prompts, max_tokens, one=_token_times)
    lo, hi = max(r[0] for r in runs), min(r[-1] for r in runs)
    if not hi > lo:
        t0 = min(r[0] for r in runs)
        raise _NoWindow(f"no window in which all {len(prompts)} requests of {len(prompts[0])} prompt tokens "
                           f"decoded: the last first token came {lo - t0:.3f} s after the first, the first last "
                           f"token {hi - t0:.3f} s after it (text chunks per request: "
                           f"{sorted(len(r) for r in runs)}); raise --decode-tokens")
    steps, context = [], []
    for prompt, r in zip(prompts, runs):
        inside = [i for i, t in enumerate(r) if lo < t <= hi]
        if inside:
            steps.append(len(inside))
            context.append(len(prompt) + (inside[0] + inside[-1]) / 2)
    return (hi - lo) / statistics.mean(steps), statistics.mean(context)


def measure_context(base_url: str, devices: int, vocab: int, decode_tokens: int, repeats: int,
                    rng: random.Random) -> float:
    """Seconds a device's decode step gains per token of context its sequences hold."""
    points = []
    for length in CONTEXT_PROMPTS:
        # long prompts are prefilled in chunks while the first of them already decode: give the
        # window as many steps again as the prefill takes
        tokens = decode_tokens + CONTEXT_BATCH * length // 256
        try:
            runs = [_steady_step(base_url, [[rng.randrange(3, vocab) for _ in range(length)]
                                            for _ in range(CONTEXT_BATCH * devices)], tokens)
                    for _ in range(repeats)]
        except _NoWindow as exc:
            # NOTE: steps of a few ms (the tiny preset without a quota) are shorter than the
            # delays with which this one client reads 16+ streams; such runs leave no window.
            logger.warning("%d device(s): the context cost is not measured (written as 0): %s", devices, exc)
            return 0.0
        points.append((statistics.median(s for s, _ in runs), statistics.median(c for _, c in runs)))
    (short_s, short_ctx), (long_s, long_ctx) = points
    per_token = (long_s - short_s) / (CONTEXT_BATCH * (long_ctx - short_ctx))
    logger.info("%d device(s): decode step %.1f ms at %.0f tokens of context per sequence, %.1f ms at %.0f -> "
                "%.3g s per context token", devices, short_s * 1e3, short_ctx, long_s * 1e3, long_ctx, per_token)
    return max(per_token, 0.0)


def measure_service(base_url: str, devices: int, vocab: int, batches, prefills, decode_tokens: int, repeats: int,
                    rng: random.Random, with_context: bool = True) -> profile_mod.Service:
    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    # untimed: the first steps of a new configuration allocate and warm caches
    _batch(base_url, [prompt(32) for _ in range(4 * devices)], 8)
    decode = []
    for b in batches:
        tpots = []
        for _ in range(repeats):
            res = _batch(base_url, [prompt(8) for _ in range(b * devices)], decode_tokens)
            tpots.append(statistics.median(t for _, t, _ in res))
        decode.append((float(b), round(b / statistics.median(tpots), 2)))
    prefill = []
    for tokens in prefills:
        ttfts = []
        for _ in range(repeats):
            res = _batch(base_url, [prompt(tokens) for _ in range(devices)], 1)
            ttfts.append(statistics.median(t for t, _, _ in res))
        prefill.append((float(tokens), round(tokens / statistics.median(ttfts), 2)))
    context = measure_context(base_url, devices, vocab, decode_tokens, repeats, rng) if with_context else 0.0
    return profile_mod.Service(devices, tuple(decode), tuple(prefill), float(f"{context:.4g}"))


def _scale(base_url: str, headers: dict, devices: int) -> float:
    """Scale through the admin API, wait for the outcome; -> its measured seconds."""
    import httpx

    from elasticmoe_worker.contract import admin

    scale_id = f"profile-{devices}-{int(time.time() * 1000)}"
    r = httpx.post(f"{base_url}/admin/scale", headers=headers, timeout=30,
                   json={"devices": devices, "reason": "bench profile", "scaleId": scale_id})
    if r.status_code != 202:
        raise RuntimeError(f"scale to {devices} refused: {r.status_code} {r.text[:200]}")
    while True:
        record = admin.decode_status(httpx.get(f"{base_url}/admin/status", headers=headers, timeout=30).content
                                     ).find_scale(scale_id)
        if record is not None and record.outcome in admin.TERMINAL_OUTCOMES:
            break
        time.sleep(0.2)
    if record.outcome != admin.Outcome.SUCCEEDED:
        raise RuntimeError(f"scale {record.from_devices} -> {devices} {record.outcome.value}: {record.message}")
    return round(record.duration_ms / 1000, 3)


def run(args: argparse.Namespace) -> int:
    import secrets

    from rich.console import Console
    from rich.table import Table

    from elasticmoe_worker.bench import serve_bench
    from elasticmoe_worker.engine import engine as engine_mod

    if args.quick:
        args.max_devices, args.decode_tokens, args.repeats = min(args.max_devices, 2), 16, 1
    batches = (1, 4) if args.quick else DECODE_BATCHES
    prefills = (32, 512) if args.quick else PREFILL_TOKENS
    console = Console()
    model_dir = model_dir_of(args)
    cfg = cliargs.engine_config_from_args(args)
    dtype = serve_bench.resolve_dtype(args.dtype, model_dir)
    vocab = len(engine_mod.load_tokenizer(model_dir))
    rng = random.Random(0)
    quota = f"{args.cpu_per_device:g} cores" if args.cpu_per_device else "no quota"
    console.print(f"profiling {model_dir.name} on 1..{args.max_devices} devices, {quota} per device, through "
                  f"`elasticmoe serve` and its HTTP API")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    token_file = args.out.with_suffix(".admin-token")
    token = secrets.token_urlsafe(24)
    token_file.write_text(token)
    headers = {"Authorization": f"Bearer {token}"}
    port = serve_bench.free_port()
    base_url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "elasticmoe_worker.cli", "serve", "--model", str(model_dir), "--port", str(port),
            "--devices", "1", "--admin-token-file", str(token_file), *serve_bench.engine_flags(args, dtype)]
    if args.cpu_per_device:
        argv += ["--cpu-per-device", f"{args.cpu_per_device:g}"]
    started = time.perf_counter()
    server = serve_bench.ServerProcess(argv, args.out.with_suffix(".server.log"))
    services, steps = [], []
    try:
        server.wait_healthy(f"{base_url}/health", 600)
        start_s = time.perf_counter() - started
        for n in range(1, args.max_devices + 1):
            if n > 1:
                steps.append(profile_mod.Step(n - 1, n, _scale(base_url, headers, n)))
                time.sleep(2)  # let the warm spare come up again, as between scales in service
            with console.status(f"{n} device(s): decode and prefill rates"):
                services.append(measure_service(base_url, n, vocab, batches, prefills, args.decode_tokens,
                                                args.repeats, rng, with_context=not args.quick))
            console.print(f"{n} device(s): decode {services[-1].decode}, prefill {services[-1].prefill}, "
                          f"{services[-1].context_step_s:.3g} s per step per context token")
        for n in range(args.max_devices, 1, -1):
            steps.append(profile_mod.Step(n, n - 1, _scale(base_url, headers, n - 1)))
    finally:
        server.stop()
    prof = profile_mod.Profile(
        service=tuple(services), scale=tuple(steps), start=((1, round(start_s, 3)),),
        max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens, max_waiting=cfg.max_waiting,
        measured={"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "model": str(model_dir),
                  "backend": "cpu", "cpuPerDevice": args.cpu_per_device, "cpuCount": os.cpu_count(),
                  "loadAverage": [round(x, 2) for x in os.getloadavg()], "decodeTokens": args.decode_tokens,
                  "repeats": args.repeats})
    profile_mod.save(prof, args.out)
    table = Table(title=f"service profile of {model_dir.name}, {quota} per device")
    table.add_column("devices", justify="right")
    for b in batches:
        table.add_column(f"decode tok/s @{b}", justify="right")
    for t in prefills:
        table.add_column(f"prefill tok/s @{t}", justify="right")
    table.add_column("µs per step per 1k context tokens", justify="right")
    for s in services:
        table.add_row(str(s.devices), *[f"{r:.0f}" for _, r in s.decode], *[f"{r:.0f}" for _, r in s.prefill],
                      f"{s.context_step_s * 1e9:.0f}")
    console.print(table)
    console.print("scale steps: " + ", ".join(f"{s.from_devices}->{s.to_devices} {s.seconds:.1f} s" for s in steps)
                  + f"; cold start of 1 device {start_s:.1f} s", highlight=False)
    console.print(f"wrote {args.out}", highlight=False)
    return 0

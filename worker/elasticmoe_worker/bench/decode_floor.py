"""`elasticmoe bench decode`: decode time per token at batch 1 against its physical floor.

Why this exists: one sequence decoding alone reads every active weight once per token (the
attention and dense weights of every layer, the router, its top-k experts per MoE layer, the
output head); on a CPU that is bound by memory bandwidth. The floor is therefore

    active weight bytes per token / memory read bandwidth

with the bytes counted from the checkpoint's safetensors headers (routed experts scaled by
top-k / experts, the input embedding as one row unless tied to the head) and the bandwidth
measured in the same run on the same machine. KV-cache reads are left out of the floor (at
the contexts used here they are under 1 % of the weights; the JSON gives their size).

What is measured: the real `elasticmoe serve` in a subprocess, one streaming request at a
time (batch 1), `--output-len` tokens each; decode time per token is a request's TPOT (first
token to last, over the tokens between), and a repeat's figure is the median over its
requests. It therefore includes everything a user pays per token (scheduler, executor IPC,
sampling, streaming), not only the forward pass. Several builds can be measured side by side
(`--build NAME=WORKER_DIR`, e.g. a clone at an older commit), interleaved per repeat; the
bandwidth is measured between repeats while every server idles.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import platform
import re
import statistics
import struct
import sys
import time
from typing import Any

from elasticmoe_worker import cliargs
from elasticmoe_worker.bench import serve_bench

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Decode time per token at batch 1 of `elasticmoe serve` (one streaming request at a time) against the "
    "physical floor: active weight bytes per token (from the checkpoint's headers) / memory read bandwidth "
    "measured in the same run. Builds given with --build are measured side by side, interleaved; prints medians "
    "over --repeats and each build's ratio to the floor, writes --out-json and a PNG beside it."
)

TARGET_RATIO = 5.0  # issue: decode time per token <= 5x the floor
_EXPERT = re.compile(r"\.experts\.\d+\.")  # routed experts; shared experts ("shared_experts") are always active
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("benchmark")
    g.add_argument("--model", default=None, help="checkpoint directory (default: generate --family/--preset)")
    g.add_argument("--family", default=None, choices=["qwen3_moe", "deepseek_v2", "mixtral"],
                   help="family to generate when no --model is given (default: qwen3_moe)")
    g.add_argument("--preset", default="bench", choices=["tiny", "small", "bench"],
                   help="size to generate when no --model is given (default: %(default)s)")
    g.add_argument("--num-requests", type=cliargs.positive_int, default=6,
                   help="requests per build and repeat, sent one at a time (default: %(default)s)")
    g.add_argument("--prompt-len", type=cliargs.positive_int, default=32, help="prompt tokens (default: %(default)s)")
    g.add_argument("--output-len", type=cliargs.positive_int, default=64,
                   help="tokens generated per request, exactly (default: %(default)s)")
    g.add_argument("--repeats", type=cliargs.positive_int, default=3,
                   help="timed repeats, builds interleaved; medians are reported (default: %(default)s)")
    g.add_argument("--build", action="append", default=[], metavar="NAME=WORKER_DIR",
                   help="also measure the server from another source tree: WORKER_DIR is the directory that holds "
                        "its `elasticmoe_worker` package (e.g. a clone's worker/), put first on the server's "
                        "PYTHONPATH; repeatable. The running build is always measured, as 'this'")
    g.add_argument("--bandwidth-mib", type=cliargs.positive_int, default=1024,
                   help="size of the buffer the memory bandwidth is measured on; keep it far above the "
                        "last-level cache (default: %(default)s)")
    g.add_argument("--out-json", type=pathlib.Path, default=pathlib.Path("bench-results/decode.json"),
                   help="raw numbers, medians and configuration (default: %(default)s); the PNG and the servers' "
                        "logs go beside it")
    g.add_argument("--server-start-timeout-s", type=float, default=300.0,
                   help="how long to wait for each server's /health (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------- the floor


@dataclasses.dataclass(frozen=True)
class ActiveBytes:
    total: int  # every weight in the checkpoint
    per_token: int  # what one token at batch 1 reads
    experts_total: int
    experts_per_token: int
    embedding_row: int  # the input embedding's share (one row, or the whole table when tied to the head)


def _safetensors_headers(model_dir: pathlib.Path) -> dict[str, dict[str, Any]]:
    """name -> header entry of every tensor in the checkpoint; no tensor data is read."""
    tensors: dict[str, dict[str, Any]] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise serve_bench.BenchError(f"{model_dir}: no *.safetensors files to count the weights from")
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        tensors.update(header)
    return tensors


def active_bytes(model_dir: pathlib.Path) -> ActiveBytes:
    """Weight bytes one token at batch 1 reads: all but the routed experts, `top_k / experts` of
    those, and one row of the input embedding unless the head shares its table."""
    from elasticmoe_worker.models import config

    spec = config.load_spec(model_dir)
    total = experts = embed = 0
    for name, entry in _safetensors_headers(model_dir).items():
        start, end = entry["data_offsets"]
        size = end - start
        total += size
        if _EXPERT.search(name):
            experts += size
        elif name.endswith("embed_tokens.weight"):
            embed += size
    experts_per_token = experts * spec.num_experts_per_tok // max(spec.num_experts, 1)
    embedding_row = embed if spec.tie_word_embeddings else embed // spec.vocab_size
    per_token = total - experts - embed + experts_per_token + embedding_row
    return ActiveBytes(total, per_token, experts, experts_per_token, embedding_row)


def kv_bytes_per_token(model_dir: pathlib.Path, context: int) -> int:
    """KV-cache bytes one decode step reads at `context` tokens (keys and values, every layer)."""
    from elasticmoe_worker.models import config

    spec = config.load_spec(model_dir)
    itemsize = 4 if spec.torch_dtype.removeprefix("torch.") == "float32" else 2
    return spec.num_layers * context * spec.num_kv_heads * (spec.qk_head_dim + spec.v_head_dim) * itemsize


def memory_bandwidth(num_bytes: int, tries: int = 5) -> dict[str, float]:
    """Read bandwidth (a sum over a float32 buffer) and copy bandwidth (read + write counted),
    bytes/s, best of `tries`, with this process's torch threads."""
    import torch

    n = num_bytes // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    read_s = copy_s = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        src.sum()
        t1 = time.perf_counter()
        dst.copy_(src)
        t2 = time.perf_counter()
        read_s, copy_s = min(read_s, t1 - t0), min(copy_s, t2 - t1)
    return {"read_bytes_per_s": n * 4 / read_s, "copy_bytes_per_s": 2 * n * 4 / copy_s}


# ---------------------------------------------------------------- the run


def parse_builds(values: list[str]) -> dict[str, pathlib.Path | None]:
    builds: dict[str, pathlib.Path | None] = {"this": None}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise serve_bench.BenchError(f"--build {value!r}: expected NAME=WORKER_DIR")
        if name in builds:
            raise serve_bench.BenchError(f"--build {value!r}: the name {name!r} is already used")
        directory = pathlib.Path(path).absolute()
        if not (directory / "elasticmoe_worker" / "cli.py").is_file():
            raise serve_bench.BenchError(f"--build {value!r}: {directory} holds no elasticmoe_worker/cli.py; "
                                         "expected the directory that holds the package (a clone's worker/)")
        builds[name] = directory
    return builds


def _decode_ms(samples: list[serve_bench.RequestSample]) -> float:
    return statistics.median(s.tpot_s for s in samples) * 1e3


def run(args: argparse.Namespace) -> int:
    try:
        with serve_bench.signals_as_interrupt():
            return _run(args)
    except serve_bench.BenchError as exc:
        logger.error("%s", exc)
        return 1


def _run(args: argparse.Namespace) -> int:
    import httpx
    import torch
    import transformers

    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    builds = parse_builds(args.build)
    progress_off = args.no_progress or not sys.stderr.isatty()
    args.quick = False
    model_dir, family, preset = serve_bench.resolve_model(args, progress=not progress_off)
    dtype = serve_bench.resolve_dtype("auto", model_dir)
    weights = active_bytes(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    prompts = serve_bench.build_prompts(tokenizer, args.num_requests, args.prompt_len)
    servers: dict[str, tuple[serve_bench.ServerProcess, str]] = {}
    decode_ms: dict[str, list[float]] = {name: [] for name in builds}
    raw: dict[str, list[list[dict[str, float]]]] = {name: [] for name in builds}
    bandwidth: list[dict[str, float]] = []
    try:
        with serve_bench.progress(progress_off) as bar:
            task = bar.add_task("starting the servers", total=args.repeats * len(builds) * args.num_requests)
            for name, directory in builds.items():
                port = serve_bench.free_port()
                env = dict(os.environ)
                if directory is not None:
                    env["PYTHONPATH"] = os.pathsep.join([str(directory), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
                argv = [sys.executable, "-m", "elasticmoe_worker.cli", "serve", "--model", str(model_dir),
                        "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype]
                log = args.out_json.with_name(f"{args.out_json.stem}.{name}.server.log")
                servers[name] = (serve_bench.ServerProcess(argv, log, env), f"http://127.0.0.1:{port}")
            for name, (server, url) in servers.items():
                bar.update(task, description=f"waiting for the server ({name})")
                server.wait_healthy(f"{url}/health", args.server_start_timeout_s)
            model_name = httpx.get(f"{next(iter(servers.values()))[1]}/v1/models", timeout=10).json()["data"][0]["id"]
            for name, (server, url) in servers.items():
                bar.update(task, description=f"warm-up ({name})")
                serve_bench.run_ours(url, model_name, prompts[:1], min(args.output_len, 16), 1)
            for r in range(args.repeats):
                bar.update(task, description=f"repeat {r + 1}/{args.repeats}: memory bandwidth")
                bandwidth.append(memory_bandwidth(args.bandwidth_mib << 20))
                for name, (server, url) in servers.items():
                    bar.update(task, description=f"repeat {r + 1}/{args.repeats}: {name}")
                    side = serve_bench.run_ours(url, model_name, prompts, args.output_len, 1,
                                                lambda: bar.advance(task))
                    decode_ms[name].append(_decode_ms(side.samples))
                    raw[name].append([dataclasses.asdict(s) for s in side.samples])
    finally:
        for server, _ in servers.values():
            server.stop()

    read_bw = statistics.median(b["read_bytes_per_s"] for b in bandwidth)
    floor_ms = weights.per_token / read_bw * 1e3
    result: dict[str, Any] = {
        "weights": dataclasses.asdict(weights),
        "kv_bytes_per_token_at_end": kv_bytes_per_token(model_dir, args.prompt_len + args.output_len),
        "bandwidth": {"per_repeat": bandwidth, "median_read_bytes_per_s": read_bw},
        "floor_ms_per_token": floor_ms,
        "builds": {},
    }
    for name in builds:
        med = statistics.median(decode_ms[name])
        result["builds"][name] = {
            "worker_dir": None if builds[name] is None else str(builds[name]),
            "decode_ms_per_token": {"median": med, "min": min(decode_ms[name]), "max": max(decode_ms[name]),
                                    "per_repeat": decode_ms[name]},
            "ratio_to_floor": med / floor_ms,
            "requests": raw[name],
        }
    result["target"] = {"measure": "decode ms/token at batch 1 / floor (this build)", "max_ratio": TARGET_RATIO,
                        "ratio": result["builds"]["this"]["ratio_to_floor"],
                        "met": result["builds"]["this"]["ratio_to_floor"] <= TARGET_RATIO}
    result["config"] = {
        "model_dir": str(model_dir), "family": family, "preset": preset, "dtype": dtype,
        "num_requests": args.num_requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
        "repeats": args.repeats, "bandwidth_mib": args.bandwidth_mib, "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch_version": torch.__version__,
        "git_commit": serve_bench.git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, args.out_json.with_suffix(".png"))
    _print_report(result, args.out_json)
    return 0


def _print_report(result: dict[str, Any], out_json: pathlib.Path) -> None:
    from rich import console as rich_console
    from rich import table as rich_table

    cfg, w = result["config"], result["weights"]
    table = rich_table.Table(
        title=f"elasticmoe bench decode: {cfg['family']}/{cfg['preset'] or pathlib.Path(cfg['model_dir']).name}, "
              f"{cfg['dtype']}",
        caption=f"floor = {w['per_token'] / 1e6:.1f} MB active weights/token ÷ "
                f"{result['bandwidth']['median_read_bytes_per_s'] / 1e9:.2f} GB/s read bandwidth (same run); "
                f"median of {cfg['repeats']} repeats × {cfg['num_requests']} requests × {cfg['output_len']} tokens; "
                f"target ≤ {TARGET_RATIO:g}× floor: {'met' if result['target']['met'] else 'not met'}; "
                f"JSON: {out_json}")
    for name in ("build", "decode ms/token, batch 1", "spread (min–max)", "÷ floor"):
        table.add_column(name, justify="left" if name == "build" else "right")
    table.add_row("floor", f"{result['floor_ms_per_token']:.3g}", "", "1.0")
    for name, b in result["builds"].items():
        d = b["decode_ms_per_token"]
        table.add_row(name, f"{d['median']:.3g}", f"{d['min']:.3g}–{d['max']:.3g}", f"{b['ratio_to_floor']:.1f}")
    console = rich_console.Console()
    if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
        console = rich_console.Console(width=140)
    console.print(table)


def _plot(result: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["builds"])
    medians = [result["builds"][n]["decode_ms_per_token"]["median"] for n in names]
    lows = [m - result["builds"][n]["decode_ms_per_token"]["min"] for m, n in zip(medians, names)]
    highs = [result["builds"][n]["decode_ms_per_token"]["max"] - m for m, n in zip(medians, names)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(names, medians, yerr=[lows, highs], capsize=4, color="tab:blue")
    floor = result["floor_ms_per_token"]
    ax.axhline(floor, color="black", lw=1, label=f"floor {floor:.1f} ms")
    ax.axhline(floor * TARGET_RATIO, color="red", ls="--", lw=1, label=f"target {TARGET_RATIO:g}× floor")
    ax.set_ylabel("decode ms/token, batch 1")
    ax.legend()
    cfg = result["config"]
    ax.set_title(f"{cfg['family']}/{cfg['preset']}: decode at batch 1 vs its floor")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)

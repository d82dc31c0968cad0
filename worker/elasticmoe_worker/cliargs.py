"""Command-line pieces shared by `elasticmoe` (cli.py), the benchmarks and the worker.

Why it exists: the CLI builds the benchmarks' parsers and the benchmarks need the CLI's
engine options and cache directory; with those here, neither imports the other. Imports no
torch: `elasticmoe --help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from typing import Callable

DEFAULT_FAMILY = "qwen3_moe"
DEFAULT_PRESET = "tiny"
# Bump when the default model's generator changes, so stale caches are not served.
DEFAULT_MODEL_VERSION = "v1"


def cache_dir() -> pathlib.Path:
    base = os.environ.get("ELASTICMOE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "elasticmoe"
    )
    return pathlib.Path(base)


def default_model_dir() -> pathlib.Path:
    """The embedded default model: generated on first use, then reused from the cache."""
    from elasticmoe_worker import modelgen

    path = cache_dir() / "models" / f"{DEFAULT_FAMILY}-{DEFAULT_PRESET}-{DEFAULT_MODEL_VERSION}"
    if (path / "config.json").is_file():
        return path
    logging.getLogger("elasticmoe").info(
        "no model given: generating the embedded default (%s, preset %s) into %s", DEFAULT_FAMILY, DEFAULT_PRESET, path
    )
    return modelgen.make_model(DEFAULT_FAMILY, DEFAULT_PRESET, path, progress=sys.stderr.isatty())


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected an integer >= {least}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"got {value}, expected an integer >= {least}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def positive_float(expected: str) -> Callable[[str], float]:
    """An argparse type for a finite number > 0; `expected` completes "expected ..." in its error."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}, expected {expected}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"got {text}, expected {expected}")
        return value

    return parse


def mebibytes(text: str) -> int:
    """An argparse type: a number of MiB >= 0, fractions allowed (small test models) -> bytes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a number of MiB >= 0, e.g. 512 or 0.1") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"got {text}, expected a number of MiB >= 0, e.g. 512 or 0.1")
    return round(value * (1 << 20))


positive_seconds = positive_float("a number of seconds > 0")
cores = positive_float("a number of cores > 0, e.g. 0.45")


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a port number 0-65535") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"got {value}, expected a port number 0-65535")
    return value


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="serving dtype; auto = the checkpoint's (default: %(default)s)")
    g.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV-cache block (default: %(default)s)")
    g.add_argument("--kv-cache-mb", type=positive_int, default=256,
                   help="KV-cache pool size in MiB, preallocated (default: %(default)s)")
    g.add_argument("--num-kv-blocks", type=positive_int, default=None,
                   help="KV-cache pool size in blocks; overrides --kv-cache-mb")
    g.add_argument("--max-num-seqs", type=positive_int, default=64,
                   help="requests running at once (default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=positive_int, default=512,
                   help="tokens computed per step, prefill chunks plus decodes (default: %(default)s)")
    g.add_argument("--max-model-len", type=positive_int, default=None,
                   help="context length in tokens (default: the model's, at most 4096)")
    g.add_argument("--max-waiting", type=int, default=256,
                   help="requests queued beyond the running ones; more are refused with 429 (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed for unseeded sampling (default: %(default)s)")


def engine_config_from_args(args: argparse.Namespace):
    from elasticmoe_worker.engine import engine as engine_mod

    return engine_mod.EngineConfig(
        dtype=args.dtype, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        kv_cache_bytes=args.kv_cache_mb * 2**20, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        max_waiting=args.max_waiting, seed=args.seed,
    )


def add_worker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device-index", type=int, required=True,
                   help="this worker's device index (0-based; in a pod, from the pod's name)")
    p.add_argument("--coordinator", required=True,
                   help="the coordinator's ZeroMQ control address, e.g. tcp://demo-coordinator.default.svc:5555")
    p.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "ascend"],
                   help="device backend (default: %(default)s)")
    p.add_argument("--host", default="",
                   help="the address this worker's collectives (weight transfers, expert-parallel steps) listen "
                        "on, which its peers dial: an address of this machine that the other workers reach "
                        "(default: chosen by gloo: the interface $GLOO_SOCKET_IFNAME names, else the address "
                        "this machine's hostname resolves to, as in a pod)")
    p.add_argument("--orphan-timeout-s", type=positive_seconds, default=None, metavar="S",
                   help="when the coordinator goes away, keep this device's memory (its executors stop) for a "
                        "coordinator that connects again with the same secret, at most this long, then exit and "
                        "free it (default: wait as long as it takes)")



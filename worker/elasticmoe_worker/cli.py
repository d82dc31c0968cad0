"""The `elasticmoe` command line: serve, make-model, bench.

Heavy imports (torch, transformers, fastapi) happen inside the subcommand that needs them,
so `elasticmoe --help` is instant and the operator subcommand never loads torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import socket
import sys

# NOTE: before torch is imported anywhere. OpenMP threads that spin while waiting turn every
# small op into milliseconds when the cores are shared (server, load generator and workers
# on one small machine): measured 6x fewer tokens/s on 2 cores. Passive waiting costs little
# when the machine is idle. An explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {value}, expected an integer >= 1")
    return value


def _port(text: str) -> int:
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
    g.add_argument("--block-size", type=_positive_int, default=16, help="tokens per KV-cache block (default: %(default)s)")
    g.add_argument("--kv-cache-mb", type=_positive_int, default=256,
                   help="KV-cache pool size in MiB, preallocated (default: %(default)s)")
    g.add_argument("--num-kv-blocks", type=_positive_int, default=None,
                   help="KV-cache pool size in blocks; overrides --kv-cache-mb")
    g.add_argument("--max-num-seqs", type=_positive_int, default=64,
                   help="requests running at once (default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=_positive_int, default=512,
                   help="tokens computed per step, prefill chunks plus decodes (default: %(default)s)")
    g.add_argument("--max-model-len", type=_positive_int, default=None,
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


def cmd_serve(args: argparse.Namespace) -> int:
    from elasticmoe_worker.engine import async_engine
    from elasticmoe_worker.server import api

    log = logging.getLogger("elasticmoe")
    model_dir = pathlib.Path(args.model) if args.model else default_model_dir()
    if not model_dir.is_dir():
        log.error("--model %s: not a directory (expected a Hugging Face checkpoint directory)", model_dir)
        return 2
    name = args.served_model_name or model_dir.name
    from elasticmoe_worker.server import admin

    token = admin.resolve_token(args.admin_token_file, cache_dir())
    if args.devices is None:
        engine = async_engine.AsyncEngine.from_model_dir(model_dir, engine_config_from_args(args), model_name=name)
    elif args.fleet == "local":
        from elasticmoe_worker.instance import coordinator

        log.info("starting a local instance of %d %s device(s)", args.devices, args.backend)
        engine = coordinator.Instance(model_dir, args.devices, engine_config_from_args(args), model_name=name,
                                      backend=args.backend, collective_timeout_s=args.collective_timeout_s)
    else:
        from elasticmoe_worker.instance import coordinator

        advertise = args.advertise_host or socket.getfqdn()
        log.info("coordinator: waiting for %d %s worker(s) to register on tcp://%s:%d (rendezvous store on "
                 "port %d)", args.devices, args.backend, advertise, args.control_port, args.store_port)
        engine = coordinator.Instance(
            model_dir, args.devices, engine_config_from_args(args), model_name=name, backend=args.backend,
            collective_timeout_s=args.collective_timeout_s, startup_timeout_s=args.startup_timeout_s,
            warm_workers=0, fleet="external", bind_host=args.host, advertise_host=advertise,
            control_port=args.control_port, store_port=args.store_port, worker_token=token,
            heartbeat_timeout_s=args.heartbeat_timeout_s)
    try:
        app = api.build_app(engine, served_model_name=args.served_model_name)
        admin.add_routes(app, engine, token)
        log.info("serving %s as %r", model_dir, engine.model_name)
        api.run_server(app, args.host, args.port, log_level=args.log_level)
    except KeyboardInterrupt:
        pass  # uvicorn re-raises Ctrl-C after its graceful shutdown: that is a clean stop
    finally:
        engine.shutdown()
    log.info("stopped")
    return 0


def cmd_make_model(args: argparse.Namespace) -> int:
    from elasticmoe_worker import modelgen

    path = modelgen.make_model(args.family, args.preset, args.out, seed=args.seed, dtype=args.dtype,
                               progress=not args.no_progress)
    print(path)
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    import time

    import httpx
    from rich.console import Console
    from rich.table import Table

    token = args.token or os.environ.get("ELASTICMOE_ADMIN_TOKEN")
    if not token:
        path = cache_dir() / "admin-token"
        if not path.is_file():
            logging.getLogger("elasticmoe").error("no admin token: pass --token, set ELASTICMOE_ADMIN_TOKEN, "
                                                  "or run on the server's machine (%s)", path)
            return 2
        token = path.read_text().strip()
    headers = {"Authorization": f"Bearer {token}"}
    console = Console()
    with httpx.Client(base_url=args.url, headers=headers, timeout=30) as client:
        r = client.post("/admin/scale", json={"devices": args.devices, "reason": args.reason})
        if r.status_code != 202:
            message = r.json().get("error", {}).get("message", r.text) if r.headers.get("content-type", "").startswith(
                "application/json") else r.text
            console.print(f"[red]scale refused ({r.status_code}):[/red] {message}")
            return 1
        if args.no_wait:
            console.print(f"scaling to {args.devices} devices started")
            return 0
        with console.status(f"scaling to {args.devices} devices"):
            while True:
                status = client.get("/admin/status").json()
                if status["phase"] != "Scaling":
                    break
                time.sleep(0.2)
    last = status.get("lastScale") or {}
    table = Table(title=f"scale {last.get('from_devices')} -> {last.get('to_devices')}: {last.get('outcome')}")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    for name, seconds in (last.get("phases") or {}).items():
        table.add_row(name, f"{seconds:.3f}")
    table.add_row("total", f"{last.get('seconds', 0):.3f}")
    console.print(table)
    if last.get("error"):
        console.print(f"[red]{last['error']}[/red]")
    return 0 if last.get("outcome") == "succeeded" else 1


def _add_serving_arguments(p: argparse.ArgumentParser, host_default: str, devices_required: bool) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--served-model-name", default=None, help="model name in the API (default: the directory name)")
    p.add_argument("--host", default=host_default, help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on, 0 = any free (default: %(default)s)")
    if devices_required:
        p.add_argument("--devices", type=_positive_int, required=True,
                       help="devices (workers) the instance starts with")
    else:
        p.add_argument("--devices", type=_positive_int, default=None,
                       help="run a multi-device instance: one HMM + executor process pair per device, attention "
                            "data-parallel, experts spread over all devices (default: one in-process engine)")
    p.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "ascend"],
                   help="device backend of the instance's workers (default: %(default)s)")
    p.add_argument("--collective-timeout-s", type=float, default=60.0,
                   help="a collective that stalls longer fails with an error instead of hanging (default: %(default)s)")
    p.add_argument("--admin-token-file", default=None,
                   help=f"file holding the admin API bearer token (default: ${'{'}ELASTICMOE_ADMIN_TOKEN{'}'}, else one "
                        "is generated and saved to <cache dir>/admin-token)")
    add_engine_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    from elasticmoe_worker.bench import scaling_bench, serve_bench

    parser = argparse.ArgumentParser(
        prog="elasticmoe",
        description="Elastic, zero-downtime serving of Mixture-of-Experts LLMs.",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="logging verbosity (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="serve a model through an OpenAI-compatible API",
                       description="Serve a MoE checkpoint through an OpenAI-compatible HTTP API with "
                                   "Prometheus metrics. With no --model, the embedded tiny default model is "
                                   "generated into the cache directory ($ELASTICMOE_CACHE_DIR, default "
                                   "~/.cache/elasticmoe) on first use.")
    _add_serving_arguments(p, host_default="127.0.0.1", devices_required=False)
    p.set_defaults(func=cmd_serve, fleet="local")

    p = sub.add_parser("coordinator", help="run an instance's coordinator; its workers run elsewhere (pods)",
                       description="The coordinator of an instance whose workers are started by others, one "
                                   "`elasticmoe worker` per device (in Kubernetes: the operator's worker pods). "
                                   "Serves the OpenAI API, /metrics and the admin API like `serve --devices N`, "
                                   "waits for N workers to register on the control port, hosts the rendezvous "
                                   "store, and presents the admin token to workers (they must send the same "
                                   "one). A worker silent for --heartbeat-timeout-s is declared dead.")
    _add_serving_arguments(p, host_default="0.0.0.0", devices_required=True)
    p.add_argument("--control-port", type=_port, default=5555,
                   help="ZeroMQ port workers and executors register on (default: %(default)s)")
    p.add_argument("--store-port", type=_port, default=5556,
                   help="torch.distributed TCPStore rendezvous port (default: %(default)s)")
    p.add_argument("--advertise-host", default=None,
                   help="the name workers dial to reach this coordinator, e.g. the Service's DNS name "
                        "(default: this host's FQDN)")
    p.add_argument("--heartbeat-timeout-s", type=float, default=15.0,
                   help="declare a worker dead after this long without a message (default: %(default)s)")
    p.add_argument("--startup-timeout-s", type=float, default=600.0,
                   help="give up if the first N workers have not registered and loaded by then (default: "
                        "%(default)s)")
    p.set_defaults(func=cmd_serve, fleet="external")

    from elasticmoe_worker.instance import hmm

    p = sub.add_parser("worker", help="run the worker (HMM) of one device; it registers with a coordinator",
                       description="The long-lived process of one device: registers with the coordinator, "
                                   "loads the weights and KV cache it is told to, starts the executors as child "
                                   "processes, and moves weights peer-to-peer when the instance scales. Presents "
                                   "$ELASTICMOE_ADMIN_TOKEN when it registers.")
    hmm.add_arguments(p)
    p.set_defaults(func=lambda args: hmm.run_worker(args))

    sub.add_parser("operator", help="run the Kubernetes operator (see `elasticmoe operator --help`)",
                   add_help=False)

    p = sub.add_parser("scale", help="change the number of devices of a running instance",
                       description="Ask a running `elasticmoe serve --devices N` to scale to M devices with zero "
                                   "downtime, then follow it until done and print its phases.")
    p.add_argument("--devices", type=_positive_int, required=True, help="target number of devices")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    p.add_argument("--token", default=None,
                   help="admin bearer token (default: $ELASTICMOE_ADMIN_TOKEN, else <cache dir>/admin-token)")
    p.add_argument("--reason", default="elasticmoe scale", help="recorded with the scale (default: %(default)s)")
    p.add_argument("--no-wait", action="store_true", help="return once the scale has started")
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("make-model", help="write a random-initialised checkpoint of a supported family",
                       description="Write a random-initialised MoE checkpoint in Hugging Face layout "
                                   "(config.json, safetensors, a tokenizer trained locally). No network needed.")
    p.add_argument("--family", required=True, choices=["qwen3_moe", "deepseek_v2", "mixtral"], help="model family")
    p.add_argument("--preset", required=True, choices=["tiny", "small", "bench"],
                   help="size: tiny (tests, < 5 MB), small (~70 MB), bench (1-2 GB, bfloat16)")
    p.add_argument("--out", required=True, type=pathlib.Path, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: the preset's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("bench", help="benchmarks", description="Benchmarks that print tables and write JSON.")
    bench_sub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = bench_sub.add_parser("serve", help="serving throughput vs transformers generate",
                             description=serve_bench.DESCRIPTION)
    serve_bench.add_arguments(b)
    add_engine_arguments(b)
    b.set_defaults(func=serve_bench.run)
    b = bench_sub.add_parser("scaling", help="elastic scaling vs cold restart, extravagant and horizontal",
                             description=scaling_bench.DESCRIPTION)
    scaling_bench.add_arguments(b)
    add_engine_arguments(b)
    b.set_defaults(func=scaling_bench.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["operator"]:
        # NOTE: before build_parser: the operator never imports torch.
        from elasticmoe_operator import cli as operator_cli

        return operator_cli.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        logging.getLogger("elasticmoe").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())

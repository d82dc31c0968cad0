"""The `elasticmoe` command line: serve, make-model, bench.

Heavy imports (torch, transformers, fastapi) happen inside the subcommand that needs them,
so `elasticmoe --help` is instant and the operator subcommand never loads torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import socket
import sys
import threading

from elasticmoe_worker import cliargs
from elasticmoe_worker.server import autoscale


def _openmp_wait_policy(args: argparse.Namespace) -> None:
    """OMP_WAIT_POLICY for this process and the ones it starts, before torch is imported
    anywhere; an explicit setting by the user wins.

    NOTE: PASSIVE where several processes compute on shared cores with more threads in all than
    cores (workers, `bench scaling`, `bench autoscale`): threads that spin while waiting turn
    every small op into milliseconds there (measured 6x fewer tokens/s on 2 cores with two
    2-thread executors). libgomp's default short spin where they do not: one process computes
    (`serve` without --devices, `bench serve`/`bench decode`, whose baselines compute in the
    bench process and whose servers are that same one-process `serve`), or the executors of
    `serve --devices N` on the local fleet, which divide the cores among them
    (`executor.set_compute_threads`). Measured on 2 cores with the client on the same machine:
    batch-1 decode of the bench preset 18.7 ms/token against 28.4 ms/token passive; 16 streams
    through `serve --devices 1`, small preset, ~12 ms/step against ~24 ms passive."""
    spin = ((args.command == "serve" and (getattr(args, "devices", None) is None
                                          or getattr(args, "fleet", "local") == "local"))
            or (args.command == "bench" and getattr(args, "bench", None) in ("serve", "decode")))
    if not spin:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cmd_serve(args: argparse.Namespace) -> int:
    autoscale.check_arguments(args)  # before the slow imports: a wrong option fails at once
    from elasticmoe_worker import backends
    from elasticmoe_worker.engine import async_engine
    from elasticmoe_worker.server import api

    log = logging.getLogger("elasticmoe")
    # serve --control-port: its workers outlive it, and the same command started again adopts them
    restartable = args.command == "serve" and bool(args.control_port)
    if restartable and (args.fleet != "local" or args.devices is None):
        log.error("--control-port: only for a local fleet (--devices N, --fleet local): the address a restarted "
                  "serve finds its workers on")
        return 2
    if restartable and not _worker_secret(args):
        log.error("--control-port needs the worker secret from $ELASTICMOE_WORKER_SECRET or --worker-secret-file: "
                  "a restarted serve must prove the same secret to the workers it adopts")
        return 2
    redundant_bytes = args.redundant_expert_bytes
    if redundant_bytes is not None and args.expert_copies != 2:
        log.error("--redundant-expert-mb needs --expert-copies 2 (it budgets the second copies; got --expert-copies "
                  "%d)", args.expert_copies)
        return 2
    # these adopt the workers a killed coordinator left (which hold the model: the checkpoint may be gone)
    adopts = restartable or (args.command == "coordinator" and args.fleet == "external")
    model_dir = pathlib.Path(args.model) if args.model else cliargs.default_model_dir()
    if not model_dir.is_dir() and not (adopts and not args.autoscale):
        log.error("--model %s: not a directory (expected a Hugging Face checkpoint directory)", model_dir)
        return 2
    if args.autoscale:
        from elasticmoe_worker.models import config as model_config

        scaling = autoscale.config_from_args(args, model_config.load_spec(model_dir).num_experts)
    name = args.served_model_name or model_dir.name
    from elasticmoe_worker.server import admin

    token = admin.resolve_token(args.admin_token_file, cliargs.cache_dir())
    if args.fleet == "ray":
        if getattr(args, "cpu_per_device", None) is not None:
            log.error("--cpu-per-device: only for --fleet local; with --fleet ray each device asks Ray for "
                      "--ray-cpus-per-device CPUs")
            return 2
        if args.devices is None:
            log.error("--fleet ray needs --devices N (the devices the instance starts with)")
            return 2
        from elasticmoe_worker.instance import rayfleet

        try:
            rayfleet.import_ray()
        except RuntimeError as exc:
            log.error("%s", exc)
            return 2
    if args.devices is None:
        if args.expert_copies != 1:
            log.error("--expert-copies %d needs --devices N (copies live on distinct devices of a multi-device "
                      "instance)", args.expert_copies)
            return 2
        if getattr(args, "cpu_per_device", None) is not None:
            log.error("--cpu-per-device needs --devices N (a CPU quota for each device of a multi-device instance)")
            return 2
        try:  # one process, one device: the backend's first (cuda:0, npu:0) or the CPU
            device = backends.get_backend(args.backend).torch_device()
        except RuntimeError as exc:
            log.error("--backend %s: %s", args.backend, exc)
            return 2
        log.info("serving from this process on %s", device)
        engine = async_engine.AsyncEngine.from_model_dir(model_dir, cliargs.engine_config_from_args(args),
                                                         model_name=name, device=device)
    elif args.fleet == "local":
        from elasticmoe_worker.instance import coordinator

        log.info("starting a local instance of %d %s device(s)", args.devices, args.backend)
        engine = coordinator.Instance(model_dir, args.devices, cliargs.engine_config_from_args(args), model_name=name,
                                      backend=args.backend, collective_timeout_s=args.collective_timeout_s,
                                      cpu_per_device=args.cpu_per_device, expert_copies=args.expert_copies,
                                      redundant_expert_bytes=redundant_bytes,
                                      warm_workers=1 if args.warm_workers is None else args.warm_workers,
                                      warm_reserve=args.warm_reserve,
                                      scale_down_reserve_bytes=args.scale_down_reserve_bytes,
                                      control_port=args.control_port,
                                      worker_secret=_worker_secret(args) if restartable else "",
                                      orphan_timeout_s=args.orphan_timeout_s if restartable else None)
        if not adopts:
            engine.start()
    elif args.fleet == "ray":
        from elasticmoe_worker.instance import coordinator, rayfleet, transport

        log.info("starting an instance of %d %s device(s) on the Ray cluster at %s", args.devices, args.backend,
                 args.ray_address or "$RAY_ADDRESS or the one `ray start` made here")
        is_coordinator = args.command == "coordinator"
        engine = coordinator.Instance(
            model_dir, args.devices, cliargs.engine_config_from_args(args), model_name=name, backend=args.backend,
            collective_timeout_s=args.collective_timeout_s, startup_timeout_s=args.startup_timeout_s, fleet="ray",
            # serve: the control channel on the address Ray knows this node by; coordinator: on --host
            bind_host=args.host if is_coordinator else None,
            advertise_host=args.advertise_host if is_coordinator else None,
            control_port=args.control_port if is_coordinator else 0,
            worker_secret=_worker_secret(args) if is_coordinator else os.environ.get(transport.SECRET_ENV, "").strip(),
            ray_options=rayfleet.Options(address=args.ray_address, cpus_per_device=args.ray_cpus_per_device,
                                         placement_timeout_s=args.ray_placement_timeout_s),
            expert_copies=args.expert_copies, redundant_expert_bytes=redundant_bytes,
            warm_workers=1 if args.warm_workers is None else args.warm_workers, warm_reserve=args.warm_reserve,
            scale_down_reserve_bytes=args.scale_down_reserve_bytes).start()
    else:
        from elasticmoe_worker.instance import coordinator

        from elasticmoe_worker.instance import transport

        if args.warm_workers:
            log.error("--warm-workers %d: the workers of an external fleet (pods) are started by others, not by "
                      "the coordinator; leave it out", args.warm_workers)
            return 2
        advertise = args.advertise_host or socket.getfqdn()
        secret = _worker_secret(args)
        if not secret:
            log.error("no worker secret: set %s or pass --worker-secret-file (the same value its workers get)",
                      transport.SECRET_ENV)
            return 2
        log.info("coordinator: waiting for %d %s worker(s) to register on tcp://%s:%d", args.devices, args.backend,
                 advertise, args.control_port)
        engine = coordinator.Instance(
            model_dir, args.devices, cliargs.engine_config_from_args(args), model_name=name, backend=args.backend,
            collective_timeout_s=args.collective_timeout_s, startup_timeout_s=args.startup_timeout_s,
            warm_workers=0, fleet="external", bind_host=args.host, advertise_host=advertise,
            control_port=args.control_port, worker_secret=secret,
            heartbeat_timeout_s=args.heartbeat_timeout_s, expert_copies=args.expert_copies,
            redundant_expert_bytes=redundant_bytes, warm_reserve=args.warm_reserve,
            scale_down_reserve_bytes=args.scale_down_reserve_bytes)
        # started below, once the HTTP API listens
    autoscaler = None
    # NOTE: uvicorn re-raises the signal that stopped it once its graceful shutdown is done; with
    # SIGTERM's default action (what Kubernetes and `kill` send) the process would end right there,
    # before `finally` stops the workers and removes their CPU-quota groups.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app = api.build_app(engine, served_model_name=args.served_model_name)
        if args.autoscale:
            policy_config, interval_s, window_s = scaling
            autoscaler = autoscale.Autoscaler(engine, app.state.elasticmoe.metrics, policy_config,
                                              interval_s=interval_s, window_s=window_s).start()
        admin.add_routes(app, engine, token, autoscaler=autoscaler)
        server = api.make_server(app, args.host, args.port, log_level=args.log_level)
        if adopts:
            # NOTE: listening before the instance serves: while it starts (waits for its workers, or
            # adopts those of a coordinator that was killed), requests get 503 + Retry-After, not refused.
            threading.Thread(target=_start_in_background, args=(engine, server, failed := []), name="instance-start",
                             daemon=True).start()
        log.info("serving %s as %r", model_dir, engine.model_name)
        server.run()
        if adopts and failed:
            return 1
    except KeyboardInterrupt:
        pass  # uvicorn re-raises Ctrl-C (and SIGTERM) after its graceful shutdown: that is a clean stop
    finally:
        if autoscaler is not None:
            autoscaler.stop()
        engine.shutdown()
    log.info("stopped")
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _start_in_background(engine, server, failed: list) -> None:
    try:
        engine.start()
    except BaseException as exc:
        logging.getLogger("elasticmoe").error("the instance did not start: %s", exc)
        failed.append(exc)
        server.should_exit = True


def _worker_secret(args: argparse.Namespace) -> str:
    from elasticmoe_worker.instance import transport

    return (pathlib.Path(args.worker_secret_file).read_text().strip() if args.worker_secret_file
            else os.environ.get(transport.SECRET_ENV, "").strip())


def cmd_worker(args: argparse.Namespace) -> int:
    from elasticmoe_worker.instance import hmm

    return hmm.run_worker(args)


def cmd_make_model(args: argparse.Namespace) -> int:
    from elasticmoe_worker import modelgen

    path = modelgen.make_model(args.family, args.preset, args.out, seed=args.seed, dtype=args.dtype,
                               progress=not args.no_progress)
    print(path)
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    import time
    import uuid

    from elasticmoe_worker.contract import admin

    import httpx
    from rich.console import Console
    from rich.table import Table

    token = args.token or os.environ.get("ELASTICMOE_ADMIN_TOKEN")
    if not token:
        path = cliargs.cache_dir() / "admin-token"
        if not path.is_file():
            logging.getLogger("elasticmoe").error("no admin token: pass --token, set ELASTICMOE_ADMIN_TOKEN, "
                                                  "or run on the server's machine (%s)", path)
            return 2
        token = path.read_text().strip()
    headers = {"Authorization": f"Bearer {token}"}
    console = Console()
    scale_id = f"cli-{uuid.uuid4().hex[:12]}"
    with httpx.Client(base_url=args.url, headers=headers, timeout=30) as client:
        r = client.post("/admin/scale", json={"devices": args.devices, "reason": args.reason, "scaleId": scale_id})
        if r.status_code != 202:
            message = r.json().get("error", {}).get("message", r.text) if r.headers.get("content-type", "").startswith(
                "application/json") else r.text
            console.print(f"[red]scale refused ({r.status_code}):[/red] {message}")
            return 1
        if args.no_wait:
            console.print(f"scaling to {args.devices} devices started (scale id {scale_id})")
            return 0
        with console.status(f"scaling to {args.devices} devices"):
            while True:
                record = admin.decode_status(client.get("/admin/status").content).find_scale(scale_id)
                if record is not None and record.outcome in admin.TERMINAL_OUTCOMES:
                    break
                time.sleep(0.2)
    table = Table(title=f"scale {record.from_devices} -> {record.to_devices}: {record.outcome.value}")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    for name, ms in record.phases_ms.items():
        table.add_row(name, f"{ms / 1000:.3f}")
    table.add_row("total", f"{record.duration_ms / 1000:.3f}")
    console.print(table)
    if record.message:
        console.print(f"[red]{record.message}[/red]")
    return 0 if record.outcome == admin.Outcome.SUCCEEDED else 1


def _add_serving_arguments(p: argparse.ArgumentParser, host_default: str, devices_required: bool) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--served-model-name", default=None, help="model name in the API (default: the directory name)")
    p.add_argument("--host", default=host_default, help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=cliargs.port, default=8000, help="port to listen on, 0 = any free (default: %(default)s)")
    if devices_required:
        p.add_argument("--devices", type=cliargs.positive_int, required=True,
                       help="devices (workers) the instance starts with")
    else:
        p.add_argument("--devices", type=cliargs.positive_int, default=None,
                       help="run a multi-device instance: one HMM + executor process pair per device, attention "
                            "data-parallel, experts spread over all devices (default: one in-process engine)")
    p.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "ascend"],
                   help="device backend of the instance's workers (default: %(default)s)")
    p.add_argument("--expert-copies", type=int, choices=[1, 2], default=1,
                   help="copies of each routed expert, on distinct devices: with 2, a lost device's experts come "
                        "from a peer's copy instead of the checkpoint, at the memory of one more copy of every "
                        "expert (shown in /admin/status as experts.redundantBytes) (default: %(default)s)")
    p.add_argument("--redundant-expert-mb", type=cliargs.mebibytes, default=None, metavar="N",
                   dest="redundant_expert_bytes",
                   help="with --expert-copies 2: MiB per device (fractions allowed) for the second copies. Only the hottest experts "
                        "(most routed tokens; before any are counted, the lowest ids) get one, as many as fit: "
                        "min(experts, floor(devices x N MiB / one expert's bytes)), on average over the devices; "
                        "re-chosen at every scale and recovery (default: no limit, every expert gets its copy)")
    p.add_argument("--warm-workers", type=cliargs.non_negative_int, default=None, metavar="N",
                   help="workers (an HMM and a pre-started executor each, holding no weights) kept started ahead of "
                        "a scale-up, so that adding up to N devices does not wait for processes to start; local and "
                        "Ray fleets (an external fleet's workers are started by others) (default: 1)")
    p.add_argument("--warm-reserve", action=argparse.BooleanOptionalAction, default=True,
                   help="a worker waiting without weights (warm, or an idle pod) allocates the memory it would "
                        "receive at the next scale-up by one device (its replicated weights and its share of the "
                        "experts) while it waits, so the scale copies into memory that exists; it counts in the "
                        "worker's memory until that scale commits (default: on)")
    p.add_argument("--scale-down-reserve-mb", type=cliargs.mebibytes, default=0, metavar="N",
                   dest="scale_down_reserve_bytes",
                   help="MiB per device (fractions allowed): each serving device keeps up to this much memory "
                        "allocated and populated for experts a scale-down would bring it (whole experts, at most "
                        "those a scale to one device would), so that a scale-down copies into memory that exists "
                        "instead of faulting in new pages; it counts in the device's memory all the time, and is "
                        "resized after every scale (0: none) (default: 0)")
    p.add_argument("--collective-timeout-s", type=float, default=60.0,
                   help="a collective that stalls longer fails with an error instead of hanging (default: %(default)s)")
    p.add_argument("--admin-token-file", default=None,
                   help=f"file holding the admin API bearer token (default: ${'{'}ELASTICMOE_ADMIN_TOKEN{'}'}, else one "
                        "is generated and saved to <cache dir>/admin-token)")
    cliargs.add_engine_arguments(p)
    autoscale.add_arguments(p)


def _add_ray_arguments(p: argparse.ArgumentParser, fleets: list[str], default_fleet: str, workers: str) -> None:
    p.add_argument("--fleet", choices=fleets, default=default_fleet,
                   help=f"who starts the devices' workers: {workers}; ray: one Ray actor per device on a Ray "
                        "cluster, wherever it has the device's resources (needs the ray package: pip install "
                        "'elasticmoe[ray]') (default: %(default)s)")
    g = p.add_argument_group("Ray fleet (--fleet ray)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="the Ray cluster to run the workers on, e.g. 10.0.0.1:6379 (the head's `ray start --head` "
                        "address) (default: $RAY_ADDRESS, else the cluster `ray start` made on this machine, else "
                        "a new Ray instance on this machine alone)")
    g.add_argument("--ray-cpus-per-device", type=cliargs.cores, default=1.0, metavar="CPUS",
                   help="Ray CPUs each device's worker asks for, besides its GPU (--backend cuda) or NPU "
                        "(--backend ascend); Ray counts them, it does not enforce them (default: %(default)s)")
    g.add_argument("--ray-placement-timeout-s", type=cliargs.positive_seconds, default=120.0, metavar="S",
                   help="a device whose resources no node frees within this long is reported lost (a scale "
                        "aborts; at start-up, the start fails) (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    from elasticmoe_worker.bench import autoscale_bench, decode_floor, profile_bench, scaling_bench, serve_bench, simulate

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
    p.add_argument("--cpu-per-device", type=cliargs.cores, default=None, metavar="CORES",
                   help="give each device's executors a CPU quota of this many cores through the cgroup CPU "
                        "controller (cgroup v1 cpu.cfs_quota_us or v2 cpu.max; needs root), like a Kubernetes CPU "
                        "limit, so that a CPU device has fixed capacity, e.g. 0.45; the device's HMM (host work: "
                        "checkpoint reads, peer copies) and its spare executor (started ahead of the next scale, "
                        "like a warm worker) each get a group with a quota of the same size (default: no quota)")
    g = p.add_argument_group("restarting serve without losing its workers (--fleet local)")
    g.add_argument("--control-port", type=cliargs.port, default=0,
                   help="the port the workers' control channel listens on (loopback); with a fixed port and the "
                        "worker secret ($ELASTICMOE_WORKER_SECRET or --worker-secret-file) the workers outlive a "
                        "killed serve, keeping their memory, and the same command started again adopts them and "
                        "serves without reading the checkpoint (0 = any free port: the workers die with serve) "
                        "(default: %(default)s)")
    g.add_argument("--worker-secret-file", default=None,
                   help="file holding the worker secret (default: $ELASTICMOE_WORKER_SECRET; without "
                        "--control-port, a fresh one is generated)")
    g.add_argument("--orphan-timeout-s", type=cliargs.positive_seconds, default=60.0, metavar="S",
                   help="with --control-port: workers whose serve is gone wait this long for a new one, then "
                        "exit and free their memory (default: %(default)s)")
    _add_ray_arguments(p, ["local", "ray"], "local", "local: child processes on this machine")
    p.set_defaults(func=cmd_serve, startup_timeout_s=600.0)

    p = sub.add_parser("coordinator", help="run an instance's coordinator; its workers run elsewhere (pods)",
                       description="The coordinator of an instance whose workers are started by others, one "
                                   "`elasticmoe worker` per device (in Kubernetes: the operator's worker pods). "
                                   "Serves the OpenAI API, /metrics and the admin API like `serve --devices N`, "
                                   "waits for N workers to register on the control port (CURVE-authenticated "
                                   "with keys derived from the worker secret, $ELASTICMOE_WORKER_SECRET or "
                                   "--worker-secret-file; the collectives' rendezvous runs over the same "
                                   "channel). A worker silent for --heartbeat-timeout-s is declared dead. With "
                                   "--fleet ray it starts the workers itself, one Ray actor per device, and "
                                   "generates the worker secret when none is given.")
    _add_serving_arguments(p, host_default="0.0.0.0", devices_required=True)
    p.add_argument("--control-port", type=cliargs.port, default=5555,
                   help="ZeroMQ port workers and executors register on (default: %(default)s)")
    p.add_argument("--worker-secret-file", default=None,
                   help="file holding the worker secret (default: $ELASTICMOE_WORKER_SECRET); separate from the "
                        "admin token, shared only with the workers")
    p.add_argument("--advertise-host", default=None,
                   help="the name workers dial to reach this coordinator, e.g. the Service's DNS name "
                        "(default: this host's FQDN; with --fleet ray, the address Ray reports for this node)")
    p.add_argument("--heartbeat-timeout-s", type=float, default=15.0,
                   help="declare a worker dead after this long without a message (--fleet external; a Ray "
                        "fleet's workers are lost when their process or actor ends) (default: %(default)s)")
    p.add_argument("--startup-timeout-s", type=float, default=600.0,
                   help="give up if the first N workers have not registered and loaded by then (default: "
                        "%(default)s)")
    _add_ray_arguments(p, ["external", "ray"], "external",
                       "external: others (the operator's pods, `elasticmoe worker`) start them and they register")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run the worker (HMM) of one device; it registers with a coordinator",
                       description="The long-lived process of one device: registers with the coordinator, "
                                   "loads the weights and KV cache it is told to, starts the executors as child "
                                   "processes, and moves weights peer-to-peer when the instance scales. Proves it "
                                   "holds the worker secret ($ELASTICMOE_WORKER_SECRET, the coordinator's) on "
                                   "the authenticated control channel; nothing it sends counts without it.")
    cliargs.add_worker_arguments(p)
    p.set_defaults(func=cmd_worker)

    sub.add_parser("operator", help="run the Kubernetes operator (see `elasticmoe operator --help`)",
                   add_help=False)

    p = sub.add_parser("scale", help="change the number of devices of a running instance",
                       description="Ask a running `elasticmoe serve --devices N` to scale to M devices with zero "
                                   "downtime, then follow it until done and print its phases.")
    p.add_argument("--devices", type=cliargs.positive_int, required=True, help="target number of devices")
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
    cliargs.add_engine_arguments(b)
    b.set_defaults(func=serve_bench.run)
    b = bench_sub.add_parser("decode", help="decode time per token at batch 1 vs its memory-bandwidth floor",
                             description=decode_floor.DESCRIPTION)
    decode_floor.add_arguments(b)
    b.set_defaults(func=decode_floor.run)
    b = bench_sub.add_parser("scaling", help="elastic scaling vs cold restart, extravagant and horizontal",
                             description=scaling_bench.DESCRIPTION)
    scaling_bench.add_arguments(b)
    cliargs.add_engine_arguments(b)
    b.set_defaults(func=scaling_bench.run)
    b = bench_sub.add_parser("profile", help="measure the service profile `elasticmoe simulate` models an instance with",
                             description=profile_bench.DESCRIPTION)
    profile_bench.add_arguments(b)
    cliargs.add_engine_arguments(b)
    b.set_defaults(func=profile_bench.run)
    b = bench_sub.add_parser("autoscale", help="one trace, four scaling policies, CPU devices under a quota",
                             description=autoscale_bench.DESCRIPTION)
    autoscale_bench.add_arguments(b)
    cliargs.add_engine_arguments(b)
    b.set_defaults(func=autoscale_bench.run)

    p = sub.add_parser("simulate", help="replay a trace through the scaling policies on a model of an instance",
                       description=simulate.DESCRIPTION)
    simulate.add_arguments(p)
    p.set_defaults(func=simulate.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["operator"]:
        # NOTE: before build_parser: the operator never imports torch.
        from elasticmoe_operator import cli as operator_cli

        return operator_cli.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _openmp_wait_policy(args)
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

"""The device check: `python -m elasticmoe_worker.devicecheck --backend cuda` (what
`scripts/device-check.sh` runs). One summary line per check, PASS / FAIL / SKIP with its reason;
the exit status is 1 when any check failed.

Why it exists: the accelerator backends cannot be exercised where this project is developed
(no GPU or NPU). Whoever has one runs this single command; it runs with `--backend cpu` too,
and a test does exactly that, so the script itself is known to work before it meets a GPU.

Checks:
- `greedy <family> <preset> devices=N`: `elasticmoe serve --backend B --devices N` (HMM and
  executor processes) answers 8 concurrent greedy completions with exactly the text of
  `transformers`' greedy continuations computed on the same device (float32); every family ×
  preset with N=1, and with N=2 where two devices exist;
- `zero-copy attach`: a child process attaches a region this process allocated, as an executor
  attaches its HMM's memory: its tensor starts at the address the backend mapped (torch made no
  copy), it reads our bytes, we read its write; on a GPU/NPU the device's free memory does not
  drop by the region's size;
- `scale 1->2->1`: serve --devices 1 under a streaming load of 4 clients, scaled to 2 devices
  and back: both scales Succeeded, 0 failed requests, every output equal to `transformers`'.

Devices: cuda counts torch.cuda.device_count(), ascend torch.npu.device_count(); on cpu a
device is a worker process (`--cpu-devices`, default 2).

Not checked: speed, bfloat16, more than 2 devices, several machines. It has run only with
`--backend cpu` (tests/worker/test_devicecheck.py), never on a GPU or NPU.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable

import httpx
import msgspec
import torch

from elasticmoe_worker import backends, modelgen, reference
from elasticmoe_worker.engine import engine as engine_mod

FAMILIES = ("qwen3_moe", "deepseek_v2", "mixtral")
PROMPT_LENGTHS = (3, 9, 14, 22, 31, 40, 6, 17)
ZERO_COPY_BYTES = 64 << 20


@dataclasses.dataclass
class Result:
    status: str  # PASS | FAIL | SKIP
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}"


@dataclasses.dataclass
class Model:
    family: str
    preset: str
    path: pathlib.Path
    prompts: list[list[int]]
    expected: list[str]  # transformers' greedy text per prompt, on the checked device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(text: str) -> None:
    print(f"[device-check] {text}", file=sys.stderr, flush=True)


class Server:
    """`elasticmoe serve --backend B --devices N` on 127.0.0.1, stopped (Ctrl-C) on exit."""

    def __init__(self, args: argparse.Namespace, model_dir: pathlib.Path, devices: int, log: pathlib.Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.token = secrets.token_hex(16)
        env = {**os.environ, "ELASTICMOE_ADMIN_TOKEN": self.token,
               "ELASTICMOE_CACHE_DIR": str(args.workdir / "cache")}
        cmd = [sys.executable, "-m", "elasticmoe_worker.cli", "serve", "--model", str(model_dir),
               "--served-model-name", "model", "--backend", args.backend, "--devices", str(devices),
               "--port", str(self.port), "--dtype", "float32"]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + args.serve_timeout_s
        while not self._healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode} before it was healthy{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"serve not healthy after {args.serve_timeout_s:g} s{self.tail()}")
            time.sleep(0.3)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return f" (log {self.log}; last line: {lines[-1] if lines else 'empty'})"

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.token}"}, timeout=600)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _mismatch(expected: list[str], got: list[str]) -> str | None:
    for i, (want, have) in enumerate(zip(expected, got)):
        if want != have:
            return f"prompt {i}: transformers {want[:60]!r}, serve {have[:60]!r}"
    return None


def prepare_model(args: argparse.Namespace, family: str, preset: str, device: torch.device) -> Model:
    path = modelgen.make_model(family, preset, args.workdir / "models" / f"{family}-{preset}", progress=False)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(99)
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    tokens = reference.hf_greedy(path, prompts, args.max_new_tokens, device=str(device))
    tokenizer = engine_mod.load_tokenizer(path)
    return Model(family, preset, path, prompts, [tokenizer.decode(t, skip_special_tokens=True) for t in tokens])


def check_greedy(args: argparse.Namespace, model: Model, devices: int) -> Result:
    name = f"greedy {model.family} {model.preset} devices={devices}"
    body = {"model": "model", "max_tokens": args.max_new_tokens, "temperature": 0.0, "ignore_eos": True}

    async def ask_all(base: str) -> list[str]:
        async with httpx.AsyncClient(base_url=base, timeout=300) as c:
            replies = await asyncio.gather(*(c.post("/v1/completions", json={**body, "prompt": p})
                                             for p in model.prompts))
        for r in replies:
            r.raise_for_status()
        return [r.json()["choices"][0]["text"] for r in replies]

    with Server(args, model.path, devices, args.workdir / f"serve-{model.family}-{model.preset}-{devices}.log") as s:
        got = asyncio.run(ask_all(s.base))
    wrong = _mismatch(model.expected, got)
    if wrong is not None:
        return Result("FAIL", name, f"serve --backend {args.backend} differs from transformers on the same "
                                    f"device: {wrong}")
    return Result("PASS", name, f"{len(got)} concurrent greedy completions of {args.max_new_tokens} tokens equal "
                                f"transformers on {args.device}")


def _free_device_bytes(backend: backends.DeviceBackend) -> int | None:
    device = backend.torch_device()
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "npu":
        return torch.npu.mem_get_info(device)[0]
    return None  # host memory: no device pool to watch


def _sync(backend: backends.DeviceBackend) -> None:
    device = backend.torch_device()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def attach_child() -> int:
    """The executor's side of the zero-copy check: a handle on stdin, JSON reports on stdout."""
    handle = msgspec.json.decode(sys.stdin.readline().encode(), type=backends.MemoryHandle)
    backend = backends.get_backend(handle.backend, handle.device_index)
    torch.zeros(1, device=backend.torch_device()).sum()  # the device context exists before we measure
    _sync(backend)
    free_before = _free_device_bytes(backend)
    region = backend.attach(handle)
    words = region.tensor(torch.int64, (handle.size_bytes // 8,))
    total = int(words.sum())
    words[-1] = -7
    _sync(backend)
    free_after = _free_device_bytes(backend)
    print(json.dumps({"sum": total, "data_ptr": words.data_ptr(), "address": region.address,
                      "free_drop": None if free_before is None else free_before - free_after}), flush=True)
    sys.stdin.readline()  # the parent wrote words[0]
    print(json.dumps({"first": int(words[0])}), flush=True)
    del words
    region.close()
    return 0


def check_zero_copy(args: argparse.Namespace) -> Result:
    name = "zero-copy attach"
    backend = backends.get_backend(args.backend, 0)
    n = ZERO_COPY_BYTES // 8
    region = backend.allocate(ZERO_COPY_BYTES, "devicecheck.zero_copy")
    words = region.tensor(torch.int64, (n,))
    words.copy_(torch.arange(n, dtype=torch.int64, device=words.device))
    _sync(backend)
    proc = subprocess.Popen([sys.executable, "-m", "elasticmoe_worker.devicecheck", "--attach-child"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write(msgspec.json.encode(region.handle).decode() + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            return Result("FAIL", name, f"the attaching process died ({proc.wait()}): {proc.stderr.read()[-500:]}")
        report = json.loads(line)
        _sync(backend)
        problems = []
        if report["sum"] != n * (n - 1) // 2:
            problems.append("the child did not read our bytes")
        if report["data_ptr"] != report["address"]:
            problems.append(f"the child's tensor is at {report['data_ptr']:#x}, not at the mapped "
                            f"{report['address']:#x} (a copy)")
        if int(words[-1]) != -7:
            problems.append("we do not see the child's write")
        if report["free_drop"] is not None and report["free_drop"] >= ZERO_COPY_BYTES // 2:
            problems.append(f"the device lost {report['free_drop']} free bytes while the child attached "
                            f"{ZERO_COPY_BYTES} (a copy)")
        words[0] = 12345
        _sync(backend)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        if json.loads(proc.stdout.readline())["first"] != 12345:
            problems.append("the child does not see our later write")
        if proc.wait(timeout=60) != 0:
            problems.append(f"the child exited with {proc.returncode}: {proc.stderr.read()[-300:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        del words
        region.close()
    if problems:
        return Result("FAIL", name, "; ".join(problems))
    drop = "" if report["free_drop"] is None else f", device free memory moved {report['free_drop']} bytes"
    return Result("PASS", name, f"a child process mapped our {ZERO_COPY_BYTES >> 20} MiB at its own pointer "
                                f"{report['address']:#x} (its tensor starts there), writes cross both ways{drop}")


def check_scale(args: argparse.Namespace, model: Model) -> Result:
    name = f"scale 1->2->1 {model.family} {model.preset}"
    with Server(args, model.path, 1, args.workdir / "serve-scale.log") as s:
        load = reference.StreamingLoad(s.base, "model", model.prompts, args.max_new_tokens, clients=4)
        replies = []
        try:
            with s.admin() as c:
                for devices in (2, 1):
                    time.sleep(1.0)  # requests in flight across every switch
                    replies.append(c.post("/admin/scale", json={"devices": devices, "reason": "device check",
                                                                "wait": True}))
                time.sleep(1.0)
        finally:
            load.stop()
        with s.admin() as c:
            history = c.get("/admin/status").json()["history"]
    scales = [(r["from"], r["to"], r["outcome"]) for r in history]
    problems = [f"POST /admin/scale answered {r.status_code}: {r.text[:200]}" for r in replies if r.status_code != 200]
    if scales != [(1, 2, "Succeeded"), (2, 1, "Succeeded")]:
        problems.append(f"scales {scales}")
    if load.failed:
        problems.append(f"{len(load.failed)} failed requests, first: {load.failed[0]}")
    wrong = _mismatch([model.expected[i] for i, _ in load.results], [text for _, text in load.results])
    if wrong is not None:
        problems.append(f"an output differs from transformers: {wrong}")
    if problems:
        return Result("FAIL", name, "; ".join(problems))
    return Result("PASS", name, f"{len(load.results)} streamed requests, 0 failed, all equal transformers; "
                                + ", ".join(f"{r['from']}->{r['to']} in {r['durationMs']} ms" for r in history))


def _device_count(args: argparse.Namespace) -> int:
    if args.backend == "cpu":
        return args.cpu_devices
    if args.backend == "cuda":
        return torch.cuda.device_count()
    return torch.npu.device_count()


def _guarded(name: str, fn: Callable[[], Result]) -> Result:
    _say(f"running {name}")
    started = time.monotonic()
    try:
        result = fn()
    except Exception as exc:  # a check that crashes is a FAIL with its reason, and the others still run
        result = Result("FAIL", name, f"{type(exc).__name__}: {exc}")
    result.detail += f" ({time.monotonic() - started:.0f} s)"
    return result


def run(args: argparse.Namespace) -> list[Result]:
    reason = backends.unavailable_reason(args.backend)
    if reason is not None:
        return [Result("FAIL", f"backend {args.backend}", f"not usable here: {reason}")]
    args.device = backends.get_backend(args.backend, 0).torch_device()
    num_devices = _device_count(args)
    _say(f"backend {args.backend}, {num_devices} device(s), work directory {args.workdir}")
    results = [_guarded("zero-copy attach", lambda: check_zero_copy(args))]
    first: Model | None = None
    for preset in args.presets:
        for family in args.families:
            label = f"greedy {family} {preset}"
            try:
                _say(f"writing {family} {preset} and its transformers reference on {args.device}")
                model = prepare_model(args, family, preset, args.device)
            except Exception as exc:
                results.append(Result("FAIL", label, f"preparing the model: {type(exc).__name__}: {exc}"))
                continue
            first = first or model
            results.append(_guarded(f"{label} devices=1", lambda: check_greedy(args, model, 1)))
            if num_devices >= 2:
                results.append(_guarded(f"{label} devices=2", lambda: check_greedy(args, model, 2)))
            else:
                results.append(Result("SKIP", f"{label} devices=2", f"needs 2 devices, {num_devices} visible"))
    if num_devices < 2:
        results.append(Result("SKIP", "scale 1->2->1", f"needs 2 devices, {num_devices} visible"))
    elif first is None:
        results.append(Result("SKIP", "scale 1->2->1", "no model could be prepared"))
    else:
        results.append(_guarded(f"scale 1->2->1 {first.family} {first.preset}", lambda: check_scale(args, first)))
    return results


def _names(value: str, allowed: tuple[str, ...], option: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{option}: got {value!r}; expected a comma-separated subset of "
                                         f"{', '.join(allowed)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m elasticmoe_worker.devicecheck",
        description="Check a device backend end to end: greedy outputs of `serve` equal transformers on the same "
                    "device, zero-copy attach, and (with 2 devices) serve --devices 2 and a scale 1->2->1 under "
                    "load. Prints one PASS/FAIL/SKIP line per check; exits 1 if any check failed.")
    p.add_argument("--backend", choices=backends.BACKEND_NAMES, help="the backend to check (required)")
    p.add_argument("--presets", default="tiny,small", help="model presets, comma-separated (default: tiny,small)",
                   type=lambda v: _names(v, ("tiny", "small"), "--presets"))
    p.add_argument("--families", default=",".join(FAMILIES), help="model families, comma-separated (default: all three)",
                   type=lambda v: _names(v, FAMILIES, "--families"))
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per prompt (default: 16)")
    p.add_argument("--cpu-devices", type=int, default=2, help="devices (worker processes) with --backend cpu (default: 2)")
    p.add_argument("--serve-timeout-s", type=float, default=300.0,
                   help="how long a server may take to become healthy (default: 300)")
    p.add_argument("--workdir", type=pathlib.Path, default=None,
                   help="where models and server logs go (default: a temporary directory, removed unless a check fails)")
    p.add_argument("--attach-child", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.attach_child:
        return attach_child()
    if args.backend is None:
        raise SystemExit(f"--backend: required; one of {', '.join(backends.BACKEND_NAMES)}")
    if args.max_new_tokens < 1 or args.cpu_devices < 1:
        raise SystemExit(f"--max-new-tokens and --cpu-devices must be >= 1; got {args.max_new_tokens}, "
                         f"{args.cpu_devices}")
    temporary = args.workdir is None
    args.workdir = pathlib.Path(tempfile.mkdtemp(prefix="elasticmoe-devicecheck-")) if temporary else args.workdir
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = run(args)
    for r in results:
        print(r.line(), flush=True)
    failed = [r for r in results if r.status == "FAIL"]
    print(f"device check ({args.backend}): {sum(r.status == 'PASS' for r in results)} passed, {len(failed)} failed, "
          f"{sum(r.status == 'SKIP' for r in results)} skipped in {time.monotonic() - started:.0f} s", flush=True)
    if temporary and not failed:
        shutil.rmtree(args.workdir, ignore_errors=True)
    elif failed:
        print(f"logs and models kept in {args.workdir}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

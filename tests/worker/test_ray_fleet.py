"""The Ray fleet (`--fleet ray`) on a real Ray cluster, started here and always stopped:

- `elasticmoe serve --fleet ray` scales 1 -> 2 -> 3 -> 1 under streaming load, with the
  checkpoint directory renamed away after start-up (new devices can get weights only from
  peers): no request fails, and every greedy output equals `transformers`';
- `elasticmoe coordinator --fleet ray`: a worker whose actor is killed through Ray is a lost
  device (the instance turns unhealthy, naming the device and why);
- closing a fleet while workers are still starting or being removed disconnects from Ray only
  after the last thread that calls Ray is done, and starts nothing afterwards;
- `--fleet ray` with a wrong option, or without the ray package, names what to do.

NOTE: the cluster runs with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's single-machine mode (its
default on macOS): Ray then reports the node's address as 127.0.0.1 instead of this machine's
network address, so every socket of these tests (Ray's, the coordinator's control channel, the
workers' collectives) listens on loopback. On a real cluster Ray reports each node's network
address and the same code uses that. One node only: two machines were never tried here.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import httpx
import pytest
import torch

import testprocs
from elasticmoe_worker.engine import engine as engine_mod
from elasticmoe_worker.instance import rayfleet

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
TOKEN = "ray-fleet-test"
MAX_NEW = 40
STARTED = re.compile(r"device (\d+): worker started by Ray actor (\S+) on node (\S+) \(pid \d+")


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster (`ray start --head --block`) on 127.0.0.1 with 4 CPUs and no GPU;
    -> its address. Stopped (SIGTERM: Ray stops what it started) at the end."""
    # Ray's unix sockets live under its temp dir and their paths must fit 107 bytes: a short one.
    temp = pathlib.Path(tempfile.mkdtemp(prefix="emoe-ray-", dir="/tmp"))
    port = testprocs.free_port()
    ports = {flag: str(testprocs.free_port()) for flag in ("--dashboard-port", "--dashboard-agent-listen-port")}
    argv = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address",
            "127.0.0.1", "--port", str(port), "--num-cpus", "4", "--num-gpus", "0", "--include-dashboard",
            "false", "--disable-usage-stats", "--temp-dir", str(temp), *(x for kv in ports.items() for x in kv)]
    log = temp / "head.log"
    with open(log, "w") as out:
        head = subprocess.Popen(argv, env={**os.environ, **RAY_ENV}, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=testprocs.die_with_test)
    try:
        testprocs.until("the Ray head", lambda: "Ray runtime started" in log.read_text(), 90, head, log)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _start(argv: list[str], tmp_path: pathlib.Path) -> tuple[subprocess.Popen, str, pathlib.Path]:
    """`elasticmoe ARGV --port <free>` on the test's Ray cluster; -> (process, base URL, log)."""
    port = testprocs.free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, **RAY_ENV, "ELASTICMOE_ADMIN_TOKEN": TOKEN, "ELASTICMOE_CACHE_DIR": str(tmp_path / "cache")}
    with open(log, "w") as out:
        proc = subprocess.Popen(testprocs.elasticmoe(*argv, "--port", str(port), "--dtype", "float32",
                                                     "--kv-cache-mb", "8", "--max-num-batched-tokens", "64"),
                                env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=testprocs.die_with_test)
    return proc, f"http://127.0.0.1:{port}", log


def test_serve_fleet_ray_scales_1_2_3_1_under_streaming_load_failing_nothing(ray_cluster, tiny_models, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_models["qwen3_moe"], model_dir)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 2000, (int(n),), generator=g).tolist() for n in torch.randint(3, 40, (8,), generator=g)]
    tokenizer = engine_mod.load_tokenizer(model_dir)
    expected = [tokenizer.decode(tokens, skip_special_tokens=True)
                for tokens in testprocs.hf_greedy(model_dir, prompts, MAX_NEW)]
    proc, base, log = _start(["serve", "--model", str(model_dir), "--devices", "1", "--fleet", "ray", "--ray-address",
                              ray_cluster], tmp_path)
    try:
        testprocs.until("serve --fleet ray", lambda: testprocs.healthy(base), 180, proc, log)
        # From here on nothing can read the checkpoint: new devices must get it from peers.
        model_dir.rename(tmp_path / "moved-away")
        load = testprocs.StreamingLoad(base, "model", prompts, MAX_NEW, clients=4)
        scales = []
        try:
            for devices in (2, 3, 1):
                time.sleep(1.0)  # requests in flight across every switch
                scales.append(subprocess.run(testprocs.elasticmoe("scale", "--devices", str(devices), "--url", base,
                                                                  "--token", TOKEN),
                                             capture_output=True, text=True, timeout=300))
            time.sleep(1.0)
        finally:
            load.stop()
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            history = c.get("/admin/status").json()["history"]
        print(f"\nray fleet 1->2->3->1 under streaming load: {len(load.results) + len(load.failed)} requests, "
              f"{len(load.failed)} failed; scales: "
              + "; ".join(f"{r['from']}->{r['to']} {r['outcome']} in {r['durationMs']} ms "
                          f"(phases {r['phasesMs']}, {r['requestsHandedOver']} handed over)" for r in history))
        for s in scales:
            assert s.returncode == 0, s.stdout + s.stderr
        assert [(r["from"], r["to"], r["outcome"]) for r in history] == [
            (1, 2, "Succeeded"), (2, 3, "Succeeded"), (3, 1, "Succeeded")]
        assert load.failed == [], load.failed[:5]
        assert sum(r["requestsHandedOver"] for r in history) > 0, "no request spanned a switch"
        assert len(load.results) > len(prompts)
        assert [text for _, text in load.results] == [expected[i] for i, _ in load.results]
        started = STARTED.findall(log.read_text())
        assert {d for d, _, _ in started} >= {"0", "1", "2"}, started
        assert {node for _, _, node in started} == {"127.0.0.1"}, "the node address Ray reports"
    finally:
        testprocs.interrupt(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]


def test_coordinator_fleet_ray_sees_a_killed_actor_as_a_lost_device(ray_cluster, tiny_models, tmp_path):
    proc, base, log = _start(["coordinator", "--model", str(tiny_models["mixtral"]), "--devices", "2", "--fleet",
                              "ray", "--ray-address", ray_cluster, "--host", "127.0.0.1", "--control-port",
                              str(testprocs.free_port())], tmp_path)
    try:
        testprocs.until("coordinator --fleet ray", lambda: testprocs.healthy(base), 180, proc, log)
        r = httpx.post(f"{base}/v1/completions", json={"model": tiny_models["mixtral"].name, "prompt": [5, 6, 7],
                                                       "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
        actors = {int(d): name for d, name, _ in STARTED.findall(log.read_text())}
        kill = ("import ray, sys\nray.init(address=sys.argv[1], logging_level='warning')\n"
                "ray.kill(ray.get_actor(sys.argv[2], namespace=sys.argv[3]))\n")
        out = subprocess.run([sys.executable, "-c", kill, ray_cluster, actors[1], rayfleet.RAY_NAMESPACE],
                             env={**os.environ, **RAY_ENV}, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]

        def recovered():
            s = httpx.get(f"{base}/admin/status", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
            last = s.get("lastScale") or {}
            return s if last.get("scaleId", "").startswith("recovery-") and s["phase"] == "Serving" else None

        # A lost device is recovered from like any other: the instance goes on with the survivor.
        status = testprocs.until("the recovery from the lost device", recovered, 120, proc, log)
        reason = status["lastScale"]["reason"]
        assert "device 1" in reason and "Ray actor died" in reason and "ray.kill" in reason, reason
        assert (status["lastScale"]["from"], status["lastScale"]["to"], status["devices"]["active"]) == (2, 1, 1)
        r = httpx.post(f"{base}/v1/completions", json={"model": tiny_models["mixtral"].name, "prompt": [5, 6, 7],
                                                       "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        testprocs.interrupt(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]


_CLOSE_RACE = """
import logging, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
import ray
from elasticmoe_worker.instance import rayfleet
fleet = rayfleet.RayFleet("cpu", options=rayfleet.Options(address=sys.argv[1], cpus_per_device=0.25))
fleet.coordinator_address = "127.0.0.1:9"  # nothing listens: the workers never join, as in a shutdown
teardown = fleet._teardown
def slow_teardown(worker, *args):  # a removal still calling Ray when close begins
    if worker.device_index == 2:
        time.sleep(3)
    teardown(worker, *args)
fleet._teardown = slow_teardown
for i in range(3):
    fleet.add(i)
time.sleep(float(sys.argv[2]))
fleet.remove(2, wait=False)
fleet.close()
assert not ray.is_initialized(), "still connected to Ray after close"
fleet.add(3)
assert 3 not in fleet.workers, fleet.workers
time.sleep(2)  # a thread left calling Ray would re-initialise it now
assert not ray.is_initialized(), "Ray was re-initialised after close"
print("closed cleanly")
"""


@pytest.mark.parametrize("start_s", [0.0, 3.0])
def test_closing_the_fleet_waits_for_every_thread_that_calls_ray(ray_cluster, tmp_path, start_s):
    # 0 s: the starts are still placing their bundles; 3 s: the actors are up, their workers starting.
    # Device 2's removal (in the background) is held 3 s before it calls Ray, so close overtakes it.
    out = subprocess.run([sys.executable, "-c", _CLOSE_RACE, ray_cluster, str(start_s)], capture_output=True,
                         text=True, timeout=180, env={**os.environ, **RAY_ENV, "RAY_ADDRESS": ""})
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "closed cleanly" in out.stdout, text[-4000:]
    assert "already been shutdown" not in text, text[-4000:]
    assert "device 3: not started: the Ray fleet is closing" in out.stdout, text[-4000:]


@pytest.mark.parametrize("backend, expected", [
    ("cpu", {"CPU": 0.5}), ("cuda", {"CPU": 0.5, "GPU": 1.0}), ("ascend", {"CPU": 0.5, "NPU": 1.0})])
def test_each_device_asks_ray_for_its_resources(backend, expected):
    assert rayfleet.resources(backend, 0.5) == expected


def test_bad_ray_options_are_named():
    with pytest.raises(ValueError, match="backend: got 'tpu', expected one of cpu, cuda, ascend"):
        rayfleet.resources("tpu", 1.0)
    with pytest.raises(ValueError, match="cpus_per_device: got 0, expected a number of CPUs > 0"):
        rayfleet.Options(cpus_per_device=0)


@pytest.mark.parametrize("argv, message", [
    (["--devices", "1", "--cpu-per-device", "0.5"], "--cpu-per-device: only for --fleet local"),
    ([], "--fleet ray needs --devices N"),
    (["--devices", "1"], "pip install 'elasticmoe[ray]'"),
])
def test_fleet_ray_errors_name_what_to_do(tiny_models, tmp_path, argv, message):
    # `ray` made unimportable, as where it is not installed (the other cases fail before importing it).
    code = "import sys\nsys.modules['ray'] = None\nfrom elasticmoe_worker import cli\nsys.exit(cli.main(sys.argv[1:]))\n"
    out = subprocess.run([sys.executable, "-c", code, "serve", "--model", str(tiny_models["qwen3_moe"]), "--fleet",
                          "ray", *argv], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ELASTICMOE_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]

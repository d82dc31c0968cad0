"""The cluster topology on one machine: `elasticmoe coordinator` with workers that others
start (`elasticmoe worker`, one per device, as the operator's pods do), registering over the
control port with the worker secret (CURVE; separate from the admin token), scaled through the
admin API, dead when silent."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest

import testprocs

TOKEN = "pod-topology-token"  # the admin API's
SECRET = "pod-topology-worker-secret"  # the control channel's


class Cluster:
    """A coordinator and hand-started workers, all stopped at teardown."""

    def __init__(self, model, tmp_path, devices: int, heartbeat_timeout_s: float = 3.0) -> None:
        self.http_port, self.control_port = testprocs.free_port(), testprocs.free_port()
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        self.tmp = tmp_path
        self.workers: dict[int, subprocess.Popen] = {}
        self._coordinator_cmd = testprocs.elasticmoe(
            "coordinator", "--model", str(model), "--devices", str(devices), "--host", "127.0.0.1",
            "--port", str(self.http_port), "--control-port", str(self.control_port), "--advertise-host", "127.0.0.1",
            "--admin-token-file", str(token_file), "--heartbeat-timeout-s", str(heartbeat_timeout_s),
            "--kv-cache-mb", "8", "--served-model-name", "m")
        self.coordinator = self._start_coordinator("wb")
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)

    def _start_coordinator(self, mode: str) -> subprocess.Popen:
        return subprocess.Popen(
            self._coordinator_cmd, env={**os.environ, "ELASTICMOE_WORKER_SECRET": SECRET},
            stdout=open(self.tmp / "coordinator.log", mode), stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=testprocs.die_with_test)

    def restart_coordinator(self) -> None:
        """SIGKILL the coordinator (a pod that dies) and start it again with the same command."""
        self.coordinator.kill()
        self.coordinator.wait()
        self.coordinator = self._start_coordinator("ab")

    def start_worker(self, index: int, secret: str = SECRET) -> subprocess.Popen:
        proc = subprocess.Popen(
            testprocs.elasticmoe("worker", "--device-index", str(index), "--coordinator",
                        f"tcp://127.0.0.1:{self.control_port}"),
            env={**{k: v for k, v in os.environ.items() if k != "ELASTICMOE_ADMIN_TOKEN"},
                 "ELASTICMOE_WORKER_SECRET": secret},
            stdout=open(self.tmp / f"worker-{index}.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=testprocs.die_with_test)
        self.workers[index] = proc
        return proc

    def status(self) -> dict:
        return self.client.get("/admin/status").json()

    def wait(self, predicate, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            assert self.coordinator.poll() is None, (self.tmp / "coordinator.log").read_text()[-3000:]
            try:
                last = self.status()
                if predicate(last):
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}; last status {last}; coordinator log:\n"
                             + (self.tmp / "coordinator.log").read_text()[-3000:])

    def complete(self) -> str:
        r = self.client.post("/v1/completions", json={"model": "m", "prompt": "hello", "max_tokens": 4,
                                                      "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def close(self) -> None:
        self.client.close()
        procs = [self.coordinator, *self.workers.values()]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT if p is self.coordinator else signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture
def cluster_factory(tmp_path):
    made: list[Cluster] = []

    def make(model, devices: int, **kw) -> Cluster:
        c = Cluster(model, tmp_path, devices, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_workers_register_scale_up_and_down_and_leave(tiny_models, cluster_factory):
    c = cluster_factory(tiny_models["qwen3_moe"], devices=2)
    intruder = c.start_worker(5, secret="wrong-secret")  # must never be registered
    for i in range(3):  # one more than the start needs, as the operator creates pods ahead of a scale
        c.start_worker(i)
    status = c.wait(lambda s: s["phase"] == "Serving" and 2 in s["devices"]["registered"], 180,
                    "the instance to serve with a third worker registered")
    assert status["devices"]["active"] == 2 and status["devices"]["registered"] == [0, 1, 2]
    reference = c.complete()

    r = c.client.post("/admin/scale", json={"devices": 3, "reason": "test up", "wait": False})
    assert r.status_code == 202, r.text
    status = c.wait(lambda s: s["phase"] == "Serving" and s["devices"]["active"] == 3, 120, "3 active devices")
    assert status["lastScale"]["outcome"] == "Succeeded", status["lastScale"]
    assert c.complete() == reference

    r = c.client.post("/admin/scale", json={"devices": 1, "reason": "test down"})
    assert r.status_code == 202, r.text
    status = c.wait(lambda s: s["phase"] == "Serving" and s["devices"]["active"] == 1, 120, "1 active device")
    assert status["devices"]["registered"] == [0]
    # the released workers exit on their own; the operator only deletes their pods
    for i in (1, 2):
        c.workers[i].wait(timeout=30)
    assert c.workers[0].poll() is None
    assert intruder.poll() is None and 5 not in c.status()["devices"]["registered"]
    assert "refused a peer without the worker secret" in (c.tmp / "coordinator.log").read_text()
    # released workers' last heartbeats do not count as deaths, after the heartbeat timeout either
    time.sleep(4)
    assert c.status()["phase"] == "Serving"
    assert c.complete() == reference


def test_a_silent_worker_is_declared_dead_and_the_instance_goes_on_without_it(tiny_models, cluster_factory):
    c = cluster_factory(tiny_models["qwen3_moe"], devices=2, heartbeat_timeout_s=2.0)
    for i in range(2):
        c.start_worker(i)
    c.wait(lambda s: s["phase"] == "Serving", 180, "the instance to serve")
    os.killpg(c.workers[1].pid, signal.SIGSTOP)  # alive but silent, like a partitioned pod
    try:
        def recovered(s):
            last = s.get("lastScale") or {}
            return s["phase"] == "Serving" and last.get("scaleId", "").startswith("recovery-")

        status = c.wait(recovered, 60, "the instance to recover without the silent worker")
        record = status["lastScale"]
        assert (record["from"], record["to"], record["outcome"]) == (2, 1, "Succeeded"), record
        assert "device 1" in record["reason"] and "heartbeats stopped" in record["reason"], record
        assert status["devices"]["active"] == 1 and c.client.get("/health").status_code == 200
        assert c.complete()  # the survivor serves (device 1's experts read from the checkpoint)
    finally:
        os.killpg(c.workers[1].pid, signal.SIGKILL)


@pytest.mark.slow  # the same adoption as test_coordinator_restart's (default suite), here with pods' workers
def test_a_restarted_coordinator_adopts_its_worker_pods_without_the_checkpoint(tiny_models, cluster_factory, tmp_path):
    """The coordinator's pod dies (SIGKILL) and restarts with the same command and Secret while
    the checkpoint is gone: the workers, which kept their memory, rejoin and are adopted; the
    instance serves the same output on the same worker processes."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_models["qwen3_moe"], model)
    c = cluster_factory(model, 2)
    for i in range(2):
        c.start_worker(i)
    c.wait(lambda s: s["phase"] == "Serving", 180, "the instance to serve")
    before = c.complete()
    model.rename(tmp_path / "moved-away")
    c.restart_coordinator()
    status = c.wait(lambda s: s["phase"] == "Serving", 120, "the restarted coordinator to serve")
    assert c.complete() == before
    record = status["lastScale"]
    assert record["scaleId"].startswith("restart-") and record["outcome"] == "Succeeded", record
    assert status["devices"]["active"] == 2 and all(w.poll() is None for w in c.workers.values())
    print(f"\ncoordinator pod restarted: adopted its 2 workers in {record['durationMs']} ms ({record['phasesMs']})")

"""The HBM manager (HMM): the long-lived process of one device.

It owns the device's memory (weights, expert pages, KV pool), loads it once, hands
zero-copy handles to the executors it starts as child processes, and outlives them: an
executor can be killed and restarted, or replaced by one for another configuration,
without the HMM reading the checkpoint again.

Talks to the coordinator over one ZeroMQ DEALER socket (typed messages, see `messages`).
Exits when the coordinator says so or dies (parent-death signal).
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import subprocess
import sys

import zmq

from elasticmoe_worker import backends
from elasticmoe_worker.instance import memory, messages, procutil

logger = logging.getLogger("elasticmoe.hmm")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class HMM:
    def __init__(self, device_index: int, coordinator: str, backend_name: str) -> None:
        self.device_index = device_index
        self.coordinator = coordinator
        self.backend_name = backend_name
        self.backend = backends.get_backend(backend_name)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"hmm-{device_index}".encode())
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.connect(coordinator)
        self.memory: memory.DeviceMemory | None = None
        self.plan: messages.LoadPlan | None = None
        self.config_json = ""
        self.tokenizer_files: dict[str, str] = {}
        self.executor: subprocess.Popen | None = None
        self.executor_rank = -1
        self.executor_config_id = 0
        self.stop = False

    def send(self, msg: messages.Msg) -> None:
        self.sock.send(messages.encode(msg))

    def load(self, plan: messages.LoadPlan) -> None:
        self.plan = plan
        model_dir = pathlib.Path(plan.model_dir)
        # Read the small text files once, now: executors get them from us, not from disk.
        self.config_json = (model_dir / "config.json").read_text()
        self.tokenizer_files = {n: (model_dir / n).read_text() for n in _TOKENIZER_FILES if (model_dir / n).is_file()}
        self.memory = memory.load_device(self.backend, self.device_index, plan)
        self.send(self.memory.ready)

    def start_executor(self, start: messages.StartExecutor) -> None:
        assert self.memory is not None and self.plan is not None, "StartExecutor before LoadPlan"
        self.stop_executor()
        spec = messages.ExecutorSpec(
            device_index=self.device_index, backend=self.backend_name, coordinator=self.coordinator,
            config_json=self.config_json, tokenizer_files=self.tokenizer_files,
            model_name=start.model_name, ready=self.memory.ready, start=start,
        )
        self.executor = subprocess.Popen([sys.executable, "-m", "elasticmoe_worker.instance.executor"],
                                         stdin=subprocess.PIPE)
        self.executor.stdin.write(messages.encode(spec))
        self.executor.stdin.close()
        self.executor_rank = start.rank
        self.executor_config_id = start.config_id
        logger.info("device %d: executor rank %d of %d started (pid %d, configuration %d)", self.device_index,
                    start.rank, start.world_size, self.executor.pid, start.config_id)

    def stop_executor(self, timeout_s: float = 10.0) -> None:
        if self.executor is None:
            return
        if self.executor.poll() is None:
            self.executor.terminate()
            try:
                self.executor.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.executor.kill()
                self.executor.wait()
        self.executor = None

    def _check_executor(self) -> None:
        if self.executor is not None and self.executor.poll() is not None:
            code = self.executor.returncode
            self.executor = None
            if not self.stop:
                self.send(messages.ExecutorFailed(rank=self.executor_rank, config_id=self.executor_config_id,
                                                  error=f"executor on device {self.device_index} exited with code {code}"))

    def run(self) -> None:
        self.send(messages.HMMHello(device_index=self.device_index, pid=os.getpid()))
        while not self.stop:
            if self.sock.poll(200):
                msg = messages.decode(self.sock.recv())
                try:
                    if isinstance(msg, messages.LoadPlan):
                        self.load(msg)
                    elif isinstance(msg, messages.StartExecutor):
                        self.start_executor(msg)
                    elif isinstance(msg, messages.Shutdown):
                        self.stop = True
                    else:
                        logger.warning("device %d: unexpected message %s", self.device_index, type(msg).__name__)
                except Exception as exc:
                    logger.exception("device %d: %s failed", self.device_index, type(msg).__name__)
                    self.send(messages.HMMFailed(device_index=self.device_index, error=f"{type(exc).__name__}: {exc}"))
            self._check_executor()

    def close(self) -> None:
        self.stop = True
        self.stop_executor()
        if self.memory is not None:
            self.memory.close()
        self.sock.close()
        self.ctx.term()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m elasticmoe_worker.instance.hmm",
                                description="The HBM manager of one device (started by a fleet, not by hand).")
    p.add_argument("--device-index", type=int, required=True)
    p.add_argument("--coordinator", required=True, help="the coordinator's ZeroMQ address")
    p.add_argument("--backend", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("ELASTICMOE_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    procutil.die_with_parent()
    procutil.raise_fd_limit()
    hmm = HMM(args.device_index, args.coordinator, args.backend)
    signal.signal(signal.SIGTERM, lambda *_: setattr(hmm, "stop", True))
    signal.signal(signal.SIGINT, lambda *_: setattr(hmm, "stop", True))  # the coordinator stops us
    try:
        hmm.run()
    finally:
        hmm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

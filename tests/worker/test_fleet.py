"""LocalFleet: stopping workers that never connected."""

from __future__ import annotations

import time

import testprocs
from elasticmoe_worker.instance import fleet, transport


def test_a_worker_still_starting_is_stopped_at_once_instead_of_waited_for():
    # Nothing listens at the coordinator address: the worker never connects, so no Shutdown can
    # reach it. Before, wait_stopped waited for it until the deadline (serve took 17 s to stop).
    f = fleet.LocalFleet(f"tcp://127.0.0.1:{testprocs.free_port()}", env={transport.SECRET_ENV: "test-secret"})
    try:
        f.add(0)
        proc = f.workers[0]
        time.sleep(0.5)
        start = time.monotonic()
        f.wait_stopped(start + 30.0)
        waited_s = time.monotonic() - start
        assert proc.poll() is not None, "the starting worker is still running after wait_stopped"
        assert waited_s < 15.0, f"waited {waited_s:.1f} s of a 30 s deadline for a worker that never connected"
    finally:
        f.close()

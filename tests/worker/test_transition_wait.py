"""The transition's wait on its transfers (instance/transition.wait_for), with real gloo send/recv:
gloo's `wait(timeout)` that times out fails the work, so a send slower than the poll interval
used to fail the whole scale (found by `bench scaling` under a CPU quota)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import testprocs
from elasticmoe_worker.instance import transition


def test_a_send_slower_than_the_poll_interval_completes():
    pg0, pg1 = testprocs.gloo_pair()
    data = torch.arange(8 << 20, dtype=torch.int64).to(torch.uint8)
    got = torch.zeros_like(data)

    def late_receiver():
        time.sleep(1.5)  # three poll intervals: the old wait failed the send here
        pg1.recv([got], 0, 7).wait()
    receiver = threading.Thread(target=late_receiver)
    receiver.start()
    started = time.monotonic()
    transition.wait_for([pg0.send([data], 1, 7)], transition.Cancel(), time.monotonic() + 60)
    receiver.join()
    assert time.monotonic() - started >= 1.4 and torch.equal(got, data)


def test_a_cancel_ends_the_wait_and_a_deadline_too():
    pg0, pg1 = testprocs.gloo_pair()
    cancel = transition.Cancel()
    threading.Timer(0.3, cancel.set, args=("the scale was aborted",)).start()
    with pytest.raises(transition.Cancelled, match="the scale was aborted"):
        transition.wait_for([pg0.recv([torch.zeros(4, dtype=torch.uint8)], 1, 1)], cancel, time.monotonic() + 60)
    with pytest.raises(TimeoutError, match="deadline"):
        transition.wait_for([pg1.recv([torch.zeros(4, dtype=torch.uint8)], 0, 2)], transition.Cancel(),
                            time.monotonic() + 0.6)
    # let the waiters' receives end: their peers send now
    pg1.send([torch.zeros(4, dtype=torch.uint8)], 0, 1).wait()
    pg0.send([torch.zeros(4, dtype=torch.uint8)], 1, 2).wait()

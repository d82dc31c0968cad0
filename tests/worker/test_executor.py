"""What an executor process tells the coordinator about a request it refuses: the kind of the
refusal and the field at fault travel typed, so the HTTP layer answers 400/429 exactly as it
does for an in-process engine (the end-to-end comparison is in test_api.py)."""

from __future__ import annotations

import pytest

from elasticmoe_worker.contract import wire
from elasticmoe_worker.engine import types
from elasticmoe_worker.instance import executor


@pytest.mark.parametrize("exc,kind,param", [
    (ValueError("prompt: token ids [99999999] outside the vocabulary [0, 2048)"), wire.ErrorKind.INVALID_REQUEST,
     "prompt"),
    (ValueError("max_tokens: prompt (9) + max_tokens (900) needs more KV blocks than the pool holds"),
     wire.ErrorKind.INVALID_REQUEST, "max_tokens"),
    (ValueError("no field named here"), wire.ErrorKind.INVALID_REQUEST, None),
    (types.EngineOverloaded("server busy: 4 requests already waiting (max_waiting=4)"), wire.ErrorKind.OVERLOADED,
     None),
])
def test_refusal_crosses_the_wire_typed(exc, kind, param):
    msg = wire.decode(wire.encode(executor._to_wire(types.refusal("r1", exc, num_prompt_tokens=3))))
    assert isinstance(msg, wire.Output)
    assert (msg.request_id, msg.finish_reason, msg.token_ids, msg.num_prompt_tokens) == ("r1", "error", [], 3)
    assert (msg.error, msg.error_kind, msg.error_param) == (str(exc), kind, param)


def test_engine_failure_stays_untyped():
    out = types.RequestOutput("r1", "", [], types.FinishReason.ERROR, error="RuntimeError: device lost")
    msg = wire.decode(wire.encode(executor._to_wire(out)))
    assert (msg.finish_reason, msg.error, msg.error_kind, msg.error_param) == (
        "error", "RuntimeError: device lost", None, None)


def test_the_start_log_gives_each_phase_wall_and_cpu_time():
    # wall far above CPU is a standby waiting (for the cores, its quota, or its group's slowest
    # rank), not working: what the scaling benchmark's per-phase profile rests on
    phases = {"setup": (0.014, 0.0004), "group": (0.110, 0.007), "warm-up": (0.111, 0.0144)}
    text = executor.Executor._phases_text(type("E", (), {"phases": phases})())
    assert text == "0.02 CPU-s; ms wall/CPU: setup 14/0, group 110/7, warm-up 111/14", text

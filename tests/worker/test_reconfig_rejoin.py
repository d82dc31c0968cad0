"""A restarted coordinator learns the configuration from the workers that rejoin
(`reconfig_rejoin`): it adopts them when what they hold agrees, waits while devices are missing,
and refuses, naming the devices and what disagrees, when it does not. Pure: literal messages."""

from __future__ import annotations


import msgspec
import pytest

import reconfigharness as rh
from elasticmoe_worker import hotcopies, planner
from elasticmoe_worker.contract import wire
from elasticmoe_worker.instance import reconfig_rejoin

CONFIG_JSON = '{"model_type": "qwen3_moe"}'


def rejoin(device: int, rank: int, world: int, experts: list[int], *, config_id: int = 3, last: int = 3,
           config_json: str = CONFIG_JSON, kv_blocks: int = 64) -> wire.HMMRejoin:
    ready = msgspec.structs.replace(rh.hmm_ready(device), num_kv_blocks=kv_blocks)
    return wire.HMMRejoin(device_index=device, pid=1000 + device, config_id=config_id, last_config_id=last, rank=rank,
                          world_size=world, expert_ids=experts, ready=ready, config_json=config_json,
                          tokenizer_files={"tokenizer.json": "{}"})


def whole(devices: list[int], num_experts: int = 8, copies: int = 1, **kw) -> dict[int, wire.HMMRejoin]:
    placement = planner.initial_placement(num_experts, devices, copies)
    return {d: rejoin(d, r, len(devices), list(placement.experts_on(d)), **kw) for r, d in enumerate(devices)}


@pytest.mark.parametrize("devices, copies", [([0, 1], 1), ([0, 1, 2], 2), ([0, 2], 1), ([1], 1), ([0, 1, 3], 2)])
def test_workers_that_agree_are_adopted_as_the_configuration_they_held(devices, copies):
    rejoins = whole(devices, copies=copies)
    assert reconfig_rejoin.missing(rejoins) is None
    a = reconfig_rejoin.adopt(rejoins, num_experts=8, expert_copies=copies, model_config_json=CONFIG_JSON)
    assert (a.config_id, a.devices) == (3, tuple(devices))
    assert a.placement == planner.initial_placement(8, devices, copies)
    assert set(a.hmm_ready) == set(devices) and a.config_json == CONFIG_JSON
    assert a.next_config_id == 4  # never an id a worker has seen: executor identities, rendezvous keys


def test_the_next_configuration_id_is_above_every_id_any_worker_saw():
    rejoins = whole([0, 1])
    rejoins[1] = msgspec.structs.replace(rejoins[1], last_config_id=9)
    assert reconfig_rejoin.adopt(rejoins, num_experts=8, expert_copies=1).next_config_id == 10


def test_a_configuration_with_devices_still_missing_is_waited_for_and_then_refused_naming_them():
    rejoins = whole([0, 1, 2])
    del rejoins[1]
    assert reconfig_rejoin.missing(rejoins) == "configuration 3 ran on 3 device(s); only device(s) [0, 2] rejoined"
    assert reconfig_rejoin.missing({}) == "no worker holding memory has rejoined"
    loading = {d: msgspec.structs.replace(r, config_id=0, last_config_id=0, rank=-1, world_size=0)
               for d, r in whole([0, 1]).items()}
    assert reconfig_rejoin.missing(loading).startswith("device(s) [0, 1] hold memory no configuration ever served")
    with pytest.raises(reconfig_rejoin.Refused, match=r"only device\(s\) \[0, 2\] rejoined"):
        reconfig_rejoin.adopt(rejoins, num_experts=8, expert_copies=1)


@pytest.mark.parametrize("change, message", [
    (lambda r: {**r, 1: msgspec.structs.replace(r[1], config_id=4, last_config_id=4)},
     r"different configurations \(device: configuration\): \{0: 3, 1: 4\}"),
    (lambda r: {**r, 1: msgspec.structs.replace(r[1], config_json='{"model_type": "mixtral"}')},
     "device 1 and device 0 disagree on the model config.json"),
    (lambda r: {**r, 1: msgspec.structs.replace(
        r[1], ready=msgspec.structs.replace(r[1].ready, num_kv_blocks=32))},
     r"device 1 and device 0 disagree on the KV blocks \(32 vs 64\)"),
    (lambda r: {**r, 1: msgspec.structs.replace(r[1], rank=0)},
     r"device 1: rank 0 of 2 in configuration 3; expected rank 1 of 2"),
    (lambda r: {**r, 1: msgspec.structs.replace(r[1], expert_ids=[4, 5, 6])},
     r"expert\(s\) \[7\] are held by no rejoined device"),
    (lambda r: {**r, 1: msgspec.structs.replace(r[1], expert_ids=[3, 4, 5, 6, 7])},
     r"hold 1 to 2 copies \(several: experts \[3\]\) of each expert; this coordinator's expert_copies=1 wants 1"),
    (lambda r: {**r, 1: msgspec.structs.replace(r[1], expert_ids=[4, 5, 6, 7, 7])},
     "no placement: homes"),
    (lambda r: {**r, 1: msgspec.structs.replace(r[1], expert_ids=[4, 5, 6, 7, 8])},
     r"expert id\(s\) \[8\] held, but the model has 8 routed experts"),
])
def test_workers_that_disagree_are_refused_saying_what_and_where(change, message):
    with pytest.raises(reconfig_rejoin.Refused, match=message):
        reconfig_rejoin.adopt(change(whole([0, 1])), num_experts=8, expert_copies=1)


def test_workers_of_another_model_or_another_copy_count_than_the_command_says_are_refused():
    with pytest.raises(reconfig_rejoin.Refused, match="another model than the checkpoint's config.json"):
        reconfig_rejoin.adopt(whole([0, 1]), num_experts=8, expert_copies=1, model_config_json='{"other": 1}')
    with pytest.raises(reconfig_rejoin.Refused, match="hold 1 copies of each expert; this coordinator's "
                                                      r"expert_copies=2 wants 2 on 2 device\(s\)"):
        reconfig_rejoin.adopt(whole([0, 1]), num_experts=8, expert_copies=2)


def _with_experts(rejoins: dict[int, wire.HMMRejoin]) -> dict[int, wire.HMMRejoin]:
    """Each device's HMMReady lists its expert regions: 100 + 50 B in each of 2 MoE layers (300 B an expert)."""
    def region(layer, e, size):
        return wire.MemoryHandle(backend="cpu", name=f"l{layer}.e{e}", size_bytes=size, owner_pid=1)
    return {d: msgspec.structs.replace(r, ready=msgspec.structs.replace(r.ready, experts=[
        wire.ExpertRegion(layer, e, region(layer, e, 100), region(layer, e, 50))
        for layer in (1, 2) for e in r.expert_ids])) for d, r in rejoins.items()}


def test_with_a_budget_the_workers_may_hold_second_copies_of_some_experts_more_than_it_fits_is_said():
    """450 B per device on 2 devices fits the second copy of 3 experts of 300 B."""
    three = _with_experts(whole([0, 1], copies=hotcopies.hot_copies(8, 2, 3, [0, 0, 0, 0, 0, 9, 8, 7])))
    a = reconfig_rejoin.adopt(three, num_experts=8, expert_copies=2, redundant_budget_bytes=450)
    assert a.placement.redundant_experts == (5, 6, 7)  # the dead coordinator's choice stands
    none = _with_experts(whole([0, 1]))
    assert reconfig_rejoin.adopt(none, num_experts=8, expert_copies=2, redundant_budget_bytes=450).placement.uniform
    assert a.over_budget == ""
    four = _with_experts(whole([0, 1], copies=hotcopies.hot_copies(8, 2, 4)))
    over = reconfig_rejoin.adopt(four, num_experts=8, expert_copies=2, redundant_budget_bytes=450)
    assert over.placement.redundant_experts == (0, 1, 2, 3)  # held already: adopted, and said
    assert over.over_budget == "the rejoined workers hold 4 experts in 2 copies; this coordinator's budget of 450 B " \
                               "per device on 2 device(s) fits 3"
    with pytest.raises(reconfig_rejoin.Refused, match=r"hold 1 to 2 copies \(several: experts \[5, 6, 7\]\) of each "
                                                      r"expert; this coordinator's expert_copies=2 wants 2"):
        reconfig_rejoin.adopt(three, num_experts=8, expert_copies=2)  # no budget: every expert needs its copies
    triple = _with_experts(whole([0, 1, 2], copies=[3, 1, 1, 1, 1, 1, 1, 1]))
    with pytest.raises(reconfig_rejoin.Refused, match=r"hold experts \[0\] in neither 1 nor 2 copies"):
        reconfig_rejoin.adopt(triple, num_experts=8, expert_copies=2, redundant_budget_bytes=450)

"""Transport by locality (instance.peer_copy): which transfers copy through shared memory."""

from __future__ import annotations

from elasticmoe_worker.backends import cpu as cpu_backend
from elasticmoe_worker.contract import wire
from elasticmoe_worker.instance import peer_copy


def _t(src: int, dst: int) -> wire.Transfer:
    return wire.Transfer(kind="expert", src=src, dst=dst, expert_id=0)


def test_only_transfers_between_devices_with_the_same_key_are_local() -> None:
    transfers = [_t(0, 1), _t(0, 2), _t(2, 3), _t(1, 3), _t(3, 4)]
    keys = {0: "cpu/boot-a/net:[1]/uid0", 1: "cpu/boot-a/net:[1]/uid0", 2: "cpu/boot-b/net:[1]/uid0",
            3: "cpu/boot-b/net:[1]/uid0", 4: ""}
    assert peer_copy.local_transfers(transfers, keys) == {0, 2}
    # a device that publishes no key (no peer copies there) is never local, even with another such device
    assert peer_copy.local_transfers([_t(4, 5)], {4: "", 5: ""}) == set()


def test_the_key_names_backend_host_namespace_and_user(monkeypatch) -> None:
    key = peer_copy.locality_key(cpu_backend.CpuBackend())
    backend, boot, netns, uid = key.split("/")
    assert backend == "cpu" and len(boot) == 36 and netns.startswith("net:[") and uid.startswith("uid")
    monkeypatch.setenv(peer_copy.ENV, "0")
    assert peer_copy.locality_key(cpu_backend.CpuBackend()) == ""


def test_a_backend_that_cannot_copy_from_peers_is_never_local() -> None:
    class NoPeers(cpu_backend.CpuBackend):
        copies_from_peers = False

    assert peer_copy.locality_key(NoPeers()) == ""

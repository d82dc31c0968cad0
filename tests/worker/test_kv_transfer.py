"""The HMM's KV block mover (`instance.kv_transfer`) with real gloo send/recv between two pools
in shared memory: the blocks land where the plan says, in every layer's keys and values (MLA:
of different widths), in one round or many, and a copy that does not complete writes nothing
into the pool."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

import testprocs
from elasticmoe_worker import backends
from elasticmoe_worker.contract import wire
from elasticmoe_worker.instance import kv_transfer, memory, transition
from elasticmoe_worker.models import config as config_mod

NUM_BLOCKS, BLOCK_SIZE = 8, 4


def _pools(model_dir):
    config_json = (model_dir / "config.json").read_text()
    spec = config_mod.spec_from_json(config_json)
    layout, nbytes = memory.kv_layout(spec, NUM_BLOCKS, BLOCK_SIZE, torch.float32)
    cpu = backends.get_backend("cpu")
    regions = [cpu.allocate(nbytes, f"kv{d}") for d in (0, 1)]
    views = [kv_transfer.block_views(r, memory.kv_block_bytes(spec, BLOCK_SIZE, torch.float32), NUM_BLOCKS)
             for r in regions]
    # the HMM's byte views (no config parsed) are the executor's keys and values, view for view
    executor_side = [(k_off, k_shape, v_off, v_shape) for k_off, k_shape, v_off, v_shape in layout]
    for (k_off, k_shape, v_off, v_shape), k, v in zip(executor_side, views[0][0::2], views[0][1::2]):
        assert (k.data_ptr() - views[0][0].data_ptr(), v.data_ptr() - views[0][0].data_ptr()) == (k_off, v_off)
        assert k.numel() == torch.Size(k_shape).numel() * 4 and v.numel() == torch.Size(v_shape).numel() * 4
    g = torch.Generator().manual_seed(3)
    for v in views[1]:
        v.copy_(torch.randint(0, 256, v.shape, generator=g, dtype=torch.uint8))
    return regions, views


@pytest.mark.parametrize("chunk_bytes", [kv_transfer.CHUNK_BYTES, 1], ids=["one-round", "a-round-per-block"])
def test_blocks_land_at_their_new_ids_in_every_layer(tiny_models, chunk_bytes):
    regions, (dst, src) = _pools(tiny_models["deepseek_v2"])
    assert len({v.shape[1] for v in dst}) == 2, "keys and values of different widths"
    # two copies between one pair: their messages must not mix
    copies = [wire.KVCopy(src=1, dst=0, src_blocks=[2, 5, 6], dst_blocks=[0, 3, 7]),
              wire.KVCopy(src=1, dst=0, src_blocks=[1], dst_blocks=[4])]
    pgs, out = testprocs.gloo_pair(), {}

    def side(d):
        out[d] = kv_transfer.copy(pgs[d], {0: 0, 1: 1}, (dst, src)[d], copies, d, transition.Cancel(),
                                  time.monotonic() + 30, chunk_bytes)
    threads = [threading.Thread(target=side, args=(d,)) for d in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    block_bytes = sum(v.shape[1] for v in dst)
    assert out == {0: (0, 4 * block_bytes), 1: (4 * block_bytes, 0)}
    for d, s in zip(dst, src):
        assert torch.equal(d[[0, 3, 7, 4]], s[[2, 5, 6, 1]])
        assert not d[[1, 2, 5, 6]].any(), "no other block written"
    for r in regions:
        r.close()


def test_a_local_copy_through_the_hmms_inboxes_brings_the_pools_fd_with_its_handle(tiny_models, monkeypatch):
    """Devices of one host: the source sends its pool's handle with its fd into the destination's
    inbox, which maps the pool without asking the source's fd server, copies the blocks, and both
    wait for each other before the grant is revoked."""
    from elasticmoe_worker.backends import fdpass
    from elasticmoe_worker.instance import mailbox, peer_copy

    regions, (dst, src) = _pools(tiny_models["deepseek_v2"])
    cpu = backends.get_backend("cpu")
    asked = []
    real_request = fdpass._request
    monkeypatch.setattr(fdpass, "_request", lambda handles: asked.append(handles) or real_request(handles))
    spec = config_mod.spec_from_json((tiny_models["deepseek_v2"] / "config.json").read_text())
    msg = wire.MoveKV(config_id=9, group_ranks=[0, 1], rank=0, copies=[
        wire.KVCopy(src=1, dst=0, src_blocks=[2, 5, 6], dst_blocks=[0, 3, 7])],
        view_block_bytes=memory.kv_block_bytes(spec, BLOCK_SIZE, torch.float32), timeout_s=30.0)
    own = mailbox.server().name
    box = mailbox.box_id("secret", 9, "kv")
    out = {}

    def side(d):
        peers = peer_copy.MailboxPeers(box, d, {0: own, 1: own}, 10.0, lambda: None)
        out[d] = kv_transfer.copy_local(cpu, peers, regions[d], NUM_BLOCKS, msg, [0], d, transition.Cancel(),
                                        time.monotonic() + 30)
    threads = [threading.Thread(target=side, args=(d,)) for d in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    block_bytes = sum(v.shape[1] for v in dst)
    assert out == {0: (0, 3 * block_bytes), 1: (3 * block_bytes, 0)}
    for d, s in zip(dst, src):
        assert torch.equal(d[[0, 3, 7]], s[[2, 5, 6]])
        assert not d[[1, 2, 4, 5, 6]].any(), "no other block written"
    assert asked == [], "the fd came with the handle"
    for r in regions:
        r.close()


def test_a_copy_that_never_completes_writes_nothing(tiny_models):
    regions, (dst, _) = _pools(tiny_models["deepseek_v2"])
    copies = [wire.KVCopy(src=1, dst=0, src_blocks=[2], dst_blocks=[0])]
    pg0, pg1 = testprocs.gloo_pair()
    cancel = transition.Cancel()
    threading.Timer(0.3, cancel.set, args=("the peer died",)).start()
    with pytest.raises(transition.Cancelled, match="the peer died"):
        kv_transfer.copy(pg0, {0: 0, 1: 1}, dst, copies, 0, cancel, time.monotonic() + 30)
    assert not any(v.any() for v in dst)
    pg1.send([torch.ones(sum(v.shape[1] for v in dst), dtype=torch.uint8)], 0, 0).wait()  # its receive ends late
    time.sleep(0.1)
    assert not any(v.any() for v in dst), "a late arrival lands in the staging buffer, never in the pool"
    for r in regions:
        r.close()


def test_the_hmm_maps_a_pool_without_importing_transformers():
    # An HMM that got its weights from peers never parsed the model's config; importing
    # `transformers` to do so took 3.7-4.8 s on a 0.225-core device, inside a switch's pause.
    code = ("import sys\nfrom elasticmoe_worker.instance import hmm\nfrom elasticmoe_worker import backends\n"
            "kv = backends.get_backend('cpu').allocate(4096, 'kv')\n"
            "views = hmm.kv_transfer.block_views(kv, [64, 32, 64, 32], 8)\n"
            "assert [tuple(v.shape) for v in views] == [(8, 64), (8, 32), (8, 64), (8, 32)]\n"
            "print('transformers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr[-2000:]

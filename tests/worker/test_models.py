"""Loading checkpoints: clear errors, sharded layouts, and per-device expert subsets."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from elasticmoe_worker import modelgen
from elasticmoe_worker.models import config as config_mod
from elasticmoe_worker.models import registry, weights


def test_unsupported_model_type_is_named(tmp_path, tiny_models):
    shutil.copytree(tiny_models["mixtral"], tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "llama4_text"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(config_mod.UnsupportedModelError, match="'llama4_text'.*qwen3_moe, deepseek_v2, mixtral"):
        registry.load_model(tmp_path / "m")


def test_missing_tensor_is_named(tmp_path, tiny_models):
    shutil.copytree(tiny_models["qwen3_moe"], tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, str(path))
    with pytest.raises(weights.MissingTensorError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight"):
        registry.load_model(tmp_path / "m")


def test_missing_config_and_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        registry.load_model(tmp_path)


def test_sharded_checkpoint_loads_the_same_weights(tmp_path, tiny_models):
    sharded = modelgen.make_model("deepseek_v2", "tiny", tmp_path / "s", max_shard_bytes=300_000, progress=False)
    assert (sharded / "model.safetensors.index.json").is_file()
    a, _ = registry.load_model(sharded)
    b, _ = registry.load_model(tiny_models["deepseek_v2"])
    assert torch.equal(a.layers[2].mlp.w13, b.layers[2].mlp.w13)
    assert torch.equal(a.lm_head, b.lm_head)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "mixtral"])
def test_a_device_reads_only_its_experts(tiny_models, family):
    full, ck_full = registry.load_model(tiny_models[family])
    part, ck_part = registry.load_model(tiny_models[family], expert_ids=[1, 6])
    spec = full.spec
    block_full, block_part = full.moe_blocks()[0], part.moe_blocks()[0]
    assert block_part.w13.shape[0] == 2
    assert torch.equal(block_part.w13[1], block_full.w13[6])
    per_expert = block_full.w13[0].numel() * 4 + block_full.w2[0].numel() * 4
    saved = ck_full.bytes_read - ck_part.bytes_read
    assert saved == per_expert * (spec.num_experts - 2) * spec.num_moe_layers


def test_bad_expert_ids_and_dtype_are_named(tiny_models):
    with pytest.raises(ValueError, match="expert_ids"):
        registry.load_model(tiny_models["mixtral"], expert_ids=[99])
    with pytest.raises(ValueError, match="dtype: got 'int8'"):
        registry.load_model(tiny_models["mixtral"], dtype="int8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_one_matmul_per_expert(dtype, monkeypatch):
    """The grouped matmul over sorted segments computes what one matmul per expert computes,
    including experts held elsewhere (left at 0) and experts no token chose."""
    from elasticmoe_worker.models import layers

    gen = torch.Generator().manual_seed(0)
    tokens, hidden, inter, k = 37, 64, 96, 2
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = torch.randn(8, 2 * inter, hidden, generator=gen).to(dtype)
    w2 = torch.randn(8, hidden, inter, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(16, generator=gen)[:k] for _ in range(tokens)])
    weights_ = torch.rand(tokens, k, generator=gen)
    held = torch.full((16,), -1)
    held[torch.tensor([1, 3, 4, 7, 9, 11, 12, 15])] = torch.arange(8)
    assert layers.grouped_mm_supported(x.device, dtype), "torch 2.13 runs _grouped_mm on CPU"
    grouped = layers.expert_mlp(x, w13, w2, ids, weights_, held)
    monkeypatch.setitem(layers._GROUPED_MM, (x.device.type, dtype), False)
    looped = layers.expert_mlp(x, w13, w2, ids, weights_, held)
    assert torch.equal(grouped, looped)
    assert grouped.abs().sum() > 0 and torch.count_nonzero(grouped.abs().sum(-1)) < tokens, "some tokens chose "\
        "only experts held elsewhere: their rows stay 0"


def test_expert_shapes_grouped_mm_cannot_lay_out_take_the_loop():
    """torch._grouped_mm needs every operand row a multiple of 16 bytes; an intermediate width
    of 6 float32 (24 bytes) used to fail inside it instead of falling back."""
    from elasticmoe_worker.models import layers

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 8, generator=gen)
    w13, w2 = torch.randn(3, 12, 8, generator=gen), torch.randn(3, 8, 6, generator=gen)
    ids, weights_ = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0]]), torch.rand(5, 2, generator=gen)
    assert not layers.grouped_mm_fits(w13, w2) and layers.grouped_mm_fits(torch.empty(3, 16, 8), torch.empty(3, 8, 8))
    expected = torch.zeros(5, 8)
    for t in range(5):
        for j in sorted(range(2), key=lambda j: int(ids[t, j])):
            e = int(ids[t, j])
            gate, up = (w13[e] @ x[t]).chunk(2)
            expected[t] += weights_[t, j] * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(layers.expert_mlp(x, w13, w2, ids, weights_), expected)


def test_decode_attention_in_length_groups_equals_attention_per_sequence():
    """Decoding sequences of very different context lengths are attended in groups of similar
    length, keys and values gathered a block at a time; each gets what attention over its own
    context alone gives."""
    import torch.nn.functional as F

    from elasticmoe_worker.engine import runner
    from elasticmoe_worker.models import layers

    gen = torch.Generator().manual_seed(1)
    bs, heads, kv_heads, dim, num_blocks = 4, 4, 2, 8, 64
    k_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=gen)
    v_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=gen)
    lengths = [3, 17, 18, 40, 130, 5]  # context after this step's token
    free = torch.randperm(num_blocks, generator=gen).tolist()
    work = []
    for n in lengths:
        table = [free.pop() for _ in range(-(-n // bs))]
        work.append(runner.SeqWork(token_ids=[7], start_pos=n - 1, block_table=table, sample=True))
    _, meta = runner.build_metadata(work, bs, torch.device("cpu"))
    assert [len(g.token_idx) for g in meta.decodes] == [2, 3, 1], "blocks 1, 2 | 5, 5, 10 | 33: a group ends before twice its first length"
    q = torch.randn(len(lengths), heads, dim, generator=gen)
    k_new = torch.randn(len(lengths), kv_heads, dim, generator=gen)
    v_new = torch.randn(len(lengths), kv_heads, dim, generator=gen)
    out = layers.paged_attention(q, k_new, v_new, k_cache, v_cache, meta, scale=dim ** -0.5)
    for i, (w, n) in enumerate(zip(work, lengths)):
        pos = torch.arange(n)
        slots = torch.tensor(w.block_table)[pos // bs] * bs + pos % bs
        kk = k_cache.view(-1, kv_heads, dim)[slots].transpose(0, 1)  # [Hkv, n, D], the new key written
        vv = v_cache.view(-1, kv_heads, dim)[slots].transpose(0, 1)
        assert torch.equal(kk[:, -1], k_new[i])
        ref = F.scaled_dot_product_attention(q[i][:, None], kk, vv, scale=dim ** -0.5, enable_gqa=True)[:, 0]
        torch.testing.assert_close(out[i], ref)


@pytest.mark.parametrize("rows", [1, 16, 64, 65, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_computes_what_f_linear_computes_weight_first_only_for_few_float32_rows(rows, dtype):
    from elasticmoe_worker.models import layers

    gen = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 96, generator=gen).to(dtype), torch.randn(160, 96, generator=gen).to(dtype)
    out = layers.linear(x, w)
    assert out.shape == (rows, 160) and out.is_contiguous() and out.dtype == dtype
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w))
    assert layers.weight_first(x) == (dtype == torch.float32 and rows <= layers.WEIGHT_FIRST_MAX_ROWS)
    assert layers.native_gemv(x) == (dtype == torch.bfloat16 and rows == 1)
    assert torch._C._get_mkldnn_enabled(), "oneDNN is switched back on after a one-row bfloat16 product"


def test_a_failing_one_row_bfloat16_product_still_switches_onednn_back_on():
    from elasticmoe_worker.models import layers

    x, w = torch.ones(1, 8, dtype=torch.bfloat16), torch.ones(4, 9, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        layers.linear(x, w)
    assert torch._C._get_mkldnn_enabled()


def test_one_bfloat16_token_takes_the_expert_loop_and_computes_what_the_grouped_matmul_does(monkeypatch):
    from elasticmoe_worker.models import layers

    gen = torch.Generator().manual_seed(4)
    hidden, inter, k = 64, 96, 2
    x = torch.randn(1, hidden, generator=gen).bfloat16()
    w13 = torch.randn(8, 2 * inter, hidden, generator=gen).bfloat16()
    w2 = torch.randn(8, hidden, inter, generator=gen).bfloat16()
    ids, weights_ = torch.tensor([[5, 2]]), torch.rand(1, k, generator=gen).bfloat16()
    grouped_calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: grouped_calls.append(1) or real(*a, **kw))
    looped = layers.expert_mlp(x, w13, w2, ids, weights_)
    assert grouped_calls == []
    monkeypatch.setattr(layers, "native_gemv", lambda x: False)
    grouped = layers.expert_mlp(x, w13, w2, ids, weights_)
    assert len(grouped_calls) == 2
    torch.testing.assert_close(looped, grouped)


def test_experts_weight_first_compute_what_the_grouped_matmul_computes(monkeypatch):
    """A float32 decode step's few token copies go through one weight-first product per expert;
    the grouped matmul (what more rows take) gives the same result."""
    from elasticmoe_worker.models import layers

    gen = torch.Generator().manual_seed(3)
    tokens, hidden, inter, k = 16, 64, 96, 4
    x = torch.randn(tokens, hidden, generator=gen)
    w13, w2 = torch.randn(8, 2 * inter, hidden, generator=gen), torch.randn(8, hidden, inter, generator=gen)
    ids = torch.stack([torch.randperm(8, generator=gen)[:k] for _ in range(tokens)])
    weights_ = torch.rand(tokens, k, generator=gen)
    assert layers.weight_first(x[: tokens * k])
    first = layers.expert_mlp(x, w13, w2, ids, weights_)
    monkeypatch.setattr(layers, "WEIGHT_FIRST_MAX_ROWS", 0)
    grouped = layers.expert_mlp(x, w13, w2, ids, weights_)
    # float32 rounding of sums of ~100 products of size ~1e2: equal to ~1e-6 of the largest value
    torch.testing.assert_close(first, grouped, rtol=1e-5, atol=2e-6 * float(grouped.abs().max()))


def test_kv_gathers_reuse_their_slot_and_equal_a_fresh_gather(monkeypatch):
    from elasticmoe_worker.models import layers as L

    cache = torch.randn(10, 4, 2, 3)
    blocks = torch.tensor([[3, 1, 7], [0, 9, 9]])
    with torch.inference_mode():
        a = L._gather_blocks(cache, blocks, "k").clone()
        first = L._workspace.buffers["k"].data_ptr()
        b = L._gather_blocks(cache, blocks[:1, :2], "k")
        assert L._workspace.buffers["k"].data_ptr() == first, "a smaller gather reuses the slot's buffer"
    torch.testing.assert_close(a, cache[blocks])
    torch.testing.assert_close(b, cache[blocks[:1, :2]])
    # outside inference mode an inference buffer cannot be written: a new one is made
    with torch.no_grad():
        torch.testing.assert_close(L._gather_blocks(cache, blocks, "k"), cache[blocks])
    monkeypatch.setattr(L, "GATHER_WORKSPACE_MAX_BYTES", 16)
    big = L._gather_blocks(cache, blocks, "v")
    assert "v" not in L._workspace.buffers or L._workspace.buffers["v"].data_ptr() != big.data_ptr()
    torch.testing.assert_close(big, cache[blocks])

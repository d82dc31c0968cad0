"""Tests for `elasticmoe_worker.modelgen`: checkpoints that `transformers` loads as hub models."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from elasticmoe_worker import modelgen

transformers = pytest.importorskip("transformers")

TEXT = "héllo wörld ✓\n\tdef f(x):  return x ** 2  # 日本語"


def _tensors(model_dir: pathlib.Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _load(model_dir: pathlib.Path, dtype=torch.float32):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, output_loading_info=True)
    return model.eval(), info


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: modelgen.make_model(f, "tiny", root / f, progress=False) for f in modelgen.FAMILIES}


@pytest.mark.parametrize("family", modelgen.FAMILIES)
def test_tiny_loads_in_transformers_with_no_missing_keys(tiny_dirs, family):
    model_dir = tiny_dirs[family]
    model, info = _load(model_dir)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert info["mismatched_keys"] == set(), info
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == family
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert config["vocab_size"] == len(tokenizer) == model.config.vocab_size

    input_ids = tokenizer("def main():\n    return the quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids, output_router_logits=True)
    logits = out.logits[0]
    assert logits.shape == (input_ids.shape[1], config["vocab_size"])
    assert torch.isfinite(logits).all()
    # Peaked next-token distribution: greedy comparisons must not hinge on float rounding.
    top2 = logits.topk(2, dim=-1).values
    relative_gap = (top2[:, 0] - top2[:, 1]) / top2[:, 0].abs()
    assert relative_gap.median() > 1e-3, relative_gap
    # Routers are neither uniform nor one-hot.
    num_experts = out.router_logits[0].shape[-1]
    for router_logits in out.router_logits:
        max_prob = router_logits.softmax(-1).max(-1).values
        assert 1.5 / num_experts < max_prob.mean() < 0.99, max_prob


@pytest.mark.parametrize("family", modelgen.FAMILIES)
def test_tiny_tokenizer_round_trips_text_and_applies_chat_template(tiny_dirs, family):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dirs[family])
    ids = tokenizer(TEXT)["input_ids"]
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 0
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi ✓"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi ✓<|im_end|>\n"
                      "<|im_start|>assistant\n")
    ids = tokenizer(prompt)["input_ids"]
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 3  # special tokens are single ids, never split
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")
    config = json.loads((tiny_dirs[family] / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 2048


def test_tiny_is_small_on_disk_and_matches_estimate(tiny_dirs):
    for family, model_dir in tiny_dirs.items():
        disk_bytes = sum(p.stat().st_size for p in model_dir.iterdir())
        assert disk_bytes < 50 * 2**20, (family, disk_bytes)
        config = json.loads((model_dir / "config.json").read_text())
        tensors = _tensors(model_dir)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == \
            modelgen.estimate_weight_bytes(config)
        assert sorted(p.name for p in model_dir.iterdir()) == [
            "config.json", "generation_config.json", "model.safetensors",
            "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("family", modelgen.FAMILIES)
def test_bench_estimate_is_between_one_and_two_gigabytes(family):
    config = modelgen.preset_config(family, "bench")
    assert config["torch_dtype"] == "bfloat16"
    assert 1.0e9 <= modelgen.estimate_weight_bytes(config) <= 2.0e9


@pytest.mark.parametrize("family", modelgen.FAMILIES)
def test_small_estimate_is_between_30_and_150_megabytes(family):
    assert 30e6 <= modelgen.estimate_weight_bytes(modelgen.preset_config(family, "small")) <= 150e6


def test_hub_tensor_names():
    names = {f: [s.name for s in modelgen._tensor_specs(modelgen.preset_config(f, p))]
             for f, p in [("qwen3_moe", "tiny"), ("deepseek_v2", "tiny"), ("mixtral", "tiny")]}
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names["qwen3_moe"]
    assert "model.layers.0.self_attn.q_norm.weight" in names["qwen3_moe"]
    assert "model.layers.1.block_sparse_moe.experts.7.w2.weight" in names["mixtral"]
    assert "model.layers.0.mlp.gate_proj.weight" in names["deepseek_v2"]  # dense first layer
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in names["deepseek_v2"]
    assert "model.layers.1.self_attn.q_proj.weight" in names["deepseek_v2"]
    bench = [s.name for s in modelgen._tensor_specs(modelgen.preset_config("deepseek_v2", "bench"))]
    assert "model.layers.1.self_attn.q_a_layernorm.weight" in bench
    assert "model.layers.1.self_attn.q_proj.weight" not in bench


def test_sharded_checkpoint_has_index_and_loads(tmp_path, tiny_dirs):
    model_dir = modelgen.make_model("deepseek_v2", "tiny", tmp_path / "m", progress=False,
                                    max_shard_bytes=512 * 2**10)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = sorted(model_dir.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (model_dir / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    config = json.loads((model_dir / "config.json").read_text())
    assert index["metadata"]["total_size"] == modelgen.estimate_weight_bytes(config)
    model, info = _load(model_dir)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    # Sharding does not change values: every tensor has its own seed.
    unsharded = _tensors(tiny_dirs["deepseek_v2"])
    sharded = _tensors(model_dir)
    assert sharded.keys() == unsharded.keys() == index["weight_map"].keys()
    assert all(torch.equal(sharded[k], unsharded[k]) for k in sharded)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, tiny_dirs):
    again = modelgen.make_model("mixtral", "tiny", tmp_path / "again", seed=0, progress=False)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tiny_dirs["mixtral"] / name).read_bytes(), name
    other = _tensors(modelgen.make_model("mixtral", "tiny", tmp_path / "other", seed=1, progress=False))
    base = _tensors(again)
    for name, tensor in base.items():
        if name.endswith("norm.weight"):
            assert torch.equal(other[name], tensor)  # norms are constant
        else:
            assert not torch.equal(other[name], tensor), name


def test_bfloat16_model_is_float32_model_rounded(tmp_path, tiny_dirs):
    bf16_dir = modelgen.make_model("qwen3_moe", "tiny", tmp_path / "bf16", dtype="bfloat16",
                                   progress=False)
    config = json.loads((bf16_dir / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    fp32 = _tensors(tiny_dirs["qwen3_moe"])
    for name, tensor in _tensors(bf16_dir).items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, fp32[name].to(torch.bfloat16)), name


def test_overrides_change_config_shapes_and_tokenizer(tmp_path):
    overrides = {"num_hidden_layers": 1, "max_position_embeddings": 512, "vocab_size": 1024}
    model_dir = modelgen.make_model("qwen3_moe", "tiny", tmp_path / "m", progress=False,
                                    overrides=overrides)
    config = json.loads((model_dir / "config.json").read_text())
    assert {k: config[k] for k in overrides} == overrides
    tensors = _tensors(model_dir)
    assert tensors["model.embed_tokens.weight"].shape == (1024, 64)
    assert not any(k.startswith("model.layers.1.") for k in tensors)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == 1024 and tokenizer.model_max_length == 512


def test_dense_layers_follow_config():
    config = modelgen.preset_config("qwen3_moe", "tiny") | {"mlp_only_layers": [0]}
    names = {s.name for s in modelgen._tensor_specs(config)}
    assert "model.layers.0.mlp.up_proj.weight" in names
    assert "model.layers.0.mlp.gate.weight" not in names
    assert "model.layers.1.mlp.gate.weight" in names


@pytest.mark.parametrize(("family", "preset", "bad"), [
    ("llama", "tiny", "family='llama'"),
    ("mixtral", "huge", "preset='huge'"),
])
def test_unknown_family_or_preset_is_rejected_with_allowed_values(tmp_path, family, preset, bad):
    allowed = modelgen.FAMILIES if bad.startswith("family") else modelgen.PRESETS
    for call in (lambda: modelgen.preset_config(family, preset),
                 lambda: modelgen.make_model(family, preset, tmp_path / "m", progress=False)):
        with pytest.raises(ValueError) as excinfo:
            call()
        assert bad in str(excinfo.value)
        assert all(name in str(excinfo.value) for name in allowed)
    assert not (tmp_path / "m").exists()


def test_bad_dtype_and_vocab_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="dtype='int8'.*float32"):
        modelgen.make_model("mixtral", "tiny", tmp_path / "m", dtype="int8", progress=False)
    with pytest.raises(ValueError, match="vocab_size=100"):
        modelgen.build_tokenizer(100)
    with pytest.raises(ValueError, match="vocab_size=1000000 cannot be reached"):
        modelgen.build_tokenizer(1_000_000)


def test_build_tokenizer_is_deterministic_and_returns_independent_copies():
    first = modelgen.build_tokenizer(2048)
    first.add_tokens(["<extra>"])
    second = modelgen.build_tokenizer(2048)
    assert second.get_vocab_size() == 2048
    assert second.to_str() == modelgen.build_tokenizer(2048).to_str()


def test_existing_model_dir_is_replaced_atomically(tmp_path):
    out_dir = tmp_path / "m"
    modelgen.make_model("mixtral", "tiny", out_dir, seed=1, progress=False,
                        max_shard_bytes=512 * 2**10)
    assert (out_dir / "model.safetensors.index.json").exists()
    modelgen.make_model("mixtral", "tiny", out_dir, seed=2, progress=False)
    # No stale shards or index from the first model; no temporary directories left behind.
    assert sorted(p.name for p in out_dir.glob("model*")) == ["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    seed2 = modelgen.make_model("mixtral", "tiny", tmp_path / "seed2", seed=2, progress=False)
    assert (out_dir / "model.safetensors").read_bytes() == (seed2 / "model.safetensors").read_bytes()


def test_crash_while_writing_leaves_previous_model_intact(tmp_path, monkeypatch):
    out_dir = modelgen.make_model("mixtral", "tiny", tmp_path / "m", seed=1, progress=False)
    before = (out_dir / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(modelgen, "_write_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        modelgen.make_model("mixtral", "tiny", out_dir, seed=2, progress=False)
    with pytest.raises(OSError, match="disk full"):
        modelgen.make_model("mixtral", "tiny", tmp_path / "new", progress=False)
    assert (out_dir / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_directory_with_foreign_files_is_not_replaced(tmp_path):
    out_dir = tmp_path / "data"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        modelgen.make_model("mixtral", "tiny", out_dir, progress=False)
    assert (out_dir / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_progress_bar_reports_bytes(tmp_path, capsys):
    modelgen.make_model("mixtral", "tiny", tmp_path / "m", progress=True)
    err = capsys.readouterr().err
    assert "mixtral/tiny" in err and "100%" in err
    modelgen.make_model("mixtral", "tiny", tmp_path / "q", progress=False)
    assert capsys.readouterr().err == ""

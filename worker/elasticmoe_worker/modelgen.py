"""Write random-initialised MoE checkpoints in exact Hugging Face hub layout, offline.

Why this exists: tests, benchmarks and the embedded default model need real checkpoints of
each supported family (Qwen3-MoE, DeepSeek-V2, Mixtral) without network access. This module
writes them from a seed: ``config.json`` and ``generation_config.json`` shaped like the real
hub configs, weights under the hub's tensor names (per-expert tensors, as on the hub; the
``transformers`` loader fuses them on load), and a byte-level BPE tokenizer trained locally.

Presets (``vocab_size`` is also the tokenizer's real vocabulary size)::

    preset dtype     vocab hidden layers heads/kv  experts, top-k (qwen3 / dsv2 / mixtral)
    tiny   float32    2048     64  2 (*)      4/2  8, 2
    small  float32    8192    256      4      8/4  16, 4 / 16, 4 / 16, 2
    bench  bfloat16  16384   1024      8     16/4  64, 8 / 64 + 2 shared, 6 / 32, 2

    params, weight bytes   qwen3_moe        deepseek_v2      mixtral
    tiny                   0.51 M, 2.0 MB   0.56 M, 2.2 MB   0.48 M, 1.9 MB
    small                  18.4 M, 73 MB    16.5 M, 66 MB    17.6 M, 70 MB
    bench                  680 M, 1.36 GB   565 M, 1.13 GB   659 M, 1.32 GB

    (*) deepseek_v2 tiny has 3 layers: layer 0 is dense, so two MoE layers follow it.

Family details: Qwen3-MoE uses ``head_dim`` wider than ``hidden/heads`` (as Qwen3-30B-A3B
does). DeepSeek-V2 uses MLA with layer 0 dense (``first_k_dense_replace`` 1) and shared
experts; tiny and small have no ``q_lora_rank`` (``q_proj``, as DeepSeek-V2-Lite), bench has
one (``q_a_proj``/``q_b_proj``); tiny routes ``greedy``, small and bench
``group_limited_greedy``. No preset sets rope scaling. Checkpoints with more than
``max_shard_bytes`` of weights are sharded with a ``model.safetensors.index.json``.

Initialisation is deliberately not the training init (std 0.02): every projection gets
std ``1/sqrt(fan_in)`` (output projections half that), embeddings std 1, norms 1, and
``lm_head`` is scaled so logits spread over several units. Every sub-layer then moves the
residual stream by O(1), so a bug in attention or routing changes greedy tokens, and the
next-token and router distributions are peaked, so float rounding rarely flips an argmax.

Not guaranteed: the tokenizer corpus is the source of a fixed list of standard-library
modules (missing ones are skipped), so tokenizers (and thus token ids) may differ between
Python versions or installations; the vocabulary size does not. ``make_model`` replaces an
existing ``out_dir`` only if it is empty or holds nothing but checkpoint files (a model
written earlier); anything else raises ``FileExistsError``. Concurrent writers to one
``out_dir`` are not supported.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import shutil
import struct
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import tqdm

if TYPE_CHECKING:
    import tokenizers

logger = logging.getLogger(__name__)

FAMILIES = ("qwen3_moe", "deepseek_v2", "mixtral")
PRESETS = ("tiny", "small", "bench")

EOS_TOKEN = "<|endoftext|>"  # also bos and pad
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)  # ids 0, 1, 2 in this order
EOS_TOKEN_ID = 0

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

DEFAULT_MAX_SHARD_BYTES = 512 * 2**20

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

# Single-file standard-library modules present in every Python from 3.10 on; sorted so the
# corpus (and thus the BPE merges) is deterministic for a given Python version.
_CORPUS_MODULES = tuple(sorted((
    "_pydecimal", "_pyio", "argparse", "ast", "calendar", "codecs", "configparser",
    "dataclasses", "datetime", "difflib", "doctest", "enum", "fractions", "ftplib",
    "functools", "gettext", "heapq", "inspect", "ipaddress", "locale", "mailbox", "optparse",
    "pdb", "pickle", "pickletools", "platform", "pprint", "pydoc", "random", "shutil",
    "smtplib", "socket", "ssl", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "tokenize", "traceback", "turtle", "typing",
    "uuid", "warnings",
)))

# Files a checkpoint directory written here may hold; a directory holding anything else
# is never replaced.
_CHECKPOINT_FILE_RE = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map)\.json"
    r"|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
)

# Per-preset dimensions shared by the families; family builders below add their own keys.
_DIMS = {
    "tiny": dict(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_experts=8, moe_intermediate_size=64,
                 intermediate_size=128, max_position_embeddings=2048, dtype="float32"),
    "small": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, num_experts=16, moe_intermediate_size=256,
                  intermediate_size=768, max_position_embeddings=4096, dtype="float32"),
    "bench": dict(vocab_size=16384, hidden_size=1024, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, num_experts=64,
                  moe_intermediate_size=384, intermediate_size=2816,
                  max_position_embeddings=8192, dtype="bfloat16"),
}


def _common_config(d: dict, architecture: str, model_type: str) -> dict:
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": d["vocab_size"],
        "hidden_size": d["hidden_size"],
        "num_hidden_layers": d["num_hidden_layers"],
        "num_attention_heads": d["num_attention_heads"],
        "num_key_value_heads": d["num_key_value_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": d["max_position_embeddings"],
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "attention_dropout": 0.0,
        "use_cache": True,
        "tie_word_embeddings": False,
        "bos_token_id": EOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": EOS_TOKEN_ID,
        "torch_dtype": d["dtype"],
        "dtype": d["dtype"],
    }


def _qwen3_moe_config(preset: str, d: dict) -> dict:
    return _common_config(d, "Qwen3MoeForCausalLM", "qwen3_moe") | {
        # Like Qwen3-30B-A3B: attention width (heads * head_dim) is twice hidden_size.
        "head_dim": 2 * d["hidden_size"] // d["num_attention_heads"],
        "attention_bias": False,
        "num_experts": d["num_experts"],
        "num_experts_per_tok": {"tiny": 2, "small": 4, "bench": 8}[preset],
        "moe_intermediate_size": d["moe_intermediate_size"],
        "intermediate_size": d["intermediate_size"],
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": d["num_hidden_layers"],
    }


def _deepseek_v2_config(preset: str, d: dict) -> dict:
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    config = _common_config(d, "DeepseekV2ForCausalLM", "deepseek_v2") | {
        # MLA: every head has its own key/value, expanded from one shared latent.
        "num_key_value_heads": heads,
        "attention_bias": False,
        "q_lora_rank": None,
        "kv_lora_rank": hidden // 2,
        "qk_nope_head_dim": hidden // heads,
        "qk_rope_head_dim": hidden // heads // 2,
        "v_head_dim": hidden // heads,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "intermediate_size": d["intermediate_size"],
        "moe_intermediate_size": d["moe_intermediate_size"],
        "n_routed_experts": d["num_experts"],
        "n_shared_experts": 1,
        "num_experts_per_tok": {"tiny": 2, "small": 4, "bench": 6}[preset],
        "scoring_func": "softmax",
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": False,
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "pretraining_tp": 1,
        "rope_theta": 10000.0,
    }
    if preset == "tiny":
        config["num_hidden_layers"] = 3  # one dense layer, then two MoE layers
    if preset in ("small", "bench"):
        config |= {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                   "n_shared_experts": 2, "routed_scaling_factor": 2.0}
    if preset == "bench":
        config |= {"q_lora_rank": 384, "kv_lora_rank": 256, "n_group": 8, "topk_group": 3,
                   "moe_intermediate_size": 352}
    return config


def _mixtral_config(preset: str, d: dict) -> dict:
    return _common_config(d, "MixtralForCausalLM", "mixtral") | {
        "num_local_experts": {"tiny": 8, "small": 16, "bench": 32}[preset],
        "num_experts_per_tok": 2,
        # Mixtral's intermediate_size is the size of each expert's FFN.
        "intermediate_size": {"tiny": 64, "small": 256, "bench": 768}[preset],
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "output_router_logits": False,
        "sliding_window": None,
    }


_FAMILY_BUILDERS = {
    "qwen3_moe": _qwen3_moe_config,
    "deepseek_v2": _deepseek_v2_config,
    "mixtral": _mixtral_config,
}


def preset_config(family: str, preset: str) -> dict:
    """The ``config.json`` dict of one family at one preset (a fresh copy each call)."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not supported; expected one of {FAMILIES}")
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not supported; expected one of {PRESETS}")
    return _FAMILY_BUILDERS[family](preset, copy.deepcopy(_DIMS[preset]))


# --- tensor plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    shape: tuple[int, ...]
    std: float | None  # None: constant 1.0 (norm weights)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _linear(name: str, out_features: int, in_features: int, gain: float = 1.0) -> _TensorSpec:
    return _TensorSpec(name, (out_features, in_features), gain / math.sqrt(in_features))


def _mlp(prefix: str, hidden: int, inter: int, names=("gate_proj", "up_proj", "down_proj")):
    gate, up, down = names
    yield _linear(f"{prefix}.{gate}.weight", inter, hidden)
    yield _linear(f"{prefix}.{up}.weight", inter, hidden)
    yield _linear(f"{prefix}.{down}.weight", hidden, inter, gain=0.5)


def _norm(name: str, size: int) -> _TensorSpec:
    return _TensorSpec(name, (size,), None)


def _attention(config: dict, p: str) -> Iterator[_TensorSpec]:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if config["model_type"] == "deepseek_v2":
        q_lora, kv_lora = config["q_lora_rank"], config["kv_lora_rank"]
        rope, nope, v = config["qk_rope_head_dim"], config["qk_nope_head_dim"], config["v_head_dim"]
        if q_lora is None:
            yield _linear(f"{p}.q_proj.weight", heads * (nope + rope), hidden)
        else:
            yield _linear(f"{p}.q_a_proj.weight", q_lora, hidden)
            yield _norm(f"{p}.q_a_layernorm.weight", q_lora)
            yield _linear(f"{p}.q_b_proj.weight", heads * (nope + rope), q_lora)
        yield _linear(f"{p}.kv_a_proj_with_mqa.weight", kv_lora + rope, hidden)
        yield _norm(f"{p}.kv_a_layernorm.weight", kv_lora)
        yield _linear(f"{p}.kv_b_proj.weight", heads * (nope + v), kv_lora)
        yield _linear(f"{p}.o_proj.weight", hidden, heads * v, gain=0.5)
        return
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config["num_key_value_heads"]
    yield _linear(f"{p}.q_proj.weight", heads * head_dim, hidden)
    yield _linear(f"{p}.k_proj.weight", kv_heads * head_dim, hidden)
    yield _linear(f"{p}.v_proj.weight", kv_heads * head_dim, hidden)
    yield _linear(f"{p}.o_proj.weight", hidden, heads * head_dim, gain=0.5)
    if config["model_type"] == "qwen3_moe":
        yield _norm(f"{p}.q_norm.weight", head_dim)
        yield _norm(f"{p}.k_norm.weight", head_dim)


def _feed_forward(config: dict, i: int, p: str) -> Iterator[_TensorSpec]:
    hidden, family = config["hidden_size"], config["model_type"]
    if family == "mixtral":
        moe = f"{p}.block_sparse_moe"
        yield _linear(f"{moe}.gate.weight", config["num_local_experts"], hidden, gain=2.0)
        for e in range(config["num_local_experts"]):
            yield from _mlp(f"{moe}.experts.{e}", hidden, config["intermediate_size"],
                            names=("w1", "w3", "w2"))
        return
    if family == "qwen3_moe":
        is_moe = (i not in config.get("mlp_only_layers", [])
                  and config["num_experts"] > 0
                  and (i + 1) % config.get("decoder_sparse_step", 1) == 0)
        num_experts = config["num_experts"]
    else:
        is_moe = i >= config.get("first_k_dense_replace", 0)
        num_experts = config["n_routed_experts"]
    if not is_moe:
        yield from _mlp(f"{p}.mlp", hidden, config["intermediate_size"])
        return
    # Router logits with std 2 keep top-k choices well separated (see module docstring).
    yield _linear(f"{p}.mlp.gate.weight", num_experts, hidden, gain=2.0)
    for e in range(num_experts):
        yield from _mlp(f"{p}.mlp.experts.{e}", hidden, config["moe_intermediate_size"])
    if family == "deepseek_v2":
        shared = config["moe_intermediate_size"] * config["n_shared_experts"]
        yield from _mlp(f"{p}.mlp.shared_experts", hidden, shared)


def _tensor_specs(config: dict) -> list[_TensorSpec]:
    """Every tensor of the checkpoint, in model order, named as on the hub."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"config model_type={family!r} is not supported; expected one of {FAMILIES}")
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    specs = [_TensorSpec("model.embed_tokens.weight", (vocab, hidden), 1.0)]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        specs.append(_norm(f"{p}.input_layernorm.weight", hidden))
        specs.extend(_attention(config, f"{p}.self_attn"))
        specs.append(_norm(f"{p}.post_attention_layernorm.weight", hidden))
        specs.extend(_feed_forward(config, i, p))
    specs.append(_norm("model.norm.weight", hidden))
    if not config.get("tie_word_embeddings", False):
        # Logit std ~4: a peaked next-token distribution with clear top-1 / top-2 gaps.
        specs.append(_linear("lm_head.weight", vocab, hidden, gain=4.0))
    return specs


def _config_dtype(config: dict) -> str:
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    if dtype not in _DTYPES:
        raise ValueError(f"config dtype={dtype!r} is not supported; expected one of {tuple(_DTYPES)}")
    return dtype


def estimate_weight_bytes(config: dict) -> int:
    """Bytes of all weights of the checkpoint described by ``config``, in its dtype."""
    elem_bytes = _DTYPES[_config_dtype(config)].itemsize
    return sum(spec.numel for spec in _tensor_specs(config)) * elem_bytes


# --- tokenizer ---------------------------------------------------------------------------


def _corpus() -> list[str]:
    stdlib_dir = pathlib.Path(sysconfig.get_path("stdlib"))
    texts = []
    for module in _CORPUS_MODULES:
        path = stdlib_dir / f"{module}.py"
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return texts


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    start_s = time.monotonic()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} cannot be reached: the local corpus yields only "
            f"{tokenizer.get_vocab_size()} tokens; expected a vocab_size at most that large"
        )
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    logger.debug("trained BPE tokenizer: vocab_size=%d in %.2f s", vocab_size, time.monotonic() - start_s)
    return tokenizer.to_str()


def build_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer with exactly ``vocab_size`` tokens, trained locally.

    Deterministic for a given Python version; the trained result is cached in-process and
    each call returns an independent copy.
    """
    from tokenizers import Tokenizer

    min_size = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size!r} is invalid; expected an int >= {min_size}")
    return Tokenizer.from_str(_tokenizer_json(vocab_size))


def _tokenizer_files(max_length: int) -> dict[str, dict]:
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
        "added_tokens_decoder": added,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    special_tokens_map = {
        "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
    }
    return {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special_tokens_map}


# --- writing -----------------------------------------------------------------------------


def _tensor_seed(seed: int, name: str) -> int:
    # Per-tensor seeds make every tensor independent of write order and sharding.
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _make_tensor(spec: _TensorSpec, seed: int, dtype_name: str) -> np.ndarray:
    """The tensor's values as a C-contiguous array of the checkpoint's raw element type.

    Scaling and casting run in numpy on purpose: torch's multi-threaded element-wise CPU ops
    slow down a hundredfold when the cores are shared (measured: 2.4 G/s -> 33 M/s).
    """
    if spec.std is None:
        values = np.ones(spec.shape, dtype=np.float32)
    else:
        generator = torch.Generator().manual_seed(_tensor_seed(seed, spec.name))
        values = torch.randn(spec.shape, generator=generator, dtype=torch.float32).numpy()
        values *= np.float32(spec.std)
    if dtype_name == "float32":
        return values
    if dtype_name == "float16":
        return values.astype(np.float16)
    assert dtype_name == "bfloat16", dtype_name
    # Round to nearest even, as torch's float32 -> bfloat16 cast does (values are finite).
    bits = values.view(np.uint32)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)


def _plan_shards(specs: list[_TensorSpec], elem_bytes: int, max_shard_bytes: int) -> list[list[_TensorSpec]]:
    """Greedy split in model order, as ``transformers`` does; an oversized tensor gets its own shard."""
    shards: list[list[_TensorSpec]] = [[]]
    shard_bytes = 0
    for spec in specs:
        nbytes = spec.numel * elem_bytes
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(spec)
        shard_bytes += nbytes
    return shards


def _write_safetensors(path: pathlib.Path, specs: list[_TensorSpec], seed: int, dtype_name: str,
                       bar: tqdm.tqdm) -> None:
    """Stream tensors into one safetensors file, generating each just before it is written."""
    assert sys.byteorder == "little", "safetensors stores little-endian data"
    dtype = _DTYPES[dtype_name]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset_bytes = 0
    for spec in specs:
        nbytes = spec.numel * dtype.itemsize
        header[spec.name] = {"dtype": _SAFETENSORS_DTYPES[dtype_name], "shape": list(spec.shape),
                             "data_offsets": [offset_bytes, offset_bytes + nbytes]}
        offset_bytes += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for spec in specs:
            values = _make_tensor(spec, seed, dtype_name)
            assert values.nbytes == spec.numel * dtype.itemsize, spec
            f.write(memoryview(values).cast("B"))
            bar.update(values.nbytes)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: pathlib.Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _check_replaceable(out_dir: pathlib.Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"out_dir={str(out_dir)!r} exists and is not a directory; "
                              "expected a missing, empty or checkpoint directory")
    for entry in sorted(out_dir.iterdir()):
        if not (entry.is_file() and _CHECKPOINT_FILE_RE.fullmatch(entry.name)):
            raise FileExistsError(
                f"out_dir={str(out_dir)!r} holds {entry.name!r}, which is not a checkpoint file; "
                "expected a missing, empty or checkpoint directory (refusing to replace it)")


def _swap_into_place(tmp_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
    if not out_dir.exists():
        os.rename(tmp_dir, out_dir)
        return
    # NOTE: out_dir is briefly absent between the two renames, but never half written.
    old_dir = tmp_dir.with_name(tmp_dir.name + ".old")
    os.rename(out_dir, old_dir)
    os.rename(tmp_dir, out_dir)
    shutil.rmtree(old_dir, ignore_errors=True)


def make_model(
    family: str,
    preset: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: str | None = None,
    progress: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overrides: dict | None = None,
) -> pathlib.Path:
    """Write a random-initialised checkpoint with its tokenizer into ``out_dir``; return its path.

    ``overrides`` updates the preset's config before anything is derived from it (tensor
    shapes, tokenizer vocabulary, ``model_max_length``). The directory appears atomically:
    everything is written into a temporary sibling that is then renamed.
    """
    config = preset_config(family, preset)
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; expected one of {tuple(_DTYPES)}")
        config["torch_dtype"] = config["dtype"] = dtype
    config.update(copy.deepcopy(overrides or {}))
    if config.get("model_type") != family:
        raise ValueError(f"overrides model_type={config.get('model_type')!r} does not match "
                         f"family={family!r}; expected no model_type override")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r} is invalid; expected a positive int")
    dtype_name = _config_dtype(config)
    elem_bytes = _DTYPES[dtype_name].itemsize
    specs = _tensor_specs(config)
    total_bytes = sum(spec.numel for spec in specs) * elem_bytes
    num_params = sum(spec.numel for spec in specs)
    start_s = time.monotonic()
    tokenizer = build_tokenizer(config["vocab_size"])
    assert tokenizer.get_vocab_size() == config["vocab_size"]

    out_dir = pathlib.Path(out_dir).absolute()
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial",
                                            dir=out_dir.parent))
    try:
        _write_json(tmp_dir / "config.json", config)
        _write_json(tmp_dir / "generation_config.json", {
            "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"], "do_sample": False,
        })
        tokenizer.save(str(tmp_dir / "tokenizer.json"))
        for name, obj in _tokenizer_files(config["max_position_embeddings"]).items():
            _write_json(tmp_dir / name, obj)

        shards = _plan_shards(specs, elem_bytes, max_shard_bytes)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        with tqdm.tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"{family}/{preset}", disable=not progress) as bar:
            for name, shard in zip(names, shards, strict=True):
                _write_safetensors(tmp_dir / name, shard, seed, dtype_name, bar)
        if len(shards) > 1:
            weight_map = {spec.name: name
                          for name, shard in zip(names, shards, strict=True) for spec in shard}
            _write_json(tmp_dir / "model.safetensors.index.json", {
                "metadata": {"total_size": total_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            })
        os.chmod(tmp_dir, 0o755)  # mkdtemp creates 0o700
        _swap_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("wrote %s/%s model to %s: %d params, %d bytes (%s) in %d file(s), seed=%d, %.1f s",
                family, preset, out_dir, num_params, total_bytes, dtype_name, len(shards), seed,
                time.monotonic() - start_s)
    return out_dir

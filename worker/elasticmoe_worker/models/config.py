"""Read a Hugging Face checkpoint's `config.json` into one normalized, typed description.

The three supported families spell the same idea differently (`num_experts`,
`num_local_experts`, `n_routed_experts`; dense layers chosen by `mlp_only_layers`,
`decoder_sparse_step` or `first_k_dense_replace`). Everything downstream (engine, planner,
HMM) reads `ModelSpec` only, so a family's quirks stay here and in its model module.

The raw config is parsed by `transformers.AutoConfig` from the local directory (no network),
so defaults for keys a checkpoint omits are the ones `transformers` itself uses.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "deepseek_v2", "mixtral")


class UnsupportedModelError(ValueError):
    """The checkpoint's model_type (or one of its options) is not one we can serve."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    qk_head_dim: int  # query/key width per head (nope + rope for MLA)
    v_head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    intermediate_size: int  # dense MLP layers
    moe_layers: tuple[bool, ...]  # per layer: MoE (True) or dense MLP (False)
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    torch_dtype: str
    hf_config: Any = dataclasses.field(compare=False, repr=False)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def load_spec(model_dir: str | pathlib.Path) -> ModelSpec:
    """Parse `model_dir/config.json`; raise UnsupportedModelError naming what is unsupported."""
    model_dir = pathlib.Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"model directory {model_dir}: no config.json (expected a Hugging Face checkpoint)")
    return spec_from_json(config_path.read_text(), origin=str(config_path))


def spec_from_json(config_json: str, origin: str = "config.json") -> ModelSpec:
    """Same as load_spec, from the text of a config.json (an executor reads no file)."""
    raw = json.loads(config_json)
    config_path = origin
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{config_path}: model_type {model_type!r} is not supported; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    import transformers  # heavy; only needed here

    hf = transformers.CONFIG_MAPPING[model_type].from_dict(raw)
    num_layers = hf.num_hidden_layers
    sliding_window = None
    dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")

    if model_type == "qwen3_moe":
        mlp_only = set(hf.mlp_only_layers or ())
        moe_layers = tuple(
            (i not in mlp_only) and hf.num_experts > 0 and (i + 1) % hf.decoder_sparse_step == 0
            for i in range(num_layers)
        )
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        if getattr(hf, "use_sliding_window", False):
            sliding_window = hf.sliding_window
        spec_kw = dict(
            num_kv_heads=hf.num_key_value_heads, qk_head_dim=head_dim, v_head_dim=head_dim,
            num_experts=hf.num_experts, moe_intermediate_size=hf.moe_intermediate_size,
        )
    elif model_type == "mixtral":
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        moe_layers = (True,) * num_layers
        sliding_window = getattr(hf, "sliding_window", None)
        spec_kw = dict(
            num_kv_heads=hf.num_key_value_heads, qk_head_dim=head_dim, v_head_dim=head_dim,
            num_experts=hf.num_local_experts, moe_intermediate_size=hf.intermediate_size,
        )
    else:  # deepseek_v2
        if hf.topk_method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModelError(
                f"{config_path}: topk_method {hf.topk_method!r} is not supported; "
                "expected 'greedy' or 'group_limited_greedy'"
            )
        if not hf.n_shared_experts:
            raise UnsupportedModelError(f"{config_path}: n_shared_experts {hf.n_shared_experts!r}: expected >= 1")
        moe_layers = tuple(i >= hf.first_k_dense_replace for i in range(num_layers))
        spec_kw = dict(
            # MLA: keys and values are expanded per head from the latent, so kv heads == heads.
            num_kv_heads=hf.num_attention_heads,
            qk_head_dim=hf.qk_nope_head_dim + hf.qk_rope_head_dim,
            v_head_dim=hf.v_head_dim,
            num_experts=hf.n_routed_experts, moe_intermediate_size=hf.moe_intermediate_size,
        )

    return ModelSpec(
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=num_layers,
        num_heads=hf.num_attention_heads,
        rms_norm_eps=hf.rms_norm_eps,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        num_experts_per_tok=hf.num_experts_per_tok,
        intermediate_size=getattr(hf, "intermediate_size", 0) or 0,
        moe_layers=moe_layers,
        sliding_window=sliding_window,
        eos_token_ids=_eos_ids(raw.get("eos_token_id", getattr(hf, "eos_token_id", None))),
        bos_token_id=raw.get("bos_token_id"),
        torch_dtype=dtype,
        hf_config=hf,
        **spec_kw,
    )

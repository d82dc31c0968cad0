"""Mixtral: GQA attention (optional sliding window), softmax top-k routing always
renormalised over the chosen experts, experts named w1 (gate) / w3 (up) / w2 (down) under
`block_sparse_moe`."""

from __future__ import annotations

from typing import Sequence

import torch

from elasticmoe_worker.models import config as config_mod
from elasticmoe_worker.models import layers
from elasticmoe_worker.models import model as model_mod
from elasticmoe_worker.models import weights as weights_mod

MODEL_TYPE = "mixtral"


def expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    return f"{p}.w1.weight", f"{p}.w3.weight", f"{p}.w2.weight"


def replicated_names(spec: config_mod.ModelSpec) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not spec.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight",
                  f"{p}.block_sparse_moe.gate.weight"]
        names += [f"{p}.self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    return names


def build(spec: config_mod.ModelSpec, w: weights_mod.WeightSource, expert_ids: Sequence[int],
          device: torch.device) -> model_mod.CausalLM:
    """The model over `w`'s tensors, which live on `device`."""
    rotary = layers.Rotary(spec.hf_config, spec.qk_head_dim, interleaved=False, device=device)
    decoder = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        attn = model_mod.GQAAttention(
            q_proj=w.tensor(f"{p}.self_attn.q_proj.weight"),
            k_proj=w.tensor(f"{p}.self_attn.k_proj.weight"),
            v_proj=w.tensor(f"{p}.self_attn.v_proj.weight"),
            o_proj=w.tensor(f"{p}.self_attn.o_proj.weight"),
            num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.qk_head_dim,
            rotary=rotary, eps=spec.rms_norm_eps, sliding_window=spec.sliding_window,
        )
        w13, w2 = w.experts(i, expert_names)
        mlp = model_mod.MoEMLP(
            router=model_mod.softmax_topk_router(
                w.tensor(f"{p}.block_sparse_moe.gate.weight"), spec.num_experts_per_tok, renormalize=True
            ),
            w13=w13, w2=w2, expert_map=model_mod.expert_map(spec.num_experts, expert_ids, device),
        )
        decoder.append(model_mod.DecoderLayer(
            attn=attn, mlp=mlp,
            input_norm=w.tensor(f"{p}.input_layernorm.weight"),
            post_attn_norm=w.tensor(f"{p}.post_attention_layernorm.weight"),
        ))
    embed = w.tensor("model.embed_tokens.weight")
    lm_head = embed if spec.tie_word_embeddings else w.tensor("lm_head.weight")
    return model_mod.CausalLM(spec, embed, decoder, w.tensor("model.norm.weight"), lm_head, rotary, device)

"""DeepSeek-V2 (and V2-Lite): multi-head latent attention (MLA), shared experts, the first
`first_k_dense_replace` layers dense, and routing by `topk_method` ("greedy" or
"group_limited_greedy" over `n_group`/`topk_group`) scaled by `routed_scaling_factor`.

The KV cache holds keys and values expanded per head (not the compressed latent): simpler
paged attention shared with the GQA families, at the price of more cache bytes per token.
`norm_topk_prob` follows DeepSeek's reference code (renormalise instead of scaling when set);
`transformers` ignores it, so checkpoints that set it differ from `transformers` there.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

from elasticmoe_worker.models import config as config_mod
from elasticmoe_worker.models import layers
from elasticmoe_worker.models import model as model_mod
from elasticmoe_worker.models import weights as weights_mod

MODEL_TYPE = "deepseek_v2"


def expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    p = f"model.layers.{layer}.mlp.experts.{expert}"
    return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"


def _attn_names(hf, p: str) -> list[str]:
    names = [f"{p}.self_attn.{n}.weight" for n in ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")]
    if hf.q_lora_rank is None:
        names.append(f"{p}.self_attn.q_proj.weight")
    else:
        names += [f"{p}.self_attn.{n}.weight" for n in ("q_a_proj", "q_a_layernorm", "q_b_proj")]
    return names


def replicated_names(spec: config_mod.ModelSpec) -> list[str]:
    hf = spec.hf_config
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not spec.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
        names += _attn_names(hf, p)
        if spec.moe_layers[i]:
            names.append(f"{p}.mlp.gate.weight")
            names += [f"{p}.mlp.shared_experts.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
        else:
            names += [f"{p}.mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
    return names


@dataclasses.dataclass
class MLAAttention:
    kv_a_proj: torch.Tensor  # [kv_lora_rank + rope_dim, H]
    kv_a_norm: torch.Tensor
    kv_b_proj: torch.Tensor  # [heads * (nope + v), kv_lora_rank]
    o_proj: torch.Tensor
    q_proj: torch.Tensor | None
    q_a_proj: torch.Tensor | None
    q_a_norm: torch.Tensor | None
    q_b_proj: torch.Tensor | None
    num_heads: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    kv_lora_rank: int
    scale: float
    eps: float
    rotary: layers.Rotary

    def __call__(self, x, meta, freqs, k_cache, v_cache):
        t = x.shape[0]
        if self.q_proj is not None:
            q = layers.linear(x, self.q_proj)
        else:
            q = layers.linear(layers.rms_norm(layers.linear(x, self.q_a_proj), self.q_a_norm, self.eps), self.q_b_proj)
        q = q.view(t, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = layers.linear(x, self.kv_a_proj).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = layers.rms_norm(latent, self.kv_a_norm, self.eps)
        q_pe = self.rotary.apply(q_pe, freqs)
        k_pe = self.rotary.apply(k_pe.unsqueeze(1), freqs)  # [T, 1, rope]
        kv = layers.linear(latent, self.kv_b_proj).view(t, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, self.num_heads, -1)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        o = layers.paged_attention(q, k, v.contiguous(), k_cache, v_cache, meta, self.scale)
        return layers.linear(o.reshape(t, o.shape[1] * o.shape[2]), self.o_proj)


def deepseek_router(gate: torch.Tensor, hf) -> model_mod.RouterFn:
    top_k = hf.num_experts_per_tok
    num_experts = hf.n_routed_experts
    method = hf.topk_method
    n_group, topk_group = hf.n_group, hf.topk_group
    scaling = float(hf.routed_scaling_factor)
    normalize = bool(getattr(hf, "norm_topk_prob", False)) and top_k > 1
    gate_f = gate.float()

    def route(x: torch.Tensor):
        scores = torch.softmax(F.linear(x.float(), gate_f), dim=-1, dtype=torch.float32)
        if method == "group_limited_greedy":
            group_scores = scores.view(-1, n_group, num_experts // n_group).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
            score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(-1, num_experts)
            scores = scores.masked_fill(~score_mask.bool(), 0.0)
        weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
        if normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * scaling
        return ids, weights.to(x.dtype)

    return route


def build(spec: config_mod.ModelSpec, w: weights_mod.WeightSource, expert_ids: Sequence[int],
          device: torch.device) -> model_mod.CausalLM:
    """The model over `w`'s tensors, which live on `device`."""
    hf = spec.hf_config
    rotary = layers.Rotary(hf, hf.qk_rope_head_dim, interleaved=True, device=device)
    scale = spec.qk_head_dim ** -0.5
    rope_params = getattr(hf, "rope_parameters", None) or {}
    if rope_params.get("rope_type", "default") != "default" and rope_params.get("mscale_all_dim"):
        mscale = layers.yarn_mscale(rope_params["factor"], rope_params["mscale_all_dim"])
        scale = scale * mscale * mscale
    decoder = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}.self_attn"
        lora = hf.q_lora_rank is not None
        attn = MLAAttention(
            kv_a_proj=w.tensor(f"{p}.kv_a_proj_with_mqa.weight"),
            kv_a_norm=w.tensor(f"{p}.kv_a_layernorm.weight"),
            kv_b_proj=w.tensor(f"{p}.kv_b_proj.weight"),
            o_proj=w.tensor(f"{p}.o_proj.weight"),
            q_proj=None if lora else w.tensor(f"{p}.q_proj.weight"),
            q_a_proj=w.tensor(f"{p}.q_a_proj.weight") if lora else None,
            q_a_norm=w.tensor(f"{p}.q_a_layernorm.weight") if lora else None,
            q_b_proj=w.tensor(f"{p}.q_b_proj.weight") if lora else None,
            num_heads=spec.num_heads, nope_dim=hf.qk_nope_head_dim, rope_dim=hf.qk_rope_head_dim,
            v_dim=hf.v_head_dim, kv_lora_rank=hf.kv_lora_rank, scale=scale, eps=spec.rms_norm_eps,
            rotary=rotary,
        )
        m = f"model.layers.{i}.mlp"
        if spec.moe_layers[i]:
            w13, w2 = w.experts(i, expert_names)
            mlp = model_mod.MoEMLP(
                router=deepseek_router(w.tensor(f"{m}.gate.weight"), hf),
                w13=w13, w2=w2,
                shared=model_mod.DenseMLP(*(w.tensor(f"{m}.shared_experts.{n}.weight")
                                           for n in ("gate_proj", "up_proj", "down_proj"))),
                expert_map=model_mod.expert_map(spec.num_experts, expert_ids, device),
            )
        else:
            mlp = model_mod.DenseMLP(*(w.tensor(f"{m}.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")))
        decoder.append(model_mod.DecoderLayer(
            attn=attn, mlp=mlp,
            input_norm=w.tensor(f"model.layers.{i}.input_layernorm.weight"),
            post_attn_norm=w.tensor(f"model.layers.{i}.post_attention_layernorm.weight"),
        ))
    embed = w.tensor("model.embed_tokens.weight")
    lm_head = embed if spec.tie_word_embeddings else w.tensor("lm_head.weight")
    return model_mod.CausalLM(spec, embed, decoder, w.tensor("model.norm.weight"), lm_head, rotary, device)

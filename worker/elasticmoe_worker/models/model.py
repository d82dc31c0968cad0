"""The decoder skeleton the three families share, and the pieces two of them share (GQA
attention, SwiGLU MLP, the routed-expert block).

A model is plain tensors arranged in small classes, not `nn.Module`s: weights come from a
`WeightSource` (checkpoint now, zero-copy views on HMM memory later) and are never copied
again. Family modules decide names, routers and attention flavour; this module owns the
layer loop.

Expert parallelism hooks in at `MoEMLP.experts_fn`: by default the local stacked experts;
an instance replaces it with a dispatch/combine over the collective group.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from elasticmoe_worker.models import config as config_mod
from elasticmoe_worker.models import layers

# (x [T,H]) -> (topk_ids [T,K] int64, topk_weights [T,K])
RouterFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (x, topk_ids, topk_weights) -> [T,H]
ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Attention(Protocol):
    def __call__(
        self, x: torch.Tensor, meta: layers.AttentionMetadata, freqs: layers.RotaryTable,
        k_cache: torch.Tensor, v_cache: torch.Tensor,
    ) -> torch.Tensor: ...


@dataclasses.dataclass
class GQAAttention:
    """Grouped-query attention with optional per-head q/k RMSNorm (Qwen3) ."""

    q_proj: torch.Tensor
    k_proj: torch.Tensor
    v_proj: torch.Tensor
    o_proj: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary: layers.Rotary
    eps: float
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    sliding_window: int | None = None

    def __call__(self, x, meta, freqs, k_cache, v_cache):
        t = x.shape[0]
        q = layers.linear(x, self.q_proj).view(t, self.num_heads, self.head_dim)
        k = layers.linear(x, self.k_proj).view(t, self.num_kv_heads, self.head_dim)
        v = layers.linear(x, self.v_proj).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = layers.rms_norm(q, self.q_norm, self.eps)
            k = layers.rms_norm(k, self.k_norm, self.eps)
        q = self.rotary.apply(q, freqs)
        k = self.rotary.apply(k, freqs)
        o = layers.paged_attention(
            q, k, v, k_cache, v_cache, meta, self.head_dim ** -0.5, self.sliding_window
        )
        return layers.linear(o.reshape(t, o.shape[1] * o.shape[2]), self.o_proj)


@dataclasses.dataclass
class DenseMLP:
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    def __call__(self, x):
        return layers.dense_mlp(x, self.gate, self.up, self.down)


@dataclasses.dataclass
class MoEMLP:
    """Router + routed experts (+ optional always-on shared experts)."""

    router: RouterFn
    w13: torch.Tensor  # [E_local, 2I, H]
    w2: torch.Tensor  # [E_local, H, I]
    shared: DenseMLP | None = None
    expert_map: torch.Tensor | None = None  # [E_global] -> local index or -1
    experts_fn: ExpertsFn | None = None
    # [E_global] int64 on the model's device: when set, each call adds the token copies its router
    # sent to each expert (an instance's executor counts which experts are hot; one tensor may be
    # shared by every layer). scatter_add_, not bincount: no host sync on an accelerator.
    routed: torch.Tensor | None = None

    def __call__(self, x):
        topk_ids, topk_weights = self.router(x)
        if self.routed is not None:
            flat = topk_ids.reshape(-1)
            self.routed.scatter_add_(0, flat, torch.ones_like(flat))
        if self.experts_fn is not None:
            out = self.experts_fn(x, topk_ids, topk_weights)
        else:
            out = layers.expert_mlp(x, self.w13, self.w2, topk_ids, topk_weights, self.expert_map)
        if self.shared is not None:
            out = out + self.shared(x)
        return out


@dataclasses.dataclass
class DecoderLayer:
    attn: Attention
    mlp: DenseMLP | MoEMLP
    input_norm: torch.Tensor
    post_attn_norm: torch.Tensor


@dataclasses.dataclass
class CausalLM:
    spec: config_mod.ModelSpec
    embed: torch.Tensor  # [V, H]
    layers: list[DecoderLayer]
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # [V, H] (the embedding itself when tied)
    rotary: layers.Rotary
    device: torch.device  # where every weight lives and every step's tensors are made

    def __post_init__(self) -> None:
        # NOTE: the engine makes its tensors on `device`; a weight elsewhere would fail at the
        # first forward pass with a device mismatch deep inside a layer.
        for name, t in (("embed", self.embed), ("lm_head", self.lm_head), ("final_norm", self.final_norm),
                        ("rotary.inv_freq", self.rotary.inv_freq)):
            if t.device != self.device:
                raise ValueError(f"model {name}: on {t.device}, expected the model's device {self.device}")

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        meta: layers.AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """input_ids: [T] -> final hidden states [T, H] (after the final norm)."""
        eps = self.spec.rms_norm_eps
        h = F.embedding(input_ids, self.embed)
        freqs = self.rotary.freqs(meta.positions)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            residual = h
            h = layer.attn(layers.rms_norm(h, layer.input_norm, eps), meta, freqs, k_cache, v_cache)
            h = residual + h
            residual = h
            h = residual + layer.mlp(layers.rms_norm(h, layer.post_attn_norm, eps))
        return layers.rms_norm(h, self.final_norm, eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, H] -> float32 logits [B, V]."""
        return layers.linear(hidden, self.lm_head).float()

    def moe_blocks(self) -> list[MoEMLP]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoEMLP)]


def softmax_topk_router(
    gate: torch.Tensor, top_k: int, *, renormalize: bool, logits_in_float: bool = False
) -> RouterFn:
    """Softmax over all experts, keep the top k (Qwen3-MoE, Mixtral)."""

    def route(x: torch.Tensor):
        logits = F.linear(x.float(), gate.float()) if logits_in_float else layers.linear(x, gate)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(x.dtype)

    return route


def expert_map(num_experts: int, expert_ids, device: torch.device) -> torch.Tensor | None:
    """Global expert id -> index in this device's stacked buffer (-1: held elsewhere), [E] int64
    on `device`.

    None when the device holds every expert in order (the common single-device case).
    """
    expert_ids = list(expert_ids)
    if expert_ids == list(range(num_experts)):
        return None
    table = torch.full((num_experts,), -1, dtype=torch.int64, device=device)
    table[torch.tensor(expert_ids, dtype=torch.int64, device=device)] = torch.arange(len(expert_ids), device=device)
    return table

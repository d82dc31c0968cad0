"""Building blocks shared by the model families: norms, rotary embeddings, paged attention
and the expert computation.

Every function here works on a flat batch of tokens (`[num_tokens, ...]`) from many
sequences at once; which token belongs to which sequence, and where its keys and values
live in the paged KV pool, is described by `AttentionMetadata`, built by the runner.

Numerics follow the `transformers` implementations of the same families (float32 softmax in
routers, rotary tables in float32) so greedy outputs match them token for token in float32.
Nothing here guarantees bit-identical results with `transformers`: batching changes the
order of floating-point reductions.
"""

from __future__ import annotations

import dataclasses
import threading

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., D] -> [..., D], computed in float32 like the reference implementations."""
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


class Rotary:
    """Rotary position embedding for one head width.

    `interleaved=False` rotates the two halves of the head (Llama/Qwen/Mixtral style);
    `interleaved=True` rotates adjacent pairs as complex numbers (DeepSeek style).
    Non-default rope types (yarn, dynamic, ...) take their frequencies and attention scaling
    from `transformers`' own table so long-context configs behave as upstream.
    """

    def __init__(self, hf_config, dim: int, *, interleaved: bool, device: torch.device) -> None:
        params = getattr(hf_config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        # NOTE: the frequency table is computed on the host and then moved to `device`, as a
        # `transformers` model computes its buffer at construction and moves it with `.to()`:
        # the same table bit for bit on every device.
        if rope_type == "default":
            base = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            self.scaling = 1.0
        else:
            from transformers import modeling_rope_utils

            init_fn = modeling_rope_utils.ROPE_INIT_FUNCTIONS.get(rope_type)
            if init_fn is None:
                raise ValueError(f"rope_parameters.rope_type: got {rope_type!r}, not supported")
            inv_freq, self.scaling = init_fn(hf_config, None)
        self.inv_freq = inv_freq.to(device)
        self.interleaved = interleaved

    def freqs(self, positions: torch.Tensor) -> "RotaryTable":
        """positions: [T] -> the step's rotation table (angles [T, dim/2] in float32 and what
        `apply` derives from them, computed once per step and shared by every layer)."""
        return RotaryTable(positions[:, None].float() * self.inv_freq[None, :], self)

    def apply(self, x: torch.Tensor, freqs: "RotaryTable") -> torch.Tensor:
        """x: [T, H, dim] -> rotated x of the same shape and dtype."""
        if self.interleaved:
            xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 2))
            return torch.view_as_real(xc * freqs.cis()[:, None, :]).flatten(-2).type_as(x)
        cos, sin = freqs.cos_sin(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class RotaryTable:
    """One step's rotary factors, made on first use and kept for the step's other layers
    (the same values each layer would compute: cos/sin per dtype, or the complex factors)."""

    def __init__(self, angles: torch.Tensor, rotary: Rotary) -> None:
        self.angles = angles  # [T, dim/2] float32
        self._rotary = rotary
        self._cos_sin: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cis: torch.Tensor | None = None

    def cos_sin(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (cos, sin), each [T, 1, dim] in `dtype` (halves rotation)."""
        if dtype not in self._cos_sin:
            emb = torch.cat((self.angles, self.angles), dim=-1)
            scaling = self._rotary.scaling
            self._cos_sin[dtype] = ((emb.cos() * scaling).to(dtype)[:, None, :],
                                    (emb.sin() * scaling).to(dtype)[:, None, :])
        return self._cos_sin[dtype]

    def cis(self) -> torch.Tensor:
        """-> complex factors [T, dim/2] (adjacent-pairs rotation)."""
        if self._cis is None:
            self._cis = torch.polar(torch.ones_like(self.angles), self.angles) * self._rotary.scaling
        return self._cis


@dataclasses.dataclass
class PrefillSpan:
    """One sequence whose step computes more than one token (a prompt chunk)."""

    start: int  # first token of the span in the flat batch
    end: int
    context_len: int  # tokens of this sequence already in the cache before this step
    gather_slots: torch.Tensor | None  # [context_len + span] cache slots to read; None when context_len == 0


@dataclasses.dataclass
class DecodeGroup:
    """Sequences computing one token each whose contexts are of similar length, attended in
    one call: the keys and values are gathered a whole block at a time.

    token_idx [b] index of each one's token in the flat batch; blocks [b, nb] the cache
    blocks of each context in order (padded); mask [b, nb * block_size] True where a slot
    holds a real position of that context.
    """

    token_idx: torch.Tensor
    blocks: torch.Tensor
    mask: torch.Tensor


@dataclasses.dataclass
class AttentionMetadata:
    """Where every token of one step reads and writes the paged KV cache.

    slot_mapping: [T] flat cache slot (block * block_size + offset) for each new token.
    decodes: the sequences computing exactly one token, in groups of similar context length
      (a group's contexts are padded to its longest: grouping bounds the padding).
    prefills: the other sequences, one attention call each.
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    decodes: list[DecodeGroup]
    prefills: list[PrefillSpan]


def _window_mask(q_pos: torch.Tensor, k_len: int, window: int | None) -> torch.Tensor:
    """Causal (and optionally sliding-window) mask [Q, K]: True where attention is allowed."""
    k_pos = torch.arange(k_len, device=q_pos.device)
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > (q_pos[:, None] - window)
    return mask


# Gathers larger than this are allocated per call instead of kept in the workspace.
GATHER_WORKSPACE_MAX_BYTES = 64 << 20


class _GatherWorkspace(threading.local):
    """Reused outputs of the KV gathers, one per slot ("k", "v") and thread.

    Why: a gather's output is megabytes, allocated and freed 8 times a step. On CPU glibc
    serves such sizes with fresh mmaps, so every gather paid a page fault per 4 KiB of output:
    3.2 ms for 16 sequences x 512 tokens of context (8 MiB, small preset), 0.4 ms into a reused
    buffer; in-process decode steps at ~500 tokens of context took 50 ms until glibc's dynamic
    mmap threshold rose (~20 steps; in a serving executor it may never), 20 ms after, and 20 ms
    from the first step with the buffer. The consumer (one attention call) is done with a
    gather before the next one of its slot starts."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, slot: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        if numel * like.element_size() > GATHER_WORKSPACE_MAX_BYTES:
            return like.new_empty(numel)
        buf = self.buffers.get(slot)
        if (buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device
                or (buf.is_inference() and not torch.is_inference_mode_enabled())):
            buf = like.new_empty(numel)
            self.buffers[slot] = buf
        return buf[:numel]


_workspace = _GatherWorkspace()


def _gather_rows(table: torch.Tensor, rows: torch.Tensor, slot: str | None = None) -> torch.Tensor:
    """table[rows] along dim 0 as one contiguous copy: `index_select` on the rows flattened
    to 2-D (on CPU about 4x faster than advanced indexing `table[rows]` of a 4-D cache, which
    walks every inner dimension; the same values). With a `slot`, into that slot's reused
    buffer: valid until the next gather of the same slot on this thread."""
    flat = table.view(table.shape[0], -1)
    index = rows.reshape(-1)
    if slot is None:
        out = torch.index_select(flat, 0, index)
    else:
        out = _workspace.take(slot, index.numel() * flat.shape[1], flat).view(index.numel(), flat.shape[1])
        torch.index_select(flat, 0, index, out=out)
    return out.view(*rows.shape, *table.shape[1:])


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, slot: str | None = None) -> torch.Tensor:
    """cache [blocks, block_size, Hkv, D], blocks [b, nb] -> [b, nb, block_size, Hkv, D]."""
    return _gather_rows(cache, blocks, slot)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: [T, H, Dk], k: [T, Hkv, Dk], v: [T, Hkv, Dv]; caches [blocks, block_size, Hkv, D*].

    Writes k and v into their cache slots, then attends each token to its sequence's
    context. Returns [T, H, Dv].
    """
    num_kv_heads = k.shape[1]
    k_flat = k_cache.view(-1, num_kv_heads, k_cache.shape[-1])
    v_flat = v_cache.view(-1, num_kv_heads, v_cache.shape[-1])
    k_flat[meta.slot_mapping] = k
    v_flat[meta.slot_mapping] = v
    gqa = q.shape[1] != num_kv_heads
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])

    for g in meta.decodes:
        b, nb = g.blocks.shape
        qq = q[g.token_idx].unsqueeze(2)  # [b, H, 1, Dk]
        kk = _gather_blocks(k_cache, g.blocks, "k").view(b, -1, num_kv_heads, k_cache.shape[-1]).transpose(1, 2)
        vv = _gather_blocks(v_cache, g.blocks, "v").view(b, -1, num_kv_heads, v_cache.shape[-1]).transpose(1, 2)
        mask = g.mask[:, None, None, :]
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[g.token_idx] = o[:, :, 0, :]

    for span in meta.prefills:
        qq = q[span.start:span.end].transpose(0, 1).unsqueeze(0)  # [1, H, S, Dk]
        if span.gather_slots is None:
            kk = k[span.start:span.end].transpose(0, 1).unsqueeze(0)
            vv = v[span.start:span.end].transpose(0, 1).unsqueeze(0)
        else:
            kk = _gather_rows(k_flat, span.gather_slots, "k").transpose(0, 1).unsqueeze(0)
            vv = _gather_rows(v_flat, span.gather_slots, "v").transpose(0, 1).unsqueeze(0)
        n = span.end - span.start
        if span.context_len == 0 and sliding_window is None:
            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            q_pos = torch.arange(span.context_len, span.context_len + n, device=q.device)
            mask = _window_mask(q_pos, span.context_len + n, sliding_window)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[span.start:span.end] = o[0].transpose(0, 1)
    return out


# A product with at most this many rows of activations (decode steps, small batches) is computed
# weight-first when its dtype is in _WEIGHT_FIRST_DTYPES; see `linear`.
WEIGHT_FIRST_MAX_ROWS = 64
_WEIGHT_FIRST_DTYPES = frozenset({torch.float32})


def weight_first(x: torch.Tensor) -> bool:
    return x.shape[0] <= WEIGHT_FIRST_MAX_ROWS and x.dtype in _WEIGHT_FIRST_DTYPES


def native_gemv(x: torch.Tensor) -> bool:
    """A bfloat16 product of one row on the CPU: computed by ATen's own kernel, not oneDNN's (see
    `linear`)."""
    return x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu"


def _linear_without_onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # NOTE: the switch is process-wide (ATen's global context); in our processes only the engine's
    # thread runs products, so nothing else sees it off. Restored even if the product raises.
    if not torch._C._get_mkldnn_enabled():
        return F.linear(x, w)
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(x, w)
    finally:
        torch._C._set_mkldnn_enabled(True)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] times w [N, K] transposed -> [M, N], the product F.linear computes.

    For float32 with at most WEIGHT_FIRST_MAX_ROWS rows it is computed weight-first, (w @ x.T).T:
    the same arithmetic laid out as a tall-skinny product, which the CPU BLAS (MKL sgemm) runs
    far faster than the short-wide one: an engine step decoding 16 sequences of the small preset
    took 6.7-6.9 ms instead of 9.3 ms on 2 cores (with the experts done the same way). Not for
    bfloat16 (oneDNN): measured slower there for 4-16 rows. Greedy outputs still equal
    `transformers`' (tests/worker/test_correctness.py and the instance tests).

    A bfloat16 product of one row (batch-1 decode) on the CPU goes to ATen's own kernel instead of
    oneDNN's, 2-2.6x faster on an AMD EPYC with avx512_bf16 (8 experts' [768, 1024] products read
    from memory: 0.39-0.40 ms against 0.80-1.03 ms; 2 rows: 0.75 against 0.82 ms; from 4 rows on
    oneDNN wins). Not bit-equal in general: bfloat16 greedy tokens of the random-initialised bench
    preset part from the oneDNN path's after 8-14 tokens on 2 of 4 prompts, as each path's do from
    `transformers`' on two of the four (bfloat16 rounding between near-tied logits)."""
    if x.dim() == 2 and weight_first(x):
        return (w @ x.t()).t().contiguous()
    if x.dim() == 2 and native_gemv(x):
        return _linear_without_onednn(x, w)
    return F.linear(x, w)


def dense_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP. x: [T, H]; gate/up: [I, H]; down: [H, I] -> [T, H]."""
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def expert_mlp(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts for the tokens of this step.

    x: [T, H]; w13: [E_local, 2*I, H] (gate rows then up rows); w2: [E_local, H, I];
    topk_ids: [T, K] global expert ids; topk_weights: [T, K]; expert_map: [E_global] local
    index of each global expert, -1 where this device does not hold it (None: all local).
    Returns [T, H], the weighted sum over the local experts only.

    Token copies are sorted by expert, so the experts' rows are contiguous segments: one grouped
    matmul per projection runs every local expert at once (`torch._grouped_mm` with the
    segments' end offsets, where the device and dtype support it); else, and for the few rows
    `linear` computes weight-first, one product per expert on its slice, the same arithmetic.
    NOTE: for those few float32 rows the loop of weight-first products beat `_grouped_mm` in
    both layouts on CPU: engine step 6.6 ms against 7.6-8.9 ms with `_grouped_mm(w13, xs.T)` and
    ~9.3 ms with `_grouped_mm(xs, w13.T)` (16 decoding sequences, small preset, 2 cores; CPU's
    `_grouped_mm` is itself a loop of one product per group). One bfloat16 token on the CPU takes the
    loop too: each expert's product is then one row, which `linear` computes without oneDNN.
    Results are unsorted with one gather and summed over k in ascending expert order, the order
    the reference implementations accumulate in (so float32 results match them).
    """
    num_tokens, k = topk_ids.shape
    if num_tokens == 0:
        return torch.zeros_like(x)
    local = topk_ids if expert_map is None else expert_map[topk_ids]
    local, perm = local.sort(dim=1)  # per token: experts ascending
    weights = topk_weights.gather(1, perm).reshape(-1, 1)
    flat = local.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat + 1, minlength=w13.shape[0] + 1)
    elsewhere = int(counts[0])  # rows of experts held elsewhere come first and stay 0
    xs = x[order[elsewhere:] // k]
    if (grouped_mm_supported(x.device, x.dtype) and grouped_mm_fits(w13, w2) and not weight_first(xs)
            and not native_gemv(x)):
        offsets = torch.cumsum(counts[1:], 0).to(torch.int32)
        gate, up = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        held = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offsets)
    else:
        held = torch.empty_like(xs)
        start = 0
        for local_id, count in enumerate(counts[1:].tolist()):
            if count:
                gate, up = linear(xs[start:start + count], w13[local_id]).chunk(2, dim=-1)
                held[start:start + count] = linear(F.silu(gate) * up, w2[local_id])
                start += count
    ys = torch.cat((held.new_zeros(elsewhere, held.shape[-1]), held)) if elsewhere else held
    return combine_copies(ys[torch.argsort(order)], weights, num_tokens, k).to(x.dtype)


_GROUPED_MM: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs on this device type and dtype (tried once, on a tiny
    problem: its support differs by backend, dtype and GPU generation)."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM:
        try:
            a = torch.ones(2, 8, device=device, dtype=dtype)
            b = torch.ones(2, 8, 8, device=device, dtype=dtype)
            torch._grouped_mm(a, b, offs=torch.tensor([1, 2], device=device, dtype=torch.int32))
            _GROUPED_MM[key] = True
        except (AttributeError, RuntimeError, NotImplementedError):
            _GROUPED_MM[key] = False
    return _GROUPED_MM[key]


def grouped_mm_fits(w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether these expert shapes meet `torch._grouped_mm`'s layout rule: every row of every
    operand a multiple of 16 bytes (hidden and intermediate widths; e.g. an intermediate size
    of 6 float32 fails with "strides should be multiple of 16 bytes")."""
    itemsize = w13.element_size()
    return all(width * itemsize % 16 == 0 for width in (w2.shape[1], w2.shape[2]))


def combine_copies(ys: torch.Tensor, weights: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
    """ys: [T*K, H] expert outputs per token copy, copies of a token in ascending expert
    order; weights: [T*K, 1]. -> [T, H], summed one k at a time (reference order)."""
    per_copy = (ys * weights).view(num_tokens, k, ys.shape[-1])
    out = per_copy[:, 0]
    for j in range(1, k):
        out = out + per_copy[:, j]
    return out


def yarn_mscale(scale: float, mscale: float) -> float:
    """DeepSeek's YaRN attention-scale correction (see its reference code)."""
    import math

    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

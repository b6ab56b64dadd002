"""The Llama family (Llama, Mistral, Qwen2) in plain torch, module names as in Hugging Face
except the fused qkv_proj and gate_up_proj (weights.py maps the checkpoint's names onto them).

Tokens of all sequences in a step are flattened into one axis; `AttentionMetadata` says
which tokens belong to which sequence and where their KV lives in the paged cache.
Under tensor parallelism each rank builds the same model with its shard of heads and MLP
features (services/engine/parallel.py); head counts below are this rank's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.kv_cache import PagedKVCache
from services.engine.parallel import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedEmbedding,
    ReplicatedLinear,
    RowParallelLinear,
    TPGroup,
)
from services.hf.config import ModelConfig


@dataclass(frozen=True)
class PrefillSpan:
    """One sequence's tokens in a prefill step: flattened tokens [begin, end) of the batch are
    its context positions [start, start + end - begin)."""

    begin: int
    end: int
    start: int
    # start > 0 (the earlier tokens are in the cache): the blocks its whole context lives in
    context_table: torch.Tensor | None = None  # [W]

    @property
    def stop(self) -> int:
        return self.start + self.end - self.begin


@dataclass
class AttentionMetadata:
    """One step's batch. Prefill: chunks of one or more prompts. Decode: one token per sequence."""

    is_prefill: bool
    positions: torch.Tensor  # [T] position of each flattened token
    slot_blocks: torch.Tensor  # [T] cache block each token's KV is written to
    slot_offsets: torch.Tensor  # [T] offset inside that block
    # prefill only: which flattened tokens are whose
    spans: tuple[PrefillSpan, ...] = ()
    # decode only: the blocks each sequence's whole context lives in, and which positions of
    # the longest (Tmax) are attended; no mask when every context is Tmax long
    context_tables: torch.Tensor | None = None  # [S, W]
    context_len: int = 0  # Tmax
    context_mask: torch.Tensor | None = None  # [S, 1, 1, Tmax] True where attended


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    # on the CPU even while a model is built on the meta device: meta arithmetic is slow to start
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (default, llama3 are)")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = (self.inv_freq[:, None].float() @ positions[None, :].float()).T  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, tp: TPGroup):
        super().__init__()
        self.layer_index = layer_index
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.attention_bias, tp
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.o_proj = RowParallelLinear(cfg.q_size, cfg.hidden_size, bias=False, tp=tp)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: PagedKVCache,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.sizes, dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        cos, sin = (t.to(x.dtype)[:, None, :] for t in cos_sin)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        cache.write(self.layer_index, meta.slot_blocks, meta.slot_offsets, k, v)
        if meta.is_prefill:
            out = torch.cat([self._prefill(q, k, v, span, cache) for span in meta.spans])
        else:
            # One new token per sequence: read each context from the cache, in its layout.
            ctx_k, ctx_v = cache.read(self.layer_index, meta.context_tables, meta.context_len)
            # ctx_k: [S, Tmax, Hkv, D]
            out = F.scaled_dot_product_attention(
                q[:, :, None, :],  # [S, Hq, 1, D]
                ctx_k.to(x.dtype).transpose(1, 2),
                ctx_v.to(x.dtype).transpose(1, 2),
                attn_mask=meta.context_mask,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )[:, :, 0, :]  # [S, Hq, D]
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        span: PrefillSpan,
        cache: PagedKVCache,
    ) -> torch.Tensor:  # [T_span, Hq, D]
        """Causal attention of one sequence's new tokens: over themselves when they start its
        context, else over its whole context, read back from the cache."""
        q = q[span.begin : span.end].transpose(0, 1)  # [Hq, T, D]
        gqa = self.num_heads != self.num_kv_heads
        if span.start == 0:
            k = k[span.begin : span.end].transpose(0, 1)
            v = v[span.begin : span.end].transpose(0, 1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            return out.transpose(0, 1)
        ctx_k, ctx_v = (
            t[0].to(q.dtype).transpose(0, 1)
            for t in cache.read(self.layer_index, span.context_table[None], span.stop)
        )
        # query i sits at position start + i and sees context positions 0 ..= start + i
        queries = torch.arange(span.end - span.begin, device=q.device)[:, None] + span.start
        mask = torch.arange(ctx_k.shape[1], device=q.device)[None, :] <= queries
        out = F.scaled_dot_product_attention(q, ctx_k, ctx_v, attn_mask=mask, enable_gqa=gqa)
        return out.transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [size, size], False, tp)
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, bias=False, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, tp: TPGroup):
        super().__init__()
        self.self_attn = Attention(cfg, layer_index, tp)
        self.mlp = MLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos_sin, meta, cache):  # noqa: ANN001, ANN201 - see Attention.forward
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, meta, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        self.embed_tokens = ReplicatedEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


LayerDone = Callable[[int], None]


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None):
        super().__init__()
        self.cfg = cfg
        self.tp = tp or TPGroup()
        self.model = Backbone(cfg, self.tp)
        self.rotary = Rotary(cfg)
        self.lm_head = ReplicatedLinear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self,
        token_ids: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        cache: PagedKVCache,
        last_token_index: torch.Tensor,  # [S] which flattened tokens give logits
        on_layer_done: LayerDone | None = None,
    ) -> torch.Tensor:  # [S, vocab] float32
        x = self.model.embed_tokens(token_ids)
        cos_sin = self.rotary(meta.positions)
        for layer in self.model.layers:
            x = layer(x, cos_sin, meta, cache)
            if on_layer_done is not None:
                on_layer_done(layer.self_attn.layer_index)
        x = self.model.norm(x[last_token_index])
        return self.lm_head(x).float()

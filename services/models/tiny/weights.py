"""Random weights scaled so that every part of the model matters to its output."""

from __future__ import annotations

import math

import torch

from services.models.tiny.archs import ArchSpec


def init_weights(spec: ArchSpec, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return normal(out_features, in_features, std=1 / math.sqrt(in_features))

    def norm(scale: float = 1.0) -> torch.Tensor:
        # Not all ones, so a norm weight that fails to load changes the output.
        return scale * (1 + normal(spec.hidden, std=0.1))

    q_size, kv_size = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    # Tied weights: a large embedding would make each token's own logit dominate (the model
    # would echo its input), so keep it small and widen the logits with the final norm.
    embed_std, final_norm_scale = (0.1, 3.0) if spec.tied else (1.0, 1.0)
    w = {"model.embed_tokens.weight": normal(vocab, spec.hidden, std=embed_std)}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = linear(q_size, spec.hidden)
        w[p + "self_attn.k_proj.weight"] = linear(kv_size, spec.hidden)
        w[p + "self_attn.v_proj.weight"] = linear(kv_size, spec.hidden)
        if spec.qkv_bias:
            w[p + "self_attn.q_proj.bias"] = normal(q_size, std=0.2)
            w[p + "self_attn.k_proj.bias"] = normal(kv_size, std=0.2)
            w[p + "self_attn.v_proj.bias"] = normal(kv_size, std=0.2)
        w[p + "self_attn.o_proj.weight"] = linear(spec.hidden, q_size)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = linear(spec.intermediate, spec.hidden)
        w[p + "mlp.up_proj.weight"] = linear(spec.intermediate, spec.hidden)
        w[p + "mlp.down_proj.weight"] = linear(spec.hidden, spec.intermediate)
    w["model.norm.weight"] = norm(final_norm_scale)
    if not spec.tied:
        # Logits with a standard deviation of about 4: top-1 and top-2 rarely come close.
        w["lm_head.weight"] = normal(vocab, spec.hidden, std=4 / math.sqrt(spec.hidden))
    return w

"""Operator-level roofline of one instance: a GPU type at TP x PP serving one model.

Each operator takes max(FLOPs / (peak x compute efficiency), bytes / (bandwidth x memory
efficiency)); a layer is GEMMs + attention + two TP all-reduces + a fixed overhead. With PP the
layers split into equal stages: a prefill batch passes the stages in turn (the first stage frees
after one stage time) and decode keeps PP micro-batches in flight (a token step is one round
through every stage). All functions take numpy arrays or floats.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from services.planner.catalog import GpuSpec
from services.planner.model_spec import ModelSpec

ALLREDUCE_LATENCY_S = 8e-6  # per collective: small-message latency on a scale-up link
HOP_LATENCY_S = 20e-6  # per pipeline-stage hand-off
ACTIVATION_WIDTHS = 4  # hidden-state-sized buffers alive during a prefill chunk

Number = np.ndarray | float


def _max(a: Number, b: Number) -> Number:
    """Element-wise maximum; the builtin for plain floats (the simulator's hot path)."""
    if isinstance(a, float | int) and isinstance(b, float | int):
        return max(a, b)
    return np.maximum(a, b)


@dataclass(frozen=True)
class _PrefillCoefficients:
    """The prefill formulas' constants: per token, per squared token, per sequence, fixed."""

    gemm_flops: float
    gemm_bytes: float
    attention_flops: float
    attention_bytes: float
    allreduce_per_token: float
    layer_fixed: float
    head_flops: float
    head_bytes: float
    hop_per_token: float
    hop_fixed: float


@dataclass(frozen=True)
class InstanceShape:
    gpu: GpuSpec
    tp: int
    pp: int

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    def label(self) -> str:
        return f"{self.gpu.name} tp={self.tp} pp={self.pp}"


class PerfModel:
    """Step times and memory of one instance."""

    def __init__(self, model: ModelSpec, shape: InstanceShape, network_gbps: float) -> None:
        """`network_gbps` (gigabits/s) carries pipeline hops that leave the scale-up domain."""
        self.model = model
        self.shape = shape
        gpu, tp, pp = shape.gpu, shape.tp, shape.pp
        eff = gpu.efficiency
        self._flops = gpu.dense_flops * eff.compute
        self._mem_bw = gpu.hbm_gbps * 1e9 * eff.memory
        self._kv_bw = gpu.hbm_gbps * 1e9 * eff.attention
        self._link_bw = gpu.link_gbps * 1e9 / 2 * eff.link  # one direction
        self._overhead = eff.layer_overhead_s
        in_node = shape.gpus <= gpu.gpus_per_node
        self._hop_bw = self._link_bw if in_node else network_gbps * 1e9 / 8
        self.layers_per_stage = model.num_layers / pp
        self._q_heads = model.num_heads / tp
        self._kv_heads = math.ceil(model.num_kv_heads / tp)
        m = model
        self._layer_weights = (
            m.hidden_size * m.head_dim * (2 * self._q_heads + 2 * self._kv_heads)
            + 3 * m.hidden_size * m.intermediate_size / tp
        )
        self._head_weights = m.vocab_size * m.hidden_size / tp
        self._e = m.bytes_per_element
        self.kv_bytes_per_token_gpu = (
            self.layers_per_stage * 2 * self._kv_heads * m.head_dim * self._e
        )

    # operators -------------------------------------------------------------------------
    def _gemm(self, weights: float, rows: Number) -> Number:
        return _max(2 * weights * rows / self._flops, weights * self._e / self._mem_bw)

    def _allreduce(self, rows: Number) -> Number:
        if self.shape.tp == 1:
            return 0.0 * rows
        tp = self.shape.tp
        volume = 2 * (tp - 1) / tp * rows * self.model.hidden_size * self._e
        return 2 * (volume / self._link_bw + ALLREDUCE_LATENCY_S)

    def _hop(self, rows: Number) -> Number:
        if self.shape.pp == 1:
            return 0.0 * rows
        return rows * self.model.hidden_size * self._e / self._hop_bw + HOP_LATENCY_S

    def _prefill_layer(self, tokens: Number, squares: Number) -> Number:
        """One layer over a prefill batch of `tokens` tokens whose lengths' squares sum to
        `squares` (causal attention: 2 s^2 x heads x head size FLOPs per sequence)."""
        hd = self.model.head_dim
        attn_flops = 2 * squares * self._q_heads * hd
        attn_bytes = tokens * hd * self._e * (2 * self._q_heads + 4 * self._kv_heads)
        attention = _max(attn_flops / self._flops, attn_bytes / self._kv_bw)
        return (
            self._gemm(self._layer_weights, tokens)
            + attention
            + self._allreduce(tokens)
            + self._overhead
        )

    # prefill ---------------------------------------------------------------------------
    def prefill_stage_time(self, tokens: Number, squares: Number, sequences: Number) -> Number:
        """How long the busiest (last) stage is held by one prefill batch."""
        layers = self.layers_per_stage * self._prefill_layer(tokens, squares)
        return layers + self._gemm(self._head_weights, sequences)

    def prefill_latency(self, tokens: Number, squares: Number, sequences: Number) -> Number:
        """From the batch's start to its last layer's KV and first token."""
        layers = self.model.num_layers * self._prefill_layer(tokens, squares)
        hops = (self.shape.pp - 1) * self._hop(tokens)
        return layers + self._gemm(self._head_weights, sequences) + hops

    def prefill_times(self, tokens: int, squares: int, sequences: int) -> tuple[float, float]:
        """(prefill_stage_time, prefill_latency) of one batch, in plain float arithmetic: the
        same formulas, for the simulator's hot path."""
        c = self._scalar
        layer = (
            max(c.gemm_flops * tokens, c.gemm_bytes)
            + max(c.attention_flops * squares, c.attention_bytes * tokens)
            + c.allreduce_per_token * tokens
            + c.layer_fixed
        )
        head = max(c.head_flops * sequences, c.head_bytes)
        hops = c.hop_per_token * tokens + c.hop_fixed
        return self.layers_per_stage * layer + head, self.model.num_layers * layer + head + hops

    @functools.cached_property
    def _scalar(self) -> _PrefillCoefficients:
        m, tp, pp = self.model, self.shape.tp, self.shape.pp
        hd, e = m.head_dim, self._e
        allreduce = 4 * (tp - 1) / tp * m.hidden_size * e / self._link_bw if tp > 1 else 0.0
        return _PrefillCoefficients(
            gemm_flops=2 * self._layer_weights / self._flops,
            gemm_bytes=self._layer_weights * e / self._mem_bw,
            attention_flops=2 * self._q_heads * hd / self._flops,
            attention_bytes=hd * e * (2 * self._q_heads + 4 * self._kv_heads) / self._kv_bw,
            allreduce_per_token=allreduce,
            layer_fixed=self._overhead + (2 * ALLREDUCE_LATENCY_S if tp > 1 else 0.0),
            head_flops=2 * self._head_weights / self._flops,
            head_bytes=self._head_weights * e / self._mem_bw,
            hop_per_token=(pp - 1) * m.hidden_size * e / self._hop_bw if pp > 1 else 0.0,
            hop_fixed=(pp - 1) * HOP_LATENCY_S,
        )

    # decode ----------------------------------------------------------------------------
    def decode_round(self, batch: Number, context: Number) -> Number:
        """Time per output token for a decode batch of `batch` sequences holding `context`
        tokens in all: PP micro-batches of batch / pp, each one round through every stage."""
        pp = self.shape.pp
        micro = batch / pp
        hd = self.model.head_dim
        per_context_token = max(
            4 * self._q_heads * hd / self._flops,
            2 * self._kv_heads * hd * self._e / self._kv_bw,
        )
        layer = self._gemm(self._layer_weights, micro) + self._allreduce(micro) + self._overhead
        stage = (
            self.layers_per_stage * layer + self._gemm(self._head_weights, micro) + self._hop(micro)
        )
        return pp * stage + self.model.num_layers * per_context_token * context / pp

    # memory ----------------------------------------------------------------------------
    def weight_bytes_per_gpu(self) -> float:
        """The busiest stage: its layers plus the embedding and (untied) LM head it holds."""
        m = self.model
        heads = 1 if m.tie_embeddings or self.shape.pp > 1 else 2
        return (self.layers_per_stage * self._layer_weights + heads * self._head_weights) * self._e

    def activation_bytes_per_gpu(self, prefill_tokens: int) -> float:
        m = self.model
        width = ACTIVATION_WIDTHS * m.hidden_size + 2 * m.intermediate_size / self.shape.tp
        return prefill_tokens * width * self._e

    def kv_capacity_tokens(self, memory_utilisation: float, prefill_tokens: int) -> int:
        """Tokens of KV one instance can hold once weights and activations are placed."""
        usable = self.shape.gpu.memory_gb * 1e9 * memory_utilisation
        free = usable - self.weight_bytes_per_gpu() - self.activation_bytes_per_gpu(prefill_tokens)
        return max(0, int(free // self.kv_bytes_per_token_gpu))


def transfer_tail(kv_bytes: Number, latency: Number, layers: int, link_gbps: float) -> Number:
    """Time after prefill ends until its KV has crossed to decode: layers are sent as they
    finish, so only the last layer's share is exposed unless the link is the slower side."""
    transfer = kv_bytes * 8 / (link_gbps * 1e9)
    return _max(transfer / layers, transfer - latency * (layers - 1) / layers)

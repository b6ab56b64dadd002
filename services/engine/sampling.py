"""Per-request token sampling: greedy, temperature, top-k, top-p, with an optional seed."""

from __future__ import annotations

import torch

from proto.messages import SamplingParams


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0.0 or self.params.top_k == 1

    def sample(self, logits: torch.Tensor) -> int:
        """logits: [vocab] float32 for one sequence."""
        if self.greedy:
            return int(torch.argmax(logits))
        logits = logits / self.params.temperature
        top_k = self.params.top_k
        if 0 < top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always the first token)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= self.params.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))

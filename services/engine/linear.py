"""The matmul of every linear layer. On the CPU it goes through oneDNN (torch's mkldnn
linear, the kernel vLLM's CPU backend also uses) instead of F.linear's MKL sgemm: measured
on SmolLM2-135M on one AMD EPYC thread (docs/benchmarks.md, "engines alone"), the decode step
took 0.70x, 0.65x and 0.62x the time at batch 1, 8 and 32, and a 256-token prefill 0.55x,
with the same greedy tokens. MKL's generic path on a non-Intel CPU is the likely reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, for x [T, in] and weight [out, in]."""
    if _ONEDNN and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES and x.dim() == 2:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)

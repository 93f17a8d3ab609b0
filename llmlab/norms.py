"""Normalization layers: RMSNorm and a factory for the two norms the model can use.

What it implements
- ``RMSNorm`` (Zhang and Sennrich 2019): y = x / sqrt(mean(x^2) + eps) * weight. Unlike LayerNorm it
  neither subtracts the mean nor adds a bias, which saves a reduction and works as well in LLMs
  (LLaMA, Mistral, ChatGLM2/3). It equals ``torch.nn.RMSNorm`` and transformers' ``LlamaRMSNorm``
  (which, like this one, normalizes in float32 and casts back).
- ``make_norm``: "rmsnorm" or "layernorm" (``torch.nn.LayerNorm``, Ba et al. 2016, used by GPT-2/3).

What it leaves out: DeepNorm is a residual scaling, not a norm; it lives in ``llmlab.model``.
"""

from __future__ import annotations

import torch
from torch import nn

from llmlab.shapes import check_choice, check_float, check_int, check_tensor

NORMS = ("rmsnorm", "layernorm")


class RMSNorm(nn.Module):
    """x (..., C) -> x / sqrt(mean_c x^2 + eps) * weight, computed in float32.

    >>> RMSNorm(8)(torch.randn(2, 3, 8)).shape
    torch.Size([2, 3, 8])
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, minimum=1)
        self.eps = check_float("eps", eps, low=0.0)
        self.weight = nn.Parameter(torch.ones(self.dim))  # (C,)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must end in C={self.dim} channels, got shape {tuple(x.shape)}")
        h = x.float()  # squares of half-precision activations overflow easily; reduce in float32
        h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., C)
        return self.weight * h.to(x.dtype)  # (..., C)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """A "rmsnorm" (no bias by definition) or "layernorm" (optionally without bias) over C = dim channels."""
    check_choice("kind", kind, NORMS)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)

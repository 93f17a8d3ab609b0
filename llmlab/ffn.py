"""Position-wise feed-forward blocks: the GELU MLP of GPT-2 and the SwiGLU MLP of LLaMA.

What it implements
- ``GELUMLP``: down_proj(GELU(up_proj(x))), hidden width usually 4C ("Attention Is All You Need"
  section 3.3 with ReLU; GPT-2 with the tanh approximation of GELU, Hendrycks and Gimpel 2016,
  which is transformers' ``gelu_new``).
- ``SwiGLUMLP``: down_proj(SiLU(gate_proj(x)) * up_proj(x)) (Shazeer 2020, "GLU Variants Improve
  Transformer"), the block of transformers' ``LlamaMLP``. It has three matrices instead of two,
  so its hidden width is usually about 8C/3 to keep the parameter count of a 4C GELU MLP
  (``swiglu_hidden``).

What it leaves out: GeGLU/ReGLU and other gated variants; mixture-of-experts (``llmlab.moe``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.shapes import check_int


def swiglu_hidden(n_embd: int, multiple_of: int = 32) -> int:
    """LLaMA's rule: F = 8C/3 rounded up to a multiple of ``multiple_of`` (C=4096 -> 11008 with 256).

    >>> swiglu_hidden(128)
    352
    """
    n_embd = check_int("n_embd", n_embd, minimum=1)
    multiple_of = check_int("multiple_of", multiple_of, minimum=1)
    hidden = int(2 * (4 * n_embd) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class GELUMLP(nn.Module):
    """x (B, T, C) -> down_proj(GELU_tanh(up_proj(x))) (B, T, C), hidden width F.

    >>> GELUMLP(16, 64)(torch.randn(2, 3, 16)).shape
    torch.Size([2, 3, 16])
    """

    def __init__(self, n_embd: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.up_proj = nn.Linear(check_int("n_embd", n_embd, minimum=1), check_int("hidden", hidden, minimum=1), bias)
        self.down_proj = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up_proj(x), approximate="tanh")  # (B, T, F)
        return self.down_proj(h)  # (B, T, C)


class SwiGLUMLP(nn.Module):
    """x (B, T, C) -> down_proj(SiLU(gate_proj(x)) * up_proj(x)) (B, T, C), hidden width F.

    >>> SwiGLUMLP(16, 48)(torch.randn(2, 3, 16)).shape
    torch.Size([2, 3, 16])
    """

    def __init__(self, n_embd: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        n_embd = check_int("n_embd", n_embd, minimum=1)
        hidden = check_int("hidden", hidden, minimum=1)
        self.gate_proj = nn.Linear(n_embd, hidden, bias=bias)
        self.up_proj = nn.Linear(n_embd, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, F): the gate decides what passes
        return self.down_proj(h)  # (B, T, C)

"""Counting the floating-point operations a piece of PyTorch code actually runs.

What it implements
- ``count_flops(fn, *args, **kwargs)``: run ``fn(*args, **kwargs)`` under PyTorch's
  ``torch.utils.flop_counter.FlopCounterMode`` and return the total FLOPs it counted.
- ``count_flops_by_operator(fn, *args, **kwargs)``: the same run, split by ATen operator
  (``"aten.mm"``, ``"aten.bmm"``, ...), for checking *which* kernels did the work.
- ``matmul_flops(m, n, k)``: the analytic count those operators use, 2 m n k for an (m, k) x (k, n)
  product (one multiply and one add per term; Kaplan et al. 2020, "Scaling Laws for Neural
  Language Models", section 2.1, count a forward pass as 2 FLOPs per parameter per token).

What it leaves out: ``FlopCounterMode`` has formulas for matrix multiplications, convolutions and
the fused CUDA attention kernels only, so element-wise work (softmax, norms, activations, the
optimizer update) counts as zero, embedding lookups do no FLOPs, and on the CPU
``scaled_dot_product_attention`` (whose CPU kernel has no formula) counts as zero too: count
attention through an explicit ``q @ k.T`` path (``attn_impl="manual"`` in ``llmlab.model``).
A backward pass inside ``fn`` is counted too (about twice the forward for a linear layer: one
product for the input gradient, one for the weight gradient). Tensors on the ``meta`` device
are counted without doing the work, so a 7B-parameter shape costs nothing to count.

Reference implementation: ``torch/utils/flop_counter.py`` (PyTorch >= 2.1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.flop_counter import FlopCounterMode

from llmlab.shapes import check_int


def _counted(fn: Callable[..., Any], args: tuple, kwargs: dict) -> FlopCounterMode:
    """Run ``fn(*args, **kwargs)`` inside a silent ``FlopCounterMode`` and return the counter."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args, **kwargs)
    return counter


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Total FLOPs PyTorch counts while running ``fn(*args, **kwargs)`` (forward and any backward).

    Wrap the call in ``torch.no_grad()`` yourself when the autograd graph is not wanted; the count
    is the same, only memory differs.

    >>> import torch
    >>> a, b = torch.ones(4, 3), torch.ones(3, 5)  # (m, k), (k, n)
    >>> count_flops(torch.matmul, a, b) == matmul_flops(4, 5, 3) == 120
    True
    """
    return int(_counted(fn, args, kwargs).get_total_flops())


def count_flops_by_operator(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, int]:
    """FLOPs of ``fn(*args, **kwargs)`` per ATen operator, e.g. ``{"aten.bmm": 2048}``, sorted by name.

    Operators with no FLOP formula (softmax, additions, ...) do not appear.

    >>> import torch
    >>> x = torch.ones(2, 4, 3)  # (B, m, k)
    >>> count_flops_by_operator(lambda: x @ x.transpose(1, 2))  # (B, m, m): 2 * 2*4*4*3
    {'aten.bmm': 192}
    """
    counts = _counted(fn, args, kwargs).get_flop_counts()["Global"]
    return {str(op): int(n) for op, n in sorted(counts.items(), key=lambda item: str(item[0]))}


def matmul_flops(m: int, n: int, k: int) -> int:
    """FLOPs of an (m, k) x (k, n) matrix product: m*n dot products of length k, 2 FLOPs per term.

    >>> matmul_flops(4096, 1, 4096)  # one token through a 4096 x 4096 linear layer
    33554432
    """
    for name, value in (("m", m), ("n", n), ("k", k)):
        check_int(name, value, minimum=0)
    return 2 * m * n * k

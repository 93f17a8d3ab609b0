"""Exercise checkers for notebook 04 Attention."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_attention"]


def _attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    from llmlab.attention import scaled_dot_product_attention

    return scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, T, D)


def check_attention(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor],
                    trials: int = 5, seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(q, k, v, causal) -> softmax(q k^T / sqrt(D) [+ causal mask]) v, all (B, H, T, D)."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        shape = (_randint(g, 1, 2), _randint(g, 2, 4), _randint(g, 2, 9), 4 * _randint(g, 1, 8))
        q, k, v = (torch.randn(shape, generator=g) for _ in range(3))  # (B, H, T, D) each
        cases.append((q, k, v, bool(_randint(g, 0, 1)) or len(cases) == 0))
    return _run("attention", fn, _attention_reference, cases,
                "scale by 1/sqrt(D) with D the per-head dimension, softmax over the keys (last axis)",
                MISTAKES["attention"], verbose=verbose)


def _attention_with_scale(q, k, v, causal, scale):
    scores = q @ k.transpose(-2, -1) * scale  # (B, H, T, T)
    if causal:
        t = q.shape[-2]
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v



MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "attention": {
        "model_width": (lambda q, k, v, c: _attention_with_scale(q, k, v, c, 1 / math.sqrt(q.shape[1] * q.shape[3])),
                        "scale by 1/sqrt(d_k), the per-head dimension, not the model width H*D"),
        "no_scale": (lambda q, k, v, c: _attention_with_scale(q, k, v, c, 1.0),
                     "divide the scores by sqrt(D) before the softmax"),
        "no_mask": (lambda q, k, v, c: _attention_with_scale(q, k, v, False, 1 / math.sqrt(q.shape[-1])),
                    "with causal=True, mask the future keys with -inf before the softmax"),
    },
}

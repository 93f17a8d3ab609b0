"""Exercise checkers for notebook 04 Attention: scaled dot-product attention and grouped-query attention."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_attention", "check_gqa_attention"]


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


def _gqa_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    from llmlab.attention import scaled_dot_product_attention

    return scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)  # (B, H, T, D)


def check_gqa_attention(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor],
                        trials: int = 5, seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(q (B, H, T, D), k (B, K, T, D), v (B, K, T, D), causal) -> (B, H, T, D): grouped-query
    attention, query head h reads key/value head h // (H/K) (transformers' ``repeat_kv``)."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        b, kv, group = _randint(g, 1, 2), _randint(g, 2, 4), _randint(g, 2, 4)  # K >= 2 and H/K >= 2
        t, d = _randint(g, 2, 9), 4 * _randint(g, 1, 8)
        q = torch.randn(b, kv * group, t, d, generator=g)  # (B, H, T, D)
        k, v = (torch.randn(b, kv, t, d, generator=g) for _ in range(2))  # (B, K, T, D) each
        cases.append((q, k, v, bool(_randint(g, 0, 1)) or len(cases) == 0))
    return _run("gqa_attention", fn, _gqa_attention_reference, cases,
                "give each group of H/K neighbouring query heads one key/value head: k.repeat_interleave(H // K, "
                "dim=1), the same for v, then ordinary attention (masked when causal)", MISTAKES["gqa_attention"],
                verbose=verbose)


def _gqa_with_heads(q, k, v, causal, kv_index):
    heads = kv_index(q.shape[1], k.shape[1])  # (H,): the key/value head each query head reads
    return _attention_with_scale(q, k[:, heads], v[:, heads], causal, 1 / math.sqrt(q.shape[-1]))


MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "attention": {
        "model_width": (lambda q, k, v, c: _attention_with_scale(q, k, v, c, 1 / math.sqrt(q.shape[1] * q.shape[3])),
                        "scale by 1/sqrt(d_k), the per-head dimension, not the model width H*D"),
        "no_scale": (lambda q, k, v, c: _attention_with_scale(q, k, v, c, 1.0),
                     "divide the scores by sqrt(D) before the softmax"),
        "no_mask": (lambda q, k, v, c: _attention_with_scale(q, k, v, False, 1 / math.sqrt(q.shape[-1])),
                    "with causal=True, mask the future keys with -inf before the softmax"),
    },
    "gqa_attention": {
        "tiled": (lambda q, k, v, c: _gqa_with_heads(q, k, v, c, lambda h, kv: torch.arange(h) % kv),
                  "query head h uses key/value head h // (H/K): repeat_interleave (0,0,1,1), not repeat "
                  "(0,1,0,1), which gives a query head another group's keys"),
        "mqa": (lambda q, k, v, c: _gqa_with_heads(q, k, v, c, lambda h, kv: torch.zeros(h, dtype=torch.long)),
                "all query heads share key/value head 0, which is multi-query attention; with K heads, "
                "each group of H/K query heads has its own"),
        "no_mask": (lambda q, k, v, c: _gqa_with_heads(q, k, v, False, lambda h, kv: torch.arange(h) // (h // kv)),
                    "with causal=True, mask the future keys with -inf before the softmax"),
    },
}

"""Exercise checkers for notebook 10 FlashAttention: the online softmax and attention over key
blocks."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_online_softmax", "check_tiled_attention"]


# ----------------------------------------------------------------------------------------------
# Exercise 1: the softmax of a row from one pass over its blocks


def _online_softmax_reference(x: torch.Tensor, block_size: int) -> torch.Tensor:
    from llmlab.flash_attention import online_softmax

    m, l = online_softmax(x.split(block_size))  # running max and sum over the blocks
    return torch.exp(x - m) / l  # (N,)


def _score_row(g: torch.Generator) -> tuple[torch.Tensor, int]:
    """A row of N float64 scores and a block size giving at least 3 blocks; the row's maximum lies
    in its second half, so the running maximum changes after the first block."""
    block = _randint(g, 3, 24)
    n = _randint(g, 3 * block + 1, 12 * block)
    x = torch.randn(n, generator=g, dtype=torch.float64) * (1 + 4 * torch.rand((), generator=g).item())
    top, late = int(x.argmax()), _randint(g, max(n // 2, block), n - 1)
    x[[top, late]] = x[[late, top]]  # (N,)
    return x, block


def check_online_softmax(fn: Callable[[torch.Tensor, int], torch.Tensor], trials: int = 5,
                         seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(x, block_size) -> softmax(x): x is one row (N,) of float64 scores, read in blocks of
    block_size while keeping a running maximum m and a running sum l of exp(x - m)."""
    g = _generator(seed)
    cases = [_score_row(g) for _ in range(trials)]
    return _run("online_softmax", fn, _online_softmax_reference, cases,
                "per block: m_new = max(m, max(block)); l = l * exp(m - m_new) + sum(exp(block - m_new)); "
                "at the end softmax = exp(x - m) / l", MISTAKES["online_softmax"], rtol=1e-9, atol=1e-12,
                verbose=verbose)


def _online_softmax_no_rescale(x, block_size):
    m, l = torch.tensor(-math.inf, dtype=x.dtype), torch.tensor(0.0, dtype=x.dtype)
    for block in x.split(block_size):
        m = torch.maximum(m, block.max())
        l = l + torch.exp(block - m).sum()  # the old sum stays relative to the old maximum
    return torch.exp(x - m) / l


def _online_softmax_block_max(x, block_size):
    l = torch.tensor(0.0, dtype=x.dtype)
    for block in x.split(block_size):
        l = l + torch.exp(block - block.max()).sum()  # each block against its own maximum
    return torch.exp(x - x.max()) / l


def _online_softmax_per_block(x, block_size):
    return torch.cat([torch.softmax(block, dim=0) for block in x.split(block_size)])


# ----------------------------------------------------------------------------------------------
# Exercise 2: attention of a query block over key/value blocks


def _tiled_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> torch.Tensor:
    from llmlab.flash_attention import FlashConfig, flash_attention_forward

    tiles = FlashConfig(block_q=q.shape[0], block_k=block_size)  # all queries in one tile
    return flash_attention_forward(q[None, None], k[None, None], v[None, None], config=tiles).output[0, 0]


def _attention_case(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    t, s, d, block = _randint(g, 1, 24), _randint(g, 20, 160), 2 ** _randint(g, 3, 6), _randint(g, 4, 32)
    q = torch.randn(t, d, generator=g, dtype=torch.float64) * 2  # (T, D)
    k = torch.randn(s, d, generator=g, dtype=torch.float64)  # (S, D)
    v = torch.randn(s, d, generator=g, dtype=torch.float64)  # (S, D)
    return q, k, v, block


def check_tiled_attention(fn: Callable[..., torch.Tensor], trials: int = 5, seed: int | None = None,
                          verbose: bool = True) -> Verdict:
    """fn(q, k, v, block_size) -> softmax(q k^T / sqrt(D)) v for one head, q (T, D), k and v (S, D),
    float64, reading the keys and values block_size rows at a time (never all T x S scores at once)."""
    g = _generator(seed)
    cases = [_attention_case(g) for _ in range(trials)]
    return _run("tiled_attention", fn, _tiled_attention_reference, cases,
                "per key block: s = q k_j^T / sqrt(D); m_new = max(m, rowmax(s)); p = exp(s - m_new); "
                "alpha = exp(m - m_new); l = alpha l + rowsum(p); o = alpha o + p v_j; at the end o / l",
                MISTAKES["tiled_attention"], rtol=1e-9, atol=1e-12, verbose=verbose)


def _tiled(q, k, v, block_size, scale, rescale_output=True):
    m = torch.full((q.shape[0],), -math.inf, dtype=q.dtype)  # (T,)
    l = torch.zeros(q.shape[0], dtype=q.dtype)  # (T,)
    o = torch.zeros_like(q)  # (T, D)
    for j in range(0, k.shape[0], block_size):
        s = q @ k[j : j + block_size].T * scale  # (T, block)
        m_new = torch.maximum(m, s.amax(dim=1))
        p = torch.exp(s - m_new[:, None])
        alpha = torch.exp(m - m_new)
        l = alpha * l + p.sum(dim=1)
        o = (alpha[:, None] * o if rescale_output else o) + p @ v[j : j + block_size]
        m = m_new
    return o / l[:, None]


MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "online_softmax": {
        "no_rescale": (_online_softmax_no_rescale,
                       "when the maximum grows, multiply the running sum by exp(m_old - m_new) before adding the "
                       "new block: its terms were computed against the old maximum"),
        "block_max_only": (_online_softmax_block_max,
                           "each block's sum was taken against that block's own maximum; they must all be expressed "
                           "against one running maximum (rescale by exp(m_old - m_new)), as the final "
                           "exp(x - m) is"),
        "per_block_softmax": (_online_softmax_per_block,
                              "this is a softmax of each block on its own (each sums to 1); the whole row must "
                              "sum to 1, so keep a running max and sum across blocks and normalize at the end"),
    },
    "tiled_attention": {
        "no_output_rescale": (lambda q, k, v, b: _tiled(q, k, v, b, q.shape[-1] ** -0.5, rescale_output=False),
                              "the accumulated output must be rescaled by exp(m_old - m_new) whenever the running "
                              "maximum grows, exactly like the running sum l"),
        "scale_by_d": (lambda q, k, v, b: _tiled(q, k, v, b, 1 / q.shape[-1]),
                       "the scores are divided by sqrt(D), the square root of the head dimension, not by D"),
        "no_scale": (lambda q, k, v, b: _tiled(q, k, v, b, 1.0),
                     "the scores q k^T must be divided by sqrt(D) before the softmax"),
    },
}

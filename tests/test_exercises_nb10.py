"""llmlab.exercises.nb10: the online-softmax and tiled-attention checkers accept solutions written
from the formulas (not llmlab's reference) and reject each recognized mistake, naming it."""

import math

import torch
import torch.nn.functional as F

from llmlab.exercises import check_online_softmax, check_tiled_attention


def online_softmax(x, block_size):
    m, l = -math.inf, 0.0
    for block in x.split(block_size):
        m_new = max(m, block.max().item())
        l = l * math.exp(m - m_new) + torch.exp(block - m_new).sum().item()
        m = m_new
    return torch.exp(x - m) / l


def tiled_attention(q, k, v, block_size):
    d = q.shape[-1]
    m = torch.full((q.shape[0], 1), -math.inf, dtype=q.dtype)  # (T, 1)
    l = torch.zeros(q.shape[0], 1, dtype=q.dtype)  # (T, 1)
    o = torch.zeros_like(q)  # (T, D)
    for k_j, v_j in zip(k.split(block_size), v.split(block_size), strict=True):
        s = q @ k_j.T / math.sqrt(d)  # (T, block)
        m_new = torch.maximum(m, s.max(dim=1, keepdim=True).values)
        p = torch.exp(s - m_new)
        l = l * torch.exp(m - m_new) + p.sum(dim=1, keepdim=True)
        o = o * torch.exp(m - m_new) + p @ v_j
        m = m_new
    return o / l


# the solutions written from the formula; tests/test_exercises.py checks that each checker accepts
# its solution and rejects every mistake it lists
SOLUTIONS = {"online_softmax": online_softmax, "tiled_attention": tiled_attention}


def test_the_solutions_agree_with_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, generator=g, dtype=torch.float64) * 5
    torch.testing.assert_close(online_softmax(x, 7), torch.softmax(x, 0), rtol=1e-12, atol=1e-14)
    q = torch.randn(9, 16, generator=g, dtype=torch.float64)  # (T, D)
    k, v = torch.randn(2, 50, 16, generator=g, dtype=torch.float64)  # (S, D) each
    torch.testing.assert_close(tiled_attention(q, k, v, 8), F.scaled_dot_product_attention(q, k, v),
                               rtol=1e-12, atol=1e-12)


def test_an_unrecognized_wrong_answer_gets_the_general_hint():
    verdict = check_online_softmax(lambda x, b: torch.exp(x) / torch.exp(x).sum() * 2, seed=0, verbose=False)
    assert not verdict and verdict.hint.startswith("per block: m_new = max(m, max(block))")
    verdict = check_tiled_attention(lambda q, k, v, b: q, seed=0, verbose=False)
    assert not verdict and verdict.hint.startswith("per key block: s = q k_j^T / sqrt(D)")

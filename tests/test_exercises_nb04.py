"""llmlab.exercises.nb04: the grouped-query-attention checker accepts a solution written from the
formula (not llmlab's reference) and rejects each recognized mistake, naming it."""

import math

import torch
import torch.nn.functional as F

from llmlab.exercises import check_gqa_attention


def gqa_attention(q, k, v, causal):
    h, kv, t = q.shape[1], k.shape[1], q.shape[2]
    heads = torch.arange(h) // (h // kv)  # (H,): query head h reads key/value head h // G
    scores = q @ k[:, heads].transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    if causal:
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(dim=-1) @ v[:, heads]  # (B, H, T, D)


# the solutions written from the formula; tests/test_exercises.py checks that each checker accepts
# its solution and rejects every mistake it lists
SOLUTIONS = {"gqa_attention": gqa_attention}


def test_the_solution_agrees_with_torch_enable_gqa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 6, 16, generator=g)  # (B, H, T, D)
    k, v = torch.randn(2, 2, 2, 6, 16, generator=g).unbind(0)  # (B, K, T, D) each
    for causal in (True, False):
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        torch.testing.assert_close(gqa_attention(q, k, v, causal), expected)


def test_an_unrecognized_wrong_answer_gets_the_general_hint():
    verdict = check_gqa_attention(lambda q, k, v, c: q, seed=0, verbose=False)
    assert not verdict and verdict.hint.startswith("give each group of H/K neighbouring query heads")


def test_standard_attention_with_unexpanded_heads_fails_cleanly():
    # plain multi-head attention cannot broadcast (B, H, T, D) against (B, K, T, D): a verdict, not a crash
    verdict = check_gqa_attention(lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c),
                                  seed=0, verbose=False)
    assert not verdict and verdict.message.startswith("raised ")

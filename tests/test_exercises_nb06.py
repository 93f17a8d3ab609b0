"""llmlab.exercises.nb06: the top-k router and load-balancing-loss checkers accept solutions written
from the formulas (not llmlab's reference) and reject each recognized mistake, naming it."""

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from llmlab.exercises import check_load_balancing_loss, check_topk_router


def topk_router(logits, k):
    # top-k of the logits, then a softmax over those k: the same weights as softmax -> top-k -> renormalize
    top, indices = logits.float().topk(k, dim=-1)  # (N, k) each
    return torch.softmax(top, dim=-1), indices


def load_balancing_loss(logits, k):
    n, e = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
    chosen = probs.topk(k, dim=-1).indices  # (N, k)
    counts = torch.zeros(e).index_add_(0, chosen.flatten(), torch.ones(n * k))  # (E,)
    return e * torch.dot(counts / n, probs.mean(dim=0))


# the solutions written from the formula; tests/test_exercises.py checks that each checker accepts
# its solution and rejects every mistake it lists
SOLUTIONS = {"topk_router": topk_router, "load_balancing_loss": load_balancing_loss}


def test_the_solutions_agree_with_transformers_and_the_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 8, generator=g)  # (N, E)
    probs = torch.softmax(logits, dim=-1)
    weights, indices = topk_router(logits, 2)
    expected = probs.topk(2, dim=-1).values
    torch.testing.assert_close(weights, expected / expected.sum(dim=-1, keepdim=True))
    assert torch.equal(indices, probs.topk(2, dim=-1).indices)
    reference = load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    torch.testing.assert_close(load_balancing_loss(logits, 2), reference)
    assert float(load_balancing_loss(torch.zeros(6, 8), 2)) == pytest.approx(2.0)  # balanced: k


def test_an_unrecognized_wrong_answer_gets_the_general_hint():
    verdict = check_topk_router(lambda x, k: x.topk(k, dim=-1), seed=0, verbose=False)
    assert not verdict and verdict.hint.startswith("softmax over the experts (last axis)")
    verdict = check_load_balancing_loss(lambda x, k: torch.tensor(1.0), seed=0, verbose=False)
    assert not verdict and verdict.hint.startswith("E * sum_e f_e * P_e as a 0-d tensor")
    verdict = check_load_balancing_loss(lambda x, k: float(load_balancing_loss(x, k)), seed=0, verbose=False)
    assert not verdict and "got " in verdict.message  # a Python float is not the differentiable 0-d tensor

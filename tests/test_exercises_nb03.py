"""llmlab.exercises.nb03: the ALiBi checker accepts a solution written from the paper's rule (not
llmlab's reference) and rejects each recognized mistake, naming it."""

import math

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from llmlab.exercises import check_alibi_bias


def slopes(h):
    def geometric(n):  # 2^(-8/n), 2^(-16/n), ..., 2^(-8)
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    n = 2 ** int(math.log2(h))
    return torch.tensor(geometric(n) + geometric(2 * n)[0::2][: h - n])  # (H,)


def alibi_bias(h, t):
    rows = torch.arange(t)[:, None].expand(t, t)  # (T, T): query i
    cols = torch.arange(t)[None, :].expand(t, t)  # (T, T): key j
    bias = -slopes(h)[:, None, None] * (rows - cols)  # (H, T, T)
    return torch.where(cols > rows, float("-inf"), bias)


# the solutions written from the formula; tests/test_exercises.py checks that each checker accepts
# its solution and rejects every mistake it lists
SOLUTIONS = {"alibi_bias": alibi_bias}


@pytest.mark.parametrize("heads", [1, 5, 8, 12, 24])
def test_the_solution_slopes_are_blooms(heads):
    bloom = build_alibi_tensor(torch.ones(1, 3), heads, torch.float32)  # (H, 1, S): slope_h * j
    torch.testing.assert_close(slopes(heads), bloom[:, 0, 1])


def test_an_unrecognized_wrong_answer_gets_the_general_hint():
    verdict = check_alibi_bias(lambda h, t: torch.zeros(h, t, t), seed=0, verbose=False)
    assert not verdict and verdict.hint.startswith("slopes 2^(-8h/n) for the n = largest power of two")

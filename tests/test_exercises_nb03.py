"""llmlab.exercises.nb03: the ALiBi checker accepts a solution written from the paper's rule (not
llmlab's reference) and rejects each recognized mistake, naming it."""

import math

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from llmlab.exercises import MISTAKES, check_alibi_bias


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


@pytest.mark.parametrize("seed", [0, 1, None])
def test_checker_accepts_a_correct_solution(seed, capsys):
    verdict = check_alibi_bias(alibi_bias, seed=seed)
    assert verdict, str(verdict)
    assert capsys.readouterr().out.startswith("PASS [alibi_bias] matches the reference on 5 fresh inputs")


@pytest.mark.parametrize("heads", [1, 5, 8, 12, 24])
def test_the_solution_slopes_are_blooms(heads):
    bloom = build_alibi_tensor(torch.ones(1, 3), heads, torch.float32)  # (H, 1, S): slope_h * j
    torch.testing.assert_close(slopes(heads), bloom[:, 0, 1])


@pytest.mark.parametrize("mistake", sorted(MISTAKES["alibi_bias"]))
def test_checker_rejects_each_mistake_and_names_it(mistake):
    wrong, why = MISTAKES["alibi_bias"][mistake]
    for seed in (0, 1, 2, None):
        verdict = check_alibi_bias(wrong, seed=seed, verbose=False)
        assert not verdict and verdict.hint == why, (mistake, seed, str(verdict))


def test_the_checker_knows_at_least_two_mistakes():
    assert len(MISTAKES["alibi_bias"]) >= 2


def test_an_unrecognized_wrong_answer_gets_the_general_hint():
    verdict = check_alibi_bias(lambda h, t: torch.zeros(h, t, t), seed=0, verbose=False)
    assert not verdict and verdict.hint.startswith("slopes 2^(-8h/n) for the n = largest power of two")

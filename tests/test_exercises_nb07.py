"""llmlab.exercises.nb07: the next-token-loss and learning-rate-schedule checkers accept solutions
written from the formulas (not llmlab's reference) and reject each recognized mistake, naming it."""

import math

import pytest
import torch

from llmlab.exercises import check_lr_schedule, check_next_token_loss


def next_token_loss(logits, labels):
    logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t + 1
    keep = labels != -100  # (B, T - 1)
    logp = torch.log_softmax(logits.double(), dim=-1)  # (B, T - 1, V)
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, T - 1)
    return (nll * keep).sum() / keep.sum()


def lr_schedule(step, max_lr, min_lr, warmup, max_steps):
    if step < warmup:
        return max_lr * (step + 1) / (warmup + 1)
    p = min(1.0, (step - warmup) / (max_steps - warmup))
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * p))


# the solutions written from the formula; tests/test_exercises.py checks that each checker accepts
# its solution and rejects every mistake it lists
SOLUTIONS = {"next_token_loss": next_token_loss, "lr_schedule": lr_schedule}


def test_results_as_plain_floats_or_tensors_are_accepted():
    assert check_next_token_loss(lambda lo, la: next_token_loss(lo, la).item(), seed=0, verbose=False)
    assert check_lr_schedule(lambda *a: torch.tensor(lr_schedule(*a), dtype=torch.float64), seed=0,
                             verbose=False)


def test_the_schedule_matches_nanogpt_numbers():
    # warm-up of 10 steps to 1e-3, cosine to 1e-4 at step 110: the peak at step 10, halfway at 60
    args = (1e-3, 1e-4, 10, 110)
    assert math.isclose(lr_schedule(0, *args), 1e-3 / 11) and lr_schedule(10, *args) == 1e-3
    assert math.isclose(lr_schedule(60, *args), 5.5e-4) and math.isclose(lr_schedule(500, *args), 1e-4)


def test_an_unrecognized_wrong_answer_gets_the_general_hint():
    verdict = check_next_token_loss(lambda logits, labels: logits.mean(), seed=0, verbose=False)
    assert not verdict and verdict.hint.startswith("score logits[:, :-1] against labels[:, 1:]")
    verdict = check_lr_schedule(lambda step, *rest: 1e-3, seed=0, verbose=False)
    assert not verdict and verdict.hint.startswith("warm-up: max_lr * (step + 1) / (warmup + 1)")


def test_fn_must_be_callable():
    for check in (check_next_token_loss, check_lr_schedule):
        with pytest.raises(TypeError, match="fn must be the function to check, got int"):
            check(42, seed=0)

"""llmlab.exercises.nb17: the DPO-loss and GRPO-advantage checkers accept a solution written from the
formula (not llmlab.alignment) and reject each listed mistake, naming it."""

import math

import torch

from llmlab import exercises as ex
from llmlab.exercises import nb17


def dpo_loss(pc, pr, rc, rr, beta):
    margin = beta * ((pc - rc) - (pr - rr))  # (B,)
    return torch.log1p(torch.exp(-margin))  # -log sigmoid(m) = log(1 + e^-m)


def grpo_advantages(rewards, group_size):
    out = []
    for group in rewards.split(group_size):
        mean = sum(group.tolist()) / group_size
        std = math.sqrt(sum((x - mean) ** 2 for x in group.tolist()) / (group_size - 1))
        out += [(x - mean) / (std + 1e-8) for x in group.tolist()]
    return torch.tensor(out)


# the solutions written from the formula; tests/test_exercises.py checks that each checker accepts
# its solution and rejects every mistake it lists
SOLUTIONS = {"dpo_loss": dpo_loss, "grpo_advantages": grpo_advantages}


def test_grpo_without_eps_fails_on_a_uniform_group_with_the_general_hint():
    def no_eps(rewards, group_size):
        r = rewards.view(-1, group_size)
        return ((r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True)).reshape(-1)

    verdict = ex.check_grpo_advantages(no_eps, seed=0, verbose=False)
    assert not verdict and "not NaN" in verdict.hint


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference():
    logps = torch.tensor([-12.0, -40.0])
    loss = nb17._dpo_loss_reference(logps, logps - 3, logps, logps - 3, 0.1)
    assert torch.allclose(loss, torch.full((2,), math.log(2)))

"""Exercise checkers for notebook 17 RLHF, DPO and GRPO: the DPO loss and GRPO's group-relative
advantages."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_dpo_loss", "check_grpo_advantages"]


def _dpo_loss_reference(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                        ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    from llmlab.alignment import dpo_loss

    return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)[0]  # (B,)


def _sequence_logps(g: torch.Generator, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy, reference) summed log-probs of b answers: negative, the policy near the reference."""
    ref = -(1.0 + 60.0 * torch.rand(b, generator=g))  # (B,)
    return ref + 3.0 * torch.randn(b, generator=g), ref  # (B,), (B,)


def check_dpo_loss(fn: Callable[..., torch.Tensor], trials: int = 5, seed: int | None = None,
                   verbose: bool = True) -> Verdict:
    """fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    -> the DPO loss of each pair (B,) (Rafailov et al. 2023, eq. 7, not averaged); each input (B,)
    holds one answer's log-probability summed over its tokens."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        b = _randint(g, 1, 8)
        (pc, rc), (pr, rr) = _sequence_logps(g, b), _sequence_logps(g, b)
        cases.append((pc, pr, rc, rr, round(0.05 + 0.45 * float(torch.rand(1, generator=g)), 3)))
    return _run("dpo_loss", fn, _dpo_loss_reference, cases,
                "-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))) per pair, with w the chosen and l "
                "the rejected answer", MISTAKES["dpo_loss"], verbose=verbose)


def _grpo_advantages_reference(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    from llmlab.alignment import group_normalized_advantages

    return group_normalized_advantages(rewards, group_size)  # (N*G,)


def _group_rewards(g: torch.Generator, binary: bool) -> tuple[torch.Tensor, int]:
    """Rewards (N*G,) of N >= 2 prompts with G answers each, group-contiguous; 0/1 or real-valued."""
    n, group = _randint(g, 2, 6), _randint(g, 2, 8)
    if binary:  # a verifiable reward: the answer is right or wrong
        r = torch.randint(0, 2, (n, group), generator=g).float()  # (N, G)
        r[0] = float(_randint(g, 0, 1))  # a group whose answers all score the same
    else:  # a reward model's score
        r = torch.randn(n, group, generator=g) + 2.0 * torch.randn(n, 1, generator=g)  # (N, G)
    return r.reshape(-1), group


def check_grpo_advantages(fn: Callable[[torch.Tensor, int], torch.Tensor], trials: int = 6,
                          seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(rewards, group_size) -> GRPO's advantages (N*G,): rewards (N*G,) hold the G answers of
    prompt 0, then the G answers of prompt 1, ...; each reward is standardized within its group."""
    g = _generator(seed)
    cases = [_group_rewards(g, binary=i % 2 == 0) for i in range(max(trials, 2))]
    # rtol 1e-3 accepts any small eps in the std's denominator (trl uses 1e-4, llmlab 1e-6)
    return _run("grpo_advantages", fn, _grpo_advantages_reference, cases,
                "(reward - mean of its group) / (std of its group + a small eps): the eps keeps a group "
                "whose answers all score the same at advantage 0, not NaN", MISTAKES["grpo_advantages"],
                rtol=1e-3, atol=1e-4, verbose=verbose)


def _grpo_whole_batch(rewards, group_size):
    return (rewards - rewards.mean()) / (rewards.std() + 1e-6)


def _grpo_no_std(rewards, group_size):
    r = rewards.view(-1, group_size)  # (N, G)
    return (r - r.mean(dim=1, keepdim=True)).reshape(-1)


def _grpo_population_std(rewards, group_size):
    r = rewards.view(-1, group_size)  # (N, G)
    return ((r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, unbiased=False, keepdim=True) + 1e-6)).reshape(-1)


MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "dpo_loss": {
        "no_beta": (lambda pc, pr, rc, rr, beta: -F.logsigmoid((pc - rc) - (pr - rr)),
                    "beta multiplies the log-ratio margin inside the sigmoid"),
        "reference_sign": (lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * ((pc + rc) - (pr + rr))),
                           "each answer's implicit reward is log pi - log ref: subtract the reference's "
                           "log-prob, do not add it"),
        "reversed": (lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * ((pr - rr) - (pc - rc))),
                     "the margin is chosen minus rejected: the loss falls as the chosen answer gains "
                     "probability relative to the reference"),
    },
    "grpo_advantages": {
        "whole_batch": (_grpo_whole_batch,
                        "the mean and std are taken over each prompt's own group of G answers, not over "
                        "the whole batch (view the rewards as (N, G))"),
        "no_std": (_grpo_no_std, "GRPO also divides by the group's std (Dr. GRPO drops it; the reference "
                                 "keeps it, as DeepSeekMath does)"),
        "population_std": (_grpo_population_std,
                           "use the sample std of the group (torch.std's default, dividing by G - 1), as "
                           "the reference and trl's GRPOTrainer do"),
    },
}

"""Small RLHF training loops built from ``llmlab.alignment``: reward model, PPO, DPO and GRPO.

What it implements (each loop is a few dozen lines so a notebook can show it whole)
- ``train_reward_model``: Bradley-Terry on (prompt, chosen, rejected) pairs (Ouyang et al. 2022).
- ``ValueModel``: a per-token scalar head on ``llmlab.LLM`` (PPO's critic), initialized from the
  reward model as in InstructGPT.
- ``ppo_step``: one PPO iteration for a language model with its four models (policy, frozen
  reference, reward model, value model): sample, score, per-token KL penalty to the reference,
  GAE, the clipped surrogate and the clipped value loss (Schulman et al. 2017; Ziegler et al.
  2019; Ouyang et al. 2022; the recipe of "The N implementation details of RLHF with PPO",
  Huang et al. 2024, minus the adaptive KL controller and reward whitening schedules).
- ``dpo_step``: one DPO update on pairs with cached reference log-probs (Rafailov et al. 2023).
- ``grpo_step``: one GRPO iteration (Shao et al. 2024): G samples per prompt, rule reward,
  group-normalized advantages, no value model, k3 KL to the reference added to the loss.
- ``evaluate_policy``: the rule's reward, the reward model's score and KL(pi || ref) of samples.

All responses have the same number of tokens (``llmlab.rl_tasks``), so no padding masks appear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from llmlab.alignment import (
    RewardModel,
    bradley_terry_loss,
    dpo_loss,
    gae_advantages,
    group_normalized_advantages,
    kl_penalized_rewards,
    per_token_kl,
    policy_gradient_loss,
    value_loss,
)
from llmlab.rl_tasks import continuation_log_probs, sample_continuations
from llmlab.shapes import check_float, check_int, check_tensor


class ValueModel(RewardModel):
    """PPO's value model V(s_t): the reward model's architecture with a score at every position.

    forward(input_ids (B, T)) -> values (B, T); value t estimates the return after token t.
    """

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_tensor("input_ids", input_ids, ndim=2, layout="(B, T)")
        return self.score(self.hidden_states(input_ids, attention_mask)).squeeze(-1)  # (B, T)


def reward_scores(reward_model: nn.Module, prompt_ids: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
    """The reward model's score of prompt + response: (B, P), (B, R) -> (B,)."""
    return reward_model(torch.cat([prompt_ids, response_ids], dim=1))  # (B,)


def train_reward_model(
    reward_model: nn.Module, chosen_ids: torch.Tensor, rejected_ids: torch.Tensor, steps: int,
    batch_size: int = 32, lr: float = 1e-3, generator: torch.Generator | None = None,
) -> list[float]:
    """Bradley-Terry training on full sequences (prompt + response) of shape (N, T) each.

    Returns the loss per step. AdamW, random mini-batches of ``batch_size`` pairs.
    """
    _check_pairs(chosen_ids, rejected_ids)
    steps = check_int("steps", steps, minimum=1)
    opt = torch.optim.AdamW(reward_model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, chosen_ids.shape[0], (batch_size,), generator=generator)  # (b,)
        both = reward_model(torch.cat([chosen_ids[idx], rejected_ids[idx]]))  # (2b,)
        loss = bradley_terry_loss(both[:batch_size], both[batch_size:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _check_pairs(chosen_ids: torch.Tensor, rejected_ids: torch.Tensor) -> None:
    check_tensor("chosen_ids", chosen_ids, ndim=2, layout="(N, T)")
    check_tensor("rejected_ids", rejected_ids, ndim=2, layout="(N, T)")
    if chosen_ids.shape != rejected_ids.shape or chosen_ids.shape[0] == 0:
        raise ValueError(f"chosen_ids and rejected_ids must have the same non-empty shape, got "
                         f"{tuple(chosen_ids.shape)} and {tuple(rejected_ids.shape)}")


@dataclass(frozen=True)
class PPOConfig:
    kl_coef: float = 0.1  # beta of the per-token KL penalty r_t = -beta (log pi - log ref)
    clip: float = 0.2  # epsilon of the clipped surrogate and of the value clipping
    gamma: float = 1.0  # discount (1: the episode is one short response)
    lam: float = 0.95  # GAE lambda
    epochs: int = 2  # optimization passes over each batch of rollouts
    value_coef: float = 1.0  # weight of the value loss (the value model has its own optimizer)
    temperature: float = 1.0  # the policy is softmax(logits / temperature) in rollouts and ratios


@torch.no_grad()
def _rollout(policy, ref, score_fn, prompt_ids, generator, temperature=1.0):
    response = sample_continuations(policy, prompt_ids, generator=generator, temperature=temperature)  # (B, R)
    old_logp = continuation_log_probs(policy, prompt_ids, response, temperature=temperature)  # (B, R)
    ref_logp = continuation_log_probs(ref, prompt_ids, response, temperature=temperature)  # (B, R)
    return response, old_logp, ref_logp, score_fn(prompt_ids, response).float()  # ..., (B,)


def ppo_step(
    policy: nn.Module, ref: nn.Module, value_model: ValueModel, score_fn: Callable, prompt_ids: torch.Tensor,
    policy_opt: torch.optim.Optimizer, value_opt: torch.optim.Optimizer, config: PPOConfig = PPOConfig(),
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One PPO iteration on the prompts (B, P); ``score_fn(prompt_ids, response_ids) -> (B,)`` is
    the reward model (or any scorer). Returns the batch means: score, KL (summed over tokens)."""
    response, old_logp, ref_logp, scores = _rollout(policy, ref, score_fn, prompt_ids, generator, config.temperature)
    p, r = prompt_ids.shape[1], response.shape[1]
    full = torch.cat([prompt_ids, response], dim=1)  # (B, P+R)
    mask = torch.ones_like(old_logp)  # (B, R): fixed-length responses
    with torch.no_grad():
        old_values = value_model(full)[:, p - 1:p + r - 1]  # (B, R): V before each response token
        rewards = kl_penalized_rewards(scores, old_logp, ref_logp, mask, config.kl_coef)  # (B, R)
        adv, returns = gae_advantages(rewards, old_values, mask, config.gamma, config.lam)  # (B, R)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)  # whitened, as in the PPO baselines
    for _ in range(config.epochs):
        logp = continuation_log_probs(policy, prompt_ids, response, temperature=config.temperature)  # (B, R)
        pg = policy_gradient_loss(logp, "grpo_clip", advantages=adv, old_log_probs=old_logp, clip=config.clip)
        policy_opt.zero_grad()
        pg.mean().backward()
        policy_opt.step()
        values = value_model(full)[:, p - 1:p + r - 1]  # (B, R)
        vl = config.value_coef * value_loss(values, old_values, returns, clip=config.clip).mean()
        value_opt.zero_grad()
        vl.backward()
        value_opt.step()
    kl = (old_logp - ref_logp).sum(dim=1)  # (B,) k1 estimate of KL(pi || ref) per sequence
    return {"score": scores.mean().item(), "kl": kl.mean().item(), "value_loss": vl.item()}


def sequence_logps(model: nn.Module, prompt_ids: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
    """Sum of log pi over the response tokens: (B, P), (B, R) -> (B,)."""
    return continuation_log_probs(model, prompt_ids, response_ids).sum(dim=1)  # (B,)


def dpo_step(
    policy: nn.Module, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer, beta: float = 0.1
) -> dict[str, float]:
    """One DPO update. batch: prompt (B, P), chosen and rejected (B, R), ref_chosen and ref_rejected
    (B,) (the reference's log-probs, computed once before training). Returns loss, margin, accuracy."""
    beta = check_float("beta", beta, low=0.0, low_open=True)
    pc = sequence_logps(policy, batch["prompt"], batch["chosen"])  # (B,)
    pr = sequence_logps(policy, batch["prompt"], batch["rejected"])  # (B,)
    losses, cr, rr = dpo_loss(pc, pr, batch["ref_chosen"], batch["ref_rejected"], beta)
    opt.zero_grad()
    losses.mean().backward()
    opt.step()
    margin = cr - rr  # (B,) implicit reward margin beta * h
    accuracy = (margin > 0).float().mean().item()
    return {"loss": losses.mean().item(), "margin": margin.mean().item(), "accuracy": accuracy}


def grpo_step(
    policy: nn.Module, ref: nn.Module, reward_fn: Callable, prompt_ids: torch.Tensor, group_size: int,
    opt: torch.optim.Optimizer, kl_coef: float = 0.04, clip: float = 0.2, generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One GRPO iteration: each of the N prompts (N, P) is sampled ``group_size`` times; rewards
    from ``reward_fn(prompt_ids, response_ids) -> (N*G,)``; advantages normalized within each
    group; loss = clipped surrogate + kl_coef * k3 KL to the reference, averaged over tokens
    (Shao et al. 2024, eq. 3). One gradient step per batch (so the ratio starts at 1)."""
    g = check_int("group_size", group_size, minimum=2)
    check_tensor("prompt_ids", prompt_ids, ndim=2, layout="(N, P)")
    prompts = prompt_ids.repeat_interleave(g, dim=0)  # (N*G, P), group-contiguous
    response, old_logp, ref_logp, rewards = _rollout(policy, ref, reward_fn, prompts, generator)
    adv = group_normalized_advantages(rewards, g).unsqueeze(1)  # (N*G, 1)
    logp = continuation_log_probs(policy, prompts, response)  # (N*G, R)
    pg = policy_gradient_loss(logp, "grpo_clip", advantages=adv, old_log_probs=old_logp, clip=clip)
    kl = per_token_kl(logp, ref_logp, "k3")  # (N*G, R)
    loss = (pg + kl_coef * kl).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return {"reward": rewards.mean().item(), "kl": (old_logp - ref_logp).sum(dim=1).mean().item()}


@torch.no_grad()
def evaluate_policy(
    policy: nn.Module, ref: nn.Module, prompt_ids: torch.Tensor, decode: Callable[[list[int]], str],
    rule: Callable[[str], float], score_fn: Callable | None = None, generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Sample once per prompt; the rule's mean reward, the fraction scored -1 by the rule
    ("broken"), the reward model's mean score (if ``score_fn``) and KL(pi || ref) per sequence,
    all with the policy and the reference at ``temperature``."""
    response = sample_continuations(policy, prompt_ids, generator=generator, temperature=temperature)  # (B, R)
    logp = continuation_log_probs(policy, prompt_ids, response, temperature=temperature)  # (B, R)
    ref_logp = continuation_log_probs(ref, prompt_ids, response, temperature=temperature)  # (B, R)
    true = torch.tensor([rule(decode(row.tolist())) for row in response])  # (B,)
    out = {"true_reward": true.mean().item(), "broken": (true < 0).float().mean().item(),
           "kl": (logp - ref_logp).sum(dim=1).mean().item()}
    if score_fn is not None:
        out["rm_score"] = score_fn(prompt_ids, response).float().mean().item()
    return out

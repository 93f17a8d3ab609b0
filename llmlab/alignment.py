"""Preference learning and RL for language models: reward model, PPO pieces, DPO and GRPO.

What it implements
- Small loss functions, each one equation: ``masked_mean``, ``entropy_from_logits``,
  ``token_log_probs`` (log pi(y_t | y_<t) gathered from logits), ``group_normalized_advantages``
  (GRPO, Shao et al. 2024, DeepSeekMath, eq. for outcome supervision),
  ``policy_gradient_loss`` (REINFORCE without / with a baseline, and the clipped surrogate of PPO,
  Schulman et al. 2017, which GRPO reuses), ``dpo_loss`` (Rafailov et al. 2023, eq. 7; IPO,
  Azar et al. 2023; hinge, as in SLiC, Zhao et al. 2023), ``bradley_terry_loss`` (Ouyang et al.
  2022, eq. 1), ``per_token_kl`` (k1 and k3 estimators, Schulman 2020 "Approximating KL
  divergence"), ``kl_penalized_rewards`` (Ziegler et al. 2019: the reward model's score on the
  last token, minus beta * KL on every token), ``gae_advantages`` (Schulman et al. 2016) and
  ``value_loss`` (clipped, as in the PPO baselines).
- ``RewardModel``: a scalar head on the final hidden state of ``llmlab.LLM`` at the last real token
  of each sequence (the InstructGPT reward model's shape, on a tiny model).
- The DPO loss (sigmoid, IPO, hinge) is checked equal to trl's ``DPOTrainer._compute_loss`` on the
  same log-probs in the tests when trl is installed.

What it leaves out: rollout engines, distributed actors, reward normalization schedules and the
adaptive KL controller; the notebooks write their small training loops from these pieces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.shapes import check_choice, check_float, check_int, check_tensor

PG_KINDS = ("no_baseline", "reinforce_with_baseline", "grpo_clip")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
KL_ESTIMATORS = ("k1", "k3")


def _same_shape(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    shapes = [tuple(t.shape) for t in tensors]
    if any(s != shapes[0] for s in shapes):
        listed = ", ".join(f"{n}={s}" for n, s in zip(names, shapes, strict=True))
        raise ValueError(f"{' and '.join(names)} must have the same shape, got {listed}")


# --- small reductions ------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true (1), over all or along ``dim``.

    x, mask: same shape, e.g. (B, T). Raises if the mask selects nothing (the mean is undefined).

    >>> masked_mean(torch.tensor([[1., 2., 9.]]), torch.tensor([[1, 1, 0]]))
    tensor(1.5000)
    """
    check_tensor("x", x)
    check_tensor("mask", mask)
    _same_shape(("x", "mask"), (x, mask))
    m = mask.to(x.dtype)
    count = m.sum() if dim is None else m.sum(dim=dim)
    if bool((count == 0).any()):
        where = "" if dim is None else f" along dim {dim} for at least one row"
        raise ValueError(f"mask selects no element{where}; the masked mean is undefined")
    total = (x * m).sum() if dim is None else (x * m).sum(dim=dim)
    return total / count


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H(p) = logsumexp(z) - sum_v p_v z_v of softmax(z) at every position, without log(0).

    logits (..., V) -> (...). Computed in float32 at least.

    >>> entropy_from_logits(torch.zeros(2, 4))  # log 4 at both positions
    tensor([1.3863, 1.3863])
    """
    check_tensor("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary dimension (..., V), got shape {tuple(logits.shape)}")
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    p = torch.softmax(z, dim=-1)  # (..., V)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)  # (...)


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] at every position: logits (B, T, V), tokens (B, T) -> (B, T).

    ``logits[:, t]`` must be the model's prediction for ``tokens[:, t]`` (shift before calling).
    """
    check_tensor("logits", logits, ndim=3, layout="(B, T, V)")
    check_tensor("tokens", tokens, ndim=2, layout="(B, T)")
    if tuple(logits.shape[:2]) != tuple(tokens.shape):
        raise ValueError(f"logits (B, T, V) and tokens (B, T) must agree on (B, T), got "
                         f"{tuple(logits.shape)} and {tuple(tokens.shape)}")
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)


# --- policy gradients and GRPO ---------------------------------------------------------------------


def group_normalized_advantages(
    rewards: torch.Tensor, group_size: int, normalize_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO's outcome advantage: (r - mean of its group) / (std of its group + eps), or r - mean.

    rewards (N*G,) in group-contiguous order (the G samples of prompt 0, then of prompt 1, ...)
    -> advantages (N*G,). The std is the unbiased sample std (torch.std's default), as in
    DeepSeekMath's GRPO (Shao et al. 2024, section 4.1.2); ``normalize_by_std=False`` keeps only
    the mean baseline (Dr. GRPO, Liu et al. 2025, argue the std division biases the objective).

    >>> group_normalized_advantages(torch.tensor([1., 0., 0., 0.]), group_size=2)
    tensor([ 0.7071, -0.7071,  0.0000,  0.0000])
    """
    check_tensor("rewards", rewards, ndim=1, layout="(N*G,)")
    g = check_int("group_size", group_size, minimum=1)
    eps = check_float("eps", eps, low=0.0)
    if rewards.numel() == 0:
        raise ValueError("rewards is empty: need at least one group of group_size rewards")
    if rewards.numel() % g:
        raise ValueError(f"rewards length must be a multiple of group_size={g}, got {rewards.numel()}")
    if normalize_by_std and g < 2:
        raise ValueError("group_size must be >= 2 when normalize_by_std=True (the std of one sample is "
                         f"undefined), got {g}")
    r = rewards.float().view(-1, g)  # (N, G)
    adv = r - r.mean(dim=1, keepdim=True)  # (N, G)
    if normalize_by_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)  # (N, G)
    return adv.reshape(-1)  # (N*G,)


def _check_per_sequence(name: str, value: torch.Tensor | None, batch: int) -> torch.Tensor:
    if value is None:
        raise ValueError(f"{name} is required for this kind of policy-gradient loss")
    check_tensor(name, value, ndim=2, layout="(B, 1)")
    if tuple(value.shape) != (batch, 1):
        raise ValueError(f"{name} must have shape (B, 1) = ({batch}, 1), got {tuple(value.shape)}")
    return value


def policy_gradient_loss(
    log_probs: torch.Tensor,
    kind: str,
    rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    clip: float | None = None,
) -> torch.Tensor:
    """Per-token policy-gradient loss (B, T); average it with ``masked_mean`` over response tokens.

    log_probs (B, T): log pi_theta of the sampled tokens. kind:
    - "no_baseline": -R * log pi (REINFORCE, Williams 1992), rewards (B, 1).
    - "reinforce_with_baseline": -A * log pi, advantages (B, 1) (e.g. reward minus a baseline).
    - "grpo_clip": -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A), rho = exp(log pi - log pi_old),
      PPO's clipped surrogate (Schulman et al. 2017, eq. 7); advantages (B, 1) or (B, T) (PPO's
      per-token GAE), old_log_probs (B, T), clip = eps > 0.
    Gradients flow only through ``log_probs``.
    """
    check_tensor("log_probs", log_probs, ndim=2, layout="(B, T)")
    check_choice("kind", kind, PG_KINDS)
    b = log_probs.shape[0]
    if kind == "no_baseline":
        return -_check_per_sequence("rewards", rewards, b).detach() * log_probs  # (B, T)
    if kind == "reinforce_with_baseline":
        return -_check_per_sequence("advantages", advantages, b).detach() * log_probs  # (B, T)
    if advantages is None or old_log_probs is None or clip is None:
        raise ValueError("kind='grpo_clip' needs advantages, old_log_probs and clip")
    if advantages.dim() == 2 and tuple(advantages.shape) == tuple(log_probs.shape):
        adv = advantages
    else:
        adv = _check_per_sequence("advantages", advantages, b)
    check_tensor("old_log_probs", old_log_probs, ndim=2, layout="(B, T)")
    _same_shape(("log_probs", "old_log_probs"), (log_probs, old_log_probs))
    eps = check_float("clip", clip, low=0.0, low_open=True)
    adv = adv.detach()
    ratio = torch.exp(log_probs - old_log_probs.detach())  # (B, T)
    unclipped = ratio * adv  # (B, T)
    clipped = torch.clamp(ratio, 1.0 - eps, 1.0 + eps) * adv  # (B, T)
    return -torch.minimum(unclipped, clipped)  # (B, T)


# --- DPO -------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss per pair and the implicit rewards, from per-sequence log-probs (each (B,)).

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) (summed over response tokens).
    - "sigmoid" (DPO, Rafailov et al. 2023, eq. 7): -log sigmoid(beta * h)
    - "ipo" (Azar et al. 2023, eq. 17): (h - 1 / (2 beta))^2; trl's ``DPOTrainer`` feeds it per-token
      averages of the log-probs instead of sums (pass those to get its numbers)
    - "hinge" (SLiC-style): max(0, 1 - beta * h)
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), the implicit rewards
    beta * (log pi - log ref) detached, like trl's ``DPOTrainer``.
    """
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    tensors = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    for n, t in zip(names, tensors, strict=True):
        check_tensor(n, t, ndim=1, layout="(B,)")
    _same_shape(names, tensors)
    if policy_chosen_logps.numel() == 0:
        raise ValueError("policy_chosen_logps is empty: need at least one preference pair")
    beta = check_float("beta", beta, low=0.0, low_open=True)
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    chosen = policy_chosen_logps - ref_chosen_logps  # (B,) log-ratio of the chosen answer
    rejected = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen - rejected  # (B,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = torch.relu(1.0 - beta * h)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log pi(label_t) over the positions whose label is not -100: (B, T, V), (B, T) -> (B,).

    ``labels`` are already shifted (label t is the token predicted from position t), as
    ``llmlab.sft`` builds them; prompt positions carry -100 and do not count.
    """
    mask = labels != -100  # (B, T)
    logp = token_log_probs(logits, labels.masked_fill(~mask, 0))  # (B, T)
    return (logp * mask).sum(dim=-1)  # (B,)


# --- reward model (Bradley-Terry) ------------------------------------------------------------------


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r(x, y_w) - r(x, y_l)) over pairs (Ouyang et al. 2022, eq. 1): (B,), (B,) -> ()."""
    check_tensor("chosen_rewards", chosen_rewards, ndim=1, layout="(B,)")
    check_tensor("rejected_rewards", rejected_rewards, ndim=1, layout="(B,)")
    _same_shape(("chosen_rewards", "rejected_rewards"), (chosen_rewards, rejected_rewards))
    if chosen_rewards.numel() == 0:
        raise ValueError("chosen_rewards is empty: need at least one preference pair")
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Fraction of pairs whose chosen answer gets the strictly higher reward."""
    _same_shape(("chosen_rewards", "rejected_rewards"), (chosen_rewards, rejected_rewards))
    return float((chosen_rewards > rejected_rewards).float().mean())


class RewardModel(nn.Module):
    """A language model with its LM head replaced by a scalar head ``score`` (C -> 1).

    forward(input_ids (B, T), attention_mask (B, T) of 1/0, right padding) -> rewards (B,): the
    score of the final hidden state at the last real token of each sequence, as in InstructGPT's
    and trl's reward models. The backbone is the given ``llmlab.LLM`` (its lm_head is unused).
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        if not hasattr(backbone, "model") or not hasattr(backbone.model, "norm"):
            raise TypeError(f"backbone must be an llmlab.LLM, got {type(backbone).__name__}")
        self.backbone = backbone
        self.score = nn.Linear(backbone.config.n_embd, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1.0 / backbone.config.n_embd ** 0.5)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Final-norm hidden states (B, T, C), captured with a forward hook on ``model.norm``."""
        captured = {}
        handle = self.backbone.model.norm.register_forward_hook(
            lambda _m, _i, out: captured.__setitem__("h", out))
        try:
            self.backbone(input_ids, attention_mask=attention_mask)
        finally:
            handle.remove()
        return captured["h"]  # (B, T, C)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_tensor("input_ids", input_ids, ndim=2, layout="(B, T)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        _same_shape(("input_ids", "attention_mask"), (input_ids, attention_mask))
        lengths = attention_mask.long().sum(dim=1)  # (B,)
        if bool((lengths == 0).any()):
            raise ValueError("attention_mask has a row with no real token")
        h = self.hidden_states(input_ids, attention_mask)  # (B, T, C)
        last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]  # (B, C)
        return self.score(last).squeeze(-1)  # (B,)


# --- PPO pieces ------------------------------------------------------------------------------------


def per_token_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from the sampled tokens' log-probs: (B, T), (B, T) -> (B, T).

    "k1": log pi - log ref (unbiased, can be negative; the penalty in Ziegler et al. 2019 and
    InstructGPT). "k3": exp(log ref - log pi) - (log ref - log pi) - 1 (unbiased, always >= 0;
    the estimator GRPO uses, Shao et al. 2024 eq. 4).
    """
    check_tensor("log_probs", log_probs, ndim=2, layout="(B, T)")
    check_tensor("ref_log_probs", ref_log_probs, ndim=2, layout="(B, T)")
    _same_shape(("log_probs", "ref_log_probs"), (log_probs, ref_log_probs))
    check_choice("estimator", estimator, KL_ESTIMATORS)
    if estimator == "k1":
        return log_probs - ref_log_probs
    d = ref_log_probs - log_probs  # (B, T)
    return torch.exp(d) - d - 1.0


def kl_penalized_rewards(
    scores: torch.Tensor, log_probs: torch.Tensor, ref_log_probs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards for PPO: -kl_coef * (log pi - log ref) on every response token, plus the
    reward model's score on the last response token (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2).

    scores (B,), log_probs / ref_log_probs / mask (B, T) -> rewards (B, T), zero where mask is 0.
    """
    check_tensor("scores", scores, ndim=1, layout="(B,)")
    _same_shape(("log_probs", "ref_log_probs", "mask"), (log_probs, ref_log_probs, mask))
    if scores.shape[0] != log_probs.shape[0]:
        raise ValueError(f"scores must have B={log_probs.shape[0]} entries, got {scores.shape[0]}")
    kl_coef = check_float("kl_coef", kl_coef, low=0.0)
    m = mask.to(log_probs.dtype)
    lengths = mask.long().sum(dim=1)  # (B,)
    if bool((lengths == 0).any()):
        raise ValueError("mask has a row with no response token")
    rewards = -kl_coef * per_token_kl(log_probs, ref_log_probs).detach() * m  # (B, T)
    last = (torch.arange(mask.shape[1], device=mask.device) * mask.long()).argmax(dim=1)  # (B,)
    rewards[torch.arange(mask.shape[0]), last] += scores.to(rewards.dtype)
    return rewards


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None, gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16) over response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last response token = 0), and
    A_t = sum_l (gamma * lam)^l delta_{t+l}. rewards, values, mask (B, T) -> (advantages, returns)
    each (B, T), returns = A + V (the value model's regression target); zero where mask is 0.
    The mask must be contiguous per row (response tokens, then padding).
    """
    check_tensor("rewards", rewards, ndim=2, layout="(B, T)")
    check_tensor("values", values, ndim=2, layout="(B, T)")
    if mask is None:
        mask = torch.ones_like(rewards)
    _same_shape(("rewards", "values", "mask"), (rewards, values, mask))
    gamma = check_float("gamma", gamma, 0.0, 1.0)
    lam = check_float("lam", lam, 0.0, 1.0)
    m = mask.to(rewards.dtype)
    v = values.detach() * m  # (B, T)
    adv = torch.zeros_like(rewards)  # (B, T)
    next_adv = torch.zeros_like(rewards[:, 0])  # (B,)
    next_v = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_v - v[:, t]  # (B,)
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        adv[:, t] = next_adv
        next_v = v[:, t]
    return adv, (adv + v) * m


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float | None = None
) -> torch.Tensor:
    """Per-token value loss (B, T): 0.5 (V - R)^2, or with ``clip`` the PPO baselines' clipped form
    0.5 max((V - R)^2, (old + clip(V - old, -eps, eps) - R)^2)."""
    _same_shape(("values", "old_values", "returns"), (values, old_values, returns))
    err = (values - returns.detach()) ** 2  # (B, T)
    if clip is None:
        return 0.5 * err
    eps = check_float("clip", clip, low=0.0, low_open=True)
    old = old_values.detach()
    clipped = old + torch.clamp(values - old, -eps, eps)  # (B, T)
    return 0.5 * torch.maximum(err, (clipped - returns.detach()) ** 2)

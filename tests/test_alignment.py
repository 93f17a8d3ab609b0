"""llmlab.alignment against its formulas written out element by element (plain Python math), against
torch.distributions, and against invariants (GAE with lambda=1 is return-to-go minus the value, the
clipped objective's gradient vanishes outside the trust region, DPO at the reference is log 2)."""

import math

import pytest
import torch

from llmlab.alignment import (
    RewardModel,
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    gae_advantages,
    group_normalized_advantages,
    kl_penalized_rewards,
    masked_mean,
    per_token_kl,
    policy_gradient_loss,
    preference_accuracy,
    sequence_log_probs,
    token_log_probs,
    value_loss,
)
from llmlab.model import LLM, ModelConfig

G = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


# --- masked_mean, entropy, log-probs ---------------------------------------------------------------


def test_masked_mean_all_and_per_row():
    x = torch.tensor([[1.0, 2.0, 9.0], [4.0, 0.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 4 + 6) / 4)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 5.0]))
    torch.testing.assert_close(masked_mean(x, mask.bool(), dim=0), torch.tensor([2.5, 2.0, 6.0]))


def test_masked_mean_errors():
    with pytest.raises(ValueError, match="x and mask must have the same shape"):
        masked_mean(torch.ones(2, 3), torch.ones(2, 2))
    with pytest.raises(ValueError, match="mask selects no element"):
        masked_mean(torch.ones(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="along dim 1"):
        masked_mean(torch.ones(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]), dim=1)


def test_entropy_equals_torch_distributions_and_is_stable():
    logits = randn(3, 5, 11) * 4
    ref = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), ref)
    torch.testing.assert_close(entropy_from_logits(torch.zeros(2, 7)), torch.full((2,), math.log(7)))
    huge = torch.tensor([[1000.0, -1000.0, 0.0]])  # softmax underflows to exact zeros: no NaN
    out = entropy_from_logits(huge)
    assert torch.isfinite(out).all() and out.abs().item() < 1e-6


def test_token_and_sequence_log_probs():
    logits, tokens = randn(2, 4, 6), torch.tensor([[1, 2, 3, 4], [5, 0, 1, 2]])
    expected = torch.tensor([[torch.log_softmax(logits[b, t], -1)[tokens[b, t]].item() for t in range(4)]
                             for b in range(2)], dtype=torch.float64)
    torch.testing.assert_close(token_log_probs(logits, tokens).double(), expected)
    labels = tokens.clone()
    labels[:, :2] = -100  # prompt positions do not count
    torch.testing.assert_close(sequence_log_probs(logits, labels).double(), expected[:, 2:].sum(1))
    with pytest.raises(ValueError, match="must agree on"):
        token_log_probs(logits, tokens[:, :3])


# --- GRPO advantages and policy-gradient losses ----------------------------------------------------


def test_group_normalized_advantages_formula():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 2.0, 5.0])
    adv = group_normalized_advantages(r, group_size=3)
    for g in range(3):
        grp = r[3 * g:3 * g + 3].tolist()
        mean = sum(grp) / 3
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / 2)  # unbiased (n - 1)
        for i in range(3):
            assert adv[3 * g + i].item() == pytest.approx((grp[i] - mean) / (std + 1e-6), rel=1e-5, abs=1e-6)
    centered = group_normalized_advantages(r, group_size=3, normalize_by_std=False)
    torch.testing.assert_close(centered, r - r.view(3, 3).mean(1).repeat_interleave(3))
    # a group where every sample gets the same reward carries no signal: advantages exactly 0
    assert adv[3:6].abs().max().item() == 0.0


def test_group_normalized_advantages_errors():
    with pytest.raises(ValueError, match="rewards is empty"):
        group_normalized_advantages(torch.zeros(0), group_size=2)
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        group_normalized_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_normalized_advantages(torch.zeros(3), group_size=1)
    with pytest.raises(ValueError, match="group_size must be an integer >= 1"):
        group_normalized_advantages(torch.zeros(3), group_size=0)
    with pytest.raises(ValueError, match="rewards must have 1 dimensions"):
        group_normalized_advantages(torch.zeros(2, 3), group_size=3)


def test_policy_gradient_losses_formulas():
    lp = randn(3, 4).requires_grad_()
    r = randn(3, 1)
    torch.testing.assert_close(policy_gradient_loss(lp, "no_baseline", rewards=r), -r * lp)
    torch.testing.assert_close(policy_gradient_loss(lp, "reinforce_with_baseline", advantages=r), -r * lp)
    old = lp.detach() + 0.3 * randn(3, 4)
    out = policy_gradient_loss(lp, "grpo_clip", advantages=r, old_log_probs=old, clip=0.2)
    for b in range(3):
        for t in range(4):
            rho = math.exp(lp[b, t].item() - old[b, t].item())
            a = r[b, 0].item()
            want = -min(rho * a, min(max(rho, 0.8), 1.2) * a)
            assert out[b, t].item() == pytest.approx(want, rel=1e-9)


def test_clipped_objective_gradient_vanishes_outside_trust_region():
    old = torch.zeros(1, 4, dtype=torch.float64)
    lp = torch.log(torch.tensor([[1.5, 1.1, 0.5, 0.95]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[1.0]], dtype=torch.float64)  # positive advantage: clipped above 1 + eps only
    policy_gradient_loss(lp, "grpo_clip", advantages=adv, old_log_probs=old, clip=0.2).sum().backward()
    g = lp.grad[0]
    assert g[0].item() == 0.0  # rho = 1.5 > 1.2: no push further
    assert g[1].item() == pytest.approx(-1.1) and g[2].item() == pytest.approx(-0.5)  # -rho * A
    assert g[3].item() == pytest.approx(-0.95)


def test_grpo_clip_accepts_per_token_advantages_like_ppo():
    lp, old, adv = randn(2, 3), randn(2, 3), randn(2, 3)
    out = policy_gradient_loss(lp, "grpo_clip", advantages=adv, old_log_probs=old, clip=0.1)
    rho = torch.exp(lp - old)
    torch.testing.assert_close(out, -torch.minimum(rho * adv, rho.clamp(0.9, 1.1) * adv))


def test_policy_gradient_errors():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kind must be one of"):
        policy_gradient_loss(lp, "ppo")
    with pytest.raises(ValueError, match="rewards is required"):
        policy_gradient_loss(lp, "no_baseline")
    with pytest.raises(ValueError, match=r"advantages must have shape \(B, 1\) = \(2, 1\)"):
        policy_gradient_loss(lp, "reinforce_with_baseline", advantages=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="needs advantages, old_log_probs and clip"):
        policy_gradient_loss(lp, "grpo_clip", advantages=torch.zeros(2, 1), old_log_probs=lp)
    with pytest.raises(ValueError, match="clip must be a finite number"):
        policy_gradient_loss(lp, "grpo_clip", advantages=torch.zeros(2, 1), old_log_probs=lp, clip=0.0)


# --- DPO -------------------------------------------------------------------------------------------


def dpo_by_hand(pc, pr, rc, rr, beta, loss_type):
    """Rafailov et al. 2023 eq. 7 (and IPO eq. 17, hinge) for one pair, in plain Python."""
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return math.log1p(math.exp(-beta * h))  # -log sigmoid(beta h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return max(0.0, 1 - beta * h)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_loss_equals_paper_formula(loss_type, beta):
    pc, pr, rc, rr = (randn(5) * 3 - 20 for _ in range(4))
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta, loss_type=loss_type)
    for i in range(5):
        want = dpo_by_hand(pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item(), beta, loss_type)
        assert losses[i].item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(cr, beta * (pc - rc))
    torch.testing.assert_close(rj, beta * (pr - rr))


def test_dpo_invariants():
    pc, pr = randn(4), randn(4)
    losses, cr, rj = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)  # policy == reference
    torch.testing.assert_close(losses, torch.full((4,), math.log(2), dtype=torch.float64))
    assert cr.abs().max().item() == 0.0 and rj.abs().max().item() == 0.0
    # the gradient raises the chosen log-prob and lowers the rejected one, weighted by sigmoid(-beta h)
    pc_ = pc.clone().requires_grad_()
    pr_ = pr.clone().requires_grad_()
    dpo_loss(pc_, pr_, pc, pr, beta=0.5)[0].sum().backward()
    torch.testing.assert_close(pc_.grad, torch.full((4,), -0.5 * 0.5, dtype=torch.float64))
    torch.testing.assert_close(pr_.grad, torch.full((4,), 0.5 * 0.5, dtype=torch.float64))


def test_dpo_errors():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="must have the same shape.*policy_rejected_logps=\\(2,\\)"):
        dpo_loss(a, torch.zeros(2), a, a, beta=0.1)
    with pytest.raises(ValueError, match="beta must be a finite number in \\(0"):
        dpo_loss(a, a, a, a, beta=0.0)
    with pytest.raises(ValueError, match="beta must be a finite number"):
        dpo_loss(a, a, a, a, beta=-1.0)
    with pytest.raises(ValueError, match="policy_chosen_logps is empty"):
        dpo_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0), beta=0.1)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo_loss(a, a, a, a, beta=0.1, loss_type="ddo")
    with pytest.raises(ValueError, match="policy_chosen_logps must have 1 dimensions"):
        dpo_loss(torch.zeros(3, 1), a, a, a, beta=0.1)


# --- reward model ----------------------------------------------------------------------------------


def test_bradley_terry_loss_and_accuracy():
    c, r = randn(6), randn(6)
    want = sum(-math.log(1 / (1 + math.exp(-(c[i] - r[i]).item()))) for i in range(6)) / 6
    assert bradley_terry_loss(c, r).item() == pytest.approx(want, rel=1e-9)
    assert preference_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="chosen_rewards and rejected_rewards must have the same shape"):
        bradley_terry_loss(c, r[:5])


def test_reward_model_reads_last_real_token_and_learns():
    torch.manual_seed(0)
    rm = RewardModel(LLM(ModelConfig.tiny(vocab_size=8)))
    ids = torch.randint(0, 8, (3, 6), generator=G)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    scores = rm(ids, mask)
    for b, n in enumerate([6, 4, 2]):  # right padding changes nothing: same score as the unpadded row
        torch.testing.assert_close(scores[b], rm(ids[b:b + 1, :n])[0])
    # a few Bradley-Terry steps separate "ends in token 1" (chosen) from "ends in token 2"
    chosen = torch.randint(0, 8, (16, 5), generator=G)
    rejected = chosen.clone()
    chosen[:, -1], rejected[:, -1] = 1, 2
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-2)
    for _ in range(30):
        loss = bradley_terry_loss(rm(chosen), rm(rejected))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 and preference_accuracy(rm(chosen), rm(rejected)) == 1.0
    with pytest.raises(ValueError, match="no real token"):
        rm(ids, torch.zeros_like(ids))
    with pytest.raises(TypeError, match="backbone must be an llmlab.LLM"):
        RewardModel(torch.nn.Linear(2, 2))


# --- PPO pieces ------------------------------------------------------------------------------------


def test_per_token_kl_estimators_are_unbiased():
    p = torch.distributions.Categorical(logits=torch.tensor([0.5, -1.0, 2.0, 0.0]))
    q = torch.distributions.Categorical(logits=torch.tensor([0.0, 0.3, 1.0, -0.5]))
    exact = torch.distributions.kl_divergence(p, q).item()
    torch.manual_seed(0)
    x = p.sample((200_000,)).view(1, -1)
    lp, lq = p.log_prob(x), q.log_prob(x)
    for est in ("k1", "k3"):
        assert per_token_kl(lp, lq, est).mean().item() == pytest.approx(exact, rel=0.03)
    assert per_token_kl(lp, lq, "k3").min().item() >= 0.0
    assert per_token_kl(lp, lq, "k1").min().item() < 0.0  # k1 is negative on some tokens
    with pytest.raises(ValueError, match="estimator must be one of"):
        per_token_kl(lp, lq, "k2")


def test_kl_penalized_rewards_put_the_score_on_the_last_token():
    lp, ref = randn(2, 4), randn(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    out = kl_penalized_rewards(torch.tensor([2.0, -1.0], dtype=torch.float64), lp, ref, mask, kl_coef=0.1)
    want = -0.1 * (lp - ref) * mask
    want[0, 2] += 2.0
    want[1, 3] += -1.0
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="kl_coef must be a finite number"):
        kl_penalized_rewards(torch.zeros(2), lp, ref, mask, kl_coef=-0.1)


def test_gae_matches_its_sum_and_lambda_one_is_return_to_go():
    rewards, values = randn(2, 5), randn(2, 5)
    gamma, lam = 0.9, 0.8
    adv, ret = gae_advantages(rewards, values, gamma=gamma, lam=lam)
    v_next = torch.cat([values[:, 1:], torch.zeros(2, 1, dtype=values.dtype)], 1)
    delta = rewards + gamma * v_next - values
    for t in range(5):
        want = sum((gamma * lam) ** k * delta[:, t + k] for k in range(5 - t))
        torch.testing.assert_close(adv[:, t], want)
    torch.testing.assert_close(ret, adv + values)
    adv1, _ = gae_advantages(rewards, values, gamma=1.0, lam=1.0)
    togo = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv1, togo - values)  # Monte-Carlo return minus baseline
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    adv_m, _ = gae_advantages(rewards * mask, values, mask, gamma, lam)
    short, _ = gae_advantages(rewards[:1, :3], values[:1, :3], gamma=gamma, lam=lam)
    torch.testing.assert_close(adv_m[0, :3], short[0])  # padding after the end changes nothing
    assert adv_m[0, 3:].abs().max().item() == 0.0
    with pytest.raises(ValueError, match="lam must be a finite number in \\[0, 1\\]"):
        gae_advantages(rewards, values, lam=1.5)


def test_value_loss_plain_and_clipped():
    v, old, ret = randn(2, 3), randn(2, 3), randn(2, 3)
    torch.testing.assert_close(value_loss(v, old, ret), 0.5 * (v - ret) ** 2)
    clipped = old + (v - old).clamp(-0.2, 0.2)
    want = 0.5 * torch.maximum((v - ret) ** 2, (clipped - ret) ** 2)
    torch.testing.assert_close(value_loss(v, old, ret, clip=0.2), want)
    with pytest.raises(ValueError, match="values and old_values and returns must have the same shape"):
        value_loss(v, old[:, :2], ret)


# --- DPO against trl's DPOTrainer ------------------------------------------------------------------


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


class _LogProbModel(torch.nn.Module):
    """Stands in for trl's fused-LM-head model: returns fixed per-token log-probs (2B, T - 1)."""

    def __init__(self, per_token_logps):
        super().__init__()
        self.per_token_logps = per_token_logps

    def forward(self, **_kwargs):
        from types import SimpleNamespace

        lp = self.per_token_logps
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp),
                               is_top1=torch.zeros_like(lp, dtype=torch.bool))


def _trl_dpo_loss(per_token_logps, completion_mask, ref_chosen, ref_rejected, beta, loss_type):
    """trl 1.x ``DPOTrainer._compute_loss`` on given log-probs (precomputed reference log-probs)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.dpo_trainer import DPOTrainer

    model = _LogProbModel(per_token_logps)
    trainer = SimpleNamespace(
        model=model, accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    ids = torch.zeros_like(completion_mask)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion_mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_equals_trl_dpo_trainer(loss_type):
    pytest.importorskip("trl", reason="trl is not installed (pip install 'llmlab[test]')")
    b, t, beta = 6, 9, 0.3
    lengths = torch.randint(1, t, (2 * b,), generator=G)  # completion tokens per sequence
    completion_mask = (torch.arange(t) >= t - lengths[:, None]).long()  # (2B, T): prompt then completion
    per_token = -torch.rand(2 * b, t - 1, generator=G, dtype=torch.float64) * 3 * completion_mask[:, 1:]
    ref_chosen, ref_rejected = randn(b) - 5, randn(b) - 5
    trl_loss, metrics = _trl_dpo_loss(per_token, completion_mask, ref_chosen, ref_rejected, beta, loss_type)
    logps = per_token.sum(dim=1)  # (2B,) chosen rows first, as trl concatenates them
    refs = torch.cat([ref_chosen, ref_rejected])  # (2B,)
    if loss_type == "ipo":  # trl's IPO uses per-token averages (its comment: as the IPO authors ran it)
        logps, refs = logps / lengths, refs / lengths
    losses, chosen_r, rejected_r = dpo_loss(logps[:b], logps[b:], refs[:b], refs[b:], beta, loss_type=loss_type)
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-12, atol=1e-12)
    if loss_type != "ipo":  # trl logs the implicit rewards from the summed log-ratios
        assert metrics["rewards/chosen"][0] == pytest.approx(chosen_r.mean().item(), rel=1e-12)
        assert metrics["rewards/margins"][0] == pytest.approx((chosen_r - rejected_r).mean().item(), rel=1e-12)

"""llmlab.rl_tasks and llmlab.rlhf: the rule, sampling with a KV cache against full recomputation,
log-probs against step-by-step log-softmax, and the RM / PPO / DPO / GRPO loops on a tiny random
model (invariants at the reference, and each loop raising its objective on a toy reward)."""

import copy
import math

import pytest
import torch

from llmlab.alignment import RewardModel
from llmlab.model import LLM, ModelConfig
from llmlab.rl_tasks import (
    continuation_log_probs,
    feeling_prompts,
    feeling_reward,
    first_word,
    preference_pairs,
    sample_continuations,
)
from llmlab.rlhf import (
    PPOConfig,
    ValueModel,
    dpo_step,
    evaluate_policy,
    grpo_step,
    ppo_step,
    reward_scores,
    sequence_logps,
    train_reward_model,
)

V = 8


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return LLM(ModelConfig.tiny(vocab_size=V)).eval()


def prompts(b=6, p=3, seed=0):
    return torch.randint(0, V, (b, p), generator=torch.Generator().manual_seed(seed))


def test_feeling_rule_and_prompts():
    assert first_word("proud, and") == "proud"
    assert [feeling_reward(s) for s in ("proud and ", "excited. ", "happy beca", "big ball, ", "proudproud",
                                        "kind")] == [1.0, 1.0, 0.0, -1.0, -1.0, -1.0]
    ps = feeling_prompts(20, seed=3)
    assert len({len(p) for p in ps}) == 1 and all(p.endswith(" He was very ") for p in ps)
    assert ps == feeling_prompts(20, seed=3) and ps != feeling_prompts(20, seed=4)
    with pytest.raises(ValueError, match="n must be"):
        feeling_prompts(0)
    with pytest.raises(TypeError, match="response must be a str"):
        feeling_reward(3)


def test_sampling_with_cache_equals_greedy_recomputation_and_log_probs_match():
    model, x = tiny_model(), prompts()
    y = sample_continuations(model, x, max_new_tokens=5, temperature=1e-6)  # (B, 5): greedy in effect
    ids = x
    for _ in range(5):  # greedy by recomputing the whole prefix every step
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(y, ids[:, 3:])
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(sample_continuations(model, x, 4, generator=g1), sample_continuations(model, x, 4, generator=g2))
    y = sample_continuations(model, x, 4, generator=g1)
    logp, ent = continuation_log_probs(model, x, y, with_entropy=True)  # (B, 4) each
    for t in range(4):  # log-softmax of a separate forward over the prefix, token by token
        prefix = torch.cat([x, y[:, :t]], dim=1)
        want = torch.log_softmax(model(prefix).logits[:, -1], -1).gather(1, y[:, t:t + 1]).squeeze(1)
        torch.testing.assert_close(logp[:, t], want, rtol=1e-5, atol=1e-5)
    assert bool((ent > 0).all()) and bool((ent <= math.log(V) + 1e-5).all())
    torch.testing.assert_close(sequence_logps(model, x, y), logp.sum(1))
    with pytest.raises(ValueError, match="same batch size"):
        continuation_log_probs(model, x, y[:2])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_continuations(model, x, 2, temperature=0.0)


def test_preference_pairs_one_per_score_pair():
    pairs = preference_pairs(["p1", "p2"], [["happy and ", "proud and ", "zzz", "proud. "], ["sad and "] * 3])
    assert pairs == [("p1", "proud and ", "happy and "), ("p1", "proud and ", "zzz"), ("p1", "happy and ", "zzz")]
    with pytest.raises(ValueError, match="same length"):
        preference_pairs(["p"], [])


def test_reward_model_training_and_value_model_shapes():
    torch.manual_seed(0)
    rm = RewardModel(tiny_model())
    chosen = prompts(32, 5, seed=1)
    rejected = chosen.clone()
    chosen[:, -1], rejected[:, -1] = 1, 2  # the preference: ends in token 1
    losses = train_reward_model(rm, chosen, rejected, steps=25, batch_size=16, lr=1e-2,
                                generator=torch.Generator().manual_seed(0))
    assert losses[-1] < 0.1 < losses[0]
    torch.testing.assert_close(reward_scores(rm, chosen[:, :3], chosen[:, 3:]), rm(chosen))
    vm = ValueModel(tiny_model())
    assert tuple(vm(chosen).shape) == (32, 5)
    with pytest.raises(ValueError, match="chosen_ids and rejected_ids must have the same non-empty shape"):
        train_reward_model(rm, chosen, rejected[:3], steps=1)


def count_score(token):
    def score(x, y):  # fraction of response tokens equal to ``token``
        return (y == token).float().mean(dim=1)
    return score


def test_ppo_raises_a_toy_reward_and_starts_with_zero_kl():
    policy, ref = tiny_model(), tiny_model()
    vm = ValueModel(tiny_model(1))
    popt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    vopt = torch.optim.AdamW(vm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    x = prompts(32, 3)
    stats = [ppo_step(policy, ref, vm, count_score(5), x, popt, vopt, PPOConfig(kl_coef=0.01), generator=g)
             for _ in range(15)]
    assert stats[0]["kl"] == 0.0  # the first rollout comes from a policy equal to the reference
    assert stats[-1]["score"] > stats[0]["score"] + 0.2 and stats[-1]["kl"] > 0


def test_dpo_step_starts_at_log2_and_raises_the_margin():
    policy, ref = tiny_model(), tiny_model()
    x, chosen, rejected = prompts(16, 3), prompts(16, 4, seed=1), prompts(16, 4, seed=2)
    with torch.no_grad():
        batch = {"prompt": x, "chosen": chosen, "rejected": rejected,
                 "ref_chosen": sequence_logps(ref, x, chosen), "ref_rejected": sequence_logps(ref, x, rejected)}
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    stats = [dpo_step(policy, batch, opt, beta=0.5) for _ in range(10)]
    assert stats[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and stats[0]["margin"] == 0.0
    assert stats[-1]["margin"] > 0.5 and stats[-1]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="beta must be"):
        dpo_step(policy, batch, opt, beta=0.0)


def test_grpo_raises_a_toy_reward_without_a_value_model():
    policy, ref = tiny_model(), tiny_model()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    x = prompts(8, 3)
    stats = [grpo_step(policy, ref, count_score(5), x, 8, opt, generator=g) for _ in range(15)]
    assert stats[0]["kl"] == 0.0 and stats[-1]["reward"] > stats[0]["reward"] + 0.2
    with pytest.raises(ValueError, match="group_size must be"):
        grpo_step(policy, ref, count_score(5), x, 1, opt)


def test_evaluate_policy_at_the_reference_has_zero_kl():
    model = tiny_model()
    out = evaluate_policy(model, copy.deepcopy(model), prompts(), lambda ids: "".join(map(str, ids)),
                          lambda s: 1.0 if s.startswith("5") else -1.0, count_score(5),
                          generator=torch.Generator().manual_seed(0))
    assert out["kl"] == 0.0 and set(out) == {"true_reward", "broken", "kl", "rm_score"}
    assert out["broken"] == pytest.approx((1 - out["true_reward"]) / 2)

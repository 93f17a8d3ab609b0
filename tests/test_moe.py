"""llmlab.moe against transformers' Mixtral sparse MoE block and load-balancing loss, plus the
capacity and statistics invariants."""

import math

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

from llmlab.moe import SparseMoE, capacity_keep, load_balancing_loss, route

C, F_HIDDEN, E = 16, 24, 4
TOL = {"rtol": 1e-5, "atol": 1e-6}


def pair(top_k=2, seed=0):
    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=C, intermediate_size=F_HIDDEN, num_local_experts=E, num_experts_per_tok=top_k,
                        num_attention_heads=4, num_key_value_heads=4)
    ref = MixtralSparseMoeBlock(cfg).eval()
    ours = SparseMoE(C, F_HIDDEN, E, top_k=top_k).eval()
    with torch.no_grad():
        ref.gate.weight.copy_(ours.gate.weight)
        gate_up = [torch.cat([ex.gate_proj.weight, ex.up_proj.weight]) for ex in ours.experts]  # each (2F, C)
        ref.experts.gate_up_proj.copy_(torch.stack(gate_up))  # (E, 2F, C)
        ref.experts.down_proj.copy_(torch.stack([ex.down_proj.weight for ex in ours.experts]))  # (E, C, F)
    return ours, ref


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_sparse_moe_equals_mixtral_block(top_k):
    ours, ref = pair(top_k)
    x = torch.randn(3, 5, C)
    out, stats = ours(x)
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x), **TOL)
    logits_ref, weights_ref, idx_ref = ref.gate(x.reshape(-1, C))
    weights, idx = route(stats.router_logits, top_k)
    torch.testing.assert_close(stats.router_logits, logits_ref, **TOL)
    torch.testing.assert_close(weights, weights_ref, **TOL)
    assert torch.equal(idx, idx_ref) and torch.equal(stats.expert_indices, idx_ref)


def test_load_balancing_loss_equals_transformers():
    g = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(12, E, generator=g) for _ in range(3))
    for top_k in (1, 2):
        ref = load_balancing_loss_func(layers, E, top_k)
        torch.testing.assert_close(load_balancing_loss(layers, top_k), ref, **TOL)
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # (B, S), N = B * S = 12
    ref = load_balancing_loss_func(layers, E, 2, attention_mask)
    torch.testing.assert_close(load_balancing_loss(layers, 2, token_mask=attention_mask.reshape(-1)), ref, **TOL)


def test_load_balancing_loss_is_k_when_balanced_and_larger_when_collapsed():
    balanced = torch.zeros(8, E)  # uniform probabilities; ties give every expert the same count below
    balanced[torch.arange(8), torch.arange(8) % E] = 1e-3
    torch.testing.assert_close(load_balancing_loss(balanced, top_k=1), torch.tensor(1.0), rtol=1e-3, atol=1e-3)
    collapsed = torch.zeros(8, E)
    collapsed[:, 0] = 10.0  # every token prefers expert 0
    assert load_balancing_loss(collapsed, top_k=1) > 3.5  # approaches E


def test_aux_loss_gradient_reaches_the_router():
    moe = SparseMoE(C, F_HIDDEN, E, top_k=2)
    _, stats = moe(torch.randn(2, 6, C))
    load_balancing_loss(stats.router_logits, 2).backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_route_without_renormalization_keeps_probabilities():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    weights, idx = route(logits, 1, renormalize=False)
    assert idx.tolist() == [[1]]
    torch.testing.assert_close(weights, torch.softmax(logits, -1)[:, 1:2])
    torch.testing.assert_close(route(logits, 1)[0], torch.ones(1, 1))


def test_capacity_keep_serves_first_choices_first():
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])  # (N, k)
    keep = capacity_keep(indices, n_experts=3, capacity=2)
    # expert 0: first choices of tokens 0 and 1 fit, token 2's first choice and token 3's second do not;
    # expert 1: token 3's first choice, then token 0's second choice; token 2's second choice is dropped.
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]


def test_capacity_drops_and_counts_overflow():
    ours, _ = pair(2)
    x = torch.randn(2, 8, C)
    unlimited, base = ours(x)
    assert base.capacity is None and int(base.dropped_per_expert.sum()) == 0
    assert int(base.tokens_per_expert.sum()) == 2 * 8 * 2
    ours.capacity_factor = 100.0
    roomy, stats = ours(x)
    torch.testing.assert_close(roomy, unlimited)
    ours.capacity_factor = 0.5
    tight, stats = ours(x)
    assert stats.capacity == math.ceil(0.5 * 16 * 2 / E)
    assert torch.all(stats.tokens_per_expert - stats.dropped_per_expert <= stats.capacity)
    assert int(stats.dropped_per_expert.sum()) >= 32 - E * stats.capacity
    assert 0 < stats.dropped_fraction < 1
    assert not torch.allclose(tight, unlimited)


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k must be <= n_experts"):
        SparseMoE(C, F_HIDDEN, 2, top_k=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        SparseMoE(C, F_HIDDEN, E, capacity_factor=0.0)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        SparseMoE(C, F_HIDDEN, E)(torch.randn(4, C))
    with pytest.raises(ValueError, match="router_logits must have 2 dimensions"):
        route(torch.randn(4), 1)
    with pytest.raises(ValueError, match="at least one"):
        load_balancing_loss([], 1)


def test_routing_is_per_token_not_per_sequence():
    """Without a capacity limit, a token's route and output depend on that token alone: reordering the
    tokens of a sequence, or running each token by itself, reorders the outputs and nothing else."""
    ours, _ = pair(2)
    x = torch.randn(1, 12, C)  # (B, T, C): one sequence
    y, stats = ours(x)
    assert len(set(stats.expert_indices.reshape(-1).tolist())) > 2  # one sequence, more than k experts
    perm = torch.randperm(12)
    y_perm, stats_perm = ours(x[:, perm])
    torch.testing.assert_close(y_perm, y[:, perm], **TOL)
    assert torch.equal(stats_perm.expert_indices, stats.expert_indices[perm])
    alone = torch.cat([ours(x[:, t : t + 1])[0] for t in range(12)], dim=1)  # (1, T, C)
    torch.testing.assert_close(alone, y, **TOL)


# --- DeepSeek-style MoE ----------------------------------------------------------------------------

def _hf_deepseek_moe(seed: int = 0):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, n_shared_experts=2,
                              num_experts_per_tok=2, n_group=4, topk_group=2, norm_topk_prob=True,
                              routed_scaling_factor=2.5, vocab_size=32, num_hidden_layers=1)
    torch.manual_seed(seed)
    ref = DeepseekV3MoE(config).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.5)
    ref.gate.e_score_correction_bias.normal_(std=0.3)
    return ref


def test_deepseek_moe_equals_transformers_deepseek_v3_moe():
    from llmlab.moe import DeepSeekMoE, deepseek_state_from_hf

    ref = _hf_deepseek_moe()
    ours = DeepSeekMoE(n_embd=16, hidden=8, n_experts=8, top_k=2, n_shared_experts=2, n_group=4, topk_group=2,
                       norm_topk_prob=True, routed_scaling_factor=2.5).eval()
    ours.load_state_dict(deepseek_state_from_hf(ref.state_dict()))
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        _, hf_gates, hf_idx = ref.gate(x)
        y, stats = ours(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    order = hf_idx.argsort(dim=-1)  # transformers' top-k is unsorted
    torch.testing.assert_close(stats.expert_indices.sort(dim=-1).values, hf_idx.gather(1, order))
    # the chosen experts come from the topk_group=2 best of 4 groups only
    groups = stats.expert_indices // 2  # (N, k): group of each chosen expert
    assert all(len(set(row)) <= 2 for row in groups.tolist())


def test_deepseek_bias_steers_the_choice_but_not_the_gates():
    from llmlab.moe import deepseek_route

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    gates, idx = deepseek_route(logits, torch.zeros(4), top_k=1, norm_topk_prob=False)
    assert idx.tolist() == [[0]]
    gates_b, idx_b = deepseek_route(logits, torch.tensor([0.0, 0.0, 0.0, 5.0]), top_k=1, norm_topk_prob=False)
    assert idx_b.tolist() == [[3]]
    torch.testing.assert_close(gates_b, torch.sigmoid(torch.tensor([[-1.0]])))  # s of expert 3, no bias


def test_update_routing_bias_balances_a_skewed_router():
    """With fixed, skewed router logits, repeated bias updates bring MaxVio down."""
    from llmlab.moe import deepseek_route, max_violation, update_routing_bias

    torch.manual_seed(0)
    logits = torch.randn(512, 8) + torch.linspace(2.0, -2.0, 8)  # expert 0 is favoured
    bias = torch.zeros(8)
    _, idx = deepseek_route(logits, bias, top_k=2)
    before = max_violation(torch.bincount(idx.reshape(-1), minlength=8))
    for _ in range(200):
        _, idx = deepseek_route(logits, bias, top_k=2)
        bias = update_routing_bias(bias, torch.bincount(idx.reshape(-1), minlength=8), gamma=0.01)
    after = max_violation(torch.bincount(idx.reshape(-1), minlength=8))
    assert before > 1.0 and after < 0.25, (before, after)


def test_sequence_balance_loss():
    from llmlab.moe import sequence_balance_loss

    logits = torch.zeros(4, 4)
    idx = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert float(sequence_balance_loss(logits, idx)) == pytest.approx(1.0)
    skewed = torch.tensor([[0, 1]] * 4)  # f = (2, 2, 0, 0)
    assert float(sequence_balance_loss(logits, skewed)) == pytest.approx(1.0)  # flat P hides it
    confident = torch.tensor([[3.0, 3.0, -3.0, -3.0]] * 4)  # P follows f: the loss rises toward 2
    assert 1.8 < float(sequence_balance_loss(confident, skewed)) < 2.0


def test_deepseek_errors():
    from llmlab.moe import deepseek_route, update_routing_bias

    with pytest.raises(ValueError, match="bias must have E=4"):
        deepseek_route(torch.zeros(2, 4), torch.zeros(3), top_k=1)
    with pytest.raises(ValueError, match="n_group"):
        deepseek_route(torch.zeros(2, 6), torch.zeros(6), top_k=1, n_group=4)
    with pytest.raises(ValueError, match="gamma"):
        update_routing_bias(torch.zeros(2), torch.ones(2), gamma=-1.0)

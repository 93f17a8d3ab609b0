"""llmlab.adalora against peft's AdaLoRA (budget schedule, SVDLinear forward, orthogonal regularizer,
importance scores and the ranks a short training run ends with) and against AdaLoRA's invariants."""

import copy

import pytest
import torch
from peft import AdaLoraConfig
from torch import nn

from llmlab.adalora import (
    AdaLoRAConfig,
    RankAllocator,
    SVDLinear,
    budget_schedule,
    inject_adalora,
    orthogonal_regularization,
    ranks,
    svd_layers,
)
from tests.models import peft_pair, tiny_llama, tiny_llmlab

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


def peft_config(cfg: AdaLoRAConfig) -> AdaLoraConfig:
    return AdaLoraConfig(
        task_type="CAUSAL_LM",
        init_r=cfg.init_r,
        target_r=cfg.target_r,
        lora_alpha=cfg.alpha,
        target_modules=list(cfg.target_modules),
        total_step=cfg.total_step,
        tinit=cfg.tinit,
        tfinal=cfg.tfinal,
        deltaT=cfg.deltaT,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        orth_reg_weight=cfg.orth_reg_weight,
    )


def peft_params(peft_model):
    """peft's AdaLoRA parameters under llmlab's names."""
    out = {}
    for name, p in peft_model.named_parameters():
        if ".lora_" in name:
            out[name.removeprefix("base_model.model.").replace(".default", "")] = p
    return out


def pair(cfg, seed=1):
    """llmlab and peft AdaLoRA models on the same tiny Llama with the same random A, E, B."""
    base = tiny_llama()
    ours, theirs = peft_pair(base, lambda m: inject_adalora(m, cfg), peft_config(cfg), seed=seed)
    return base, ours, theirs


# --- against peft --------------------------------------------------------------------------------


@pytest.mark.parametrize("tinit,tfinal,total,delta", [(0, 0, 50, 1), (5, 10, 60, 3), (3, 2, 20, 1)])
def test_budget_schedule_equals_peft(tinit, tfinal, total, delta):
    cfg = AdaLoRAConfig(init_r=6, target_r=2, total_step=total, tinit=tinit, tfinal=tfinal, deltaT=delta)
    _, ours, theirs = pair(cfg)
    allocator = RankAllocator(ours, cfg)
    reference = theirs.base_model.rankallocator
    assert (allocator.init_budget, allocator.target_budget) == (reference.init_bgt, reference.target_bgt) == (24, 8)
    for step in range(total + 1):
        assert budget_schedule(step, cfg, 24, 8) == reference.budget_schedule(step)


def test_forward_and_orthogonal_regularizer_equal_peft():
    cfg = AdaLoRAConfig.tiny()
    base, ours, theirs = pair(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(ours(IDS).logits, base(IDS).logits, atol=1e-3)
        ce = ours(IDS, labels=IDS).loss
        expected = ce + cfg.orth_reg_weight * orthogonal_regularization(ours, squared=False)
        torch.testing.assert_close(theirs(input_ids=IDS, labels=IDS).loss, expected, rtol=1e-4, atol=1e-5)


def test_importance_scores_and_pruning_equal_peft():
    cfg = AdaLoRAConfig(init_r=4, target_r=2, total_step=20, tinit=0, tfinal=0)
    _, ours, theirs = pair(cfg)
    ours(IDS, labels=IDS).loss.backward()
    theirs(input_ids=IDS, labels=IDS).loss.backward()  # includes the regularizer: copy its gradients over
    theirs_named = peft_params(theirs)
    for name, p in ours.named_parameters():
        if p.requires_grad:
            p.grad = theirs_named[name].grad.clone()
    allocator = RankAllocator(ours, cfg)
    reference = theirs.base_model.rankallocator
    for _ in range(2):
        allocator.update_importance(ours)
        reference.update_ipt(theirs.base_model.model)
    rank_pattern = reference.mask_to_budget(theirs.base_model.model, budget=10)
    our_ranks = allocator.mask_to_budget(ours, budget=10)
    for key, kept in rank_pattern.items():
        name = key.split(".lora_E")[0].removeprefix("base_model.model.")
        assert svd_layers(ours)[name].rank_mask.tolist() == kept
    assert sum(our_ranks.values()) == 10


def test_short_training_run_ends_with_peft_ranks():
    cfg = AdaLoRAConfig(init_r=4, target_r=2, total_step=8, tinit=1, tfinal=2, orth_reg_weight=0.1)
    _, ours, theirs = pair(cfg)
    allocator = RankAllocator(ours, cfg)
    opt_o = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.2)
    opt_t = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.2)
    g = torch.Generator().manual_seed(0)
    for step in range(cfg.total_step):
        ids = torch.randint(0, 64, (2, 8), generator=g)
        loss = ours(ids, labels=ids).loss + cfg.orth_reg_weight * orthogonal_regularization(ours, squared=False)
        loss.backward()
        opt_o.step()
        allocator.step(ours, step)
        opt_o.zero_grad()
        theirs(input_ids=ids, labels=ids).loss.backward()
        opt_t.step()
        theirs.base_model.update_and_allocate(step)
        opt_t.zero_grad()
    final = theirs.peft_config["default"].rank_pattern
    expected = {k.split(".lora_E")[0].removeprefix("base_model.model."): sum(v) for k, v in final.items()}
    assert ranks(ours) == expected
    assert sum(expected.values()) == allocator.target_budget == 8
    for name, p in peft_params(theirs).items():
        torch.testing.assert_close(dict(ours.named_parameters())[name], p, rtol=1e-3, atol=1e-5)


# --- invariants ----------------------------------------------------------------------------------


def test_zero_singular_values_at_init_change_nothing():
    base = tiny_llama()
    model = inject_adalora(copy.deepcopy(base), AdaLoRAConfig.tiny())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=0, atol=0)
    assert all(torch.count_nonzero(layer.lora_E) == 0 for layer in svd_layers(model).values())


def test_llmlab_model_takes_adalora():
    base = tiny_llmlab()
    model = inject_adalora(copy.deepcopy(base), AdaLoRAConfig.tiny())
    assert len(svd_layers(model)) == 4
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=0, atol=0)


def test_orthogonal_regularizer_is_zero_for_orthonormal_p_and_q():
    layer = SVDLinear(nn.Linear(16, 12), r=4, alpha=4.0)
    model = nn.ModuleDict({"q_proj": layer})
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(16, 4))  # (16, 4) orthonormal columns
        p, _ = torch.linalg.qr(torch.randn(12, 4))  # (12, 4)
        layer.lora_A.copy_(q.T)
        layer.lora_B.copy_(p)
    assert orthogonal_regularization(model).item() < 1e-10
    with torch.no_grad():
        layer.lora_A.mul_(2.0)  # Q Q^T = 4 I: ||3 I||_F^2 = 9 * 4 = 36, averaged with the zero for P
    assert orthogonal_regularization(model).item() == pytest.approx(18.0, rel=1e-5)


def test_svd_linear_is_the_formula_and_pruning_removes_one_rank_one_term():
    layer = SVDLinear(nn.Linear(8, 6), r=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_E.copy_(torch.tensor([[1.0], [2.0], [3.0]]))
    x = torch.randn(5, 8)
    delta = 2.0 * layer.lora_B @ torch.diag(layer.lora_E.view(-1)) @ layer.lora_A
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta.T)
    layer.apply_mask(torch.tensor([True, False, True]))
    term = 2.0 * 2.0 * torch.outer(layer.lora_B[:, 1], layer.lora_A[1])
    torch.testing.assert_close(layer.delta_weight(), delta - term)
    assert layer.rank == 2


def test_budget_decreases_cubically_between_the_warmups():
    cfg = AdaLoRAConfig(init_r=12, target_r=4, total_step=100, tinit=10, tfinal=20)
    budgets = [budget_schedule(t, cfg, 120, 40)[0] for t in range(101)]
    assert set(budgets[:11]) == {120} and set(budgets[81:]) == {40}
    assert all(a >= b for a, b in zip(budgets, budgets[1:], strict=False))
    assert budgets[45] == int(80 * (1 - 35 / 70) ** 3 + 40)  # halfway: 1/8 of the extra budget is left


def test_pruning_hits_the_budget_and_reports_ranks():
    cfg = AdaLoRAConfig.tiny(total_step=10)
    model = inject_adalora(tiny_llama(), cfg)
    allocator = RankAllocator(model, cfg)
    with torch.no_grad():
        for layer in svd_layers(model).values():
            layer.lora_E.normal_()
    model(IDS, labels=IDS).loss.backward()
    allocator.update_importance(model)
    result = allocator.mask_to_budget(model, budget=9)
    assert sum(result.values()) == 9 and set(result) == set(svd_layers(model))
    for layer in svd_layers(model).values():
        assert torch.all(layer.lora_E[~layer.rank_mask] == 0)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: AdaLoRAConfig(init_r=4, target_r=8), ValueError, "target_r must be <= init_r"),
        (lambda: AdaLoRAConfig(total_step=10, tinit=8, tfinal=2), ValueError, "tinit must be <"),
        (lambda: AdaLoRAConfig(beta1=1.0), ValueError, "beta1 must be"),
        (lambda: inject_adalora(tiny_llama(), AdaLoRAConfig(target_modules=("x",))), ValueError, "matched no"),
        (lambda: RankAllocator(tiny_llama(), AdaLoRAConfig()), ValueError, "no SVDLinear"),
        (lambda: SVDLinear(nn.Conv1d(2, 2, 1), r=2, alpha=2.0), TypeError, "base_layer must be an nn.Linear"),
        (
            lambda: RankAllocator(m := inject_adalora(tiny_llama(), AdaLoRAConfig.tiny()), AdaLoRAConfig.tiny()).step(
                m, 3
            ),
            ValueError,
            "no gradient",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_llmlab_model_adalora_equals_peft_on_the_converted_model():
    from llmlab.interop import to_hf

    base = tiny_llmlab()
    cfg = AdaLoRAConfig.tiny()
    ours, theirs = peft_pair(base, lambda m: inject_adalora(m, cfg), peft_config(cfg), hf_base=to_hf(base), seed=3)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-4, atol=1e-5)


def test_triplet_score_is_smoothed_sensitivity_times_uncertainty_by_hand():
    """Zhang et al. 2023 eqs. 8-10 computed by hand over three steps, then the pruning rule: the
    lowest-scored triplets over all modules are the ones set to zero."""
    torch.manual_seed(0)
    model = nn.Sequential(SVDLinear(nn.Linear(6, 5), r=3, alpha=3.0), SVDLinear(nn.Linear(5, 4), r=3, alpha=3.0))
    with torch.no_grad():
        for layer in svd_layers(model).values():
            layer.lora_E.normal_()
    cfg = AdaLoRAConfig(init_r=3, target_r=1, total_step=10, beta1=0.8, beta2=0.6)
    allocator = RankAllocator(model, cfg)
    i_bar, u_bar = {}, {}
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(4, 6)).square().sum().backward()
        allocator.update_importance(model)
        for name, p in model.named_parameters():
            if ".lora_" not in name:
                continue
            sensitivity = (p * p.grad).abs()  # I = |w dL/dw|
            i_bar[name] = 0.8 * i_bar.get(name, 0.0) + 0.2 * sensitivity
            u_bar[name] = 0.6 * u_bar.get(name, 0.0) + 0.4 * (sensitivity - i_bar[name]).abs()
    scores = allocator.triplet_scores(model)
    by_hand = {}
    for name in ("0", "1"):
        s = {part: i_bar[f"{name}.{part}"] * u_bar[f"{name}.{part}"] for part in ("lora_A", "lora_E", "lora_B")}
        by_hand[name] = s["lora_E"][:, 0] + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)  # (R,)
        torch.testing.assert_close(scores[name], by_hand[name])
    allocator.mask_to_budget(model, budget=2)  # keep 2 of the 6 triplets
    flat = torch.cat([by_hand["0"], by_hand["1"]])  # (6,)
    kept = torch.cat([svd_layers(model)[n].rank_mask for n in ("0", "1")])  # (6,)
    assert kept.tolist() == [bool(i in set(flat.topk(2).indices.tolist())) for i in range(6)]
    lambdas = torch.cat([svd_layers(model)[n].lora_E[:, 0] for n in ("0", "1")])
    assert torch.all(lambdas[~kept] == 0) and torch.all(lambdas[kept] != 0)

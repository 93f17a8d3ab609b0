"""llmlab.optim: Newton-Schulz orthogonalization (against the SVD), Muon (against torch.optim.Muon),
its AdamW groups (against torch.optim.AdamW), the parameter split, and the errors."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from llmlab.model import LLM, ModelConfig
from llmlab.optim import NS_CUBIC, Muon, adjusted_lr, muon_param_groups, newton_schulz
from tests.models import train_steps


def polar(g: torch.Tensor) -> torch.Tensor:
    """U V^T from the SVD G = U S V^T: the nearest orthogonal matrix, what Newton-Schulz approximates."""
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return (u @ vh).float()


# --- Newton-Schulz ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 16), (8, 24), (24, 8), (3, 12, 20)])
def test_cubic_newton_schulz_converges_to_the_polar_factor(shape):
    torch.manual_seed(0)
    g = torch.randn(shape)
    out = newton_schulz(g, steps=60, coefficients=NS_CUBIC, dtype=torch.float64)
    torch.testing.assert_close(out, polar(g), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(32, 32), (16, 48), (48, 16)])
def test_quintic_singular_values_land_near_one_with_the_same_singular_vectors(shape):
    torch.manual_seed(1)
    g = torch.randn(shape)
    out = newton_schulz(g)  # 5 quintic steps
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.6 and s.max() < 1.25, s  # not exactly 1: the price of the steep quintic
    # Same singular vectors as G: U^T out V is diagonal.
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    core = u.mT @ out @ vh.mT  # (k, k)
    off = core - torch.diag_embed(torch.diagonal(core))
    assert off.abs().max() < 1e-4


def test_batched_iteration_equals_one_matrix_at_a_time_and_keeps_dtype():
    torch.manual_seed(2)
    g = torch.randn(4, 12, 20, dtype=torch.float64)
    out = newton_schulz(g)
    assert out.dtype == torch.float64
    for i in range(4):
        torch.testing.assert_close(out[i], newton_schulz(g[i]), atol=1e-6, rtol=0)


def test_zero_gradient_gives_a_zero_update_not_nan():
    assert torch.equal(newton_schulz(torch.zeros(4, 6)), torch.zeros(4, 6))


def test_newton_schulz_errors_name_the_argument():
    with pytest.raises(ValueError, match="g must have at least 2 dimensions"):
        newton_schulz(torch.randn(5))
    with pytest.raises(ValueError, match="steps"):
        newton_schulz(torch.randn(3, 3), steps=0)


def test_adjusted_lr_formulas():
    assert adjusted_lr(1.0, (128, 512), "match_rms_adamw") == pytest.approx(0.2 * 512**0.5)
    assert adjusted_lr(1.0, (512, 128), "original") == pytest.approx(2.0)
    assert adjusted_lr(1.0, (128, 512), "original") == 1.0
    # Moonshot's scale makes the RMS of the update 0.2 * lr for any shape: an orthogonal A x B matrix
    # has RMS 1 / sqrt(max(A, B)).
    o = polar(torch.randn(64, 256))
    rms = (adjusted_lr(1.0, o.shape, "match_rms_adamw") * o).pow(2).mean().sqrt()
    assert float(rms) == pytest.approx(0.2, rel=1e-4)


# --- Muon against torch.optim.Muon --------------------------------------------------------------


def _run(opt_cls, params, grads, groups=None, **kwargs):
    opt = opt_cls(params if groups is None else groups, **kwargs)
    for g in grads:
        for p, gp in zip(params, g, strict=True):
            p.grad = gp.clone()
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_torch_muon_when_iterating_in_bfloat16(adjust, nesterov):
    torch.manual_seed(3)
    shapes = [(16, 16), (8, 32), (32, 8)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    ours = _run(Muon, [nn.Parameter(p.clone()) for p in start], grads, adjust_lr=adjust, ns_dtype=torch.bfloat16,
                **kwargs)
    ref = _run(torch.optim.Muon, [nn.Parameter(p.clone()) for p in start], grads, adjust_lr_fn=adjust, **kwargs)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)  # bfloat16 iteration on both sides


def test_float32_iteration_stays_within_bfloat16_noise_of_torch_muon():
    torch.manual_seed(4)
    start = torch.randn(24, 40)
    grads = [[torch.randn(24, 40)] for _ in range(3)]
    ours = _run(Muon, [nn.Parameter(start.clone())], grads, lr=0.02)
    ref = _run(torch.optim.Muon, [nn.Parameter(start.clone())], grads, lr=0.02, adjust_lr_fn="match_rms_adamw")
    delta_ours, delta_ref = ours[0] - start * (1 - 0.02 * 0.1) ** 3, ref[0] - start * (1 - 0.02 * 0.1) ** 3
    rel = (delta_ours - delta_ref).norm() / delta_ref.norm()
    assert rel < 0.02  # the two differ only by bfloat16 rounding in torch's iteration


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(5)
    shapes = [(6, 10), (10,)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(5)]
    kwargs = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8)
    params = [nn.Parameter(p.clone()) for p in start]
    ours = _run(Muon, params, grads, groups=[{"params": params, "use_muon": False}], **kwargs)
    ref = _run(torch.optim.AdamW, [nn.Parameter(p.clone()) for p in start], grads, **kwargs)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(6)
    model = LLM(ModelConfig.tiny(vocab_size=20))
    x = torch.randint(0, 20, (2, 8))
    opt = Muon(muon_param_groups(model, 0.1), lr=1e-2)

    def step(m, o):
        o.zero_grad()
        m(x, targets=x).loss.backward()
        o.step()

    step(model, opt)
    twin = copy.deepcopy(model)
    twin_opt = Muon(muon_param_groups(twin, 0.1), lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as torch.save/torch.load would
    step(model, opt)
    step(twin, twin_opt)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --- parameter groups and errors ----------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_param_groups_give_muon_exactly_the_block_matrices(tie):
    model = LLM(dataclasses.replace(ModelConfig.tiny(vocab_size=20), tie_embeddings=tie))
    groups = muon_param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in groups if g["use_muon"] for p in g["params"]}
    expected = {n for n, p in model.named_parameters() if n.startswith("model.layers.") and p.dim() == 2}
    assert muon == expected
    assert len(muon) == 7 * model.config.n_layer  # q, k, v, o, gate, up, down
    decayed = {names[id(p)] for g in groups if not g["use_muon"] and g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == (set() if tie else {"lm_head.weight"})
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == model.num_parameters()


def test_muon_training_lowers_the_loss():
    torch.manual_seed(7)
    model = LLM(ModelConfig.tiny(vocab_size=20))
    x = torch.randint(0, 20, (4, 16))
    losses = train_steps(
        model,
        [x] * 30,
        lr=1e-2,
        optimizer=lambda _, lr: Muon(muon_param_groups(model, 0.0), lr=lr),
        loss_fn=lambda m, ids: m(ids, targets=ids.roll(-1, dims=1)).loss,
    )
    assert losses[-1] < 0.5 * losses[0]


def test_muon_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"use_muon=True.*shape \(4,\)"):
        Muon([nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="adjust_lr"):
        Muon([nn.Parameter(torch.zeros(4, 4))], adjust_lr="moonshot")
    with pytest.raises(ValueError, match="momentum"):
        Muon([nn.Parameter(torch.zeros(4, 4))], momentum=1.0)
    with pytest.raises(ValueError, match="betas"):
        Muon([nn.Parameter(torch.zeros(4, 4))], betas=(0.9,))

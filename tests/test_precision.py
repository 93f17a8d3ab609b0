"""llmlab.precision: format facts equal torch.finfo and IEEE rounding, the loss scaler behaves like
torch.amp.GradScaler step by step, and fp32 master weights keep updates that 16-bit weights swallow."""

import pytest
import torch
from torch import nn

from llmlab.precision import (
    FORMATS,
    DynamicLossScaler,
    MasterWeightOptimizer,
    float_format,
    update_is_lost,
)


@pytest.mark.parametrize("name", list(FORMATS))
def test_format_facts_are_the_edges_of_what_the_dtype_rounds_to(name):
    f, dtype = float_format(name), FORMATS[name]
    assert f.bits == 1 + f.exponent_bits + f.mantissa_bits
    one = torch.tensor(1.0, dtype=dtype)
    assert one + f.eps > one and one + f.eps / 2 == one  # eps is the gap above 1 (ties round to even)
    assert torch.tensor(f.smallest_subnormal, dtype=dtype) > 0
    assert torch.tensor(f.smallest_subnormal / 2, dtype=dtype) == 0  # halfway rounds to even: zero
    assert torch.tensor(f.max, dtype=dtype).isfinite()
    assert torch.tensor(f.max, dtype=torch.float64).mul(1 + 2 * f.eps).to(dtype).isinf()
    below = torch.tensor(f.smallest_normal * 0.75, dtype=torch.float64).to(dtype)
    assert 0 < below < f.smallest_normal  # a subnormal: representable but with fewer significant bits


def test_known_values_of_the_formats():
    assert (float_format("fp16").max, float_format("fp16").smallest_subnormal) == (65504.0, 2.0**-24)
    assert float_format("bf16").exponent_bits == float_format("fp32").exponent_bits == 8
    assert float_format("bf16").eps == 2.0**-7


def test_update_is_lost_in_16_bit_but_kept_in_fp32():
    w, u = torch.full((3,), 1.0), torch.tensor([1e-4, 2e-3, 1e-2])
    assert update_is_lost(w, u, "bf16").tolist() == [True, True, False]  # bf16 eps/2 = 0.0039
    assert update_is_lost(w, u, "fp16").tolist() == [True, False, False]  # fp16 eps/2 = 0.00049
    assert not update_is_lost(w, u, torch.float32).any()


def test_bad_format_names_are_rejected():
    with pytest.raises(ValueError, match="name must be one of"):
        float_format("int8")
    with pytest.raises(ValueError, match="dtype must be one of"):
        update_is_lost(torch.ones(1), torch.ones(1), "fp8")
    with pytest.raises(ValueError, match="dtype must be one of"):
        update_is_lost(torch.ones(1), torch.ones(1), torch.int8)
    with pytest.raises(ValueError, match="backoff_factor must be a finite number"):
        DynamicLossScaler(backoff_factor=1.5)


def _gradient_stream(steps: int, bad: set[int]):
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        grad = torch.randn(4, 3, generator=g)
        if i in bad:
            grad[1, 2] = float("inf") if i % 2 else float("nan")
        yield grad


def test_loss_scaler_equals_torch_grad_scaler_step_by_step():
    bad = {2, 3, 9, 10, 11}
    ours_p, ref_p = nn.Parameter(torch.ones(4, 3)), nn.Parameter(torch.ones(4, 3))
    ours_opt, ref_opt = torch.optim.SGD([ours_p], lr=0.1), torch.optim.SGD([ref_p], lr=0.1)
    ours = DynamicLossScaler(init_scale=2.0**10, growth_interval=3)
    ref = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    scales, ref_scales = [], []
    for grad in _gradient_stream(16, bad):
        for p, scaler in ((ours_p, ours), (ref_p, ref)):
            p.grad = None
            scaler.scale((p * grad).sum()).backward()  # gradient = S * grad
        stepped = ours.step(ours_opt)
        ref.step(ref_opt)
        assert stepped == (len(scales) not in bad)
        scales.append(ours.update())
        ref.update()
        ref_scales.append(ref.get_scale())
        torch.testing.assert_close(ours_p.detach(), ref_p.detach(), rtol=0, atol=0)
    assert scales == ref_scales
    steps = list(zip(scales, scales[1:], strict=False))
    assert any(b < a for a, b in steps) and any(b > a for a, b in steps)  # it backed off and grew


def test_loss_scaling_rescues_fp16_gradients_that_underflow():
    torch.manual_seed(0)
    x = torch.randn(64, 8) * 1e-3
    w = torch.randn(8, 1, dtype=torch.float16, requires_grad=True)
    loss = (x.half() @ w).float().pow(2).mean() * 1e-4  # tiny loss: gradients ~1e-10, below 2^-24
    (g_plain,) = torch.autograd.grad(loss, w, retain_graph=True)
    scaler = DynamicLossScaler(init_scale=2.0**24)
    (g_scaled,) = torch.autograd.grad(scaler.scale(loss), w)
    assert (g_plain == 0).all() and (g_scaled != 0).all()


def test_master_weights_keep_updates_that_bf16_weights_swallow():
    torch.manual_seed(0)
    plain = nn.Linear(16, 1, bias=False).to(torch.bfloat16)
    mixed = nn.Linear(16, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        plain.weight.uniform_(1.0, 2.0)  # |w| >= 1: bf16 spacing >= 2^-7, so 1e-4 < half a step
    mixed.load_state_dict(plain.state_dict())
    start = plain.weight.detach().float().clone()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=1e-4)
    mixed_opt = MasterWeightOptimizer(mixed.parameters(), torch.optim.SGD, lr=1e-4)
    for _ in range(50):
        for model, opt in ((plain, plain_opt), (mixed, mixed_opt)):
            opt.zero_grad()
            model.weight.grad = torch.ones_like(model.weight)  # update lr * g = 1e-4 per step
            opt.step()
    assert torch.equal(plain.weight.float(), start)  # every 1e-4 step was rounded away
    assert not torch.equal(mixed.weight.float(), start)  # 50 x 1e-4 = 0.005 accumulated in fp32
    torch.testing.assert_close(mixed_opt.master_params[0], start - 50 * 1e-4, rtol=0, atol=1e-6)


def test_master_weight_optimizer_skips_on_overflow_and_frees_fp32_grads():
    model = nn.Linear(4, 2).to(torch.float16)
    opt = MasterWeightOptimizer(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = DynamicLossScaler(init_scale=4.0)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    assert opt.step(scaler) is False and scaler.update() == 2.0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(m.grad is None for m in opt.master_params)
    with pytest.raises(ValueError, match="params must hold at least one parameter"):
        MasterWeightOptimizer([])

"""llmlab.gptq: GPTQ against its invariants (identity Hessian = round-to-nearest, lazy batches change
nothing, the Cholesky form equals OBQ's explicit inverse-Hessian updates) and against round-to-nearest
on real layers of the shipped model at 4 and 3 bits."""

import copy

import pytest
import torch

from llmlab.checkpoint import load_pretrained
from llmlab.data import generate_corpus, get_batch, train_val_split
from llmlab.gptq import (
    GPTQConfig,
    capture_inputs,
    gptq_quantize_model,
    gptq_quantize_weight,
    hessian,
    layer_output_error,
    quantize_linears,
    rtn_quantize_model,
    target_linears,
)
from llmlab.quantization import compute_qparams, dequantize_with, fake_quantize, quantize_with
from llmlab.train import heldout_loss


def correlated_inputs(n=512, c=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) @ torch.randn(c, c, generator=g)  # (N, C) correlated features


def random_weight(out=24, c=64, seed=1):
    return torch.randn(out, c, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_identity_hessian_gives_round_to_nearest(group_size, symmetric):
    # no correlation between inputs: nothing to compensate, GPTQ is plain rounding
    w = random_weight()
    config = GPTQConfig(bits=4, symmetric=symmetric, group_size=group_size)
    ours = gptq_quantize_weight(w, torch.eye(64), config).dequantize()
    assert torch.equal(ours, fake_quantize(w, 4, symmetric, config.granularity, group_size))


@pytest.mark.parametrize("group_size", [None, 16])
def test_lazy_batch_updates_do_not_change_the_result(group_size):
    w, h = random_weight(), hessian(correlated_inputs())
    one = gptq_quantize_weight(w, h, GPTQConfig(bits=3, group_size=group_size, block_size=1))
    lazy = gptq_quantize_weight(w, h, GPTQConfig(bits=3, group_size=group_size, block_size=32))
    assert torch.equal(one.q, lazy.q)
    torch.testing.assert_close(one.scale, lazy.scale, rtol=1e-6, atol=0)


def obq_order_quantize(w, h, bits, damp=0.01):
    """The update before GPTQ's Cholesky trick: keep the inverse Hessian of the columns not yet
    quantized explicitly, and remove each quantized column from it by Gaussian elimination
    (Frantar et al. 2022, eq. 2 and 3, in GPTQ's fixed left-to-right order)."""
    w = w.to(torch.float64).clone()
    h = h.to(torch.float64) + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    h_inv = torch.linalg.inv(h)
    scale, zero = compute_qparams(w, bits, False, dim=1)
    out = torch.zeros_like(w)
    for j in range(w.shape[1]):
        q = dequantize_with(quantize_with(w[:, j : j + 1], scale, zero, bits, False), scale, zero)[:, 0]
        out[:, j] = q
        err = (w[:, j] - q) / h_inv[j, j]
        w[:, j:] -= err[:, None] * h_inv[j, j:][None, :]  # eq. 3: delta = -err * [H^-1]_{j,:}
        h_inv = h_inv - h_inv[:, j : j + 1] @ h_inv[j : j + 1, :] / h_inv[j, j]  # eq. 3: drop column j
    return out.to(torch.float32)


def test_cholesky_form_equals_the_explicit_inverse_hessian_updates():
    w, h = random_weight(), hessian(correlated_inputs())
    ours = gptq_quantize_weight(w, h, GPTQConfig(bits=4)).dequantize()
    torch.testing.assert_close(ours, obq_order_quantize(w, h, 4), rtol=0, atol=1e-6)


def test_gptq_lowers_the_layer_objective_on_correlated_inputs():
    x, w = correlated_inputs(), random_weight()
    h = hessian(x)
    for bits in (4, 3, 2):
        gptq = gptq_quantize_weight(w, h, GPTQConfig(bits=bits)).dequantize()
        rtn = fake_quantize(w, bits, symmetric=False)
        assert layer_output_error(w, gptq, x) < 0.7 * layer_output_error(w, rtn, x)


def test_inputs_that_never_fire_get_zero_weights():
    x = correlated_inputs()
    x[:, 5] = 0.0
    q = gptq_quantize_weight(random_weight(), hessian(x), GPTQConfig(bits=4)).dequantize()
    assert (q[:, 5] == 0).all()


@pytest.fixture(scope="module")
def shipped():
    model, tokenizer = load_pretrained()
    train_ids, val_ids = train_val_split(torch.tensor(tokenizer.encode(generate_corpus())))
    calib, _ = get_batch(train_ids, 16, 128, torch.Generator().manual_seed(0))  # (16, 128) from training text
    held_out = val_ids[: 16 * 128].view(16, 128)  # (16, 128) windows the calibration never saw
    return model, calib, held_out, val_ids


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_round_to_nearest_on_every_linear_of_the_shipped_model(shipped, bits):
    model, calib, held_out, _ = shipped
    ratios = []
    for _, linear in target_linears(model):  # 28 layers: q, k, v, o, gate, up, down x 4 blocks
        h = hessian(capture_inputs(model, linear, lambda: model(calib)))
        x_eval = capture_inputs(model, linear, lambda: model(held_out))
        gptq = gptq_quantize_weight(linear.weight, h, GPTQConfig(bits=bits)).dequantize()
        rtn = fake_quantize(linear.weight.detach(), bits, symmetric=False)
        ratios.append(layer_output_error(linear.weight, gptq, x_eval) / layer_output_error(linear.weight, rtn, x_eval))
    # lower output error on held-out inputs for every layer, and by a wide margin on average
    assert max(ratios) < 1.0 and sum(ratios) / len(ratios) < 0.5, ratios


def test_gptq_model_keeps_the_held_out_loss_closer_than_rtn(shipped):
    model, calib, _, val_ids = shipped
    base = heldout_loss(model, val_ids, 128, max_windows=32)
    config = GPTQConfig(bits=3, group_size=32)
    gptq_model = copy.deepcopy(model)
    codes = gptq_quantize_model(gptq_model, calib, config)
    rtn = heldout_loss(rtn_quantize_model(copy.deepcopy(model), config), val_ids, 128, max_windows=32)
    gptq = heldout_loss(gptq_model, val_ids, 128, max_windows=32)
    assert gptq - base < 0.5 * (rtn - base), (base, gptq, rtn)
    assert len(codes) == 28
    layer = gptq_model.model.layers[2].mlp.down_proj
    assert torch.equal(layer.weight, codes["model.layers.2.mlp.down_proj"].dequantize())
    assert codes["model.layers.2.mlp.down_proj"].scale.shape == (128, 352 // 32, 1)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: GPTQConfig(bits=16), ValueError, "bits must be one of"),
        (lambda: GPTQConfig(damp=-0.1), ValueError, "damp"),
        (lambda: gptq_quantize_weight(torch.randn(4, 8), torch.eye(6)), ValueError, r"h must have shape \(8, 8\)"),
        (lambda: gptq_quantize_weight(torch.randn(4, 352), torch.eye(352), GPTQConfig(group_size=64)),
         ValueError, "group_size must divide the number of columns 352, got 64"),
        (lambda: hessian(torch.randn(2, 3, 4)), ValueError, "x must have 2 dimensions"),
        (lambda: target_linears(torch.nn.Sequential(torch.nn.ReLU())), ValueError, "no nn.Linear"),
        (lambda: quantize_linears(torch.nn.Linear(4, 4), "awq"), ValueError, "method must be one of"),
        (lambda: quantize_linears(load_pretrained()[0], "gptq"), ValueError, "calib_ids must be given"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_recorded_perplexity_result_starts_from_the_checkpoints_held_out_loss():
    from llmlab.checkpoint import pretrained_dir, read_config
    from llmlab.notebook import load_result

    result = load_result("quant_perplexity")
    heldout = read_config(pretrained_dir())["metadata"]["heldout"]
    fp32 = result["rows"][0]
    assert fp32["method"] == "fp32" and result["eval_windows"] == heldout["full_windows"]
    assert fp32["losses"][0] == pytest.approx(heldout["full_loss"], abs=1e-3)
    assert result["seeds"] == 3 and all(len(r["losses"]) == 3 for r in result["rows"] if r["method"] == "gptq")

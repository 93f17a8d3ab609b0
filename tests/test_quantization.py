"""llmlab.quantization: the NF4 table against its derivation from normal quantiles, block-wise
quantization and packing invariants, the memory per parameter, and QLoRA layers on a tiny Llama."""

import copy

import pytest
import torch
from torch import nn

from llmlab.lora import LoRAConfig, LoRALinear, count_trainable_parameters, lora_layers
from llmlab.quantization import (
    NF4_LEVELS,
    NF4Config,
    NF4Linear,
    QLoRALinear,
    QuantizedScales,
    absmax_dequantize,
    absmax_quantize,
    bits_per_parameter,
    dequantize_nf4,
    dequantize_scales,
    merge_qlora,
    nf4_levels_from_normal,
    pack_4bit,
    prepare_qlora,
    quantize_nf4,
    quantize_scales,
    unpack_4bit,
    zeropoint_dequantize,
    zeropoint_quantize,
)
from tests.models import tiny_llama, train_steps

WIDE = {"hidden_size": 64, "intermediate_size": 128}  # wider than the shared tiny Llama: rows of a whole NF4 block


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


# --- the NF4 table -------------------------------------------------------------------------------


def test_nf4_levels_derived_from_normal_quantiles_equal_the_published_table():
    torch.testing.assert_close(nf4_levels_from_normal(), NF4_LEVELS, rtol=0, atol=3e-7)


def test_nf4_table_shape_zero_and_asymmetry():
    assert NF4_LEVELS.shape == (16,)
    assert torch.all(NF4_LEVELS[1:] > NF4_LEVELS[:-1])
    assert NF4_LEVELS[0] == -1.0 and NF4_LEVELS[-1] == 1.0 and NF4_LEVELS[7] == 0.0
    assert (NF4_LEVELS < 0).sum() == 7 and (NF4_LEVELS > 0).sum() == 8


def test_nf4_beats_uniform_int4_on_normal_weights():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    nf4_err = (dequantize_nf4(quantize_nf4(w, NF4Config.no_double_quant())) - w).pow(2).mean()
    blocks = w.view(-1, 64)
    q, s = absmax_quantize(blocks, dim=1, bits=4)  # 15 uniform levels per block of 64
    int4_err = (absmax_dequantize(q, s).view_as(w) - w).pow(2).mean()
    assert nf4_err < 0.8 * int4_err


# --- quantize / dequantize -----------------------------------------------------------------------


def test_values_on_the_grid_survive_exactly():
    scales = torch.tensor([0.5, 2.0, 3.0])
    codes = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(1))
    codes[:, 0] = 15  # each block holds its absmax, so the scale is exactly the block's factor
    w = NF4_LEVELS[codes] * scales[:, None]  # (3, 64)
    q = quantize_nf4(w, NF4Config.no_double_quant())
    torch.testing.assert_close(dequantize_nf4(q), w, rtol=0, atol=0)
    torch.testing.assert_close(unpack_4bit(q.packed).view(3, 64), codes.to(torch.uint8))


def test_rounding_error_is_at_most_half_the_largest_gap_times_the_block_absmax():
    w = torch.randn(10, 100, generator=torch.Generator().manual_seed(2))  # 1000 values: the last block is padded
    q = quantize_nf4(w, NF4Config(block_size=64, double_quant=False))
    err = (dequantize_nf4(q) - w).abs()
    blocks = torch.nn.functional.pad(w.reshape(-1), (0, 24)).view(-1, 64)
    bound = blocks.abs().amax(dim=1, keepdim=True) * (NF4_LEVELS.diff().max() / 2)
    assert torch.all(torch.nn.functional.pad(err.reshape(-1), (0, 24)).view(-1, 64) <= bound + 1e-6)
    assert dequantize_nf4(q).shape == w.shape


def test_pack_two_codes_per_byte_high_nibble_first():
    codes = torch.tensor([1, 2, 15, 0, 7, 8], dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0x12, 0xF0, 0x78]
    torch.testing.assert_close(unpack_4bit(packed), codes)


def test_double_quantized_scales_are_close_and_centered():
    scales = torch.rand(1000, generator=torch.Generator().manual_seed(3)) + 0.5
    q = quantize_scales(scales, block_size=256)
    assert isinstance(q, QuantizedScales) and q.codes.dtype == torch.int8 and q.absmax.shape == (4,)
    torch.testing.assert_close(q.offset, scales.mean())
    err = (dequantize_scales(q) - scales).abs().max()
    assert err <= q.absmax.max() / 127 / 2 + 1e-6


def test_double_quant_error_is_small_next_to_nf4_error():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(4))
    plain = dequantize_nf4(quantize_nf4(w, NF4Config.no_double_quant()))
    double = dequantize_nf4(quantize_nf4(w, NF4Config.qlora()))
    assert (double - plain).pow(2).mean() < 0.05 * (plain - w).pow(2).mean()


# --- memory --------------------------------------------------------------------------------------


def test_bits_per_parameter_formula():
    assert bits_per_parameter(64, double_quant=False) == 4.5
    assert bits_per_parameter(64, double_quant=True) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert round(bits_per_parameter(64, double_quant=True), 3) == 4.127


@pytest.mark.parametrize("config,expected", [(NF4Config.qlora(), 4.127), (NF4Config.no_double_quant(), 4.5)])
def test_measured_storage_matches_the_formula(config, expected):
    w = torch.randn(256, 1024)  # 262,144 weights = 4096 blocks = 16 second-level blocks
    q = quantize_nf4(w, config)
    assert q.bits_per_parameter() == pytest.approx(expected, abs=2e-3)


# --- NF4Linear and QLoRA -------------------------------------------------------------------------


def test_nf4_linear_computes_with_the_dequantized_weight():
    linear = nn.Linear(64, 32)
    layer = NF4Linear.from_linear(linear)
    x = torch.randn(3, 5, 64)
    expected = x @ dequantize_nf4(quantize_nf4(linear.weight)).T + linear.bias
    torch.testing.assert_close(layer(x), expected)
    assert layer.weight_packed.dtype == torch.uint8 and layer.weight_packed.numel() == 64 * 32 // 2
    assert not any(p.requires_grad for p in layer.parameters())


def test_qlora_layer_at_init_equals_the_quantized_base_and_trains_only_lora():
    linear = nn.Linear(64, 32)
    layer = QLoRALinear(linear, r=4, alpha=8.0)
    x = torch.randn(2, 64, requires_grad=True)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    nn.init.normal_(layer.lora_B.weight)
    layer(x).sum().backward()
    # the same gradients as a dense layer holding the dequantized weight plus s B A, by autograd
    w = layer.base_layer.dequantized_weight().detach()  # (out, in)
    a = layer.lora_A.weight.detach().clone().requires_grad_(True)  # (R, in)
    b = layer.lora_B.weight.detach().clone().requires_grad_(True)  # (out, R)
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref @ w.T + linear.bias + layer.scaling * (x_ref @ a.T) @ b.T).sum().backward()
    torch.testing.assert_close(layer.lora_A.weight.grad, a.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.weight.grad, b.grad, rtol=1e-5, atol=1e-6)
    # the gradient flows through the frozen 4-bit weight into the input
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A.weight", "lora_B.weight"}


def test_dequantize_and_merge_equals_the_qlora_layer():
    layer = QLoRALinear(nn.Linear(64, 32), r=4, alpha=8.0)
    nn.init.normal_(layer.lora_B.weight)
    merged = layer.dequantize_and_merge()
    x = torch.randn(4, 64)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="dequantize"):
        layer.merge()


def test_prepare_qlora_on_llama_equals_a_model_with_dequantized_weights():
    base = tiny_llama(**WIDE)
    model = prepare_qlora(copy.deepcopy(base), LoRAConfig.all_linear(r=4))
    assert all(isinstance(m.base_layer, NF4Linear) for m in lora_layers(model).values())
    assert all(isinstance(m, LoRALinear) for m in lora_layers(model).values())
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            reference.get_submodule(name).weight.copy_(layer.base_layer.dequantized_weight())
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)
        # 4-bit weights move the logits only a little on this tiny model
        assert (model(IDS).logits - base(IDS).logits).abs().max() < 0.5
    trainable, _ = count_trainable_parameters(model)
    assert trainable == sum(m.r * (m.in_features + m.out_features) for m in lora_layers(model).values())


def test_qlora_training_step_lowers_the_loss():
    model = prepare_qlora(tiny_llama(**WIDE), LoRAConfig.all_linear(r=4, alpha=8.0))
    losses = train_steps(model, [IDS[:1]] * 5, lr=1e-2)
    assert losses[-1] < losses[0]


# --- int8 helpers --------------------------------------------------------------------------------


def test_absmax_int8_roundtrip_and_zero_is_exact():
    x = torch.randn(8, 16)
    x[0, 0] = 0.0
    q, s = absmax_quantize(x, dim=1)
    assert q.dtype == torch.int8 and s.shape == (8, 1)
    assert absmax_dequantize(q, s)[0, 0] == 0.0
    assert ((absmax_dequantize(q, s) - x).abs() <= s / 2 + 1e-7).all()


def test_zeropoint_uses_the_full_range_on_positive_data():
    x = torch.rand(1000) * 3 + 1
    q, s, z = zeropoint_quantize(x)
    assert q.dtype == torch.uint8 and q.min() == 0 and q.max() == 255
    assert ((zeropoint_dequantize(q, s, z) - x).abs() <= s / 2 + 1e-6).all()
    qa, sa = absmax_quantize(x)
    assert sa > s  # symmetric codes waste the negative half on all-positive data


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: quantize_nf4(torch.arange(64)), TypeError, "floating-point"),
        (lambda: quantize_nf4([1.0]), TypeError, "weight must be a torch.Tensor"),
        (lambda: NF4Config(block_size=63), ValueError, "block_size must be even"),
        (lambda: NF4Config(block_size=0), ValueError, "block_size must be an integer >= 2"),
        (lambda: pack_4bit(torch.zeros(3, dtype=torch.uint8)), ValueError, "even length"),
        (lambda: NF4Linear.from_linear(nn.Conv1d(2, 2, 1)), TypeError, "linear must be an nn.Linear"),
        (lambda: prepare_qlora(tiny_llama(**WIDE), LoRAConfig(target_modules=("qkv",))), ValueError, "matched no"),
        (lambda: absmax_quantize(torch.randn(4), bits=16), ValueError, "bits must be <= 8"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_qlora_on_llmlab_model():
    from llmlab.model import LLM, ModelConfig

    torch.manual_seed(0)
    base = LLM(ModelConfig.tiny(vocab_size=64)).eval()
    model = prepare_qlora(copy.deepcopy(base), LoRAConfig.all_linear(r=4))
    assert len(lora_layers(model)) == 2 * 7
    with torch.no_grad():
        assert (model(IDS).logits - base(IDS).logits).abs().max() < 0.5
    model(IDS[:, :-1], targets=IDS[:, 1:]).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_qlora_adapter_saves_and_resumes_on_a_requantized_model(tmp_path):
    from llmlab.lora import load_adapter, lora_state_dict, save_adapter

    cfg = LoRAConfig.tiny()
    base = tiny_llama(**WIDE)
    model = prepare_qlora(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            nn.init.normal_(layer.lora_B.weight, std=0.1)
    save_adapter(model, cfg, tmp_path)
    resumed = load_adapter(prepare_qlora(copy.deepcopy(base), cfg), tmp_path, trainable=True)
    assert all(isinstance(m, QLoRALinear) for m in lora_layers(resumed).values())
    assert set(lora_state_dict(resumed)) == set(lora_state_dict(model))
    with torch.no_grad():
        torch.testing.assert_close(resumed(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    assert count_trainable_parameters(resumed)[0] == sum(v.numel() for v in lora_state_dict(model).values())


def test_nf4_linear_keeps_no_full_precision_weight_for_backward():
    """The dequantized weight is rebuilt in the backward pass: autograd saves no (out, in) float tensor,
    and the gradient equals that of a plain linear layer with the dequantized weight."""
    from llmlab.quantization import NF4Linear

    torch.manual_seed(0)
    layer = NF4Linear.from_linear(torch.nn.Linear(256, 128))
    x = torch.randn(4, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert not any(t.shape == (128, 256) and t.is_floating_point() for t in saved)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(x_ref, layer.dequantized_weight(), layer.bias)
    torch.testing.assert_close(y, ref)
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


# --- merging a QLoRA adapter -----------------------------------------------------------------------


def _trained_looking_qlora(nf4=None, std=0.05, seed=0):
    torch.manual_seed(seed)
    layer = QLoRALinear(nn.Linear(128, 64), r=4, alpha=8.0, nf4=nf4)
    with torch.no_grad():
        nn.init.normal_(layer.lora_B.weight, std=std)
    return layer


def test_merge_qlora_in_full_precision_equals_the_unmerged_model():
    base = tiny_llama(**WIDE)
    model = prepare_qlora(copy.deepcopy(base), LoRAConfig.all_linear(r=4))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            nn.init.normal_(layer.lora_B.weight, std=0.1)
        unmerged = model(IDS).logits
        merged = merge_qlora(copy.deepcopy(model))
        assert not lora_layers(merged) and not any(isinstance(m, NF4Linear) for m in merged.modules())
        torch.testing.assert_close(merged(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_requantized_merge_is_the_nf4_rounding_of_the_dense_merge():
    layer = _trained_looking_qlora()
    dense = layer.dequantize_and_merge().weight  # (out, in): dequantize(W_nf4) + s B A
    requantized = layer.merge_and_requantize()
    assert isinstance(requantized, NF4Linear) and requantized.double_quant == layer.base_layer.double_quant
    expected = dequantize_nf4(quantize_nf4(dense, NF4Config.qlora()))
    torch.testing.assert_close(requantized.dequantized_weight(), expected, rtol=0, atol=0)
    error = (requantized.dequantized_weight() - dense).abs()
    assert error.max() > 0  # the merge is no longer exact ...
    blocks = dense.reshape(-1, 64).abs().amax(dim=1).repeat_interleave(64).view_as(dense)
    largest_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()
    assert torch.all(error <= 0.5 * largest_gap * blocks * 1.01 + 1e-7)  # ... but within one rounding


def test_requantizing_a_zero_adapter_merge_is_lossless_without_double_quant():
    layer = _trained_looking_qlora(NF4Config.no_double_quant(), std=0.0)  # B = 0: the update is zero
    requantized = layer.merge_and_requantize()
    torch.testing.assert_close(requantized.dequantized_weight(), layer.base_layer.dequantized_weight(),
                               rtol=0, atol=0)  # fmt: skip
    assert torch.equal(requantized.weight_packed, layer.base_layer.weight_packed)


def test_merge_qlora_requantize_keeps_4_bit_storage_and_a_small_update_rounds_away():
    base = tiny_llama(**WIDE)
    model = prepare_qlora(copy.deepcopy(base), LoRAConfig.all_linear(r=4))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            nn.init.normal_(layer.lora_B.weight, std=1e-4)  # far below half an NF4 level step
        unmerged = model(IDS).logits
        base_4bit = copy.deepcopy(model)
        for layer in lora_layers(base_4bit).values():
            nn.init.zeros_(layer.lora_B.weight)
        merged = merge_qlora(copy.deepcopy(model), requantize=True)
        assert sum(isinstance(m, NF4Linear) for m in merged.modules()) == len(lora_layers(model))
        # the update is lost in the rounding: the merged 4-bit model is closer to the bare 4-bit base
        # than to the adapted model it was merged from
        gap_to_adapted = (merged(IDS).logits - unmerged).abs().max()
        gap_to_base = (merged(IDS).logits - base_4bit(IDS).logits).abs().max()
        assert gap_to_base < gap_to_adapted


def test_merge_qlora_needs_qlora_layers():
    with pytest.raises(ValueError, match="no QLoRALinear layers"):
        merge_qlora(tiny_llama(**WIDE))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        merge_qlora("model")


# --- integer quantization: absmax / zero-point, per tensor / channel / group ----------------------

import warnings  # noqa: E402

from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver  # noqa: E402

from llmlab.quantization import (  # noqa: E402
    INT_BITS,
    fake_quantize,
    int8_matmul,
    int_range,
    llm_int8_linear,
    outlier_columns,
    quantize_int,
    smooth_norm_and_linears,
    smoothquant_scales,
    w8a8_linear,
)


def weight_with_outlier_rows(seed=0):
    """A (64, 256) weight with a few larger rows, like a real projection."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=g) * 0.02
    w[:4] *= 8
    return w


def _torch_quantize(fn, *args):
    with warnings.catch_warnings():  # PyTorch marks its quantized tensors as deprecated
        warnings.simplefilter("ignore")
        return fn(*args)


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_int8_equals_pytorch_observer_and_quantize_per_tensor(symmetric):
    x = weight_with_outlier_rows()
    ours = quantize_int(x, 8, symmetric, "tensor")
    if symmetric:  # restricted range [-127, 127]: scale = max|x| / 127
        obs = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127)
    else:
        obs = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    obs(x)
    scale, zero_point = obs.calculate_qparams()
    assert torch.equal(ours.scale.reshape(1), scale)
    assert int(ours.zero_point) == int(zero_point)
    dtype = torch.qint8 if symmetric else torch.quint8
    theirs = _torch_quantize(torch.quantize_per_tensor, x, float(scale), int(zero_point), dtype)
    assert torch.equal(ours.q, theirs.int_repr())
    assert torch.equal(ours.dequantize(), theirs.dequantize())


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_int8_equals_pytorch_observer_and_quantize_per_channel(symmetric):
    x = weight_with_outlier_rows(1)
    ours = quantize_int(x, 8, symmetric, "channel")
    if symmetric:
        obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                       quant_min=-127, quant_max=127)  # fmt: skip
    else:
        obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.quint8, qscheme=torch.per_channel_affine)
    obs(x)
    scales, zero_points = obs.calculate_qparams()
    assert torch.equal(ours.scale.view(-1), scales)
    assert torch.equal(ours.zero_point.view(-1).long(), zero_points)
    dtype = torch.qint8 if symmetric else torch.quint8
    theirs = _torch_quantize(torch.quantize_per_channel, x, scales, zero_points, 0, dtype)
    assert torch.equal(ours.q, theirs.int_repr())
    assert torch.equal(ours.dequantize(), theirs.dequantize())


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_codes_stay_in_range_and_the_error_is_at_most_half_a_step(bits, symmetric):
    x = weight_with_outlier_rows(2)
    qmin, qmax = int_range(bits, symmetric)
    for granularity, group in (("tensor", None), ("channel", None), ("group", 32)):
        q = quantize_int(x, bits, symmetric, granularity, group)
        assert q.q.min() >= qmin and q.q.max() <= qmax
        err = (q.dequantize() - x).abs()  # (64, 256)
        step = q.scale.expand(64, 8, 1).reshape(64, 8, 1) if granularity == "group" else q.scale
        if granularity == "group":
            err = err.view(64, 8, 32)
        assert (err <= step / 2 * (1 + 1e-5)).all()


def test_int4_ranges_zero_is_exact_and_symmetric_codes_are_odd():
    assert int_range(4) == (-7, 7) and int_range(4, symmetric=False) == (0, 15)
    x = torch.rand(8, 64) + 0.5  # all positive: the zero point must still represent 0 exactly
    x[:, 0] = 0.0
    q = quantize_int(x, 4, symmetric=False, granularity="channel")
    assert (q.dequantize()[:, 0] == 0).all()
    w = weight_with_outlier_rows(3)
    assert torch.equal(quantize_int(-w, 4).q, -quantize_int(w, 4).q)  # restricted range: q(-x) = -q(x)


def test_group_of_a_whole_row_equals_per_channel_and_finer_groups_cost_scales():
    x = weight_with_outlier_rows(4)
    row = quantize_int(x, 4, granularity="group", group_size=256)
    channel = quantize_int(x, 4, granularity="channel")
    assert torch.equal(row.dequantize(), channel.dequantize())
    g32 = quantize_int(x, 4, symmetric=False, granularity="group", group_size=32)
    # 4 bits per code + an fp16 scale and a 4-bit zero point per 32 weights = 4.625 bits per weight
    assert g32.storage_bits() == 64 * 256 * 4 + 64 * 8 * (16 + 4)
    assert channel.storage_bits() == 64 * 256 * 4 + 64 * 16


def test_finer_granularity_lowers_the_error_on_a_real_weight():
    from llmlab.checkpoint import load_pretrained

    model, _ = load_pretrained()
    w = model.model.layers[0].mlp.down_proj.weight.detach()  # (128, 352)
    err = {g: (fake_quantize(w, 4, True, g, 32 if g == "group" else None) - w).pow(2).mean()
           for g in ("tensor", "channel", "group")}  # fmt: skip
    assert err["group"] < err["channel"] < err["tensor"]
    # asymmetric codes use the range of each row better than absmax at the same width
    assert (fake_quantize(w, 4, False) - w).pow(2).mean() < err["channel"]


def test_quantize_int_matches_the_older_absmax_helper():
    x = weight_with_outlier_rows(5)
    q, s = absmax_quantize(x, dim=1)
    ours = quantize_int(x, 8, True, "channel")
    torch.testing.assert_close(ours.dequantize(), absmax_dequantize(q, s), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: quantize_int(torch.randn(4, 4), bits=16), ValueError, r"bits must be one of \(2, 3"),
        (lambda: quantize_int(torch.randn(4, 4), bits=1), ValueError, "bits must be one of"),
        (lambda: quantize_int(torch.randn(4, 4), bits=4.0), ValueError, "bits must be one of"),
        (lambda: quantize_int(torch.randn(4, 4), granularity="row"), ValueError, "granularity must be one of"),
        (lambda: quantize_int(torch.randn(4, 352), granularity="group", group_size=64), ValueError,
         "group_size must divide the number of columns 352, got 64"),
        (lambda: quantize_int(torch.randn(4, 8), granularity="group"), TypeError, "group_size must be an integer"),
        (lambda: quantize_int(torch.randn(2, 4, 8), granularity="channel"), ValueError, "x must have 2 dimensions"),
        (lambda: quantize_int(torch.arange(8)), TypeError, "floating-point"),
        (lambda: int8_matmul(torch.zeros(2, 3), torch.zeros(2, 3)), TypeError, "must be int8"),
        (lambda: w8a8_linear(torch.randn(2, 4), torch.randn(3, 4), "group"), ValueError, "act_granularity"),
        (lambda: llm_int8_linear(torch.randn(2, 4), torch.randn(3, 4), threshold=0), ValueError, "threshold"),
        (lambda: smoothquant_scales(torch.ones(3), torch.ones(2, 4)), ValueError, "one entry per weight column"),
        (lambda: smoothquant_scales(torch.ones(4), torch.ones(2, 4), alpha=1.5), ValueError, "alpha"),
    ],
)
def test_int_quantization_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_supported_bits():
    assert INT_BITS == (2, 3, 4, 5, 6, 7, 8)


# --- int8 matmul, LLM.int8(), SmoothQuant ---------------------------------------------------------


def test_int8_matmul_is_exact_and_equals_pytorch_int_mm():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (32, 512), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (64, 512), generator=g, dtype=torch.int8)
    exact = a.long() @ b.long().T  # (32, 64) int64: no overflow possible
    assert torch.equal(int8_matmul(a, b).long(), exact)
    assert torch.equal(torch._int_mm(a, b.T.contiguous()).long(), exact)


def activations_with_outlier_features(seed=0, n=64, c=256, scale=60.0):
    """Token activations (N, C) with two feature dimensions far larger than the rest, as in
    LLM.int8() (section 4) and SmoothQuant (figure 4)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    x[:, [7, 100]] *= scale
    return x


def test_outlier_features_break_per_tensor_int8_and_llm_int8_fixes_it():
    x = activations_with_outlier_features()
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    y = x @ w.T

    def rel(yq):
        return float((yq - y).norm() / y.norm())

    assert outlier_columns(x).nonzero().flatten().tolist() == [7, 100]
    per_tensor, per_token = rel(w8a8_linear(x, w)), rel(w8a8_linear(x, w, "channel"))
    mixed = rel(llm_int8_linear(x, w))
    assert per_tensor > 0.04  # the outliers set the scale: ordinary features get a handful of codes
    assert per_token < per_tensor and mixed < 0.005 and mixed < per_token / 5
    # without outliers, per-token int8 is already accurate: the decomposition is about outliers
    plain = activations_with_outlier_features(scale=1.0)
    assert float((w8a8_linear(plain, w, "channel") - plain @ w.T).norm() / (plain @ w.T).norm()) < 0.01


def test_llm_int8_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the optional reference for LLM.int8()")
    import bitsandbytes.functional as bnbf

    x = activations_with_outlier_features()
    # the int8 part: bitsandbytes' vector-wise quantization takes each row's absmax over the values
    # below the threshold, and sets the codes of the outlier columns to 0 (they go to the 16-bit product)
    codes, row_absmax, outlier_cols = bnbf.int8_vectorwise_quant(x.clone(), threshold=6.0)
    regular = ~outlier_columns(x)
    assert torch.equal(outlier_cols.sort().values, (~regular).nonzero().flatten())
    ours = quantize_int(x.masked_fill(x.abs() >= 6.0, 0.0), 8, True, "channel")
    assert torch.equal(codes[:, regular], ours.q[:, regular]) and (codes[:, ~regular] == 0).all()
    torch.testing.assert_close(row_absmax / 127, ours.scale.view(-1), rtol=1e-6, atol=0)
    # the whole layer: Linear8bitLt with threshold 6 (it dequantizes the int8 weight's outlier columns,
    # llm_int8_linear uses the original ones, so the two agree to int8 rounding of the weight)
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    layer = bnb.nn.Linear8bitLt(256, 128, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    with torch.no_grad():
        theirs = layer(x)
    y = x @ w.T
    torch.testing.assert_close(llm_int8_linear(x, w), theirs, rtol=0, atol=0.02 * float(y.abs().max()))
    assert float((llm_int8_linear(x, w) - y).norm()) < 2 * float((theirs - y).norm())


def test_smoothquant_scales_follow_the_formula_and_balance_the_maxima():
    x = activations_with_outlier_features()
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    act = x.abs().amax(dim=0)  # (C,)
    s = smoothquant_scales(act, w, alpha=0.5)
    torch.testing.assert_close(s, act.sqrt() / w.abs().amax(dim=0).sqrt())
    # alpha = 0.5 makes the per-channel maxima of X / s and of W * s equal
    torch.testing.assert_close((x / s).abs().amax(dim=0), (w * s).abs().amax(dim=0), rtol=1e-5, atol=0)
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-4)  # X W^T unchanged
    # the migrated activations quantize per tensor far better
    y = x @ w.T
    before = float((w8a8_linear(x, w) - y).norm() / y.norm())
    after = float((w8a8_linear(x / s, w * s) - y).norm() / y.norm())
    assert after < before / 3


def test_smoothing_folded_into_the_norm_leaves_the_model_unchanged():
    from llmlab.model import LLM, ModelConfig

    torch.manual_seed(0)
    model = LLM(ModelConfig.tiny(vocab_size=50)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
        layer = model.model.layers[0]
        attn = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
        act = torch.rand(model.config.n_embd) * 10 + 0.1
        s = smoothquant_scales(act, torch.cat([m.weight for m in attn]), alpha=0.8)
        smooth_norm_and_linears(layer.input_layernorm, attn, s)
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="in_features"):
        smooth_norm_and_linears(layer.post_attention_layernorm, [layer.mlp.down_proj], s)


# --- NF4 against bitsandbytes ---------------------------------------------------------------------


def test_nf4_equals_bitsandbytes_quantize_4bit():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is the optional reference for NF4")
    import bitsandbytes.functional as bnbf

    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = quantize_nf4(w, NF4Config.no_double_quant())
    torch.testing.assert_close(state.code, NF4_LEVELS, rtol=0, atol=0)  # the same 16 levels
    assert torch.equal(ours.packed, packed.reshape(-1))  # the same codes, the same nibble order
    assert torch.equal(ours.scales, state.absmax)  # the same block absmax
    assert torch.equal(dequantize_nf4(ours), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("shape,dtype", [((7, 30), torch.float32), ((96, 128), torch.bfloat16)])
def test_nf4_equals_bitsandbytes_with_padding_and_in_bfloat16(shape, dtype):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is the optional reference for NF4")
    import bitsandbytes.functional as bnbf

    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)  # 210 weights: a padded block
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = quantize_nf4(w, NF4Config.no_double_quant())
    assert torch.equal(ours.scales, state.absmax.float())
    n = w.numel()
    assert torch.equal(unpack_4bit(ours.packed)[:n], unpack_4bit(packed.reshape(-1))[:n])
    assert torch.equal(dequantize_nf4(ours, dtype), bnbf.dequantize_4bit(packed, state))


def test_nf4_double_quantization_against_bitsandbytes():
    """Same 4-bit codes and the same offset (the mean scale) as bitsandbytes; the 8-bit second level
    differs on purpose (llmlab: int8 absmax codes, bitsandbytes: its dynamic 8-bit map), so the
    dequantized scales agree only to within one 8-bit step of each block."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is the optional reference for NF4")
    import bitsandbytes.functional as bnbf

    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w, NF4Config.qlora())
    assert torch.equal(ours.packed, packed.reshape(-1))
    torch.testing.assert_close(ours.scales.offset, state.offset, rtol=0, atol=0)
    exact = quantize_nf4(w, NF4Config.no_double_quant()).scales  # the fp32 block absmax
    theirs = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    step = float(ours.scales.absmax.max()) / 127  # one int8 step of the second-level blocks
    assert (dequantize_scales(ours.scales) - exact).abs().max() <= step / 2 + 1e-6  # round to nearest
    assert (theirs - exact).abs().max() <= step  # bitsandbytes' map is finer near 0, coarser near 1
    assert not torch.equal(dequantize_scales(ours.scales), theirs)


# --- real CPU kernels used for the speed comparison ------------------------------------------------


def test_quantized_linear_kernels_compute_the_same_product():
    from llmlab.quantization import quantized_linear_kernels

    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    kernels = quantized_linear_kernels(w)
    ref = x @ w.T
    tolerance = {"fp32": 1e-6, "bf16": 0.01, "fp16": 0.002, "int8 weight-only": 0.02, "int8 W8A8 dynamic": 0.03}
    for name, tol in tolerance.items():
        y = kernels[name](x).float()  # (16, 96)
        assert float((y - ref).norm() / ref.norm()) < tol, name
    # the bare int8 GEMM returns int32 accumulators of the per-tensor int8 codes
    qx, qw = quantize_int(x, 8, True, "tensor"), quantize_int(w, 8, True, "channel")
    assert torch.equal(kernels["int8 GEMM only"](x), int8_matmul(qx.q, qw.q))

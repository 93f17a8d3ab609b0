"""llmlab.quantization: the NF4 table against its derivation from normal quantiles, block-wise
quantization and packing invariants, the memory per parameter, and QLoRA layers on a tiny Llama."""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

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


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


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
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    assert x.grad is not None  # the gradient flows through the frozen 4-bit weight into the input
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
    base = tiny_llama()
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
    model = prepare_qlora(tiny_llama(), LoRAConfig.all_linear(r=4, alpha=8.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = IDS[:1]
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
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
        (lambda: prepare_qlora(tiny_llama(), LoRAConfig(target_modules=("qkv",))), ValueError, "matched no"),
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
    base = tiny_llama()
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
    base = tiny_llama()
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
    base = tiny_llama()
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
        merge_qlora(tiny_llama())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        merge_qlora("model")

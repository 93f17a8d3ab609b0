"""llmlab.lora against peft's LoRA on a tiny random transformers Llama (same weights -> same logits,
same merged weights, interchangeable saved adapters) and against LoRA's invariants."""

import copy
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from llmlab.lora import (
    LoRAConfig,
    LoRALinear,
    count_trainable_parameters,
    from_peft_keys,
    inject_lora,
    load_adapter,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    name_matches,
    save_adapter,
    to_peft_keys,
    unmerge_lora,
)
from tests.models import llmlab_loss, tiny_llama, tiny_llmlab, train_steps


def peft_config(cfg: LoRAConfig) -> LoraConfig:
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, use_rslora=cfg.use_rslora
    )


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.1)


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
CONFIGS = [
    LoRAConfig.tiny(),
    LoRAConfig.all_linear(r=4, alpha=16.0),
    LoRAConfig(r=3, alpha=5.0, target_modules=r".*\.(k_proj|down_proj)", use_rslora=True),
]


# --- equality with peft --------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS)
def test_same_adapter_weights_give_peft_logits(cfg):
    base = tiny_llama()
    ours = inject_lora(copy.deepcopy(base), cfg)
    randomize_lora(ours)
    theirs = get_peft_model(copy.deepcopy(base), peft_config(cfg)).eval()
    set_peft_model_state_dict(theirs, to_peft_keys(lora_state_dict(ours)))
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ours(IDS).logits, base(IDS).logits, atol=1e-3)  # the adapter does something


def test_weights_copy_from_peft_into_llmlab():
    cfg = LoRAConfig.all_linear(r=4, alpha=8.0)
    base = tiny_llama()
    theirs = get_peft_model(copy.deepcopy(base), peft_config(cfg)).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ours = inject_lora(copy.deepcopy(base), cfg)
    load_lora_state_dict(ours, from_peft_keys(get_peft_model_state_dict(theirs)))
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-6)


def test_same_modules_and_parameter_counts_as_peft():
    cfg = LoRAConfig.all_linear(r=4)
    base = tiny_llama()
    ours = inject_lora(copy.deepcopy(base), cfg)
    theirs = get_peft_model(copy.deepcopy(base), peft_config(cfg))
    assert count_trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    peft_keys = {k.replace(".default", "") for k in get_peft_model_state_dict(theirs)}
    assert set(to_peft_keys(lora_state_dict(ours))) == peft_keys


def test_merged_weights_equal_peft_merge_and_unload():
    cfg = LoRAConfig.all_linear(r=4, alpha=8.0)
    base = tiny_llama()
    ours = inject_lora(copy.deepcopy(base), cfg)
    randomize_lora(ours)
    theirs = get_peft_model(copy.deepcopy(base), peft_config(cfg))
    set_peft_model_state_dict(theirs, to_peft_keys(lora_state_dict(ours)))
    merged_ours = merge_and_unload(ours).state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()
    assert merged_ours.keys() == merged_theirs.keys() == base.state_dict().keys()
    for key in merged_ours:
        torch.testing.assert_close(merged_ours[key], merged_theirs[key], rtol=1e-6, atol=1e-7)


def test_init_distribution_matches_peft_and_the_paper():
    base = tiny_llama()
    ours = inject_lora(copy.deepcopy(base), LoRAConfig.tiny())
    theirs = get_peft_model(copy.deepcopy(base), peft_config(LoRAConfig.tiny()))
    bound = 1 / math.sqrt(32)  # kaiming_uniform_(a=sqrt(5)) on fan_in=32
    for key, value in to_peft_keys(lora_state_dict(ours)).items():
        ref = get_peft_model_state_dict(theirs)[key]
        assert value.shape == ref.shape
        if "lora_B" in key:
            assert torch.count_nonzero(value) == 0 and torch.count_nonzero(ref) == 0
        else:
            assert value.abs().max() <= bound and ref.abs().max() <= bound
            assert value.abs().max() > 0.8 * bound


# --- saved adapters, both ways -------------------------------------------------------------------


def test_llmlab_adapter_loads_in_peft_and_back(tmp_path):
    cfg = LoRAConfig(r=4, alpha=8.0, target_modules=("q_proj", "up_proj"))
    base = tiny_llama()
    ours = inject_lora(copy.deepcopy(base), cfg)
    randomize_lora(ours)
    save_adapter(ours, cfg, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    reloaded = load_adapter(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, ours(IDS).logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(reloaded(IDS).logits, ours(IDS).logits, rtol=0, atol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    from_peft = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(from_peft(IDS).logits, ours(IDS).logits, rtol=0, atol=0)


def test_saved_file_holds_only_adapter_weights(tmp_path):
    from safetensors.torch import load_file

    cfg = LoRAConfig.tiny()
    model = inject_lora(tiny_llama(), cfg)
    save_adapter(model, cfg, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(saved) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    assert all(".lora_A." in k or ".lora_B." in k for k in saved)


def sgd_steps(model, batches):
    train_steps(model.train(), batches, lr=0.5, optimizer=torch.optim.SGD)
    return model.eval()


def test_resume_training_from_a_saved_adapter(tmp_path):
    cfg = LoRAConfig.tiny()
    base = tiny_llama()
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 64, (2, 8), generator=g) for _ in range(4)]
    torch.manual_seed(0)
    straight = sgd_steps(inject_lora(copy.deepcopy(base), cfg), data)
    torch.manual_seed(0)
    first = sgd_steps(inject_lora(copy.deepcopy(base), cfg), data[:2])
    save_adapter(first, cfg, tmp_path)
    resumed = load_adapter(copy.deepcopy(base), tmp_path, trainable=True)
    trainable, _ = count_trainable_parameters(resumed)
    assert trainable == sum(v.numel() for v in lora_state_dict(resumed).values())
    sgd_steps(resumed, data[2:])
    for key, value in lora_state_dict(straight).items():
        torch.testing.assert_close(lora_state_dict(resumed)[key], value, rtol=1e-5, atol=1e-6)
    frozen = load_adapter(copy.deepcopy(base), tmp_path)
    assert count_trainable_parameters(frozen)[0] == 0


# --- invariants ----------------------------------------------------------------------------------


def test_b_zero_at_init_changes_nothing():
    base = tiny_llama()
    model = inject_lora(copy.deepcopy(base), LoRAConfig.all_linear(r=4))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=0, atol=0)


def test_merged_equals_unmerged_and_unmerge_restores_base():
    base = tiny_llama()
    model = inject_lora(copy.deepcopy(base), LoRAConfig.all_linear(r=4, alpha=8.0))
    randomize_lora(model)
    with torch.no_grad():
        unmerged = model(IDS).logits
        merge_lora(model)
        torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)
    base_weights = base.state_dict()
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, base_weights[name + ".weight"], rtol=0, atol=1e-6)


def test_only_adapter_parameters_train_and_base_gets_no_gradient():
    model = inject_lora(tiny_llama(), LoRAConfig.tiny())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    # at init only B gets a gradient: dL/dA = s B^T (...) = 0 because B = 0
    layer = next(iter(lora_layers(model).values()))
    assert layer.lora_A.weight.grad.abs().max() == 0 and layer.lora_B.weight.grad.abs().max() > 0


def test_lora_linear_is_the_formula():
    base = nn.Linear(8, 6)
    layer = LoRALinear(base, r=2, alpha=4.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8)
    expected = base(x) + 2.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)
    assert LoRALinear(nn.Linear(8, 6), r=4, alpha=4.0, use_rslora=True).scaling == pytest.approx(2.0)


def test_target_patterns_follow_peft_rules():
    assert name_matches("model.layers.0.self_attn.q_proj", ("q_proj",))
    assert not name_matches("model.layers.0.self_attn.xq_proj", ("q_proj",))
    assert name_matches("model.layers.1.mlp.up_proj", r".*\.1\..*proj")
    assert not name_matches("model.layers.0.mlp.up_proj", r".*\.1\..*proj")
    model = inject_lora(tiny_llama(), LoRAConfig(r=2, alpha=2.0, target_modules=r".*layers\.1\.self_attn\..*"))
    expected = [f"model.layers.1.self_attn.{p}" for p in ("k_proj", "o_proj", "q_proj", "v_proj")]
    assert sorted(lora_layers(model)) == expected


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: LoRAConfig(r=0), ValueError, "r must be an integer >= 1"),
        (lambda: LoRAConfig(alpha=0.0), ValueError, "alpha must be"),
        (lambda: LoRAConfig(dropout=1.0), ValueError, "dropout must be"),
        (lambda: LoRAConfig(target_modules=()), ValueError, "target_modules must name"),
        (lambda: LoRAConfig(target_modules=3), TypeError, "target_modules must be"),
        (lambda: inject_lora(tiny_llama(), LoRAConfig(target_modules=("qkv",))), ValueError, "matched no nn.Linear"),
        (lambda: inject_lora("model", LoRAConfig()), TypeError, "model must be a torch.nn.Module"),
        (lambda: inject_lora(tiny_llama(), {"r": 8}), TypeError, "config must be a LoRAConfig"),
        (lambda: merge_lora(tiny_llama()), ValueError, "no LoRALinear"),
        (lambda: LoRALinear(nn.ReLU(), r=2, alpha=2.0), TypeError, "base_layer must be"),
        (lambda: unmerge_lora(inject_lora(tiny_llama(), LoRAConfig.tiny())), ValueError, "not merged"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- llmlab's own model --------------------------------------------------------------------------


def test_llmlab_adapter_equals_peft_on_the_converted_transformers_model(tmp_path):
    from llmlab.interop import to_hf

    cfg = LoRAConfig.all_linear(r=4, alpha=8.0)
    base = tiny_llmlab()
    ours = inject_lora(copy.deepcopy(base), cfg)
    randomize_lora(ours)
    save_adapter(ours, cfg, tmp_path)  # same parameter names as transformers' Llama, so peft loads it
    theirs = PeftModel.from_pretrained(to_hf(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-5)
        merged_ours = merge_and_unload(ours)
        merged_theirs = theirs.merge_and_unload()
        torch.testing.assert_close(merged_ours(IDS).logits, merged_theirs(IDS).logits, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in merged_ours.modules())


def test_llmlab_model_b_zero_merge_and_training():
    base = tiny_llmlab()
    model = inject_lora(copy.deepcopy(base), LoRAConfig.all_linear(r=4))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=0, atol=0)
    train_steps(model, [IDS] * 2, lr=1.0, optimizer=torch.optim.SGD, loss_fn=llmlab_loss)
    model.eval()
    with torch.no_grad():
        before = model(IDS).logits
        assert not torch.allclose(before, base(IDS).logits, atol=1e-4)
        merge_lora(model)
        torch.testing.assert_close(model(IDS).logits, before, rtol=1e-5, atol=1e-5)


def test_half_precision_base_keeps_float32_adapters_like_peft():
    base = tiny_llama().to(torch.bfloat16)
    ours = inject_lora(copy.deepcopy(base), LoRAConfig.tiny())
    theirs = get_peft_model(copy.deepcopy(base), peft_config(LoRAConfig.tiny()))
    randomize_lora(ours)
    set_peft_model_state_dict(theirs, to_peft_keys(lora_state_dict(ours)))
    layer = next(iter(lora_layers(ours).values()))
    assert layer.lora_A.weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = ours(IDS).logits
        assert logits.dtype == torch.bfloat16
        torch.testing.assert_close(logits, theirs(IDS).logits, rtol=0, atol=0)


def test_disable_lora_gives_the_base_model_like_peft_disable_adapter():
    from llmlab.lora import disable_lora

    cfg = LoRAConfig.all_linear(r=4)
    base = tiny_llama()
    ours = inject_lora(copy.deepcopy(base), cfg)
    randomize_lora(ours)
    theirs = get_peft_model(copy.deepcopy(base), peft_config(cfg)).eval()
    set_peft_model_state_dict(theirs, to_peft_keys(lora_state_dict(ours)))
    with torch.no_grad():
        adapted = ours(IDS).logits
        with disable_lora(ours), theirs.disable_adapter():
            torch.testing.assert_close(ours(IDS).logits, base(IDS).logits, rtol=0, atol=0)
            torch.testing.assert_close(theirs(IDS).logits, base(IDS).logits, rtol=0, atol=0)
        torch.testing.assert_close(ours(IDS).logits, adapted, rtol=0, atol=0)


def test_dropout_acts_on_the_lora_branch_only():
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=4.0, dropout=0.5).train()
    x = torch.randn(64, 16)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # B = 0: dropout cannot reach the output
    nn.init.normal_(layer.lora_B.weight)
    torch.manual_seed(0)
    noisy = layer(x)
    expected_mean = layer.base_layer(x) + layer.scaling * layer.lora_B(layer.lora_A(x))
    assert not torch.allclose(noisy, expected_mean)
    layer.eval()
    torch.testing.assert_close(layer(x), expected_mean)

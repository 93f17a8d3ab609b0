"""llmlab.adapters: LLaMA-Adapter against peft's AdaptionPrompt on a tiny transformers Llama (same
prompts and gates -> same logits), and the invariants both adapter kinds are designed for: the
model is unchanged at initialisation, only adapter parameters train, the gate controls everything."""

import copy
import re

import pytest
import torch
from peft import AdaptionPromptConfig as PeftAdaptionPromptConfig
from torch import nn

from llmlab.adapters import (
    AdaptedAttention,
    AdapterLayer,
    AdaptionPromptConfig,
    BottleneckAdapter,
    BottleneckConfig,
    adaption_gates,
    inject_adapters,
    inject_adaption_prompts,
)
from tests.models import peft_pair, tiny_llama, tiny_llmlab, train_steps

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
MAKERS = pytest.mark.parametrize("make", [tiny_llama, tiny_llmlab], ids=["transformers", "llmlab"])


def adaption_name(name):
    """peft's ``...layers.{i}.self_attn.adaption_prompt`` (or ``adaption_gate``) under llmlab's name."""
    if "adaption_" not in name:
        return None
    layer = re.search(r"layers\.(\d+)\.", name).group(1)
    return f"model.layers.{layer}.self_attn.{name.rsplit('.', 1)[-1]}"


def set_gates(model, value):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(value)


# --- LLaMA-Adapter vs peft -----------------------------------------------------------------------


@pytest.mark.parametrize("layers", [1, 2])
def test_adaption_prompts_give_peft_logits(layers):
    base = tiny_llama()
    peft_cfg = PeftAdaptionPromptConfig(adapter_len=4, adapter_layers=layers, task_type="CAUSAL_LM")
    ours, theirs = peft_pair(
        base,
        lambda m: inject_adaption_prompts(m, AdaptionPromptConfig(adapter_len=4, adapter_layers=layers)),
        peft_cfg,
        rename=adaption_name,
        scale=lambda name: 0.5 if name.endswith("gate") else 1.0,
    )
    theirs.eval()
    assert len([n for n, p in theirs.named_parameters() if "adaption_" in n]) == 2 * layers
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        assert not torch.allclose(expected, base(IDS).logits, atol=1e-3)
        torch.testing.assert_close(ours(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert trainable == theirs.get_nb_trainable_parameters()[0] == layers * (4 * 32 + 1)


# --- LLaMA-Adapter invariants --------------------------------------------------------------------


@MAKERS
@pytest.mark.parametrize("gate", ["scalar", "tanh_per_head"])
def test_zero_gate_leaves_the_model_unchanged(make, gate):
    base = make()
    model = inject_adaption_prompts(
        copy.deepcopy(base), AdaptionPromptConfig(adapter_len=4, adapter_layers=2, gate=gate)
    )
    assert all(torch.count_nonzero(g) == 0 for g in adaption_gates(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=0, atol=0)
        set_gates(model, 0.5)
        assert not torch.allclose(model(IDS).logits, base(IDS).logits, atol=1e-3)


@MAKERS
def test_gate_gets_the_first_gradient_prompts_get_none_at_init(make):
    model = inject_adaption_prompts(make(), AdaptionPromptConfig.tiny())
    logits = model(IDS).logits
    logits.pow(2).mean().backward()
    attn = next(m for m in model.modules() if isinstance(m, AdaptedAttention))
    assert attn.adaption_gate.grad.abs().max() > 0  # the gate starts learning at once
    assert attn.adaption_prompt.grad.abs().max() == 0  # and the prompts only once the gate opens
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1].startswith("adaption_") for n in trainable)


def test_llmlab_adapted_attention_works_with_cached_decoding():
    model = inject_adaption_prompts(tiny_llmlab(), AdaptionPromptConfig(adapter_len=4, adapter_layers=2))
    set_gates(model, 0.7)
    with torch.no_grad():
        full = model(IDS).logits
        cache = model.new_cache()
        first = model(IDS[:, :5], cache=cache).logits
        rest = model(IDS[:, 5:], cache=cache).logits
        torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-5, atol=1e-5)


def test_only_top_layers_are_adapted():
    model = inject_adaption_prompts(tiny_llama(), AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
    assert not isinstance(model.model.layers[0].self_attn, AdaptedAttention)
    assert isinstance(model.model.layers[1].self_attn, AdaptedAttention)


# --- bottleneck adapters -------------------------------------------------------------------------


@MAKERS
@pytest.mark.parametrize(
    "cfg", [BottleneckConfig.houlsby(8), BottleneckConfig.pfeiffer(8)], ids=["houlsby", "pfeiffer"]
)
def test_bottleneck_adapters_change_nothing_at_init(make, cfg):
    base = make()
    model = inject_adapters(copy.deepcopy(base), cfg)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    assert len(wrapped) == 2 * len(cfg.target_modules)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=0, atol=0)


def test_houlsby_trains_adapters_and_norms_pfeiffer_only_adapters():
    houlsby = inject_adapters(tiny_llama(), BottleneckConfig.houlsby(8))
    trainable = {n for n, p in houlsby.named_parameters() if p.requires_grad}
    assert any("layernorm" in n for n in trainable) and "model.norm.weight" in trainable
    assert not any(n.endswith(("q_proj.weight", "base_layer.weight", "embed_tokens.weight")) for n in trainable)
    pfeiffer = inject_adapters(tiny_llama(), BottleneckConfig.pfeiffer(8))
    trainable = {n for n, p in pfeiffer.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    # (C m + m + m C + C) per adapter, one per block
    assert sum(p.numel() for p in pfeiffer.parameters() if p.requires_grad) == 2 * (32 * 8 + 8 + 8 * 32 + 32)


def test_bottleneck_adapter_is_a_residual_mlp():
    adapter = BottleneckAdapter(6, 3, "gelu")
    nn.init.normal_(adapter.adapter_up.weight)
    h = torch.randn(2, 6)
    expected = h + adapter.adapter_up(nn.functional.gelu(adapter.adapter_down(h)))
    torch.testing.assert_close(adapter(h), expected)


def test_adapter_training_lowers_the_loss():
    model = inject_adapters(tiny_llama(), BottleneckConfig.houlsby(8))
    losses = train_steps(model, [IDS] * 5, lr=1e-2, optimizer=torch.optim.Adam)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: BottleneckConfig(bottleneck_size=0), ValueError, "bottleneck_size must be"),
        (lambda: BottleneckConfig(activation="swish"), ValueError, "activation must be one of"),
        (lambda: inject_adapters(tiny_llama(), BottleneckConfig(target_modules=("ffn",))), ValueError, "matched no"),
        (lambda: inject_adapters(tiny_llama(), AdaptionPromptConfig()), TypeError, "config must be a Bottleneck"),
        (lambda: AdaptionPromptConfig(gate="sigmoid"), ValueError, "gate must be one of"),
        (lambda: inject_adaption_prompts(tiny_llama(), AdaptionPromptConfig.paper()), ValueError, "adapter_layers"),
        (lambda: inject_adaption_prompts(nn.Linear(2, 2), AdaptionPromptConfig.tiny()), TypeError, "'layers'"),
        (
            lambda: inject_adaption_prompts(
                inject_adaption_prompts(tiny_llama(), AdaptionPromptConfig.tiny()), AdaptionPromptConfig.tiny()
            ),
            TypeError,
            "cannot be stacked",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_llmlab_adaption_prompts_equal_peft_on_the_converted_model():
    from llmlab.interop import to_hf

    base = tiny_llmlab()
    peft_cfg = PeftAdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM")
    ours, theirs = peft_pair(
        base,
        lambda m: inject_adaption_prompts(m, AdaptionPromptConfig(adapter_len=4, adapter_layers=2)),
        peft_cfg,
        hf_base=to_hf(base),
        rename=adaption_name,
        scale=1.0,
        seed=2,
    )
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)

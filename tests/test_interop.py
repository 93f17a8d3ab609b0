"""llmlab.interop: LLM <-> transformers Llama / Mixtral / GPT-2 give the same logits in float32."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, MixtralForCausalLM

from llmlab.interop import from_hf, hf_family, to_hf
from llmlab.model import LLM, ModelConfig

V = 53
TOL = {"rtol": 1e-5, "atol": 1e-5}
LLAMA_MHA = replace(ModelConfig.tiny(V), n_kv_head=4, rope_base=500000.0)
CASES = {
    "llama_mha": (LLAMA_MHA, LlamaForCausalLM),
    "llama_gqa": (ModelConfig.tiny(V), LlamaForCausalLM),
    "llama_mqa_bias_tied": (replace(ModelConfig.tiny(V), n_kv_head=1, bias=True, tie_embeddings=True),
                            LlamaForCausalLM),
    "mixtral": (ModelConfig.tiny_moe(V), MixtralForCausalLM),
    "gpt2": (replace(ModelConfig.gpt2_baseline(V), n_layer=2, n_embd=32, ffn_hidden=128, block_size=32),
             GPT2LMHeadModel),
}


def random_model(config, seed=0):
    torch.manual_seed(seed)
    model = LLM(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(t=11):
    return torch.randint(0, V, (2, t), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", list(CASES))
def test_to_hf_gives_the_same_logits(name):
    config, cls = CASES[name]
    model = random_model(config)
    hf = to_hf(model)
    assert isinstance(hf, cls)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, **TOL)


@pytest.mark.parametrize("name", list(CASES))
def test_from_hf_round_trip(name):
    config, _ = CASES[name]
    model = random_model(config, seed=1)
    back = from_hf(to_hf(model))
    assert back.config == config
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, **TOL)


def test_gpt2_table_maps_every_tensor_both_ways_exactly():
    from llmlab.interop import _gpt2_state, hf_config

    config = replace(CASES["gpt2"][0], tie_embeddings=False)
    sd = random_model(config).state_dict()
    theirs = _gpt2_state(sd, config.n_layer, to_hf=True)
    assert set(theirs) == set(GPT2LMHeadModel(hf_config(config)).state_dict())
    assert theirs["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # (C, 3C): q, k, v fused, transposed
    back = _gpt2_state(theirs, config.n_layer, to_hf=False)
    assert back.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.equal(back[key], value), key


def test_from_hf_of_a_fresh_gpt2_and_loss_agrees():
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=4)).eval()
    ours = from_hf(hf)
    x = tokens(t=9)
    with torch.no_grad():
        ref = hf(x, labels=x)
        out = ours(x[:, :-1], targets=x[:, 1:])  # transformers shifts the labels itself
    torch.testing.assert_close(out.logits, ref.logits[:, :-1], **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)


def test_mixtral_aux_loss_and_total_loss_agree():
    model = random_model(ModelConfig.tiny_moe(V))
    hf = to_hf(model)
    x = tokens()
    with torch.no_grad():
        ref = hf(x, labels=x)
        full = model(x)
    torch.testing.assert_close(full.aux_loss, ref.aux_loss, **TOL)
    ce = F.cross_entropy(full.logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    torch.testing.assert_close(ce + model.config.moe_aux_loss_coef * full.aux_loss, ref.loss, **TOL)


def test_configs_without_a_counterpart_are_rejected():
    base = ModelConfig.tiny(V)
    assert hf_family(base) == "llama"
    for bad, field in [(replace(base, position="alibi"), "position"),
                       (replace(base, norm_placement="post"), "norm_placement"),
                       (replace(base, norm="layernorm"), "norm"),
                       (replace(ModelConfig.tiny_moe(V), moe_capacity_factor=1.25), "moe_capacity_factor"),
                       (replace(CASES["gpt2"][0], n_kv_head=2), "n_kv_head")]:
        with pytest.raises(ValueError, match=field):
            to_hf(LLM(bad))
    with pytest.raises(TypeError, match="model must be an llmlab.model.LLM"):
        to_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="hf_model must be a Llama, Mixtral or GPT-2"):
        from_hf(torch.nn.Linear(2, 2))


def test_gpt2_config_of_a_small_vocabulary_has_no_out_of_range_special_ids(caplog):
    import logging

    from llmlab.interop import hf_config

    with caplog.at_level(logging.WARNING):
        cfg = hf_config(CASES["gpt2"][0])  # a 48-character vocabulary
    assert cfg.bos_token_id is None and cfg.eos_token_id is None
    assert not [r for r in caplog.records if "bos_token_id" in r.getMessage()]

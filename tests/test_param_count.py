"""llmlab.param_count: the analytic counts equal transformers models built on the meta device (no
memory, no download) for every published preset, and llmlab's LLM on small configs. The presets are
built from llmlab/reference_configs; tests/test_reference_configs.py compares them with published
totals."""

from dataclasses import replace

import pytest
import torch
import transformers

from llmlab.model import LLM, ModelConfig
from llmlab.param_count import Architecture, ParameterCount, count_active_parameters, count_parameters
from llmlab.reference_configs import load_reference_config

PRESETS = Architecture.presets()

# Exact counts of the released checkpoints as other tools report them (KerasHub preset metadata,
# calflops, the Hugging Face Hub's safetensors totals); GPT-3's is the analytic 174.6B behind "175B".
KNOWN_TOTALS = {
    "gpt2": 124_439_808,
    "gpt3_175b": 174_604_259_328,
    "llama_7b": 6_738_415_616,
    "llama2_7b": 6_738_415_616,
    "llama2_70b": 68_976_648_192,
    "llama3_8b": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "llama3_1_8b": 8_030_261_248,
    "mistral_7b": 7_241_732_096,
    "mistral_7b_v03": 7_248_023_552,
    "mixtral_8x7b": 46_702_792_704,
    "chatglm2_6b": 6_243_584_000,
    "chatglm3_6b": 6_243_584_000,
}


def meta_model(arch: Architecture) -> torch.nn.Module:
    config = arch.to_transformers_config()
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_count_equals_transformers_model_on_meta_device(name):
    arch = PRESETS[name]
    model = meta_model(arch)
    assert numel(model) == count_parameters(arch).total == KNOWN_TOTALS[name]


@pytest.mark.parametrize("name", ["gpt3_175b", "llama2_70b", "chatglm2_6b"])
def test_breakdown_by_component_matches_module_names(name):
    arch, model = PRESETS[name], meta_model(PRESETS[name])
    groups = {"embeddings": ("wte", "wpe", "embed_tokens"), "attention": ("attn.", "self_attn."),
              "ffn": ("mlp.",), "norms": ("ln_", "layernorm", "model.norm"), "lm_head": ("lm_head",)}
    got = dict.fromkeys(groups, 0)
    for pname, p in model.named_parameters():
        part = next(g for g, keys in groups.items() if any(k in pname for k in keys))
        got[part] += p.numel()
    count = count_parameters(arch)
    assert got == {k: v for k, v in count.as_dict().items() if k in groups}
    assert count.non_embedding == count.attention + count.ffn + count.norms


def test_presets_read_the_published_fields():
    """Each preset equals its reference's fields under their published names."""
    pairs = {"llama2_70b": "llama-2-70b", "llama3_8b": "llama-3-8b", "mixtral_8x7b": "mixtral-8x7b",
             "mistral_7b": "mistral-7b-v0.1", "llama_7b": "llama-7b"}
    for preset, ref_name in pairs.items():
        arch, f = PRESETS[preset], load_reference_config(ref_name).fields
        assert (arch.n_layer, arch.n_embd, arch.n_head, arch.ffn_hidden, arch.vocab_size) == (
            f["num_hidden_layers"], f["hidden_size"], f["num_attention_heads"], f["intermediate_size"],
            f["vocab_size"])
        assert arch.n_kv_head == f.get("num_key_value_heads", f["num_attention_heads"])
        assert arch.rope_base == f.get("rope_theta", 10000.0)
    glm, f = PRESETS["chatglm2_6b"], load_reference_config("chatglm2-6b").fields
    assert (glm.n_kv_head, glm.ffn_hidden, glm.vocab_size, glm.head_dim) == (
        f["multi_query_group_num"], f["ffn_hidden_size"], f["padded_vocab_size"], f["kv_channels"])
    assert glm.qkv_bias and not glm.bias
    gpt3 = load_reference_config("gpt3-175b").fields
    assert PRESETS["gpt3_175b"].head_dim == gpt3["d_head"] and PRESETS["gpt3_175b"].ffn_hidden == 4 * gpt3["d_model"]
    for arch in PRESETS.values():
        assert arch.source
    for name in ("gpt3_175b", "llama_7b", "llama2_7b", "llama3_8b"):
        assert PRESETS[name].train_tokens


SMALL = {
    "tiny_gqa": ModelConfig.tiny(61),
    "small": ModelConfig.small(65),
    "gpt2_baseline": ModelConfig.gpt2_baseline(65),
    "gpt2_untied": replace(ModelConfig.gpt2_baseline(65), tie_embeddings=False),
    "llama_bias_tied": replace(ModelConfig.tiny(61), bias=True, tie_embeddings=True),
    "gelu_no_bias": replace(ModelConfig.gpt2_baseline(65), bias=False, n_layer=2),
    "tiny_moe": ModelConfig.tiny_moe(61),
    "moe_bias": replace(ModelConfig.tiny_moe(61), bias=True),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_count_equals_llmlab_model(name):
    config = SMALL[name]
    arch = Architecture.from_model_config(config)
    assert count_parameters(arch).total == LLM(config).num_parameters()
    assert arch.to_model_config() == config


def test_small_preset_round_trips_through_llmlab_and_transformers():
    arch = replace(PRESETS["llama3_8b"], vocab_size=97, n_layer=2, n_embd=64, n_head=8, n_kv_head=2, ffn_hidden=96,
                   context_length=32)
    assert count_parameters(arch).total == LLM(arch.to_model_config()).num_parameters() == numel(meta_model(arch))


def test_active_parameters_of_a_small_moe_equal_the_experts_a_token_uses():
    config = ModelConfig.tiny_moe(61)
    arch = Architecture.from_model_config(config)
    model = LLM(config)
    expert = sum(p.numel() for p in model.model.layers[0].mlp.experts[0].parameters())
    unused = config.n_layer * (config.n_experts - config.experts_per_token) * expert
    assert count_active_parameters(arch) == model.num_parameters() - unused
    assert count_active_parameters(PRESETS["llama2_7b"]) == count_parameters(PRESETS["llama2_7b"]).total


def test_qkv_only_biases_match_transformers_qwen2_layout():
    arch = replace(PRESETS["chatglm2_6b"], vocab_size=97, n_layer=2, n_embd=64, n_head=8, n_kv_head=2,
                   ffn_hidden=96, context_length=32)
    with_bias = count_parameters(arch).attention
    assert with_bias - count_parameters(replace(arch, qkv_bias=False)).attention == 2 * (64 + 2 * 2 * 8)
    assert count_parameters(arch).total == numel(meta_model(arch))


def test_clear_errors():
    with pytest.raises(ValueError, match="experts_per_token must be <= n_experts=8"):
        replace(PRESETS["mixtral_8x7b"], experts_per_token=9)
    with pytest.raises(ValueError, match="n_experts must be 1 and qkv_bias False"):
        replace(PRESETS["gpt3_175b"], n_experts=8, experts_per_token=2)
    with pytest.raises(ValueError, match="no q/k/v-only biases"):
        PRESETS["chatglm2_6b"].to_model_config()
    with pytest.raises(ValueError, match="bias must be False when n_experts > 1"):
        replace(PRESETS["mixtral_8x7b"], bias=True).to_transformers_config()
    with pytest.raises(ValueError, match="name must be one of"):
        Architecture.from_reference("llama-4")
    with pytest.raises(ValueError, match="n_kv_head must equal"):
        replace(PRESETS["gpt3_175b"], n_kv_head=8)
    with pytest.raises(ValueError, match="family must be one of"):
        replace(PRESETS["llama2_7b"], family="t5")
    with pytest.raises(ValueError, match="n_head must be a multiple of n_kv_head"):
        replace(PRESETS["llama2_7b"], n_kv_head=5)
    with pytest.raises(ValueError, match="needs rope_base"):
        replace(PRESETS["llama2_7b"], rope_base=None)
    with pytest.raises(TypeError, match="arch must be an Architecture"):
        count_parameters(ModelConfig.tiny(10))
    with pytest.raises(ValueError, match="norm_placement"):
        Architecture.from_model_config(replace(ModelConfig.tiny(10), norm_placement="post"))
    with pytest.raises(ValueError, match=r"\(position, norm, ffn\)"):
        Architecture.from_model_config(replace(ModelConfig.tiny(10), position="alibi"))
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 1"):
        replace(PRESETS["llama2_7b"], vocab_size=0)


def test_parameter_count_total():
    count = ParameterCount(embeddings=1, attention=2, ffn=3, norms=4, lm_head=5)
    assert count.total == 15 and count.as_dict()["total"] == 15 and count.non_embedding == 9

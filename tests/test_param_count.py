"""llmlab.param_count: the analytic counts equal transformers models built on the meta device (no
memory, no download) for every published preset, and llmlab's LLM on small configs."""

from dataclasses import replace

import pytest
import torch
import transformers

from llmlab.model import LLM, ModelConfig
from llmlab.param_count import Architecture, ParameterCount, count_parameters

PRESETS = Architecture.presets()

# Totals as reported for the released checkpoints (e.g. the safetensors index metadata of the
# Hugging Face repositories); GPT-3's is the analytic 174.6B behind the "175B" name.
KNOWN_TOTALS = {
    "gpt3_175b": 174_604_259_328,
    "llama_7b": 6_738_415_616,
    "llama2_7b": 6_738_415_616,
    "llama2_70b": 68_976_648_192,
    "llama3_8b": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
}


def meta_model(arch: Architecture) -> torch.nn.Module:
    config = arch.to_transformers_config()
    model_cls = transformers.GPT2LMHeadModel if arch.family == "gpt2" else transformers.LlamaForCausalLM
    with torch.device("meta"):
        return model_cls(config)


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_count_equals_transformers_model_on_meta_device(name):
    arch = PRESETS[name]
    model = meta_model(arch)
    assert numel(model) == count_parameters(arch).total == KNOWN_TOTALS[name]


@pytest.mark.parametrize("name", ["gpt3_175b", "llama2_70b"])
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


def test_presets_carry_the_published_numbers():
    assert PRESETS["llama2_70b"].n_kv_head == 8 and PRESETS["llama2_70b"].ffn_hidden == 28672
    assert PRESETS["llama3_8b"].vocab_size == 128256 and PRESETS["llama3_8b"].rope_base == 500000.0
    assert PRESETS["gpt3_175b"].head_dim == 128
    for arch in PRESETS.values():
        assert arch.source and arch.train_tokens


SMALL = {
    "tiny_gqa": ModelConfig.tiny(61),
    "small": ModelConfig.small(65),
    "gpt2_baseline": ModelConfig.gpt2_baseline(65),
    "gpt2_untied": replace(ModelConfig.gpt2_baseline(65), tie_embeddings=False),
    "llama_bias_tied": replace(ModelConfig.tiny(61), bias=True, tie_embeddings=True),
    "gelu_no_bias": replace(ModelConfig.gpt2_baseline(65), bias=False, n_layer=2),
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


def test_clear_errors():
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

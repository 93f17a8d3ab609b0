"""llmlab.reference_configs: the committed published configurations load, are well formed, and the
totals derived from them agree with totals published independently (model cards, papers, other
implementations), within the rounding of the published figure; transformers models built from the
published fields on the meta device have exactly the derived parameter counts."""

import pytest
import torch
import transformers

from llmlab.param_count import Architecture, count_active_parameters, count_parameters
from llmlab.reference_configs import (
    ReferenceConfig,
    load_reference_config,
    parse_reference_config,
    reference_config_names,
)

NAMES = ("chatglm-6b", "chatglm2-6b", "chatglm3-6b", "deepseek-v2", "deepseek-v2-lite", "deepseek-v3", "gpt2",
         "gpt3-175b", "llama-2-13b", "llama-2-70b", "llama-2-7b", "llama-3-70b", "llama-3-8b", "llama-3.1-8b",
         "llama-7b", "mistral-7b-v0.1", "mistral-7b-v0.3", "mixtral-8x7b")
NOT_DESCRIBED = ("chatglm-6b", "deepseek-v2", "deepseek-v2-lite", "deepseek-v3")
DESCRIBED = [n for n in NAMES if n not in NOT_DESCRIBED]  # Architecture presets
IN_TRANSFORMERS = ["deepseek-v2", "deepseek-v2-lite", "deepseek-v3", "gpt2", "llama-2-13b", "llama-2-70b",
                   "llama-2-7b", "llama-3-70b", "llama-3-8b", "llama-3.1-8b", "llama-7b", "mistral-7b-v0.1",
                   "mistral-7b-v0.3", "mixtral-8x7b"]

# GPT-3: Table 2.1 says 175.0B; the architecture it describes (GPT-2 layout, d_ff = 4 d_model, vocab
# 50257, 2048 learned positions) has 174.6B. The paper gives no more digits and no config, so the
# check is looser than the published rounding: within 0.5%.
RELATIVE_TOLERANCE = {"gpt3-175b": 5e-3}


def within_published(derived: int, entry: dict, name: str) -> bool:
    """|derived - value| <= half the unit the figure is rounded to (0 for exact counts), or the
    stated relative tolerance."""
    allowed = entry.get("rounded_to", 0) / 2
    allowed = max(allowed, RELATIVE_TOLERANCE.get(name, 0) * entry["value"])
    return abs(derived - entry["value"]) <= allowed


def meta_count(config) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_names_and_loading():
    assert reference_config_names() == NAMES
    for name in NAMES:
        ref = load_reference_config(name)
        assert isinstance(ref, ReferenceConfig) and ref.name == name
        assert all(ref.source[k] for k in ("repository", "path", "revision"))
        assert "parameters" in ref.published


def test_loaded_dicts_are_private_copies():
    ref = load_reference_config("llama-2-7b")
    ref.fields["hidden_size"] = 1
    assert load_reference_config("llama-2-7b").fields["hidden_size"] == 4096


def test_fields_keep_their_published_names():
    assert load_reference_config("chatglm2-6b").fields["multi_query_group_num"] == 2
    assert load_reference_config("chatglm3-6b").fields["padded_vocab_size"] == 65024
    assert load_reference_config("mistral-7b-v0.1").fields["sliding_window"] == 4096
    assert load_reference_config("mistral-7b-v0.3").fields["sliding_window"] is None
    scaling = load_reference_config("llama-3.1-8b").fields["rope_scaling"]
    assert (scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"],
            scaling["original_max_position_embeddings"]) == (8.0, 1.0, 4.0, 8192)
    mla = load_reference_config("deepseek-v2-lite").fields
    assert (mla["kv_lora_rank"], mla["qk_rope_head_dim"], mla["qk_nope_head_dim"], mla["v_head_dim"]) == (
        512, 64, 128, 128)


@pytest.mark.parametrize("name", DESCRIBED)
def test_derived_total_matches_independently_published_total(name):
    ref = load_reference_config(name)
    total = count_parameters(Architecture.from_reference(name)).total
    for key, entry in ref.published.items():
        if key.startswith("parameters"):
            assert within_published(total, entry, name), (key, total, entry)


def test_exact_published_counts():
    """Counts published to the parameter (KerasHub preset metadata, calflops) equal the derivation."""
    exact = {"gpt2": 124_439_808, "llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248,
             "llama-3.1-8b": 8_030_261_248, "mistral-7b-v0.1": 7_241_732_096,
             "mistral-7b-v0.3": 7_248_023_552, "mixtral-8x7b": 46_702_792_704, "chatglm2-6b": 6_243_584_000}
    for name, count in exact.items():
        assert load_reference_config(name).published_value("parameters") == count
        assert count_parameters(Architecture.from_reference(name)).total == count


def test_mixtral_active_parameters_match_the_announcement():
    ref, arch = load_reference_config("mixtral-8x7b"), Architecture.mixtral_8x7b()
    assert within_published(count_parameters(arch).total, ref.published["parameters_announced"], "mixtral")
    assert within_published(count_active_parameters(arch), ref.published["active_parameters"], "mixtral")
    assert count_active_parameters(Architecture.mistral_7b()) == count_parameters(Architecture.mistral_7b()).total


def test_published_interval():
    low, high = load_reference_config("mixtral-8x7b").published_interval("active_parameters")
    assert low < count_active_parameters(Architecture.mixtral_8x7b()) < high
    assert load_reference_config("llama-2-7b").published_interval("parameters") == (6_738_415_616,) * 2
    with pytest.raises(ValueError, match="key must be one of"):
        load_reference_config("gpt2").published_interval("active_parameters")


def test_gpt3_is_within_half_a_percent_but_not_the_rounding():
    """The 0.5% allowance is needed (174.6B is not 175.0B to 0.1B) and sufficient."""
    entry = load_reference_config("gpt3-175b").published["parameters"]
    total = count_parameters(Architecture.gpt3_175b()).total
    assert abs(total - entry["value"]) > entry["rounded_to"] / 2
    assert within_published(total, entry, "gpt3-175b")


@pytest.mark.parametrize("name", IN_TRANSFORMERS)
def test_transformers_model_from_published_fields_on_meta_device(name):
    ref = load_reference_config(name)
    config = ref.to_transformers_config()
    assert type(config).__name__ == ref.fields["architectures"][0].replace("ForCausalLM", "Config").replace(
        "LMHeadModel", "Config")
    count = meta_count(config)
    if name in DESCRIBED:
        assert count == count_parameters(Architecture.from_reference(name)).total
    assert within_published(count, ref.published["parameters"], name)


def test_deepseek_v2_lite_active_parameters():
    """DeepSeek-V2-Lite: 15.7B total, 2.4B activated per token (DeepSeek-V2 paper, Appendix B). From the
    meta model: the 6 of 64 routed experts a token uses, the 2 shared experts, MLA and the dense first
    layer come to 2.45B without the input embedding table (a lookup) and 2.66B with it. The paper's
    2.4B is within one unit of its rounding (0.1B) of the first only: its convention leaves the input
    embedding out (Mixtral's 12.9B counts both tables). The exact convention is not stated."""
    ref = load_reference_config("deepseek-v2-lite")
    f = ref.fields
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(ref.to_transformers_config())
    total = sum(p.numel() for p in model.parameters())
    per_expert = 3 * f["hidden_size"] * f["moe_intermediate_size"]
    moe_layers = f["num_hidden_layers"] - f["first_k_dense_replace"]
    unused = moe_layers * (f["n_routed_experts"] - f["num_experts_per_tok"]) * per_expert
    embedding = model.get_input_embeddings().weight.numel()
    assert within_published(total, ref.published["parameters"], "deepseek-v2-lite")
    published = ref.published_value("active_parameters")
    assert abs(total - unused - embedding - published) < 0.1e9
    assert abs(total - unused - published) > 0.2e9


def test_rope_scaling_reaches_transformers():
    config = load_reference_config("llama-3.1-8b").to_transformers_config()
    rope = getattr(config, "rope_parameters", None) or config.rope_scaling  # transformers 5 / 4
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0


def test_clear_errors():
    with pytest.raises(ValueError, match=r"name must be one of \[.*'llama-2-7b'.*\], got 'llama-2'"):
        load_reference_config("llama-2")
    with pytest.raises(TypeError, match="name must be a str, got int"):
        load_reference_config(7)
    with pytest.raises(ValueError, match="no transformers config: GPT-3 released no configuration"):
        load_reference_config("gpt3-175b").to_transformers_config()
    with pytest.raises(ValueError, match="remote code"):
        load_reference_config("chatglm2-6b").to_transformers_config()
    with pytest.raises(ValueError, match=r"key must be one of \['parameters'"):
        load_reference_config("chatglm2-6b").published_value("active_parameters")
    with pytest.raises(ValueError, match="model_type 'deepseek_v2'"):
        Architecture.from_reference("deepseek-v2-lite")
    with pytest.raises(ValueError, match="only ChatGLM2/3"):
        Architecture.from_reference("chatglm-6b")


def good_entry() -> dict:
    return {"name": "x", "display_name": "X", "fields": {}, "published": {},
            "source": {"repository": "r", "path": "p", "revision": "v"}}


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("fields"), "x.json: fields must be a dict"),
    (lambda d: d["source"].pop("revision"), r"source must name .*missing or empty: \['revision'\]"),
    (lambda d: d["source"].update(path=""), r"missing or empty: \['path'\]"),
    (lambda d: d["published"].update(parameters={"value": 7e9}), r"published\['parameters'\] must be a dict"),
    (lambda d: d["published"].update(parameters={"value": -1, "source": "s"}), "must be a positive number"),
    (lambda d: d["published"].update(parameters={"value": 7e9, "rounded_to": "1B", "source": "s"}),
     r"\['rounded_to'\] must be a positive number or absent, got '1B'"),
])
def test_malformed_entries_are_named(edit, message):
    data = good_entry()
    assert parse_reference_config(good_entry(), origin="x.json").name == "x"
    edit(data)
    with pytest.raises(ValueError, match=message):
        parse_reference_config(data, origin="x.json")

"""llmlab.model, llmlab.norms and llmlab.ffn: norms against torch/transformers, and the model's
invariants (cached == uncached, sdpa == manual, causality, padding, the loss, the configs)."""

import dataclasses
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from llmlab.attention import prefix_lm_mask
from llmlab.ffn import SwiGLUMLP, swiglu_hidden
from llmlab.model import LLM, ModelConfig, deepnorm_constants
from llmlab.norms import RMSNorm, make_norm

V = 61
TINY = ModelConfig.tiny(V)
VARIANTS = {
    "llama_gqa": TINY,
    "mqa": replace(TINY, n_kv_head=1),
    "alibi": replace(TINY, position="alibi"),
    "learned_gpt2": replace(ModelConfig.gpt2_baseline(V), n_layer=2, n_embd=32, ffn_hidden=128, block_size=32),
    "sinusoidal_post_ln": replace(TINY, position="sinusoidal", norm="layernorm", norm_placement="post", bias=True),
    "nope_deepnorm": replace(TINY, position="none", norm_placement="deepnorm"),
    "moe": ModelConfig.tiny_moe(V),
    "manual": replace(TINY, attn_impl="manual"),
}


def make(config, seed=0):
    torch.manual_seed(seed)
    return LLM(config).eval()


def ids(b=2, t=12, seed=1):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


# --- norms and FFN against the references --------------------------------------------------------


def test_rmsnorm_equals_torch_and_llama():
    x = torch.randn(2, 5, 16) * 3
    ours = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(16))
    ref_torch = torch.nn.RMSNorm(16, eps=1e-6)
    ref_llama = LlamaRMSNorm(16, eps=1e-6)
    ref_torch.load_state_dict(ours.state_dict())
    ref_llama.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref_torch(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours(x), ref_llama(x), rtol=1e-6, atol=1e-6)
    half = x.to(torch.bfloat16)
    torch.testing.assert_close(ours.to(torch.bfloat16)(half), ref_llama.to(torch.bfloat16)(half))
    assert isinstance(make_norm("layernorm", 8, bias=False), torch.nn.LayerNorm)


def test_swiglu_equals_llama_mlp():
    cfg = LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, num_key_value_heads=2)
    ref = LlamaMLP(cfg)
    ours = SwiGLUMLP(16, 40)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)
    assert swiglu_hidden(4096, 256) == 11008  # LLaMA-7B


# --- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "small", "tiny_moe", "gpt2_baseline"])
def test_config_presets_round_trip_through_json(name):
    config = getattr(ModelConfig, name)(V)
    restored = ModelConfig(**json.loads(json.dumps(dataclasses.asdict(config))))
    assert restored == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_layer = 3


def test_config_validation_errors():
    with pytest.raises(ValueError, match="n_head must be a multiple of n_kv_head"):
        replace(TINY, n_kv_head=3)
    with pytest.raises(ValueError, match="n_embd must be divisible by n_head"):
        replace(TINY, n_embd=30)
    with pytest.raises(ValueError, match="position must be one of"):
        replace(TINY, position="xpos")
    with pytest.raises(ValueError, match="experts_per_token"):
        replace(TINY, ffn="moe", n_experts=2, experts_per_token=3)
    with pytest.raises(TypeError, match="vocab_size must be an integer"):
        ModelConfig(vocab_size=10.0)
    with pytest.raises(TypeError, match="bias must be a bool"):
        replace(TINY, bias=1)


def test_gpt2_baseline_matches_nanogpt_baby_gpt_size():
    model = LLM(ModelConfig.gpt2_baseline(65))
    # Blocks (12C^2 + 13C each: attention 4C^2 + 4C, MLP 8C^2 + 5C, two LayerNorms 4C) and ln_f (2C);
    # with the tied wte nanoGPT reports 0.80M parameters for this config.
    assert model.num_parameters(exclude_embeddings=True) == 4 * (12 * 128 * 128 + 13 * 128) + 2 * 128
    tied = model.num_parameters()
    assert tied == model.num_parameters(exclude_embeddings=True) + 65 * 128 + 64 * 128


# --- invariants ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decoding_equals_uncached_forward(name):
    model = make(VARIANTS[name])
    x = ids()
    with torch.no_grad():
        full = model(x).logits
        for max_len in (None, 16):
            cache = model.new_cache(max_len=max_len)
            steps = [model(x[:, :5], cache=cache).logits]
            steps += [model(x[:, i : i + 1], cache=cache).logits for i in range(5, 12)]
            torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
            assert cache.seq_len == 12


@pytest.mark.parametrize("name", ["llama_gqa", "alibi", "learned_gpt2", "moe"])
def test_sdpa_equals_manual_attention(name):
    fast = make(VARIANTS[name])
    slow = make(replace(VARIANTS[name], attn_impl="manual"))
    slow.load_state_dict(fast.state_dict())
    x = ids()
    torch.testing.assert_close(fast(x).logits, slow(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama_gqa", "alibi", "learned_gpt2", "sinusoidal_post_ln"])
def test_changing_a_future_token_leaves_earlier_logits_alone(name):
    model = make(VARIANTS[name])
    x = ids(b=1, t=10)
    y = x.clone()
    y[0, 6] = (y[0, 6] + 1) % V
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_prefix_lm_mask_lets_the_prefix_see_itself():
    model = make(TINY)
    x = ids(b=1, t=8)
    y = x.clone()
    y[0, 3] = (y[0, 3] + 1) % V
    mask = prefix_lm_mask(8, prefix_len=4)[None, None]  # (1, 1, T, T)
    a, b = model(x, attention_mask=mask).logits, model(y, attention_mask=mask).logits
    assert not torch.allclose(a[:, 0], b[:, 0])  # position 0 sees position 3 inside the prefix
    torch.testing.assert_close(model(x, attention_mask=prefix_lm_mask(8, 0)[None, None]).logits, model(x).logits)


@pytest.mark.parametrize("name", ["llama_gqa", "learned_gpt2", "alibi"])
def test_left_padding_does_not_change_real_tokens(name):
    model = make(VARIANTS[name])
    x = ids(b=1, t=6)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    out = model(padded, attention_mask=mask).logits
    assert not out.isnan().any()
    torch.testing.assert_close(out[:, 3:], model(x).logits, rtol=1e-5, atol=1e-5)
    # and decoding one more token with the cache and a growing mask
    cache = model.new_cache()
    model(padded, attention_mask=mask, cache=cache)
    nxt = torch.tensor([[5]])
    step = model(nxt, cache=cache, attention_mask=torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)).logits
    torch.testing.assert_close(step[:, -1], model(torch.cat([x, nxt], 1)).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_loss_is_next_token_cross_entropy_with_ignore_index():
    model = make(TINY)
    x = ids()
    targets = ids(seed=2)
    targets[0, :4] = -100
    out = model(x, targets=targets)
    expected = F.cross_entropy(out.logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    assert out.aux_loss is None and model(x).loss is None


def test_moe_loss_adds_weighted_aux_loss_and_stats():
    model = make(VARIANTS["moe"])
    x, targets = ids(), ids(seed=2)
    out = model(x, targets=targets)
    ce = F.cross_entropy(out.logits.reshape(-1, V), targets.reshape(-1))
    torch.testing.assert_close(out.loss, ce + model.config.moe_aux_loss_coef * out.aux_loss)
    assert len(out.moe_stats) == TINY.n_layer
    assert int(out.moe_stats[0].tokens_per_expert.sum()) == x.numel() * 2


def test_output_attentions_are_probabilities():
    model = make(TINY)
    out = model(ids(t=7), output_attentions=True)
    assert len(out.attentions) == TINY.n_layer and out.attentions[0].shape == (2, 4, 7, 7)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 7))


def test_tied_embeddings_and_parameter_names():
    model = make(VARIANTS["learned_gpt2"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = set(dict(make(TINY).named_parameters()))
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
                 "model.layers.1.mlp.gate_proj.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.post_attention_layernorm.weight", "lm_head.weight"):
        assert name in names


def test_deepnorm_constants_and_init():
    alpha, beta = deepnorm_constants(6)
    assert math.isclose(alpha, 12**0.25) and math.isclose(beta, 48**-0.25)
    model = make(replace(TINY, norm_placement="deepnorm", n_layer=6))
    assert math.isclose(model.model.layers[0].alpha, alpha)
    w = model.model.layers[0].mlp.down_proj.weight
    xavier_std = beta * math.sqrt(2.0 / sum(w.shape))
    assert abs(w.std().item() - xavier_std) < 0.2 * xavier_std


def test_tiny_model_learns_a_batch():
    model = LLM(TINY)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = ids(b=4, t=16)
    first = None
    for _ in range(30):
        loss = model(x[:, :-1], targets=x[:, 1:]).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_bad_inputs_raise_clear_errors():
    model = make(TINY)
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 61\)"):
        model(torch.tensor([[1, 61]]))
    with pytest.raises(ValueError, match="input_ids must have 2 dimensions"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="targets must have the shape"):
        model(ids(), targets=ids()[:, :3])
    with pytest.raises(ValueError, match="exceeds block_size"):
        make(VARIANTS["learned_gpt2"])(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(TypeError, match="config must be a ModelConfig"):
        LLM({"vocab_size": 3})
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids(), attention_mask=torch.ones(2, 5))


def test_rope_linear_scaling_equals_transformers_llama_linear_rope():
    import copy

    from transformers import LlamaForCausalLM

    from llmlab.interop import to_hf

    torch.manual_seed(0)
    plain = LLM(ModelConfig.tiny(vocab_size=40))
    hf_config = copy.deepcopy(to_hf(plain).config)
    hf_config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": plain.config.rope_base}
    hf = LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(to_hf(plain).state_dict())
    scaled = LLM(dataclasses.replace(plain.config, rope_scaling="linear", rope_factor=4.0))
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 40, (2, 20))
    torch.testing.assert_close(scaled(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_rope_ntk_scaling_is_a_base_change():
    from llmlab.positional import ntk_scaled_base

    torch.manual_seed(0)
    ntk = LLM(dataclasses.replace(ModelConfig.tiny(vocab_size=40), rope_scaling="ntk", rope_factor=4.0))
    based = LLM(dataclasses.replace(ModelConfig.tiny(vocab_size=40), rope_base=ntk_scaled_base(1e4, 4.0, 8)))
    based.load_state_dict(ntk.state_dict())
    ids = torch.randint(0, 40, (1, 30))
    torch.testing.assert_close(ntk(ids).logits, based(ids).logits)


def test_rope_scaling_config_errors():
    with pytest.raises(ValueError, match="rope_scaling must be one of"):
        ModelConfig(vocab_size=40, rope_scaling="yarn")
    with pytest.raises(ValueError, match="rope_factor"):
        ModelConfig(vocab_size=40, rope_scaling="linear", rope_factor=0.5)


def test_rope_dynamic_scaling_equals_transformers_past_the_context():
    import copy

    from transformers import LlamaForCausalLM

    from llmlab.interop import to_hf

    torch.manual_seed(0)
    plain = LLM(ModelConfig.tiny(vocab_size=40))  # block_size 32
    hf_config = copy.deepcopy(to_hf(plain).config)
    hf_config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": plain.config.rope_base}
    hf = LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(to_hf(plain).state_dict())
    dynamic = LLM(dataclasses.replace(plain.config, rope_scaling="dynamic", rope_factor=2.0)).eval()
    dynamic.load_state_dict(plain.state_dict())
    long_ids = torch.randint(0, 40, (2, 45))
    with torch.no_grad():
        torch.testing.assert_close(dynamic(long_ids).logits, hf(long_ids).logits, rtol=1e-5, atol=1e-5)
        # within the trained context nothing is scaled; past it the model is no longer plain RoPE
        assert torch.equal(dynamic(long_ids[:, :32]).logits, plain.eval()(long_ids[:, :32]).logits)
        assert (dynamic(long_ids).logits - plain(long_ids).logits).abs().max() > 1e-4


def test_rope_tables_follow_device_dtype_and_survive_inference_mode():
    model = make(TINY)
    x = ids(t=10)
    with torch.inference_mode():  # tables built here must still be usable for training
        model(x)
    model.train()
    model(x, targets=x).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert "model.rotary_emb.inv_freq" not in model.state_dict()  # a non-persistent buffer
    double = make(TINY).double()
    with torch.no_grad():
        torch.testing.assert_close(double(x).logits.float(), make(TINY)(x).logits, rtol=1e-4, atol=1e-5)
        cos = double.model.rotary_emb(12, torch.float64, torch.device("cpu"))[0]
    assert cos.dtype == torch.float64 and cos.shape[0] >= 12


def test_token_id_range_checked_on_cpu():
    model = make(TINY)
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 61\), got values in \[0, 61\]"):
        model(torch.tensor([[0, V]]))


@pytest.mark.parametrize("name", ["llama_gqa", "mqa", "learned_gpt2", "moe"])
def test_flash_equals_sdpa_and_manual_forward_and_backward(name):
    models = {impl: make(replace(VARIANTS[name], attn_impl=impl, block_size=80)).double().train() for impl in
              ("sdpa", "manual", "flash")}
    for m in models.values():
        m.load_state_dict(models["sdpa"].state_dict())
    x = ids(t=70)  # two query and two key tiles of the default 64 (one skipped: causal)
    grads = {}
    for impl, m in models.items():
        out = m(x, targets=x)
        out.loss.backward()
        grads[impl] = (out.logits.detach(), {n: p.grad for n, p in m.named_parameters()})
    for impl in ("sdpa", "manual"):
        torch.testing.assert_close(grads["flash"][0], grads[impl][0], rtol=1e-10, atol=1e-10)
        for n, g in grads[impl][1].items():
            torch.testing.assert_close(grads["flash"][1][n], g, rtol=1e-9, atol=1e-10, msg=n)
    wq = "model.layers.0.self_attn.q_proj.weight"
    assert grads["flash"][1][wq].abs().max() > 1e-6  # attention's gradient reached q_proj


def test_flash_runs_cached_decoding_and_names_what_it_cannot_do():
    from llmlab.attention import Attention

    sdpa = make(TINY)
    flash = make(replace(TINY, attn_impl="flash"))
    flash.load_state_dict(sdpa.state_dict())
    x = ids(b=2, t=12)
    with torch.no_grad():
        cache = flash.new_cache()
        steps = [flash(x[:, :5], cache=cache).logits, flash(x[:, 5:9], cache=cache).logits]  # T < S
        steps += [flash(x[:, i : i + 1], cache=cache).logits for i in range(9, 12)]
        torch.testing.assert_close(torch.cat(steps, dim=1), sdpa(x).logits, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="impl='flash' supports the causal mask only"):
            flash(x, attention_mask=torch.ones(2, 12))
    with pytest.raises(ValueError, match="attn_impl='flash' takes no attention bias"):
        replace(TINY, attn_impl="flash", position="alibi")
    with pytest.raises(ValueError, match="impl='flash' takes no attention bias"):
        Attention(32, 4, impl="flash", position="alibi")
    dropping = make(replace(TINY, attn_impl="flash", dropout=0.1)).train()
    with pytest.raises(ValueError, match="impl='flash' has no attention dropout, got dropout=0.1"):
        dropping(x)

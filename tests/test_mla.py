"""llmlab.mla: multi-head latent attention equals transformers' DeepseekV3Attention on tiny random
configs (with and without the query bottleneck), the absorbed inference form equals the naive form,
only the latent and the RoPE key depend on the keys' tokens, and the cache accounting matches
DeepSeek-V2's Table 1."""

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

from llmlab.mla import (
    MLAConfig,
    MultiHeadLatentAttention,
    kv_cache_elements_per_token,
    mla_cache_elements_per_token,
)


def hf_attention(cfg: MLAConfig):
    config = DeepseekV3Config(
        vocab_size=32, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        rope_interleave=False, max_position_embeddings=64, num_hidden_layers=1,
    )
    config._attn_implementation = "eager"
    return DeepseekV3Attention(config, layer_idx=0).eval(), DeepseekV3RotaryEmbedding(config)


@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_equals_transformers_deepseek_v3_attention(q_lora_rank):
    cfg = MLAConfig.tiny(q_lora_rank=q_lora_rank)
    torch.manual_seed(0)
    ref, rotary = hf_attention(cfg)
    for p in ref.parameters():  # random norms too, so a swapped or missing norm shows
        torch.nn.init.normal_(p, std=0.3)
    ours = MultiHeadLatentAttention(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    b, t = 2, 7
    x = torch.randn(b, t, cfg.hidden_size)
    cos, sin = rotary(x, torch.arange(t)[None].expand(b, t))
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None]  # (1, 1, T, S) additive causal mask
    with torch.no_grad():
        expected, _ = ref(x, position_embeddings=(cos, sin), attention_mask=mask)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x, absorbed=True), expected, rtol=1e-5, atol=1e-5)


def test_absorbed_equals_naive_in_float64_and_is_causal():
    torch.manual_seed(1)
    attn = MultiHeadLatentAttention(MLAConfig.tiny()).double()
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        naive, absorbed = attn(x), attn(x, absorbed=True)
        torch.testing.assert_close(absorbed, naive, rtol=0, atol=1e-12)
        changed = x.clone()
        changed[:, 5:] += 1.0
        torch.testing.assert_close(attn(changed)[:, :5], naive[:, :5], rtol=0, atol=1e-12)
        assert (attn(changed)[:, 5:] - naive[:, 5:]).abs().max() > 1e-3


def test_latent_cache_shapes():
    """Per token MLA caches r + d_r numbers: the latent (r = 8) and one shared RoPE key (d_r = 4)."""
    torch.manual_seed(2)
    attn = MultiHeadLatentAttention(MLAConfig.tiny())
    x = torch.randn(1, 4, 32)
    c_kv, k_rope = attn.latent_cache(x)
    assert c_kv.shape == (1, 4, 8) and k_rope.shape == (1, 4, 4)


def test_cache_accounting_matches_the_paper():
    """DeepSeek-V2 Table 1: MLA caches (d_c + d_h^R) l = 9/2 d_h l per token with d_c = 4 d_h,
    d_h^R = d_h / 2, as much as GQA with 2.25 groups; MHA caches 2 n_h d_h l."""
    d_h, n_h, layers = 128, 128, 60
    mla = mla_cache_elements_per_token(layers, 4 * d_h, d_h // 2)
    assert mla * 2 == 9 * d_h * layers
    assert mla / kv_cache_elements_per_token(layers, 1, d_h) == 2.25
    assert kv_cache_elements_per_token(layers, n_h, d_h) == 2 * n_h * d_h * layers


def test_from_reference_and_errors():
    cfg = MLAConfig.from_reference("deepseek-v2-lite")
    assert (cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.q_lora_rank) == (512, 64, None)
    with pytest.raises(ValueError, match="MLA"):
        MLAConfig.from_reference("llama-2-7b")
    with pytest.raises(ValueError, match="qk_rope_head_dim must be even"):
        MLAConfig(32, 4, 8, 8, 3, 6)
    with pytest.raises(ValueError, match="x must have C=32"):
        MultiHeadLatentAttention(MLAConfig.tiny())(torch.randn(1, 2, 16))
    with pytest.raises(ValueError, match="n_layers"):
        kv_cache_elements_per_token(0, 1, 1)

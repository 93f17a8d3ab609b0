"""llmlab.positional against transformers (Llama RoPE, BLOOM ALiBi), the sinusoidal formula of
"Attention Is All You Need", and the invariants each encoding is chosen for."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from llmlab.positional import (
    LearnedPositionalEmbedding,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    ntk_scaled_base,
    rope_cos_sin,
    sinusoidal_encoding,
    sinusoidal_shift_matrix,
)


def hf_rope(head_dim, base, positions, rope_type="default", factor=None, max_pos=64):
    params = {"rope_type": rope_type, "rope_theta": base}
    if factor is not None:
        params["factor"] = factor
    heads = 2
    config = LlamaConfig(
        hidden_size=head_dim * heads,
        num_attention_heads=heads,
        max_position_embeddings=max_pos,
        rope_parameters=params,
    )
    rotary = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, 1, head_dim)
    return rotary(x, positions)  # each (B, T, D)


# --- RoPE vs transformers ------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim,base", [(8, 10000.0), (64, 10000.0), (128, 500000.0)])
def test_rope_cos_sin_equals_llama_default(head_dim, base):
    positions = torch.arange(37)[None]  # (1, T)
    cos_ref, sin_ref = hf_rope(head_dim, base, positions)
    cos, sin = rope_cos_sin(positions, head_dim, base)
    torch.testing.assert_close(cos, cos_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_ref, rtol=0, atol=1e-6)


def test_rope_linear_scaling_equals_llama_linear():
    positions = torch.arange(100)[None]
    cos_ref, sin_ref = hf_rope(16, 10000.0, positions, "linear", factor=4.0)
    cos, sin = rope_cos_sin(positions, 16, 10000.0, scaling="linear", factor=4.0)
    torch.testing.assert_close(cos, cos_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("length", [40, 64, 200])
def test_rope_dynamic_scaling_equals_llama_dynamic(length):
    positions = torch.arange(length)[None]
    cos_ref, sin_ref = hf_rope(32, 10000.0, positions, "dynamic", factor=2.0, max_pos=64)
    cos, sin = rope_cos_sin(positions, 32, 10000.0, scaling="dynamic", factor=2.0, max_position=64)
    torch.testing.assert_close(cos, cos_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(sin, sin_ref, rtol=0, atol=1e-5)


def test_apply_rope_equals_llama_apply_rotary_pos_emb():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 11, 16, generator=g)
    k = torch.randn(2, 4, 11, 16, generator=g)
    positions = torch.stack([torch.arange(11), torch.arange(5, 16)])  # (B, T): different offsets per row
    cos, sin = hf_rope(16, 10000.0, positions)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    ours_cos, ours_sin = rope_cos_sin(positions, 16)
    torch.testing.assert_close(apply_rope(q, ours_cos, ours_sin), q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, ours_cos, ours_sin), k_ref, rtol=1e-6, atol=1e-6)


def test_ntk_scaling_is_the_base_change():
    cos_a, sin_a = rope_cos_sin(50, 16, scaling="ntk", factor=4.0)
    cos_b, sin_b = rope_cos_sin(50, 16, base=ntk_scaled_base(10000.0, 4.0, 16))
    torch.testing.assert_close(cos_a, cos_b)
    torch.testing.assert_close(sin_a, sin_b)
    assert ntk_scaled_base(10000.0, 4.0, 16) == pytest.approx(10000.0 * 4.0 ** (16 / 14))


# --- RoPE invariants -----------------------------------------------------------------------------


def test_rope_preserves_norms():
    x = torch.randn(3, 2, 50, 32, dtype=torch.float64)
    cos, sin = rope_cos_sin(50, 32, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_rope_score_depends_only_on_relative_position():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 1, 64, generator=g, dtype=torch.float64).expand(1, 1, 200, 64)
    k = torch.randn(1, 1, 1, 64, generator=g, dtype=torch.float64).expand(1, 1, 200, 64)
    cos, sin = rope_cos_sin(200, 64, dtype=torch.float64)
    scores = apply_rope(q, cos, sin)[0, 0] @ apply_rope(k, cos, sin)[0, 0].T  # (T, T): q at m, k at n
    for delta in (0, 1, 7, 50):
        diagonal = torch.diagonal(scores, offset=-delta)  # all pairs with m - n = delta
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), rtol=0, atol=1e-9)


def test_rope_position_zero_is_identity():
    x = torch.randn(1, 1, 1, 8)
    cos, sin = rope_cos_sin(1, 8)
    torch.testing.assert_close(apply_rope(x, cos, sin), x)


# --- sinusoidal ----------------------------------------------------------------------------------


def test_sinusoidal_matches_the_paper_formula():
    pe = sinusoidal_encoding(20, 10)
    for pos in range(20):
        for i in range(5):
            angle = pos / 10000 ** (2 * i / 10)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


@pytest.mark.parametrize("offset", [1, 5, 123])
def test_sinusoidal_shift_is_one_linear_map_for_every_position(offset):
    pe = sinusoidal_encoding(400, 32).double()
    m = sinusoidal_shift_matrix(offset, 32).double()
    shifted = pe[:-offset] @ m.T  # M applied to every PE[k] at once
    torch.testing.assert_close(shifted, pe[offset:], rtol=0, atol=1e-5)


# --- learned -------------------------------------------------------------------------------------


def test_learned_table_lookup_and_its_hard_limit():
    wpe = LearnedPositionalEmbedding(16, 8)
    torch.testing.assert_close(wpe(torch.tensor([[0, 3]])), wpe.weight[[0, 3]][None])
    with pytest.raises(ValueError, match="max_positions=16"):
        wpe(torch.arange(17))


# --- ALiBi vs BLOOM ------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 6, 8, 12, 16, 20, 32])
def test_alibi_slopes_equal_bloom(heads):
    bloom = build_alibi_tensor(torch.ones(1, 3), heads, torch.float32)  # (H, 1, 3): slope_h * j
    torch.testing.assert_close(alibi_slopes(heads), bloom[:, 0, 1], rtol=1e-6, atol=0)


def test_alibi_slopes_follow_the_paper_for_eight_heads():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))


@pytest.mark.parametrize("heads,q_len,k_len", [(4, 7, 7), (6, 3, 10), (12, 1, 9)])
def test_alibi_bias_gives_bloom_attention_under_a_causal_mask(heads, q_len, k_len):
    scores = torch.randn(heads, q_len, k_len)
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    ours = (scores + alibi_bias(heads, q_len, k_len)).masked_fill(~causal, float("-inf")).softmax(-1)
    bloom = build_alibi_tensor(torch.ones(1, k_len), heads, torch.float32)  # (H, 1, S)
    ref = (scores + bloom).masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_alibi_bias_is_linear_in_distance():
    bias = alibi_bias(4, 5)
    slopes = alibi_slopes(4)
    for i in range(5):
        for j in range(5):
            torch.testing.assert_close(bias[:, i, j], -slopes * abs(i - j))


# --- clear errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: rope_cos_sin(10, 7), ValueError, "head_dim must be even"),
        (lambda: rope_cos_sin(10, 8, base=0.0), ValueError, "base must be"),
        (lambda: rope_cos_sin(10, 8, base=-5.0), ValueError, "base must be"),
        (lambda: rope_cos_sin(10, 8, scaling="yarn"), ValueError, "scaling must be one of"),
        (lambda: rope_cos_sin(10, 8, scaling="dynamic", factor=2.0), ValueError, "max_position"),
        (lambda: rope_cos_sin(10, 8, factor=0.5), ValueError, "factor must be"),
        (lambda: rope_cos_sin(torch.tensor([0.5]), 8), TypeError, "integer positions"),
        (lambda: rope_cos_sin(torch.zeros(1, 1, 3, dtype=torch.long), 8), ValueError, "positions must have"),
        (lambda: apply_rope(torch.randn(2, 5, 8), *rope_cos_sin(5, 8)), ValueError, r"x must have 4 dimensions"),
        (lambda: apply_rope(torch.randn(1, 1, 5, 8), *rope_cos_sin(6, 8)), ValueError, r"must end in \(T, D\)"),
        (lambda: apply_rope([1, 2], *rope_cos_sin(6, 8)), TypeError, "x must be a torch.Tensor"),
        (lambda: sinusoidal_encoding(10, 5), ValueError, "dim must be even"),
        (lambda: alibi_slopes(0), ValueError, "num_heads must be an integer >= 1"),
        (lambda: alibi_bias(4, 5, 3), ValueError, "q_len must be <= k_len"),
        (lambda: LearnedPositionalEmbedding(0, 4), ValueError, "max_positions"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()

"""llmlab.positional against transformers (Llama RoPE and its "llama3" and "yarn" scalings, BLOOM
ALiBi), the sinusoidal formula of "Attention Is All You Need", and the invariants each encoding is
chosen for."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from llmlab.positional import (
    LearnedPositionalEmbedding,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    cos_sin_from_inv_freq,
    llama3_inv_freq,
    ntk_scaled_base,
    rope_cos_sin,
    rope_inv_freq,
    scaled_rope_inv_freq,
    sinusoidal_encoding,
    sinusoidal_shift_matrix,
    yarn_attention_factor,
    yarn_inv_freq,
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


# --- LLaMA-3.1 ("llama3") and YaRN scaling vs transformers' ROPE_INIT_FUNCTIONS ----------------

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def hf_config(head_dim, base, rope_scaling, max_pos=None):
    heads = 2
    if max_pos is None:  # the extended context the scaling is for
        max_pos = int(rope_scaling["factor"] * rope_scaling["original_max_position_embeddings"])
    return LlamaConfig(hidden_size=head_dim * heads, num_attention_heads=heads, max_position_embeddings=max_pos,
                       rope_parameters={"rope_theta": base, **rope_scaling})


@pytest.mark.parametrize(
    "head_dim,base,params",
    [
        (128, 500000.0, LLAMA31),  # LLaMA-3.1's published values
        (64, 10000.0, {**LLAMA31, "factor": 4.0, "original_max_position_embeddings": 256}),
        (32, 10000.0, {**LLAMA31, "factor": 2.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                       "original_max_position_embeddings": 512}),
    ],
)
def test_llama3_inv_freq_equals_transformers(head_dim, base, params):
    config = hf_config(head_dim, base, params)
    ref, ref_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    kwargs = {k: v for k, v in params.items() if k != "rope_type"}
    torch.testing.assert_close(llama3_inv_freq(head_dim, base, **kwargs), ref, rtol=1e-6, atol=0)
    ours, ours_factor = scaled_rope_inv_freq(head_dim, base, params)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert ours_factor == ref_factor == 1.0


@pytest.mark.parametrize(
    "head_dim,base,params",
    [
        (128, 10000.0, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}),
        (64, 10000.0, {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 2048,
                       "beta_fast": 16.0, "beta_slow": 2.0}),
        (64, 500000.0, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
                        "truncate": False}),
        (32, 10000.0, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                       "attention_factor": 1.5}),
        (64, 10000.0, {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                       "mscale": 0.707, "mscale_all_dim": 0.707}),  # DeepSeek-V2's form
        (64, 10000.0, {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                       "mscale": 1.0, "mscale_all_dim": 0.5}),
    ],
)
def test_yarn_inv_freq_and_attention_factor_equal_transformers(head_dim, base, params):
    config = hf_config(head_dim, base, params)
    ref, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    ours, ours_factor = scaled_rope_inv_freq(head_dim, base, params)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert ours_factor == pytest.approx(ref_factor, rel=1e-12)


def test_yarn_cos_sin_equal_llama_rotary_embedding():
    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    rotary = LlamaRotaryEmbedding(hf_config(32, 10000.0, params, max_pos=256))
    positions = torch.arange(0, 256, 3)[None]  # (1, T)
    cos_ref, sin_ref = rotary(torch.zeros(1, 1, 32), positions)
    inv_freq, factor = scaled_rope_inv_freq(32, 10000.0, params)
    cos, sin = cos_sin_from_inv_freq(positions, inv_freq, attention_factor=factor)
    assert factor > 1.0  # the temperature really is applied: cos^2 + sin^2 = factor^2, not 1
    torch.testing.assert_close(cos, cos_ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(sin, sin_ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, factor**2))


def test_llama3_keeps_fast_pairs_and_interpolates_slow_pairs():
    inv = rope_inv_freq(128, 500000.0)
    scaled = llama3_inv_freq(128, 500000.0, **{k: v for k, v in LLAMA31.items() if k != "rope_type"})
    wavelength = 2 * math.pi / inv
    fast, slow = wavelength < 8192 / 4, wavelength > 8192 / 1
    assert fast.any() and slow.any() and not (fast & slow).any()
    torch.testing.assert_close(scaled[fast], inv[fast])
    torch.testing.assert_close(scaled[slow], inv[slow] / 8.0)
    middle = ~fast & ~slow
    assert middle.any()
    assert ((scaled[middle] < inv[middle]) & (scaled[middle] > inv[middle] / 8.0)).all()
    assert (scaled[1:] <= scaled[:-1]).all()  # still sorted from fast to slow


def test_yarn_ramp_boundaries_follow_beta():
    # D = 64, base 10000, L = 2048: pair i turns 2048 * 10000^(-2i/64) / (2 pi) times
    inv = rope_inv_freq(64, 10000.0)
    scaled = yarn_inv_freq(64, 10000.0, factor=4.0, original_max_position_embeddings=2048)
    turns = 2048 * inv / (2 * math.pi)
    kept, interpolated = turns > 32, turns < 1
    torch.testing.assert_close(scaled[kept], inv[kept])
    torch.testing.assert_close(scaled[interpolated], inv[interpolated] / 4.0)
    assert not torch.equal(scaled, inv) and not torch.equal(scaled, inv / 4.0)


def test_scaling_with_factor_one_changes_nothing():
    inv = rope_inv_freq(64, 10000.0)
    torch.testing.assert_close(llama3_inv_freq(64, 10000.0, factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=128), inv)
    torch.testing.assert_close(yarn_inv_freq(64, 10000.0, factor=1.0, original_max_position_embeddings=128), inv)
    assert yarn_attention_factor(1.0) == 1.0
    assert yarn_attention_factor(math.e) == pytest.approx(1.1)


def test_cos_sin_from_inv_freq_equals_rope_cos_sin():
    positions = torch.arange(40)
    cos_a, sin_a = rope_cos_sin(positions, 16, 10000.0, scaling="linear", factor=2.0)
    cos_b, sin_b = cos_sin_from_inv_freq(positions, rope_inv_freq(16) / 2.0)
    torch.testing.assert_close(cos_a, cos_b)
    torch.testing.assert_close(sin_a, sin_b)
    inv, factor = scaled_rope_inv_freq(16, 10000.0, None)
    torch.testing.assert_close(inv, rope_inv_freq(16))
    assert factor == 1.0


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
        (lambda: llama3_inv_freq(8, 1e4, factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0,
                                 original_max_position_embeddings=64), ValueError, "high_freq_factor must be >"),
        (lambda: llama3_inv_freq(8, 1e4, factor=0.5, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64), ValueError, "factor must be"),
        (lambda: yarn_inv_freq(8, 1e4, factor=4.0, original_max_position_embeddings=64, beta_fast=1.0,
                               beta_slow=32.0), ValueError, "beta_fast must be >"),
        (lambda: yarn_inv_freq(8, 1e4, factor=4.0, original_max_position_embeddings=0), ValueError,
         "original_max_position_embeddings"),
        (lambda: scaled_rope_inv_freq(8, 1e4, {"rope_type": "longrope", "factor": 2.0}), ValueError,
         "rope_type'\\] must be one of"),
        (lambda: scaled_rope_inv_freq(8, 1e4, {"rope_type": "yarn", "factor": 2.0}), ValueError,
         "original_max_position_embeddings"),
        (lambda: scaled_rope_inv_freq(8, 1e4, {"rope_type": "llama3"}), ValueError, "needs 'factor'"),
        (lambda: scaled_rope_inv_freq(8, 1e4, [("factor", 2.0)]), TypeError, "rope_scaling must be a mapping"),
        (lambda: cos_sin_from_inv_freq(4, torch.ones(2, 2)), ValueError, "inv_freq must have"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("scaling", ["none", "linear", "ntk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rotary_embedding_tables_equal_rope_cos_sin(scaling, dtype):
    from llmlab.positional import RotaryEmbedding

    rotary = RotaryEmbedding(16, 500.0, scaling=scaling, factor=3.0)
    small = rotary(10, dtype, torch.device("cpu"))
    grown = rotary(300, dtype, torch.device("cpu"))  # longer than the first table: rebuilt, longer
    assert small[0].shape[0] >= 10 and grown[0].shape[0] >= 300 and grown[0].dtype == dtype
    pos = torch.tensor([0, 7, 299, 123])
    want = rope_cos_sin(pos, 16, 500.0, scaling=scaling, factor=3.0, dtype=dtype)
    assert torch.equal(grown[0][pos], want[0]) and torch.equal(grown[1][pos], want[1])
    assert rotary(5, dtype, torch.device("cpu"))[0] is grown[0]  # cached, not rebuilt


def test_rotary_embedding_errors():
    from llmlab.positional import RotaryEmbedding

    with pytest.raises(ValueError, match="max_position .* is required for scaling='dynamic'"):
        RotaryEmbedding(8, scaling="dynamic", factor=2.0)
    with pytest.raises(ValueError, match="scaling must be one of"):
        RotaryEmbedding(8, scaling="yarn")
    with pytest.raises(ValueError, match="head_dim must be even"):
        RotaryEmbedding(7)

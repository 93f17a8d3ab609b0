"""llmlab.attention against torch.nn.functional.scaled_dot_product_attention, plus the invariants
of masks, the KV cache and the attention layer (sdpa == manual, cached == uncached, causality)."""

import pytest
import torch
import torch.nn.functional as F

from llmlab.attention import (
    Attention,
    KVCache,
    attention_probs,
    causal_mask,
    combine_masks,
    full_mask,
    padding_mask,
    prefix_lm_mask,
    scaled_dot_product_attention,
)

TOL = {"rtol": 1e-5, "atol": 1e-6}


def qkv(b=2, h=4, k=4, t=5, s=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, d, generator=g), torch.randn(b, k, s, d, generator=g),
            torch.randn(b, k, s, d, generator=g))


# --- from-scratch SDPA vs PyTorch ----------------------------------------------------------------


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_sdpa_equals_torch_plain_and_causal(is_causal, scale):
    q, k, v = qkv(t=6, s=6)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale), ref, **TOL)


def test_sdpa_equals_torch_with_bool_and_float_masks():
    q, k, v = qkv(t=4, s=7)
    g = torch.Generator().manual_seed(1)
    bool_mask = torch.rand(2, 1, 4, 7, generator=g) > 0.4
    bool_mask[..., 0] = True  # no fully masked rows here
    float_mask = torch.randn(1, 4, 4, 7, generator=g)
    for mask in (bool_mask, float_mask, torch.randn(4, 7, generator=g)):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(scaled_dot_product_attention(q, k, v, mask=mask), ref, **TOL)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_sdpa_gqa_equals_torch_enable_gqa(kv_heads):
    q, k, v = qkv(h=4, k=kv_heads, t=5, s=5)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), ref, **TOL)


def test_causal_with_more_keys_than_queries_means_last_positions():
    q, k, v = qkv(t=3, s=8)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(3, 8))  # bottom-right triangle
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, is_causal=True), ref, **TOL)
    # and it equals the last 3 rows of the full causal attention over 8 queries
    q_full = torch.cat([torch.randn(2, 4, 5, 8), q], dim=2)
    full = scaled_dot_product_attention(q_full, k, v, is_causal=True)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, is_causal=True), full[:, :, -3:], **TOL)


def test_mask_and_is_causal_combine():
    q, k, v = qkv(t=5, s=5)
    pad = padding_mask(torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]))
    expected = scaled_dot_product_attention(q, k, v, mask=combine_masks(pad, causal_mask(5)))
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, mask=pad, is_causal=True), expected)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
    q, k, v = qkv(t=4, s=4)
    q.requires_grad_(True)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2] = False  # query 2 may attend to nothing
    out = scaled_dot_product_attention(q, k, v, mask=mask)
    assert not out.isnan().any()
    torch.testing.assert_close(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    rows = [0, 1, 3]
    torch.testing.assert_close(out[:, :, rows], ref[:, :, rows], **TOL)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    additive = torch.zeros(4, 4).masked_fill(~mask, float("-inf"))
    out_add = scaled_dot_product_attention(q, k, v, mask=additive)
    torch.testing.assert_close(out_add, out)


def test_attention_probs_rows_sum_to_one_and_respect_the_mask():
    q, k, _ = qkv(t=6, s=6)
    probs = attention_probs(q, k, is_causal=True)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 6))
    assert (probs.masked_select(~causal_mask(6)) == 0).all()


# --- masks ---------------------------------------------------------------------------------------


def test_mask_builders():
    assert causal_mask(2, 4).int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert full_mask(2, 3).all() and full_mask(2, 3).shape == (2, 3)
    prefix = prefix_lm_mask(5, prefix_len=3)
    assert prefix[:3, :3].all() and not prefix[:3, 3:].any()  # bidirectional inside the prefix only
    assert torch.equal(prefix[3:, :], causal_mask(5)[3:, :] | (torch.arange(5) < 3))
    assert torch.equal(prefix_lm_mask(4, 0), causal_mask(4))
    assert torch.equal(prefix_lm_mask(4, 4), full_mask(4))
    pad = padding_mask(torch.tensor([[0, 1, 1]]))
    assert pad.shape == (1, 1, 1, 3) and pad.dtype == torch.bool
    both = combine_masks(causal_mask(3), None, pad)
    assert both[0, 0].int().tolist() == [[0, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert combine_masks(None, None) is None


def test_mask_errors():
    with pytest.raises(ValueError, match="q_len must be <= k_len"):
        causal_mask(5, 3)
    with pytest.raises(ValueError, match="prefix_len"):
        prefix_lm_mask(3, 4)
    with pytest.raises(TypeError, match="boolean"):
        combine_masks(causal_mask(3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="attention_mask must have 2 dimensions"):
        padding_mask(torch.ones(3))


def test_sdpa_bad_inputs():
    q, k, v = qkv(h=4, k=2)
    with pytest.raises(ValueError, match="enable_gqa"):
        scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        scaled_dot_product_attention(q[0], k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="mask must broadcast"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(3, 3, dtype=torch.bool), enable_gqa=True)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        scaled_dot_product_attention(q, None, v)


# --- KV cache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_len", [None, 16])
def test_kv_cache_grows_and_returns_everything(max_len):
    cache = KVCache(n_layer=2, max_len=max_len)
    k1, v1 = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    k2, v2 = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)
    cache.update(0, k1, v1)
    k_all, v_all = cache.update(0, k2, v2)
    torch.testing.assert_close(k_all, torch.cat([k1, k2], dim=2))
    torch.testing.assert_close(v_all, torch.cat([v1, v2], dim=2))
    assert cache.seq_len == 5 and len(cache) == 5 and cache.lengths == [5, 0]
    expected_len = 5 if max_len is None else max_len
    assert cache.nbytes() == 2 * 2 * 3 * expected_len * 8 * 4
    cache.reset()
    assert cache.seq_len == 0 and cache.nbytes() == 0


def test_kv_cache_reorder_and_copy():
    cache = KVCache(n_layer=1)
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 4).contiguous()
    cache.update(0, k, k.clone())
    snapshot = cache.copy()
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.keys[0][:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]
    assert snapshot.keys[0][:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]  # the copy is independent
    snapshot.update(0, torch.zeros(3, 1, 1, 4), torch.zeros(3, 1, 1, 4))
    assert snapshot.seq_len == 3 and cache.seq_len == 2


def test_kv_cache_errors():
    cache = KVCache(n_layer=1, max_len=4)
    with pytest.raises(ValueError, match="layer_idx must be < n_layer"):
        cache.update(1, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    with pytest.raises(ValueError, match="same shape"):
        cache.update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 2, 2))
    cache.update(0, torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    with pytest.raises(ValueError, match="cache is full"):
        cache.update(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="does not continue"):
        cache.update(0, torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2))
    with pytest.raises(TypeError, match="integer"):
        cache.reorder(torch.tensor([0.0]))


# --- the attention layer -------------------------------------------------------------------------


def make_pair(position, kv_heads, bias=False):
    torch.manual_seed(0)
    fast = Attention(32, 4, kv_heads, position=position, bias=bias, impl="sdpa")
    slow = Attention(32, 4, kv_heads, position=position, bias=bias, impl="manual")
    slow.load_state_dict(fast.state_dict())
    return fast, slow


@pytest.mark.parametrize("position,kv_heads", [("rope", 4), ("rope", 2), ("rope", 1), ("alibi", 2), ("none", 4)])
def test_attention_sdpa_equals_manual(position, kv_heads):
    fast, slow = make_pair(position, kv_heads, bias=True)
    x = torch.randn(2, 7, 32)
    mask = padding_mask(torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]]))
    for m in (None, mask):
        torch.testing.assert_close(fast(x, mask=m)[0], slow(x, mask=m)[0], **TOL)
    out, probs = fast(x, return_probs=True)
    assert probs.shape == (2, 4, 7, 7)
    torch.testing.assert_close(out, slow(x)[0], **TOL)


@pytest.mark.parametrize("position,kv_heads", [("rope", 2), ("alibi", 1), ("none", 4)])
@pytest.mark.parametrize("max_len", [None, 12])
def test_attention_cached_equals_uncached(position, kv_heads, max_len):
    attn, _ = make_pair(position, kv_heads)
    x = torch.randn(2, 9, 32)
    full, _ = attn(x)
    cache = KVCache(n_layer=1, max_len=max_len)
    parts = [attn(x[:, :4], cache=cache)[0]]
    parts += [attn(x[:, i : i + 1], cache=cache)[0] for i in range(4, 7)]
    parts.append(attn(x[:, 7:], cache=cache)[0])  # a 2-token chunk after the cache
    torch.testing.assert_close(torch.cat(parts, dim=1), full, **TOL)


def test_attention_is_causal_and_full_mask_is_not():
    attn, _ = make_pair("rope", 2)
    x = torch.randn(1, 6, 32)
    y = x.clone()
    y[:, 4] += 1.0
    torch.testing.assert_close(attn(x)[0][:, :4], attn(y)[0][:, :4])
    assert not torch.allclose(attn(x)[0][:, 5], attn(y)[0][:, 5])
    enc_x, enc_y = attn(x, is_causal=False)[0], attn(y, is_causal=False)[0]
    assert not torch.allclose(enc_x[:, 0], enc_y[:, 0])  # bidirectional: the past sees the future


def test_attention_bad_arguments():
    with pytest.raises(ValueError, match="n_head must be a multiple of n_kv_head"):
        Attention(32, 4, 3)
    with pytest.raises(ValueError, match="n_embd must be divisible by n_head"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="impl must be one of"):
        Attention(32, 4, impl="xformers")  # "flash" is llmlab.flash_attention now
    with pytest.raises(ValueError, match="x must have C=32"):
        Attention(32, 4)(torch.randn(1, 3, 16))


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_kv_cache_bytes_formula_equals_the_bytes_a_cache_holds(dtype, size):
    from llmlab.attention import kv_cache_bytes

    cache = KVCache(n_layer=3)
    for layer in range(3):
        cache.update(layer, torch.zeros(2, 4, 7, 16, dtype=dtype), torch.zeros(2, 4, 7, 16, dtype=dtype))
    assert cache.nbytes() == kv_cache_bytes(3, 4, 16, tokens=7, batch_size=2, bytes_per_value=size)
    assert kv_cache_bytes(32, 32, 128, tokens=1) == 512 * 1024  # LLaMA-2-7B, fp16
    with pytest.raises(ValueError, match="n_kv_head must be an integer >= 1"):
        kv_cache_bytes(32, 0, 128, tokens=1)

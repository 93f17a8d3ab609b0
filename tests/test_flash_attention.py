"""llmlab.flash_attention against torch.nn.functional.scaled_dot_product_attention, the from-scratch
llmlab.attention reference and autograd, plus the invariants FlashAttention is chosen for: exact
output, same FLOPs, skipped causal tiles, memory linear in the sequence length."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from llmlab.attention import scaled_dot_product_attention as reference_attention
from llmlab.flash_attention import (
    FlashConfig,
    attention_flops,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
    hbm_traffic_flash,
    hbm_traffic_standard,
    online_softmax,
)
from llmlab.memory import measure_peak_memory

TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {"rtol": 1e-12, "atol": 1e-12}}


def qkv(b, h, kv, t, s, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g, dtype=dtype)  # (B, H, T, D)
    k = torch.randn(b, kv, s, d, generator=g, dtype=dtype)  # (B, K, S, D)
    v = torch.randn(b, kv, s, d, generator=g, dtype=dtype)  # (B, K, S, D)
    return q, k, v


def bottom_right_causal(t, s):
    return torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)  # (T, S): queries are the last T positions


# --- online softmax -----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 16, 50])
def test_online_softmax_gives_max_sum_and_logsumexp(chunk):
    x = torch.randn(4, 50, dtype=torch.float64) * 10
    m, l = online_softmax(x.split(chunk, dim=-1))
    torch.testing.assert_close(m, x.amax(-1), rtol=0, atol=0)
    torch.testing.assert_close(m + l.log(), torch.logsumexp(x, -1), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(torch.exp(x - m[:, None]) / l[:, None], torch.softmax(x, -1), rtol=1e-14, atol=1e-14)


def test_online_softmax_does_not_overflow():
    x = torch.tensor([[1000.0, 999.0, -1000.0, 1001.0]])
    m, l = online_softmax(x.split(1, dim=-1))
    assert torch.isfinite(l).all()
    torch.testing.assert_close(m + l.log(), torch.logsumexp(x, -1))


def test_online_softmax_needs_a_chunk():
    with pytest.raises(ValueError, match="at least one non-empty"):
        online_softmax([])


# --- exactness of the forward pass --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("block_q,block_k", [(16, 16), (7, 5), (3, 64)])
def test_forward_equals_torch_sdpa(dtype, is_causal, block_q, block_k):
    q, k, v = qkv(2, 3, 3, 45, 45, 16, dtype)  # T = 45 is not a multiple of any block size
    res = flash_attention_forward(q, k, v, is_causal=is_causal, config=FlashConfig(block_q, block_k))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    torch.testing.assert_close(res.output, expected, **TOL[dtype])
    assert res.output.dtype == dtype and res.lse.shape == (2, 3, 45)


@pytest.mark.parametrize(
    "t,s,is_causal", [(13, 40, False), (13, 40, True), (1, 29, True), (40, 13, False), (29, 1, False)]
)
def test_forward_with_t_not_s_equals_references(t, s, is_causal):
    q, k, v = qkv(1, 2, 2, t, s, 8, torch.float64)
    res = flash_attention_forward(q, k, v, is_causal=is_causal, config=FlashConfig(4, 6))
    mask = bottom_right_causal(t, s) if is_causal else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(res.output, expected, **TOL[torch.float64])
    torch.testing.assert_close(res.output, reference_attention(q, k, v, is_causal=is_causal), **TOL[torch.float64])


@pytest.mark.parametrize("is_causal", [False, True])
def test_forward_with_gqa_equals_torch_sdpa(is_causal):
    q, k, v = qkv(2, 6, 2, 30, 30, 8, torch.float64)
    res = flash_attention_forward(q, k, v, is_causal=is_causal, enable_gqa=True, config=FlashConfig(8, 8))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    torch.testing.assert_close(res.output, expected, **TOL[torch.float64])


def test_lse_is_logsumexp_of_scaled_scores_and_custom_scale():
    q, k, v = qkv(1, 2, 2, 21, 34, 8, torch.float64)
    res = flash_attention_forward(q, k, v, is_causal=True, scale=0.3, config=FlashConfig(5, 5))
    scores = (q @ k.transpose(-2, -1) * 0.3).masked_fill(~bottom_right_causal(21, 34), float("-inf"))
    torch.testing.assert_close(res.lse, torch.logsumexp(scores, -1), rtol=1e-12, atol=1e-12)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right_causal(21, 34), scale=0.3)
    torch.testing.assert_close(res.output, expected, **TOL[torch.float64])


def test_reference_attention_equals_torch_sdpa_with_gqa_and_causal_mask():
    q, k, v = qkv(2, 4, 2, 17, 17, 8, torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(reference_attention(q, k, v, is_causal=True, enable_gqa=True), expected)


def test_half_precision_accumulates_in_float32():
    q, k, v = qkv(1, 2, 2, 40, 40, 16, torch.float64)
    res = flash_attention_forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), config=FlashConfig(8, 8))
    assert res.output.dtype == torch.bfloat16 and res.lse.dtype == torch.float32
    torch.testing.assert_close(res.output.double(), F.scaled_dot_product_attention(q, k, v), rtol=0, atol=3e-2)


# --- backward ----------------------------------------------------------------------------------


@pytest.mark.parametrize("is_causal,t,s,h,kv", [(False, 23, 31, 2, 2), (True, 23, 31, 4, 2), (True, 30, 30, 2, 1)])
def test_backward_equals_autograd_of_reference(is_causal, t, s, h, kv):
    q, k, v = (x.requires_grad_() for x in qkv(2, h, kv, t, s, 8, torch.float64))
    grad = torch.randn(2, h, t, 8, dtype=torch.float64)  # (B, H, T, D)
    mask = bottom_right_causal(t, s) if is_causal else None
    ref = F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)  # (B, H, T, D)
    expected = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    out = flash_attention(q, k, v, is_causal=is_causal, enable_gqa=True, config=FlashConfig(6, 5))
    got = torch.autograd.grad((out * grad).sum(), (q, k, v))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# --- counts: tiles, FLOPs, IO ---------------------------------------------------------------------


def test_non_causal_flops_and_io_equal_the_formulas():
    q, k, v = qkv(2, 3, 3, 50, 70, 16)
    stats = flash_attention_forward(q, k, v, config=FlashConfig(16, 32)).stats
    assert stats.flops == attention_flops(50, 70, 16, batch=2, heads=3) == 4 * 50 * 70 * 16 * 6
    assert stats.tiles_computed == math.ceil(50 / 16) * math.ceil(70 / 32) * 6 and stats.tiles_skipped == 0
    assert stats.hbm_reads + stats.hbm_writes == hbm_traffic_flash(50, 70, 16, block_q=16) * 6


def test_causal_skips_the_tiles_above_the_diagonal():
    q, k, v = qkv(1, 1, 1, 64, 64, 8)
    stats = flash_attention_forward(q, k, v, is_causal=True, config=FlashConfig(16, 16)).stats
    assert (stats.tiles_computed, stats.tiles_skipped, stats.tiles_masked) == (10, 6, 4)
    assert stats.flops == 4 * 8 * (16 * 16 + 16 * 32 + 16 * 48 + 16 * 64)  # each query tile up to its diagonal


def counted_flops(fn):
    """Matmul FLOPs of fn() as counted by PyTorch's FlopCounterMode (independent of llmlab's count)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("h,kv,t,s", [(2, 2, 70, 70), (4, 2, 50, 90), (3, 3, 90, 33)])
def test_tiled_and_naive_run_the_same_matmul_flops(h, kv, t, s):
    q, k, v = qkv(2, h, kv, t, s, 16)
    cfg, gqa = FlashConfig(32, 16), h != kv
    naive = counted_flops(lambda: reference_attention(q, k, v, enable_gqa=gqa))
    tiled = counted_flops(lambda: flash_attention_forward(q, k, v, enable_gqa=gqa, config=cfg))
    expanded = (2, h, s, 16)  # the formula counts every query head against its (shared) k/v head
    assert tiled == naive == sdpa_flop_count(q.shape, expanded, expanded) == 4 * t * s * 16 * 2 * h
    assert flash_attention_forward(q, k, v, enable_gqa=gqa, config=cfg).stats.flops == tiled


def test_causal_flops_counted_by_torch_equal_the_computed_tiles():
    q, k, v = qkv(1, 2, 2, 64, 64, 8)
    res = flash_attention_forward(q, k, v, is_causal=True, config=FlashConfig(16, 16))
    counted = counted_flops(lambda: flash_attention_forward(q, k, v, is_causal=True, config=FlashConfig(16, 16)))
    assert counted == res.stats.flops == 4 * 8 * 16 * 16 * res.stats.tiles_computed  # whole tiles, masked or not


def test_backward_recomputes_one_extra_qk_product():
    flops, tiled = {}, functools.partial(flash_attention, config=FlashConfig(16, 16))
    for name, fn in (("naive", reference_attention), ("flash", tiled)):
        q, k, v = (x.requires_grad_() for x in qkv(1, 2, 2, 48, 48, 8))
        flops[name] = counted_flops(lambda: fn(q, k, v).sum().backward())  # noqa: B023
    unit = 48 * 48 * 8 * 2  # T S D per head, 2 heads
    assert flops["naive"] == 12 * unit  # forward 4 + autograd backward 8 (dP, dV, dQ, dK)
    assert flops["flash"] == 14 * unit  # ... + the recomputed Q K^T


def test_flash_io_is_smaller_than_standard_for_long_sequences():
    assert hbm_traffic_flash(4096, 4096, 64, block_q=128) < hbm_traffic_standard(4096, 4096, 64) / 3


def test_for_sram_follows_the_paper():
    assert FlashConfig.for_sram(100 * 1024, head_dim=128, element_size=2) == FlashConfig(block_q=100, block_k=100)
    assert FlashConfig.for_sram(64 * 1024, head_dim=64) == FlashConfig(block_q=64, block_k=64)


# --- memory -------------------------------------------------------------------------------------


def test_measure_peak_memory_counts_temporaries():
    def two_buffers():
        a = torch.zeros(1000)  # 4000 bytes
        b = torch.zeros(500)  # 2000 bytes, while a is alive
        del a
        return b

    _, peak = measure_peak_memory(two_buffers)
    assert peak == 6000


def test_tiled_memory_is_linear_naive_memory_is_quadratic():
    d, cfg, peaks = 32, FlashConfig(64, 64), {}
    for t in (256, 512):
        q, k, v = qkv(1, 1, 1, t, t, d)
        peaks[t] = (
            measure_peak_memory(lambda: reference_attention(q, k, v))[1],  # noqa: B023
            measure_peak_memory(lambda: flash_attention_forward(q, k, v, config=cfg).output)[1],  # noqa: B023
        )
    assert 3.5 < peaks[512][0] / peaks[256][0] <= 4.0  # scores and probabilities: T^2
    assert peaks[512][1] / peaks[256][1] < 2.5  # output, L and one tile: T
    assert peaks[512][1] < peaks[512][0] / 8


# --- bad input ----------------------------------------------------------------------------------


def test_mismatched_heads_need_enable_gqa():
    q, k, v = qkv(1, 4, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        flash_attention_forward(q, k, v)
    q, k, v = qkv(1, 3, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attention_forward(q, k, v, enable_gqa=True)


@pytest.mark.parametrize(
    "shapes,match",
    [
        (((1, 2, 8), (1, 2, 8, 4), (1, 2, 8, 4)), "q must have 4 dimensions"),
        (((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 9, 4)), "k and v must have the same shape"),
        (((1, 2, 8, 4), (1, 2, 8, 5), (1, 2, 8, 5)), "must agree on batch B and head dim D"),
    ],
)
def test_wrong_shapes_raise_clear_errors(shapes, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        flash_attention_forward(q, k, v)


def test_other_bad_arguments():
    q, k, v = qkv(1, 1, 1, 8, 4, 4)
    with pytest.raises(ValueError, match="is_causal needs T <= S"):
        flash_attention_forward(q, k, v, is_causal=True)
    with pytest.raises(TypeError, match="share one floating dtype"):
        flash_attention_forward(q, k.double(), v)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        flash_attention_forward([1.0], k, v)
    with pytest.raises(ValueError, match="block_q must be an integer >= 1"):
        FlashConfig(block_q=0)
    with pytest.raises(TypeError, match="config must be a FlashConfig"):
        flash_attention_forward(q, k, v, config=(16, 16))
    res = flash_attention_forward(q, k, v)
    with pytest.raises(ValueError, match=r"lse must have shape \(1, 1, 8\)"):
        flash_attention_backward(q, k, v, res.output, res.lse[..., :4], torch.ones_like(q))


@pytest.mark.parametrize("t,s,causal", [(100, 100, True), (37, 90, True), (50, 50, False), (1, 70, True)])
def test_flash_forward_stats_match_the_tiles_the_loop_runs(monkeypatch, t, s, causal):
    import llmlab.flash_attention as fa

    calls = {"scores": 0, "masked": 0}
    real_mask = fa._tile_mask

    def counting_mask(*args):
        mask = real_mask(*args)
        calls["masked"] += mask is not None
        return mask

    def counting_step(m, l, acc, scores, v_tile):
        calls["scores"] += 1
        return real_step(m, l, acc, scores, v_tile)

    real_step = fa._online_step
    monkeypatch.setattr(fa, "_tile_mask", counting_mask)
    monkeypatch.setattr(fa, "_online_step", counting_step)
    q, k, v = qkv(1, 2, 2, t, s, 8)
    cfg = FlashConfig(16, 12)
    res = flash_attention_forward(q, k, v, is_causal=causal, config=cfg)
    assert res.stats == fa.flash_forward_stats(t, s, 8, cfg, causal, batch_heads=2)
    # the loop handles the K = 2 heads of a tile together: per head, the counts of the formula
    assert res.stats.tiles_computed == 2 * calls["scores"] and res.stats.tiles_masked == 2 * calls["masked"]
    assert res.stats.tiles_computed + res.stats.tiles_skipped == 2 * -(-t // 16) * -(-s // 12)

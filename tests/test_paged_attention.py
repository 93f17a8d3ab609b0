"""llmlab.paged_attention: attention through block tables equals attention over a contiguous cache
(torch.nn.functional.scaled_dot_product_attention and llmlab.attention's KVCache), and the block
bookkeeping keeps its invariants: free and reuse, fork with shared blocks, copy-on-write, clear
errors when the pool runs out or the input is malformed."""

import pytest
import torch
import torch.nn.functional as F

from llmlab.attention import KVCache
from llmlab.attention import scaled_dot_product_attention as reference_attention
from llmlab.paged_attention import (
    BlockAllocator,
    BlockManager,
    OutOfBlocksError,
    PagedCacheConfig,
    PagedKVCache,
    contiguous_reserved_slots,
    paged_attention,
)


def tokens(n, kv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, kv, d, generator=g), torch.randn(n, kv, d, generator=g)  # (T, K, D) each


# --- paged vs contiguous -----------------------------------------------------------------------


@pytest.mark.parametrize("block_tokens", [1, 3, 4, 16])
@pytest.mark.parametrize("heads", [2, 6])
def test_paged_decode_equals_contiguous_attention(block_tokens, heads):
    cfg = PagedCacheConfig(num_blocks=64, block_tokens=block_tokens, n_kv_head=2, head_dim=8)
    cache, lengths, contiguous = PagedKVCache(cfg), [5, 1, 17, 12], []
    for i, n in enumerate(lengths):  # interleave the appends so that blocks of sequences mix in the pool
        cache.add_sequence(i)
        contiguous.append(tokens(n, seed=i))
    for step in range(max(lengths)):
        for i, n in enumerate(lengths):
            if step < n:
                cache.append(i, contiguous[i][0][step], contiguous[i][1][step])
    q = torch.randn(4, heads, 8)  # (B, H, D)
    out = paged_attention(q, cache, [0, 1, 2, 3])
    for i, (k, v) in enumerate(contiguous):
        k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, K, S, D) each
        expected = F.scaled_dot_product_attention(q[i, :, None][None], k, v, enable_gqa=True)  # (1, H, 1, D)
        torch.testing.assert_close(out[i], expected[0, :, 0], rtol=1e-5, atol=1e-5)


def test_paged_cache_equals_llmlab_kv_cache_during_decoding():
    cache = PagedKVCache(PagedCacheConfig(num_blocks=8, block_tokens=3, n_kv_head=1, head_dim=4))
    cache.add_sequence("a")
    reference = KVCache(n_layer=1)
    k_all, v_all = tokens(10, kv=1, d=4)
    q_all = torch.randn(10, 2, 4)  # (T, H, D)
    for t in range(10):
        cache.append("a", k_all[t], v_all[t])
        k, v = reference.update(0, k_all[t][None, :, None], v_all[t][None, :, None])  # (1, K, S, D)
        expected = reference_attention(q_all[t][None, :, None], k, v, enable_gqa=True)  # (1, H, 1, D)
        torch.testing.assert_close(paged_attention(q_all[t][None], cache, ["a"]), expected[:, :, 0])
    torch.testing.assert_close(cache.gather("a")[0], reference.keys[0][0], rtol=0, atol=0)


def test_append_many_equals_append_one_by_one():
    cfg = PagedCacheConfig.tiny()
    k, v = tokens(11)
    a, b = PagedKVCache(cfg), PagedKVCache(cfg)
    a.add_sequence(0)
    b.add_sequence(0)
    a.append(0, k, v)
    for t in range(11):
        b.append(0, k[t], v[t])
    assert a.manager.block_table(0) == b.manager.block_table(0) == [0, 1, 2]
    torch.testing.assert_close(a.gather(0), b.gather(0), rtol=0, atol=0)
    torch.testing.assert_close(a.gather(0)[1], v.transpose(0, 1), rtol=0, atol=0)


# --- free, reuse, statistics ---------------------------------------------------------------------


def test_free_returns_blocks_and_they_are_reused():
    cache = PagedKVCache(PagedCacheConfig.tiny())  # 16 blocks of 4 slots
    cache.add_sequence(0)
    cache.append(0, *tokens(10))  # 3 blocks
    assert cache.manager.allocator.num_free == 13
    blocks = cache.manager.block_table(0)
    cache.free(0)
    assert cache.manager.allocator.num_free == 16 and cache.stats().blocks_used == 0
    cache.add_sequence(1)
    cache.append(1, *tokens(12, seed=1))
    assert sorted(cache.manager.block_table(1)) == sorted(blocks)  # the same physical blocks again
    torch.testing.assert_close(cache.gather(1)[0], tokens(12, seed=1)[0].transpose(0, 1), rtol=0, atol=0)


def test_stats_count_last_block_waste_and_compare_with_contiguous():
    cache = PagedKVCache(PagedCacheConfig.tiny())
    for i, n in enumerate([5, 8, 1]):
        cache.add_sequence(i)
        cache.append(i, *tokens(n))
    st = cache.stats()
    assert (st.blocks_used, st.slots_reserved, st.slots_filled, st.logical_tokens) == (2 + 2 + 1, 20, 14, 14)
    assert st.last_block_waste == 3 + 0 + 3 and st.waste_fraction == pytest.approx(6 / 20)
    assert contiguous_reserved_slots(3, max_len=32) == 96


# --- fork and copy-on-write ----------------------------------------------------------------------


def test_fork_shares_blocks_and_copy_on_write_keeps_the_parent():
    cache = PagedKVCache(PagedCacheConfig.tiny())
    cache.add_sequence("parent")
    cache.append("parent", *tokens(6))  # blocks [0 full, 1 half full]
    parent_k, parent_v = (x.clone() for x in cache.gather("parent"))
    cache.fork("parent", "child")
    table = cache.manager.block_table("parent")
    assert cache.manager.block_table("child") == table
    assert [cache.manager.allocator.ref_count(b) for b in table] == [2, 2]
    assert cache.stats().slots_filled == 6 and cache.stats().logical_tokens == 12  # the prompt is stored once

    cache.append("child", *tokens(3, seed=5))  # writes into the shared half-full block: copy first
    child_table = cache.manager.block_table("child")
    assert child_table[0] == table[0] and child_table[1] != table[1]
    assert [cache.manager.allocator.ref_count(b) for b in table] == [2, 1]
    torch.testing.assert_close(cache.gather("parent")[0], parent_k, rtol=0, atol=0)  # parent unchanged
    torch.testing.assert_close(cache.gather("parent")[1], parent_v, rtol=0, atol=0)
    child_k = cache.gather("child")[0]
    torch.testing.assert_close(child_k[:, :6], parent_k, rtol=0, atol=0)  # the copied prefix
    torch.testing.assert_close(child_k[:, 6:], tokens(3, seed=5)[0].transpose(0, 1), rtol=0, atol=0)

    cache.append("parent", *tokens(1, seed=9))  # the parent now owns its block alone: no copy
    assert cache.manager.block_table("parent") == table
    cache.free("parent")
    cache.free("child")
    assert cache.manager.allocator.num_free == 16


def test_fork_at_a_block_boundary_needs_no_copy():
    manager = BlockManager(num_blocks=4, block_tokens=2)
    manager.add_sequence(0)
    for _ in range(4):
        manager.append_slot(0)
    manager.fork(0, 1)
    block, slot, copy_from = manager.append_slot(1)
    assert (slot, copy_from) == (0, None) and block not in manager.block_table(0)


# --- errors ------------------------------------------------------------------------------------


def test_out_of_blocks_error_is_clear_and_leaves_the_cache_intact():
    cache = PagedKVCache(PagedCacheConfig.tiny())  # 16 blocks of 4 slots
    cache.add_sequence(0)
    cache.append(0, *tokens(60))
    with pytest.raises(OutOfBlocksError, match="needs 2 free blocks, 1 of 16 are free"):
        cache.append(0, *tokens(5))
    assert cache.length(0) == 60
    alloc = BlockAllocator(1)
    alloc.allocate()
    with pytest.raises(OutOfBlocksError, match="all 1 blocks are in use"):
        alloc.allocate()


def test_bad_inputs_raise_clear_errors():
    cache = PagedKVCache(PagedCacheConfig.tiny())  # K=2, D=8
    cache.add_sequence(0)
    with pytest.raises(ValueError, match="already in the cache"):
        cache.add_sequence(0)
    with pytest.raises(ValueError, match="seq_id 3 is not in the cache"):
        cache.append(3, *tokens(1))
    with pytest.raises(ValueError, match=r"k must end in \(K, D\) = \(2, 8\)"):
        cache.append(0, torch.zeros(3, 8), torch.zeros(3, 8))
    with pytest.raises(ValueError, match="k must have 2 or 3 dimensions"):
        cache.append(0, torch.zeros(8), torch.zeros(8))
    with pytest.raises(ValueError, match="hold no tokens yet"):
        paged_attention(torch.zeros(1, 2, 8), cache, [0])
    cache.append(0, *tokens(3))
    with pytest.raises(ValueError, match="multiple of the cache's key/value heads K=2"):
        paged_attention(torch.zeros(1, 3, 8), cache, [0])
    with pytest.raises(ValueError, match="head_dim=8"):
        paged_attention(torch.zeros(1, 2, 4), cache, [0])
    with pytest.raises(ValueError, match="one id per row of q"):
        paged_attention(torch.zeros(2, 2, 8), cache, [0])
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        paged_attention(torch.zeros(1, 1, 2, 8), cache, [0])
    with pytest.raises(ValueError, match="num_blocks must be an integer >= 1"):
        PagedCacheConfig(num_blocks=0)
    with pytest.raises(ValueError, match="allocated block id"):
        BlockAllocator(2).decref(1)

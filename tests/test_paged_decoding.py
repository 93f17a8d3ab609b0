"""llmlab.paged_decoding: decoding the shipped model with a paged KV cache gives the tokens and
logits of the contiguous KVCache (greedy and beam search); forks share blocks instead of copying."""

import pytest
import torch

from llmlab.checkpoint import load_pretrained
from llmlab.decoding import GenerationConfig, LLMAdapter, beam_search, greedy_search
from llmlab.paged_attention import OutOfBlocksError
from llmlab.paged_decoding import PagedCache, PagedLLMAdapter


@pytest.fixture(scope="module")
def shipped():
    model, tokenizer = load_pretrained()
    prompts = ["One day, Tim went to", "The sky was blue, so"]
    return model, torch.tensor([tokenizer.encode(p) for p in prompts])  # (2, 20)


def test_paged_cache_gives_the_logits_of_the_contiguous_cache(shipped):
    model, prompt = shipped
    paged, plain = PagedCache.for_model(model, num_blocks=16, block_tokens=4), model.new_cache()
    with torch.no_grad():
        for chunk in (prompt, prompt[:, :1], prompt[:, 1:3]):  # prefill, one token, two tokens
            assert torch.equal(model(chunk, cache=paged).logits, model(chunk, cache=plain).logits)
    assert paged.seq_len == plain.seq_len == 23
    tables = [paged.pools[0].manager.block_table(s) for s in paged.seq_ids]
    # 23 tokens per row: 6 blocks of 4 each, no block shared; the rows' appends interleave in the pool
    assert tables == [[0, 1, 2, 3, 4, 10], [5, 6, 7, 8, 9, 11]]


def test_greedy_and_beam_search_give_the_same_tokens_as_the_contiguous_cache(shipped):
    model, prompt = shipped
    greedy = GenerationConfig.greedy(max_new_tokens=24)
    want = greedy_search(LLMAdapter(model), prompt, greedy).sequences
    assert torch.equal(greedy_search(PagedLLMAdapter(model, num_blocks=64, block_tokens=8), prompt, greedy).sequences,
                       want)
    beams = GenerationConfig(max_new_tokens=16, num_beams=3, num_return_sequences=2, do_sample=False)
    want = beam_search(LLMAdapter(model), prompt, beams)
    got = beam_search(PagedLLMAdapter(model, num_blocks=64, block_tokens=8), prompt, beams)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.sequence_scores, want.sequence_scores, rtol=0, atol=0)


def test_reorder_and_fork_share_blocks_and_free_the_rest(shipped):
    model, prompt = shipped
    cache = PagedCache.for_model(model, num_blocks=32, block_tokens=8)
    with torch.no_grad():
        model(prompt, cache=cache)  # 2 rows x 20 tokens: 3 blocks each
    alloc = cache.pools[0].manager.allocator
    assert alloc.num_used == 6
    cache.reorder(torch.tensor([1, 1, 1]))  # three beams of row 1: row 0's blocks are freed
    tables = [cache.pools[0].manager.block_table(s) for s in cache.seq_ids]
    assert tables[0] == tables[1] == tables[2] and alloc.num_used == 3
    assert [alloc.ref_count(b) for b in tables[0]] == [3, 3, 3]
    assert cache.fork(0) == 3 and alloc.ref_count(tables[0][0]) == 4
    with torch.no_grad():
        model(prompt[:1, :1].repeat(4, 1), cache=cache)  # every row appends into the shared last block
    # copy-on-write: the first three writers copy it, the last one is then its only user and writes in place
    assert alloc.num_used == 3 + 3 and alloc.ref_count(tables[0][-1]) == 1
    cache.reset()
    assert alloc.num_used == 0 and cache.seq_len == 0


def test_paged_cache_errors(shipped):
    model, prompt = shipped
    tiny_pool = PagedCache.for_model(model, num_blocks=2, block_tokens=4)
    with torch.no_grad(), pytest.raises(OutOfBlocksError, match="out of KV cache blocks"):
        model(prompt, cache=tiny_pool)
    cache = PagedCache(n_layer=1, n_kv_head=2, head_dim=8, num_blocks=4, block_tokens=4)
    cache.update(0, torch.zeros(2, 2, 3, 8), torch.zeros(2, 2, 3, 8))
    with pytest.raises(ValueError, match="k has 3 rows but the cache holds 2 sequences"):
        cache.update(0, torch.zeros(3, 2, 1, 8), torch.zeros(3, 2, 1, 8))
    with pytest.raises(ValueError, match="row must be < 2"):
        cache.fork(2)
    with pytest.raises(TypeError, match="beam_indices must be integer indices"):
        cache.reorder(torch.tensor([0.0]))

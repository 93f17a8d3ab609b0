"""llmlab.exercises.nb09: the paged-slot checker accepts a solution written from the block-table rule
(not llmlab's BlockManager), and rejects each recognized mistake, naming it."""

import torch

from llmlab.exercises import check_paged_slot
from llmlab.paged_attention import PagedCacheConfig, PagedKVCache


def paged_slot(block_table, block_size, p):
    block, offset = divmod(p, block_size)  # logical block, offset inside it
    return block_table[block] * block_size + offset


# the solutions written from the formula; tests/test_exercises.py checks that each checker accepts
# its solution and rejects every mistake it lists
SOLUTIONS = {"paged_slot": paged_slot}


def test_the_solution_finds_each_token_in_a_paged_kv_cache():
    config = PagedCacheConfig(num_blocks=12, block_tokens=4, n_kv_head=1, head_dim=1)
    cache = PagedKVCache(config)
    for seq in (0, 1):
        cache.add_sequence(seq)
    for t in range(10):  # interleaved: the two sequences' blocks alternate in the pool
        for seq in (0, 1):
            value = torch.full((1, 1, 1), float(100 * seq + t))  # (T=1, K, D): the position as the value
            cache.append(seq, value, value)
    table = cache.manager.block_table(1)
    pool = cache.key_cache.flatten(0, 1)  # (slots, K, D)
    assert [pool[paged_slot(table, 4, p)].item() for p in range(10)] == [100.0 + p for p in range(10)]


def test_an_unknown_wrong_answer_gets_the_general_hint():
    verdict = check_paged_slot(lambda table, bs, p: table[-1] * bs, seed=0, verbose=False)
    assert not verdict and "block_table[p // block_size]" in verdict.hint

"""llmlab.exercises.nb09: the paged-slot checker accepts a solution written from the block-table rule
(not llmlab's BlockManager), and rejects each recognized mistake, naming it."""

import pytest
import torch

from llmlab.exercises import MISTAKES, check_paged_slot
from llmlab.paged_attention import PagedCacheConfig, PagedKVCache


def paged_slot(block_table, block_size, p):
    block, offset = divmod(p, block_size)  # logical block, offset inside it
    return block_table[block] * block_size + offset


@pytest.mark.parametrize("seed", [0, 1, None])
def test_checker_accepts_a_correct_solution(seed, capsys):
    verdict = check_paged_slot(paged_slot, seed=seed)
    assert verdict, str(verdict)
    assert capsys.readouterr().out.startswith("PASS [paged_slot] matches the reference on 5 fresh inputs")


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


@pytest.mark.parametrize("mistake", sorted(MISTAKES["paged_slot"]))
def test_checker_rejects_each_mistake_and_names_it(mistake):
    wrong, why = MISTAKES["paged_slot"][mistake]
    for seed in (0, 1, 2, 3):
        verdict = check_paged_slot(wrong, seed=seed, verbose=False)
        assert not verdict and verdict.hint == why, (seed, str(verdict))
        assert f"Hint: {why}" in str(verdict)


def test_an_unknown_wrong_answer_gets_the_general_hint():
    verdict = check_paged_slot(lambda table, bs, p: table[-1] * bs, seed=0, verbose=False)
    assert not verdict and "block_table[p // block_size]" in verdict.hint

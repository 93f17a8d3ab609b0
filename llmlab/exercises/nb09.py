"""Exercise checkers for notebook 09 KV cache: its size, and where a token sits in a paged cache."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_kv_cache_bytes", "check_paged_slot"]


def _kv_cache_bytes_reference(n_layer: int, n_head: int, n_kv_head: int, head_dim: int, seq_len: int,
                              batch: int, bytes_per_value: int) -> int:
    from llmlab.attention import kv_cache_bytes

    return kv_cache_bytes(n_layer, n_kv_head, head_dim, tokens=seq_len, batch_size=batch,
                          bytes_per_value=bytes_per_value)


def check_kv_cache_bytes(fn: Callable[..., int], trials: int = 5, seed: int | None = None,
                         verbose: bool = True) -> Verdict:
    """fn(n_layer, n_head, n_kv_head, head_dim, seq_len, batch, bytes_per_value) -> bytes of the KV
    cache of a decoder with grouped-query attention."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        n_kv = 2 ** _randint(g, 0, 3)
        cases.append((_randint(g, 1, 80), n_kv * 2 ** _randint(g, 1, 3), n_kv, 2 ** _randint(g, 5, 7),
                      _randint(g, 1, 32768), _randint(g, 1, 64), [1, 2, 4][_randint(g, 0, 2)]))
    return _run("kv_cache_bytes", fn, _kv_cache_bytes_reference, cases,
                "2 (K and V) x layers x KV heads x head dim x tokens x batch x bytes", MISTAKES["kv_cache_bytes"],
                verbose=verbose)


def _paged_case(g: torch.Generator) -> tuple[list[int], int, int, int]:
    """Run llmlab's BlockManager on 4 interleaved sequences (one freed midway, so its blocks are reused
    out of order); return sequence 0's block table, the block size, a position p and the slot
    (block * block_size + offset) that append_slot reserved for p."""
    from llmlab.paged_attention import BlockManager

    bs = 2 ** _randint(g, 1, 3)
    manager, slots = BlockManager(num_blocks=256, block_tokens=bs), []
    for seq in range(4):
        manager.add_sequence(seq)
    alive, steps = [0, 1, 2, 3], _randint(g, 12, 20) * bs
    for step in range(steps):
        if step == steps // 2:
            manager.free(1)
            alive.remove(1)
        seq = alive[_randint(g, 0, len(alive) - 1)]
        block, offset, _ = manager.append_slot(seq)
        if seq == 0:
            slots.append(block * bs + offset)
    while len(slots) <= bs:  # at least two logical blocks
        block, offset, _ = manager.append_slot(0)
        slots.append(block * bs + offset)
    p = _randint(g, bs, len(slots) - 1)  # past the first logical block
    return manager.block_table(0), bs, p, slots[p]


def check_paged_slot(fn: Callable[[list[int], int, int], int], trials: int = 5, seed: int | None = None,
                     verbose: bool = True) -> Verdict:
    """fn(block_table, block_size, p) -> the physical slot (index into the pool's slots, block-major)
    that holds the KV of logical token position p; block_table[i] is the physical block of the
    sequence's i-th logical block (vLLM's slot_mapping for one token)."""
    g = _generator(seed)
    cases, recorded = [], {}
    for _ in range(trials):
        table, bs, p, slot = _paged_case(g)
        cases.append((table, bs, p))
        recorded[(tuple(table), bs, p)] = slot

    def reference(table: list[int], bs: int, p: int) -> int:  # the slot BlockManager.append_slot gave
        return recorded[(tuple(table), bs, p)]

    return _run("paged_slot", fn, reference, cases,
                "look up the physical block block_table[p // block_size], then add the offset p % block_size "
                "inside it: block * block_size + offset", MISTAKES["paged_slot"], verbose=verbose)



MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "kv_cache_bytes": {
        "query_heads": (lambda n_layer, h, k, d, t, b, nbytes: 2 * n_layer * h * d * t * b * nbytes,
                        "only the key/value heads are cached: n_kv_head, not n_head"),
        "keys_only": (lambda n_layer, h, k, d, t, b, nbytes: n_layer * k * d * t * b * nbytes,
                      "both K and V are cached: a factor of 2"),
    },
    "paged_slot": {
        "logical_block": (lambda table, bs, p: (p // bs) * bs + p % bs,
                          "p // block_size is the logical block; the physical block is block_table[p // "
                          "block_size] (blocks are not contiguous)"),
        "block_not_scaled": (lambda table, bs, p: table[p // bs] + p % bs,
                             "a block holds block_size slots: the slot is block_table[p // block_size] * "
                             "block_size + offset, not block + offset"),
        "ceil_block": (lambda table, bs, p: table[math.ceil(p / bs)] * bs + p % bs,
                       "positions start at 0: logical block p // block_size (floor), not ceil(p / block_size)"),
    },
}

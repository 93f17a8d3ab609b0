"""Exercise checkers for notebook 02 Tokenization: the two steps of BPE training."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_merge_pair", "check_pair_counts"]


def _random_ids(g: torch.Generator, n: int, alphabet: int) -> list[int]:
    return torch.randint(0, alphabet, (n,), generator=g).tolist()


def _pair_counts_reference(ids: list[int]) -> dict[tuple[int, int], int]:
    return dict(Counter(zip(ids, ids[1:], strict=False)))


def check_pair_counts(fn: Callable[[list[int]], dict], trials: int = 5, seed: int | None = None,
                      verbose: bool = True) -> Verdict:
    """fn(ids) -> {(a, b): count} over adjacent pairs, the statistic BPE merges by."""
    g = _generator(seed)
    cases = [(_random_ids(g, _randint(g, 5, 60), _randint(g, 2, 5)),) for _ in range(trials)]
    return _run("pair_counts", fn, lambda ids: _pair_counts_reference(ids), cases,
                "count every adjacent pair (ids[i], ids[i+1]), overlapping ones included",
                MISTAKES["pair_counts"], verbose=verbose)


def _merge_reference(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    from llmlab.bpe import _merge

    return _merge(list(ids), pair, new_id)


def check_merge_pair(fn: Callable[[list[int], tuple[int, int], int], list[int]], trials: int = 5,
                     seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(ids, pair, new_id) -> ids with every non-overlapping occurrence of pair, scanned left to
    right, replaced by new_id (one BPE merge)."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        ids = _random_ids(g, _randint(g, 8, 40), 3)
        ids[2:5] = [1, 1, 1]  # a run where overlapping occurrences compete
        pair = (1, 1) if _randint(g, 0, 1) else (ids[0], ids[1])
        cases.append((ids, pair, 99))
    return _run("merge_pair", fn, _merge_reference, cases,
                "scan left to right; after replacing a pair, skip both of its tokens",
                MISTAKES["merge_pair"], verbose=verbose)


def _merge_first_only(ids, pair, new_id):
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == tuple(pair):
            return ids[:i] + [new_id] + ids[i + 2 :]
    return ids


def _merge_no_skip(ids, pair, new_id):
    out = []
    for i, tok in enumerate(ids):
        if i + 1 < len(ids) and (tok, ids[i + 1]) == tuple(pair):
            out.append(new_id)
        elif not (i > 0 and (ids[i - 1], tok) == tuple(pair)):
            out.append(tok)
    return out



MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "pair_counts": {
        "skip_one": (lambda ids: dict(Counter(zip(ids, ids[2:], strict=False))),
                     "pairs are neighbours (i, i+1), not (i, i+2)"),
        "unique": (lambda ids: dict.fromkeys(zip(ids, ids[1:], strict=False), 1),
                   "count every occurrence, not only whether a pair occurs"),
    },
    "merge_pair": {
        "first_only": (_merge_first_only, "replace every occurrence, not only the first"),
        "no_skip": (_merge_no_skip, "after a merge, skip the second token of the pair before scanning on"),
    },
}

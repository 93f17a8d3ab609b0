"""llmlab.exercises.nb15 (notebook 15): the ring all-reduce and ZeRO checkers accept correct solutions
written from the algorithm and the formula (not llmlab's reference) and reject each listed mistake."""

import pytest
import torch

from llmlab import exercises as ex


def ring_all_reduce(tensors):
    """Chunk by chunk around the ring: N - 1 reduce-scatter steps, then N - 1 all-gather steps."""
    n = len(tensors)
    chunks = [list(t.clone().chunk(n)) for t in tensors]  # chunks[rank][c]
    sent = [0] * n
    for s in range(n - 1):  # rank r sends chunk r - s to r + 1, which adds it
        outgoing = [chunks[r][(r - s) % n].clone() for r in range(n)]
        for r in range(n):
            chunks[(r + 1) % n][(r - s) % n] += outgoing[r]
            sent[r] += outgoing[r].numel()
    for s in range(n - 1):  # rank r owns chunk r + 1 and passes finished chunks on
        outgoing = [chunks[r][(r + 1 - s) % n].clone() for r in range(n)]
        for r in range(n):
            chunks[(r + 1) % n][(r + 1 - s) % n] = outgoing[r]
            sent[r] += outgoing[r].numel()
    return [torch.cat(c) for c in chunks], sent


def ring_from_the_formula(tensors):
    n, length = len(tensors), tensors[0].numel()
    total = sum(tensors)
    return [total] * n, [2 * (n - 1) * length // n] * n


def zero_bytes(psi, n, stage):
    return {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage]


# the solutions written from the formula; tests/test_exercises.py checks that each checker accepts
# its solution and rejects every mistake it lists
SOLUTIONS = {"ring_all_reduce": ring_all_reduce, "zero_bytes": zero_bytes}


@pytest.mark.parametrize("seed", [0, 1, None])
def test_ring_all_reduce_accepts_the_answer_from_the_formula_too(seed, capsys):
    assert ex.check_ring_all_reduce(ring_from_the_formula, seed=seed)
    assert capsys.readouterr().out.startswith("PASS [ring_all_reduce] matches the reference on 5 fresh inputs")


def test_ring_with_an_in_place_learner_still_compares_fresh_inputs():
    def in_place(tensors):  # sums into rank 0's tensor: the other ranks' inputs must stay intact
        for t in tensors[1:]:
            tensors[0] += t
        return [tensors[0].clone() for _ in tensors], [2 * (len(tensors) - 1) * tensors[0].numel()
                                                       // len(tensors)] * len(tensors)

    assert ex.check_ring_all_reduce(in_place, seed=0, verbose=False)


def test_ring_checker_rejects_a_non_callable_naming_fn():
    with pytest.raises(TypeError, match="fn must be the function to check"):
        ex.check_ring_all_reduce([1, 2], seed=0)


def test_zero_bytes_reference_reproduces_the_papers_7_5b_on_64_gpus():
    # ZeRO paper, Figure 1: 7.5 B parameters, N = 64: 120 GB, 31.4 GB, 16.6 GB, 1.88 GB per device
    from llmlab.exercises.nb15 import _zero_bytes_reference

    got = [round(_zero_bytes_reference(7_500_000_000, 64, s) / 1e9, 2) for s in range(4)]
    assert got == [120.0, 31.41, 16.64, 1.88]

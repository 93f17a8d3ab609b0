"""llmlab.exercises.nb18: the pass@k and corpus-perplexity checkers accept a solution written from the
formula (not llmlab.metrics) and reject each listed mistake, naming it."""

import math

import pytest
import torch

from llmlab import exercises as ex
from llmlab.exercises import nb18


def pass_at_k(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # comb(m, k) = 0 when k > m: then pass@k = 1


def corpus_perplexity(log_probs):
    nll = -torch.cat(log_probs).double()  # (sum of T_i,) every token of the corpus
    return nll.mean().exp()  # a 0-dim tensor: the checker reads it as a float


# the solutions written from the formula; tests/test_exercises.py checks that each checker accepts
# its solution and rejects every mistake it lists
SOLUTIONS = {"pass_at_k": pass_at_k, "corpus_perplexity": corpus_perplexity}


def test_perplexity_checker_names_fn_when_it_is_not_callable():
    with pytest.raises(TypeError, match="fn must be the function to check, got int"):
        ex.check_corpus_perplexity(42, seed=0)


def test_perplexity_checker_rejects_a_tensor_that_is_not_a_scalar():
    verdict = ex.check_corpus_perplexity(lambda lps: torch.stack([lp.mean() for lp in lps]), seed=0,
                                         verbose=False)
    assert not verdict and "got tensor of shape" in verdict.message


def test_a_learner_editing_the_log_probs_in_place_cannot_change_the_reference():
    def in_place(log_probs):
        out = corpus_perplexity(log_probs)
        for lp in log_probs:
            lp.zero_()
        return out

    assert ex.check_corpus_perplexity(in_place, seed=0, verbose=False)


def test_the_references_on_hand_computed_values():
    assert nb18._pass_at_k_reference(20, 2, 10) == pytest.approx(1 - 90 / 380)  # C(18,10)/C(20,10) = (10 * 9)/(20 * 19)
    uniform = [torch.full((3,), -math.log(4.0)), torch.full((7,), -math.log(4.0))]
    assert nb18._corpus_perplexity_reference(uniform) == pytest.approx(4.0)  # a uniform 4-way guess

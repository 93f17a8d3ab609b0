"""llmlab.exercises.nb08: the repetition-penalty checker accepts a solution written from CTRL's rule
(not llmlab's reference), agrees with transformers, and rejects each recognized mistake, naming it."""

import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from llmlab.exercises import check_repetition_penalty


def repetition_penalty(logits, input_ids, penalty):
    out = logits.clone()
    for i in set(input_ids.tolist()):  # each distinct seen token once
        out[i] = logits[i] / penalty if logits[i] > 0 else logits[i] * penalty
    return out


# the solutions written from the formula; tests/test_exercises.py checks that each checker accepts
# its solution and rejects every mistake it lists
SOLUTIONS = {"repetition_penalty": repetition_penalty}


def test_the_solution_agrees_with_transformers():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(30, generator=g)  # (V,)
    ids = torch.tensor([3, 7, 3, 12, 7, 7, 29])  # (T,)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids[None], logits[None].clone())[0]
    torch.testing.assert_close(repetition_penalty(logits, ids, 1.3), expected, rtol=0, atol=0)


def test_an_unknown_wrong_answer_gets_the_general_hint():
    verdict = check_repetition_penalty(lambda logits, ids, penalty: logits, seed=0, verbose=False)
    assert not verdict and "once each" in verdict.hint

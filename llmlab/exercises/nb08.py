"""Exercise checkers for notebook 08 Decoding: top-p sampling and the repetition penalty."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_repetition_penalty", "check_top_p"]


def _top_p_reference(probs: torch.Tensor, p: float) -> torch.Tensor:
    from llmlab.decoding import top_p_filter

    return torch.softmax(top_p_filter(probs.log()[None], p), dim=-1)[0]  # (V,)


def check_top_p(fn: Callable[[torch.Tensor, float], torch.Tensor], trials: int = 5, seed: int | None = None,
                verbose: bool = True) -> Verdict:
    """fn(probs, p) -> the nucleus distribution: keep the smallest set of most likely tokens whose
    total probability reaches p, zero the rest, renormalize. probs (V,) sums to 1."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        probs = torch.softmax(2 * torch.randn(_randint(g, 5, 50), generator=g), dim=-1)  # (V,)
        cases.append((probs, [0.5, 0.8, 0.9, 0.95][_randint(g, 0, 3)]))
    return _run("top_p", fn, _top_p_reference, cases,
                "sort descending; keep a token while the probability before it is still below p",
                MISTAKES["top_p"], atol=1e-6, verbose=verbose)


def _top_p_exclusive(probs, p):
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(-1) <= p  # drops the token that crosses p
    keep[0] = True
    out = torch.zeros_like(probs).scatter(0, order, sorted_p * keep)
    return out / out.sum()


def _top_p_unnormalized(probs, p):
    sorted_p, order = probs.sort(descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < p
    return torch.zeros_like(probs).scatter(0, order, sorted_p * keep)


def _repetition_penalty_reference(logits: torch.Tensor, input_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    from llmlab.decoding import repetition_penalty

    return repetition_penalty(logits[None], input_ids[None], penalty)[0]  # (V,)


def check_repetition_penalty(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor], trials: int = 5,
                             seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(logits, input_ids, penalty) -> the logits after CTRL's repetition penalty (as transformers'
    RepetitionPenaltyLogitsProcessor): logits (V,) float, input_ids (T,) long (prompt and generated
    tokens, with repeats), penalty > 1."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        v, t = _randint(g, 12, 40), _randint(g, 3, 8)
        ids = torch.randint(0, v, (t,), generator=g)  # (T,)
        ids = torch.cat([ids, ids[: _randint(g, 1, t)]])  # (T',): some tokens occur twice
        cases.append((3 * torch.randn(v, generator=g), ids, [1.2, 1.3, 1.5, 2.0][_randint(g, 0, 3)]))
    return _run("repetition_penalty", fn, _repetition_penalty_reference, cases,
                "only tokens already in input_ids change, once each: positive logits / penalty, "
                "negative logits * penalty", MISTAKES["repetition_penalty"], verbose=verbose)


def _seen(logits, input_ids):
    return torch.zeros(logits.shape, dtype=torch.bool).index_fill(0, input_ids, True)  # (V,)


def _penalty_divide_all(logits, input_ids, penalty):
    return torch.where(_seen(logits, input_ids), logits / penalty, logits)


def _penalty_per_occurrence(logits, input_ids, penalty):
    out = logits.clone()
    for i in input_ids.tolist():  # a token seen twice is penalized twice
        out[i] = out[i] * penalty if out[i] < 0 else out[i] / penalty
    return out


def _penalty_every_token(logits, input_ids, penalty):
    return torch.where(logits < 0, logits * penalty, logits / penalty)



MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "top_p": {
        "exclusive": (_top_p_exclusive, "keep the token that makes the total reach p (the smallest set "
                                        "whose probability is >= p)"),
        "unnormalized": (_top_p_unnormalized, "renormalize the kept probabilities so they sum to 1"),
    },
    "repetition_penalty": {
        "divide_all": (_penalty_divide_all, "dividing a negative logit by the penalty raises it toward 0 and "
                                            "makes the token more likely: multiply negative logits instead"),
        "per_occurrence": (_penalty_per_occurrence, "the penalty applies once per distinct seen token, not once "
                                                    "per occurrence (that is OpenAI's frequency penalty)"),
        "every_token": (_penalty_every_token, "penalize only tokens that occur in input_ids; unseen tokens keep "
                                              "their logits"),
    },
}

"""Exercise checkers for notebook 08 Decoding: top-p sampling."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_top_p"]


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



MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "top_p": {
        "exclusive": (_top_p_exclusive, "keep the token that makes the total reach p (the smallest set "
                                        "whose probability is >= p)"),
        "unnormalized": (_top_p_unnormalized, "renormalize the kept probabilities so they sum to 1"),
    },
}

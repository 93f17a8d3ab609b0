"""Exercise checkers for notebook 06 Mixture of experts: the top-k router and the load-balancing loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_load_balancing_loss", "check_topk_router"]


def _router_cases(g: torch.Generator, trials: int) -> list[tuple[torch.Tensor, int]]:
    """Router logits (N, E) and top_k < E; the first case has k >= 2, where top-1 shortcuts fail."""
    cases = []
    for i in range(trials):
        e = _randint(g, 4, 16)
        k = _randint(g, 2 if i == 0 else 1, 3)
        logits = 2.0 * torch.randn(_randint(g, 3, 24), e, generator=g)  # (N, E)
        cases.append((logits, k))
    return cases


def _topk_router_reference(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    from llmlab.moe import route

    return route(router_logits, top_k)  # weights (N, k), indices (N, k)


def check_topk_router(fn: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]], trials: int = 5,
                      seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(router_logits (N, E), top_k) -> (weights (N, k), expert indices (N, k)), best expert first:
    softmax over the E experts, keep the k largest probabilities, renormalize them to sum to one
    (Mixtral; transformers' ``MixtralTopKRouter``)."""
    return _run("topk_router", fn, _topk_router_reference, _router_cases(_generator(seed), trials),
                "softmax over the experts (last axis), torch.topk of the probabilities, then divide the k "
                "weights by their sum", MISTAKES["topk_router"], verbose=verbose)


def _route_no_renormalize(logits, k):
    return torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)  # raw probabilities (N, k)


def _route_softmax_over_tokens(logits, k):
    weights, indices = torch.topk(torch.softmax(logits.float(), dim=0), k, dim=-1)  # (N, k) each
    return weights / weights.sum(dim=-1, keepdim=True), indices


def _route_normalized_logits(logits, k):
    weights, indices = torch.topk(logits.float(), k, dim=-1)  # (N, k) each
    return weights / weights.sum(dim=-1, keepdim=True), indices


def _load_balancing_loss_reference(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    from llmlab.moe import load_balancing_loss

    return load_balancing_loss(router_logits, top_k)  # ()


def check_load_balancing_loss(fn: Callable[[torch.Tensor, int], torch.Tensor], trials: int = 5,
                              seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(router_logits (N, E), top_k) -> the Switch Transformer auxiliary loss E * sum_e f_e * P_e as a
    0-d tensor: f_e = top-k assignments to expert e / N (so sum_e f_e = k), P_e = mean router
    probability of e (transformers' ``load_balancing_loss_func`` for one layer)."""
    return _run("load_balancing_loss", fn, _load_balancing_loss_reference, _router_cases(_generator(seed), trials),
                "E * sum_e f_e * P_e as a 0-d tensor: f_e = (top-k assignments to e) / N from counts, "
                "P_e = softmax probabilities averaged over the N tokens", MISTAKES["load_balancing_loss"],
                verbose=verbose)


def _balance_terms(logits, k, first_only=False):
    probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
    idx = torch.topk(probs, k, dim=-1).indices[:, :1] if first_only else torch.topk(probs, k, dim=-1).indices
    f = F.one_hot(idx, logits.shape[-1]).float().sum(dim=1).mean(dim=0)  # (E,): assignments per token
    return f, probs.mean(dim=0)  # (E,), (E,)


def _balance_probs_twice(logits, k):
    _, p = _balance_terms(logits, k)
    return logits.shape[-1] * (p * p).sum()


def _balance_no_factor(logits, k):
    f, p = _balance_terms(logits, k)
    return (f * p).sum()


def _balance_first_choice(logits, k):
    f, p = _balance_terms(logits, k, first_only=True)
    return logits.shape[-1] * (f * p).sum()


MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "topk_router": {
        "no_renormalize": (_route_no_renormalize,
                           "the k weights are the top-k probabilities divided by their sum, so they sum to one "
                           "(Mixtral renormalizes; only Switch's top-1 keeps the raw probability)"),
        "softmax_over_tokens": (_route_softmax_over_tokens,
                                "the softmax runs over the experts of each token (dim=-1), not over the tokens"),
        "normalized_logits": (_route_normalized_logits,
                              "divide top-k probabilities (after the softmax) by their sum, not the raw logits"),
    },
    "load_balancing_loss": {
        "probs_twice": (_balance_probs_twice,
                        "f_e counts the tokens routed to e (top-k assignments / N); you used the mean "
                        "probability P_e in its place, so the loss is E * sum P_e^2"),
        "no_factor": (_balance_no_factor,
                      "multiply by the number of experts E, so a balanced router scores k at any E"),
        "first_choice": (_balance_first_choice,
                         "count all k choices of each token in f_e (sum_e f_e = k), not only the first"),
    },
}

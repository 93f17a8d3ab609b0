"""Exercise checkers for notebook 18 Evaluation: the unbiased pass@k estimator and corpus perplexity
from token log-probabilities."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_corpus_perplexity", "check_pass_at_k"]


def _pass_at_k_reference(n: int, c: int, k: int) -> float:
    from llmlab.metrics import pass_at_k

    return pass_at_k(n, c, k)


def check_pass_at_k(fn: Callable[[int, int, int], float], trials: int = 6, seed: int | None = None,
                    verbose: bool = True) -> Verdict:
    """fn(n, c, k) -> the unbiased pass@k estimate (Chen et al. 2021) from n samples of one problem,
    c of which pass its unit tests, for 1 < k <= n."""
    g = _generator(seed)
    cases = []
    for i in range(max(trials, 2)):
        n = _randint(g, 5, 200)
        c = _randint(g, 1, n - 1) if i % 2 else _randint(g, 1, max(1, n // 10))  # often a hard problem
        cases.append((n, c, _randint(g, 2, n)))
    return _run("pass_at_k", fn, _pass_at_k_reference, cases,
                "1 - C(n - c, k) / C(n, k): one minus the chance that a random k-subset of the n samples "
                "holds no correct one", MISTAKES["pass_at_k"], verbose=verbose)


def _corpus_perplexity_reference(log_probs: list[torch.Tensor]) -> float:
    from llmlab.metrics import NLLResult

    tokens = sum(lp.numel() for lp in log_probs)
    nats = -sum(float(lp.double().sum()) for lp in log_probs)
    return NLLResult(total_nats=nats, num_tokens=tokens, num_bytes=tokens, num_chars=tokens).perplexity


def _token_log_probs(g: torch.Generator, sentences: int) -> list[torch.Tensor]:
    """Per-token natural-log probabilities of sentences of very different lengths, one (T_i,) each."""
    out = []
    for _ in range(sentences):
        logits = torch.randn(_randint(g, 1, 40), 8, generator=g) * (0.5 + 2.5 * torch.rand(1, generator=g))
        targets = torch.randint(0, 8, (logits.shape[0],), generator=g)
        out.append(torch.log_softmax(logits, dim=-1)[torch.arange(logits.shape[0]), targets])  # (T_i,)
    return out


def check_corpus_perplexity(fn: Callable[[list[torch.Tensor]], float], trials: int = 5,
                            seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(log_probs) -> the perplexity of a corpus: log_probs is a list with one (T_i,) tensor per
    sentence of log p(token | prefix) in nats. A 0-dim tensor result is read as a float."""
    if not callable(fn):
        raise TypeError(f"fn must be the function to check, got {type(fn).__name__}")
    g = _generator(seed)
    cases = [(_token_log_probs(g, _randint(g, 2, 6)),) for _ in range(trials)]

    def as_float(log_probs):
        out = fn([lp.clone() for lp in log_probs])  # the learner cannot edit the inputs in place
        return float(out) if isinstance(out, torch.Tensor) and out.dim() == 0 else out

    return _run("corpus_perplexity", as_float, _corpus_perplexity_reference, cases,
                "exp(total negative log-likelihood / total number of tokens), over the whole corpus",
                MISTAKES["corpus_perplexity"], verbose=verbose)


def _sentence_nll(log_probs):
    return [-float(lp.double().mean()) for lp in log_probs]


def _corpus_nll_per_token(log_probs):
    return -sum(float(lp.double().sum()) for lp in log_probs) / sum(lp.numel() for lp in log_probs)


MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "pass_at_k": {
        "plug_in": (lambda n, c, k: 1.0 - (1.0 - c / n) ** k,
                    "1 - (1 - c/n)^k is the plug-in estimate, biased low (Jensen: 1 - (1 - x)^k is "
                    "concave); count k-subsets instead: 1 - C(n - c, k) / C(n, k)"),
        "pass_at_1": (lambda n, c, k: c / n, "c/n is pass@1; with k tries the chance that one passes is higher"),
    },
    "corpus_perplexity": {
        "mean_of_perplexities": (lambda lps: sum(math.exp(x) for x in _sentence_nll(lps)) / len(lps),
                                 "average the log-likelihood over all tokens first, then exponentiate; the "
                                 "mean of per-sentence perplexities is a different number"),
        "sentence_weighted": (lambda lps: math.exp(sum(_sentence_nll(lps)) / len(lps)),
                              "every token counts once: divide the total NLL by the number of tokens, not "
                              "the mean per-sentence NLL by the number of sentences"),
        "base_2": (lambda lps: 2.0 ** _corpus_nll_per_token(lps),
                   "the log-probs are natural logs (nats): perplexity is e^NLL, not 2^NLL (2^x is for bits)"),
        "sign": (lambda lps: math.exp(-_corpus_nll_per_token(lps)),
                 "exponentiate the negative log-likelihood (minus the mean log-prob): perplexity is >= 1"),
    },
}


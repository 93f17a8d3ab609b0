"""Exercise checkers for notebook 11 LoRA: merging an adapter."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_lora_merge"]


def _lora_merge_reference(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, r: int):
    return w + (alpha / r) * (b @ a)  # (out, in): W + (alpha / r) B A, Hu et al. 2021 section 4.1


def check_lora_merge(fn: Callable[..., torch.Tensor], trials: int = 5, seed: int | None = None,
                     verbose: bool = True) -> Verdict:
    """fn(W, A, B, alpha, r) -> the merged weight; W (out, in), A (r, in), B (out, r)."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        out_f, in_f, r = _randint(g, 4, 24), _randint(g, 4, 24), 2 ** _randint(g, 0, 3)
        cases.append((torch.randn(out_f, in_f, generator=g), torch.randn(r, in_f, generator=g),
                      torch.randn(out_f, r, generator=g), float(2 ** _randint(g, 0, 6)), r))
    return _run("lora_merge", fn, _lora_merge_reference, cases,
                "the update is B A (out x r times r x in), scaled by alpha / r", MISTAKES["lora_merge"],
                verbose=verbose)



MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "lora_merge": {
        "no_rank_division": (lambda w, a, b, alpha, r: w + alpha * (b @ a), "the scale is alpha / r, not alpha"),
        "unscaled": (lambda w, a, b, alpha, r: w + b @ a, "multiply B A by alpha / r"),
    },
}

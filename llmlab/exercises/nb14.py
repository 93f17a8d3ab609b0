"""Exercise checkers for notebook 14 Quantization."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_absmax_quantize", "check_per_channel_quantize"]


def _absmax_reference(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    from llmlab.quantization import absmax_quantize

    q, scale = absmax_quantize(x, bits=bits)
    return q, scale


def check_absmax_quantize(fn: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]], trials: int = 5,
                          seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(x, bits) -> (q, scale), symmetric per-tensor quantization: scale = max|x| / (2^(bits-1) - 1),
    q = round(x / scale) as integers."""
    g = _generator(seed)
    cases = [(torch.randn(_randint(g, 2, 8), _randint(g, 2, 8), generator=g) * 3, _randint(g, 3, 8))
             for _ in range(trials)]
    return _run("absmax_quantize", fn, _absmax_reference, cases,
                "the largest magnitude maps to 2^(bits-1) - 1 (127 for 8 bits); round to nearest",
                MISTAKES["absmax_quantize"], verbose=verbose)


def _per_channel_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from llmlab.quantization import absmax_quantize

    return absmax_quantize(w, dim=1, bits=8)  # scale (out, 1)


def check_per_channel_quantize(fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], trials: int = 5,
                               seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(w) -> (q int8, scale (out, 1)): 8-bit absmax quantization of a weight (out, in) with one
    scale per output channel (row)."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        w = torch.randn(_randint(g, 3, 10), _randint(g, 3, 10), generator=g)  # (out, in)
        w = w * torch.logspace(-2, 1, w.shape[0]).unsqueeze(1)  # rows of very different ranges
        cases.append((w,))
    return _run("per_channel_quantize", fn, _per_channel_reference, cases,
                "one scale per row: the max over the input dimension (dim=1), kept as a column",
                MISTAKES["per_channel_quantize"], verbose=verbose)


def _absmax_wrong_levels(x, bits):
    scale = x.abs().max() / 2 ** (bits - 1)  # 128 levels for 8 bits: +max does not fit
    return torch.round(x / scale).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).to(torch.int8), scale


def _absmax_truncate(x, bits):
    scale = x.abs().max().clamp_min(torch.finfo(torch.float32).tiny) / (2 ** (bits - 1) - 1)
    return torch.trunc(x / scale).to(torch.int8), scale


def _absmax_of_max(x, bits):
    scale = x.max() / (2 ** (bits - 1) - 1)  # the largest value, not the largest magnitude
    return torch.round(x / scale).clamp(-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1).to(torch.int8), scale


def _per_tensor(w):
    from llmlab.quantization import absmax_quantize

    q, s = absmax_quantize(w, bits=8)
    return q, s.expand(w.shape[0], 1)


def _per_input_column(w):
    from llmlab.quantization import absmax_quantize

    return absmax_quantize(w, dim=0, bits=8)



MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "absmax_quantize": {
        "levels": (_absmax_wrong_levels, "divide by 2^(bits-1) - 1 (127), not 2^(bits-1): the range is symmetric"),
        "truncate": (_absmax_truncate, "round to nearest, do not truncate toward zero"),
        "max_not_absmax": (_absmax_of_max, "use the largest magnitude max|x|, not the largest value"),
    },
    "per_channel_quantize": {
        "per_tensor": (_per_tensor, "one scale for the whole matrix is per-tensor: take the max per row"),
        "per_column": (_per_input_column,
                       "you took one scale per input column (dim=0); output channels are the rows (dim=1)"),
    },
}

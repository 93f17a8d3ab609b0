"""Shape letters and argument checks shared by every llmlab module.

Every line in llmlab that creates or reshapes a tensor carries a shape comment such as
``# (B, H, T, D)``. The letters mean the same thing everywhere; they are defined here, once.
Public entry points validate their inputs with the helpers below, so that bad input raises a
``TypeError`` or ``ValueError`` naming the argument, what was expected and what was given,
instead of a broadcasting error deep inside a matmul or a silent NaN.
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral, Real

import torch

SHAPE_LETTERS: dict[str, str] = {
    "B": "batch size",
    "T": "time: query / sequence positions",
    "S": "source: key / value positions when they differ from T (cached decoding)",
    "C": "channels: model width (hidden size)",
    "H": "attention (query) heads",
    "K": "key / value heads (K = H for MHA, 1 for MQA, 1 < K < H for GQA)",
    "D": "head dimension (C = H * D)",
    "F": "feed-forward hidden width",
    "V": "vocabulary size",
    "E": "experts in a mixture-of-experts layer",
    "R": "rank of a low-rank (LoRA) update",
    "N": "a flattened count of items (tokens, blocks, positions)",
}


def _fmt_shape(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_tensor(name: str, x: object, ndim: int | tuple[int, ...] | None = None, layout: str = "") -> None:
    """Raise unless ``x`` is a tensor with ``ndim`` dimensions (an int or a tuple of allowed ints).

    ``layout`` is the expected shape in shape letters, e.g. ``"(B, H, T, D)"``; it goes in the message.

    >>> check_tensor("x", torch.zeros(2, 3), ndim=2, layout="(T, C)")
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}".rstrip() + f", got {type(x).__name__}")
    if ndim is None:
        return
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.dim() not in allowed:
        want = " or ".join(str(a) for a in allowed)
        raise ValueError(
            f"{name} must have {want} dimensions {layout}".rstrip()
            + f", got {x.dim()} dimensions with shape {_fmt_shape(x.shape)}"
        )


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """Return ``value`` as an int; raise unless it is an integer (not bool) and at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_float(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float; raise unless it is a finite real number in the given interval.

    ``low_open=True`` excludes ``low`` itself (e.g. a base that must be > 0).

    >>> check_float("top_p", 0.9, 0.0, 1.0, low_open=True)
    0.9
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    left = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
    right = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
    ok = v == v and abs(v) != float("inf")
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        raise ValueError(f"{name} must be a finite number in {left}, {right}, got {value!r}")
    return v


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in options)}; got {value!r}")


def check_module(name: str, model: object) -> None:
    """Raise ``TypeError`` naming the argument unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool = False, is_causal: bool = False
) -> int:
    """Validate q (B, H, T, D), k and v (B, K, S, D) for the attention kernels of ``llmlab.attention``
    and ``llmlab.flash_attention``; return n_rep = G = H / K (query heads per key/value head)."""
    check_tensor("q", q, ndim=4, layout="(B, H, T, D)")
    check_tensor("k", k, ndim=4, layout="(B, K, S, D)")
    check_tensor("v", v, ndim=4, layout="(B, K, S, D)")
    if not (q.is_floating_point() and k.dtype == q.dtype and v.dtype == q.dtype):
        raise TypeError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, K, S, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch B and head dim D")
    if min(q.shape[2], k.shape[2], q.shape[-1]) < 1:
        raise ValueError(f"T, S and D must be >= 1, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    h, kv = q.shape[1], k.shape[1]
    if h != kv and not enable_gqa:
        raise ValueError(f"q has {h} heads but k/v have {kv}; pass enable_gqa=True for grouped-query attention")
    if h % kv:
        raise ValueError(f"the number of query heads H={h} must be a multiple of key/value heads K={kv}")
    if is_causal and q.shape[2] > k.shape[2]:
        raise ValueError(
            f"is_causal needs T <= S (queries are the last T of S positions), got T={q.shape[2]} > S={k.shape[2]}"
        )
    return h // kv

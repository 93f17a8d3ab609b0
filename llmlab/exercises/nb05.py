"""Exercise checkers for notebook 05 Norms and activations: RMSNorm and SwiGLU."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_rmsnorm", "check_swiglu"]


def _rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from llmlab.norms import RMSNorm

    norm = RMSNorm(x.shape[-1], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)  # (..., C)


def check_rmsnorm(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor], trials: int = 5,
                  seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(x, weight, eps) -> x / sqrt(mean(x^2 over the last axis) + eps) * weight."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        c = _randint(g, 4, 32)
        x = 0.3 * torch.randn(_randint(g, 1, 3), _randint(g, 1, 5), c, generator=g) + 0.5  # (B, T, C)
        cases.append((x, torch.rand(c, generator=g) + 0.5, [1e-2, 1e-1, 0.3][_randint(g, 0, 2)]))
    return _run("rmsnorm", fn, _rmsnorm_reference, cases,
                "no mean subtraction and no bias; eps goes inside the square root", MISTAKES["rmsnorm"],
                verbose=verbose)


def _swiglu_reference(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
    from llmlab.ffn import SwiGLUMLP

    mlp = SwiGLUMLP(x.shape[-1], w_gate.shape[0])
    with torch.no_grad():
        for layer, w in ((mlp.gate_proj, w_gate), (mlp.up_proj, w_up), (mlp.down_proj, w_down)):
            layer.weight.copy_(w)
        return mlp(x)  # (B, T, C)


def check_swiglu(fn: Callable[..., torch.Tensor], trials: int = 5, seed: int | None = None,
                 verbose: bool = True) -> Verdict:
    """fn(x, w_gate, w_up, w_down) -> down(SiLU(x W_gate^T) * (x W_up^T)); weights in nn.Linear's
    (out, in) layout: w_gate and w_up (F, C), w_down (C, F)."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        c, f = _randint(g, 4, 16), _randint(g, 8, 40)
        x = torch.randn(_randint(g, 1, 2), _randint(g, 1, 5), c, generator=g)  # (B, T, C)
        cases.append((x, torch.randn(f, c, generator=g), torch.randn(f, c, generator=g),
                      torch.randn(c, f, generator=g)))
    return _run("swiglu", fn, _swiglu_reference, cases,
                "the gate branch goes through SiLU (x * sigmoid(x)); multiply it elementwise with the up branch",
                MISTAKES["swiglu"], verbose=verbose)



MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "rmsnorm": {
        "layernorm": (lambda x, w, eps: F.layer_norm(x, x.shape[-1:], w, None, eps),
                      "that is LayerNorm: RMSNorm does not subtract the mean"),
        "eps_outside": (lambda x, w, eps: x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * w,
                        "eps goes inside the square root: sqrt(mean(x^2) + eps)"),
        "no_weight": (lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps),
                      "multiply by the learned weight (gain) at the end"),
    },
    "swiglu": {
        "silu_on_up": (lambda x, wg, wu, wd: (x @ wg.T * F.silu(x @ wu.T)) @ wd.T,
                       "SiLU goes on the gate branch (w_gate), not on the up branch"),
        "gelu": (lambda x, wg, wu, wd: (F.gelu(x @ wg.T) * (x @ wu.T)) @ wd.T,
                 "that is GeGLU: SwiGLU uses SiLU (Swish with beta = 1)"),
        "no_gate": (lambda x, wg, wu, wd: F.silu(x @ wg.T) @ wd.T,
                    "multiply the activated gate by the up projection before w_down"),
    },
}

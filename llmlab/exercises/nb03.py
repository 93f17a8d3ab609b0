"""Exercise checkers for notebook 03 Positional encodings: RoPE."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_rope"]


def _rope_reference(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    from llmlab.positional import apply_rope, rope_cos_sin

    cos, sin = rope_cos_sin(positions, x.shape[-1], base)  # (T, D) each
    return apply_rope(x, cos, sin)  # (B, H, T, D)


def check_rope(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor], trials: int = 5,
               seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(x, positions, base) -> x rotated by RoPE, x (B, H, T, D), positions (T,): channel i is
    paired with channel i + D/2 (the LLaMA / transformers layout) and pair i turns by p * base^(-2i/D)."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        d = 2 * _randint(g, 2, 16)
        t = _randint(g, 2, 9)
        x = torch.randn(_randint(g, 1, 2), _randint(g, 1, 3), t, d, generator=g)  # (B, H, T, D)
        positions = torch.randint(0, 512, (t,), generator=g)  # (T,)
        cases.append((x, positions, float(10 ** _randint(g, 2, 5))))
    return _run("rope", fn, _rope_reference, cases,
                "cos/sin of p * base^(-2i/D) for i < D/2, applied as x*cos + rotate_half(x)*sin",
                MISTAKES["rope"], rtol=1e-3, atol=1e-3, verbose=verbose)


def _rope_interleaved(x, positions, base):
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)  # (D/2,)
    ang = positions.float()[:, None] * inv  # (T, D/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # pairs (2i, 2i+1): GPT-J / Meta's complex layout
    out = torch.stack((x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()), dim=-1)
    return out.flatten(-2)  # (B, H, T, D)


def _rope_half(x, positions, base, exponent_scale=1.0, sign=1.0):
    d = x.shape[-1]
    inv = base ** (-exponent_scale * torch.arange(0, d, 2, dtype=torch.float32) / d)  # (D/2,)
    ang = sign * positions.float()[:, None] * inv  # (T, D/2)
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)  # (T, D)
    rot = torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)
    return x * cos + rot * sin



MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "rope": {
        "interleaved": (_rope_interleaved,
                        "you paired channels (2i, 2i+1); LLaMA in transformers pairs i with i + D/2 (rotate_half)"),
        "exponent": (lambda x, pos, base: _rope_half(x, pos, base, exponent_scale=0.5),
                     "the frequency of pair i is base^(-2i/D): check the exponent"),
        "sign": (lambda x, pos, base: _rope_half(x, pos, base, sign=-1.0),
                 "you rotate by -p*w: the rotation is x*cos + rotate_half(x)*sin with rotate_half = (-x2, x1)"),
    },
}

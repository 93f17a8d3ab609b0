"""Exercise checkers for notebook 03 Positional encodings: RoPE and the ALiBi bias."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_alibi_bias", "check_rope"]


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

def _alibi_bias_reference(num_heads: int, seq_len: int) -> torch.Tensor:
    from llmlab.attention import causal_mask
    from llmlab.positional import alibi_bias

    bias = alibi_bias(num_heads, seq_len)  # (H, T, T): -m_h |i - j|
    return bias.masked_fill(~causal_mask(seq_len), float("-inf"))  # (H, T, T)


def check_alibi_bias(fn: Callable[[int, int], torch.Tensor], trials: int = 5, seed: int | None = None,
                     verbose: bool = True) -> Verdict:
    """fn(num_heads, seq_len) -> the causal ALiBi bias (H, T, T): -m_h * (i - j) for key j <= query i,
    -inf for j > i, with slopes m_h as in ``llmlab.positional.alibi_slopes`` (BLOOM's rule)."""
    g = _generator(seed)
    # the first head count is not a power of two (and not 8), where the slope rules part ways
    cases = [([3, 5, 6, 7, 10, 12, 20, 24][_randint(g, 0, 7)], _randint(g, 2, 9))]
    cases += [(_randint(g, 1, 16), _randint(g, 2, 9)) for _ in range(trials - 1)]
    return _run("alibi_bias", fn, _alibi_bias_reference, cases,
                "slopes 2^(-8h/n) for the n = largest power of two <= H heads, then every other slope of the "
                "2n sequence; bias -m_h * (i - j), -inf for future keys", MISTAKES["alibi_bias"], verbose=verbose)


def _alibi_with(num_heads, seq_len, slopes, sign=-1.0, masked=True):
    i = torch.arange(seq_len)  # (T,)
    distance = (i[:, None] - i[None, :]).float()  # (T, T): i - j
    bias = sign * slopes[:, None, None] * distance.abs()  # (H, T, T)
    return bias.masked_fill(distance < 0, float("-inf")) if masked else bias


def _slopes_bloom(h):
    n = 2 ** math.floor(math.log2(h))
    extra = 2.0 ** (-4.0 * torch.arange(1, 2 * (h - n), 2) / n)  # (H - n,): odd steps of the 2n sequence
    return torch.cat([2.0 ** (-8.0 * torch.arange(1, n + 1) / n), extra])  # (H,)


MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "rope": {
        "interleaved": (_rope_interleaved,
                        "you paired channels (2i, 2i+1); LLaMA in transformers pairs i with i + D/2 (rotate_half)"),
        "exponent": (lambda x, pos, base: _rope_half(x, pos, base, exponent_scale=0.5),
                     "the frequency of pair i is base^(-2i/D): check the exponent"),
        "sign": (lambda x, pos, base: _rope_half(x, pos, base, sign=-1.0),
                 "you rotate by -p*w: the rotation is x*cos + rotate_half(x)*sin with rotate_half = (-x2, x1)"),
    },
    "alibi_bias": {
        "sign": (lambda h, t: _alibi_with(h, t, _slopes_bloom(h), sign=1.0),
                 "the bias is a penalty: -m_h * (i - j), more negative the farther back the key"),
        "geometric_in_h": (lambda h, t: _alibi_with(h, t, 2.0 ** (-8.0 * torch.arange(1, h + 1) / h)),
                           "2^(-8h/H) holds only when H is a power of two; otherwise take the n = largest "
                           "power of two below H slopes, then every other slope of the 2n-head sequence"),
        "eight_head_slopes": (lambda h, t: _alibi_with(h, t, 2.0 ** -torch.arange(1.0, h + 1)),
                              "1/2, 1/4, ..., 1/256 are the slopes for 8 heads only: the ratio is 2^(-8/n)"),
        "no_mask": (lambda h, t: _alibi_with(h, t, _slopes_bloom(h), masked=False),
                    "a decoder's keys j > i are masked: put -inf above the diagonal"),
    },
}

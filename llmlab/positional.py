"""Positional encodings: sinusoidal, learned, rotary (RoPE, with PI and NTK scaling) and ALiBi.

What it implements
- ``sinusoidal_encoding``: the fixed absolute encoding of "Attention Is All You Need" (Vaswani et
  al. 2017, section 3.5), sin on even channels and cos on odd channels, and
  ``sinusoidal_shift_matrix``, the fixed linear map that moves any encoding m positions on.
- ``LearnedPositionalEmbedding``: a trained table of absolute positions (GPT-2's ``wpe``); it has no
  row past its length, so it cannot extrapolate at all.
- RoPE (Su et al. 2021, RoFormer): ``rope_cos_sin`` and ``apply_rope`` in the half-split layout
  of transformers' ``LlamaRotaryEmbedding`` / ``apply_rotary_pos_emb``. Channel i is rotated
  together with channel i + D/2 (Meta's original LLaMA code pairs neighbours 2i, 2i+1 instead;
  the two layouts differ only by a fixed permutation of the q and k projection rows). Scaling for
  longer inputs: linear position interpolation (Chen et al. 2023), static NTK-aware scaling of the
  base (bloc97, 2023) and dynamic NTK scaling as in transformers' ``dynamic`` rope type.
- ALiBi (Press et al. 2022): ``alibi_slopes`` (with the paper's rule for head counts that are not
  powers of two, as in BLOOM) and ``alibi_bias``, the per-head linear distance penalty added to
  attention scores.

What it leaves out: T5's bucketed relative bias, YaRN and LongRoPE, xPos, and partial rotary
dimensions. Tensors follow the shape letters of ``llmlab.shapes``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmlab.shapes import check_choice, check_float, check_int, check_tensor

ROPE_SCALINGS = ("none", "linear", "ntk", "dynamic")


def _positions_tensor(positions: int | torch.Tensor, name: str = "positions") -> torch.Tensor:
    """Accept a count (-> arange) or an integer tensor of positions; return it as a tensor."""
    if isinstance(positions, torch.Tensor):
        check_tensor(name, positions, ndim=(1, 2), layout="(T,) or (B, T)")
        if positions.is_floating_point() or positions.is_complex():
            raise TypeError(f"{name} must hold integer positions, got dtype {positions.dtype}")
        if positions.numel() and int(positions.min()) < 0:
            raise ValueError(f"{name} must be >= 0, got minimum {int(positions.min())}")
        return positions
    count = check_int(name, positions, minimum=0)
    return torch.arange(count)  # (T,)


def _even_dim(name: str, dim: int) -> int:
    dim = check_int(name, dim, minimum=2)
    if dim % 2:
        raise ValueError(f"{name} must be even (channels are used in pairs), got {dim}")
    return dim


# ----------------------------------------------------------------------------------------------
# Sinusoidal (absolute, fixed)


def sinusoidal_encoding(positions: int | torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(p / base^(2i/dim)).

    positions: a count T (meaning 0..T-1) or an integer tensor (T,); returns (T, C) with C = dim.

    >>> sinusoidal_encoding(128, 64).shape
    torch.Size([128, 64])
    """
    pos = _positions_tensor(positions)
    check_tensor("positions", pos, ndim=1, layout="(T,)")
    dim = _even_dim("dim", dim)
    base = check_float("base", base, low=0.0, low_open=True)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (C/2,)
    angles = pos.to(torch.float64)[:, None] * inv_freq[None, :]  # (T, C/2)
    pe = torch.empty(pos.numel(), dim, dtype=torch.float64)  # (T, C)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles)
    return pe.to(torch.float32)


def sinusoidal_shift_matrix(offset: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The (C, C) matrix M with PE[p + offset] = M @ PE[p] for every p (block-diagonal rotations).

    Each (sin, cos) channel pair of frequency w is a point on a circle; moving ``offset``
    positions on rotates it by the angle ``offset * w``, whatever p is.
    """
    offset = check_int("offset", offset)
    dim = _even_dim("dim", dim)
    base = check_float("base", base, low=0.0, low_open=True)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (C/2,)
    c, s = torch.cos(offset * inv_freq), torch.sin(offset * inv_freq)  # (C/2,)
    m = torch.zeros(dim, dim, dtype=torch.float64)  # (C, C)
    i = torch.arange(0, dim, 2)
    # sin(a + b) = sin a cos b + cos a sin b;  cos(a + b) = cos a cos b - sin a sin b
    m[i, i], m[i, i + 1] = c, s
    m[i + 1, i], m[i + 1, i + 1] = -s, c
    return m.to(torch.float32)


# ----------------------------------------------------------------------------------------------
# Learned (absolute, trained)


class LearnedPositionalEmbedding(nn.Module):
    """A trainable (max_positions, C) table, GPT-2's ``wpe``: row p is the vector for position p.

    >>> wpe = LearnedPositionalEmbedding(max_positions=64, dim=32)
    >>> wpe(torch.arange(10)).shape
    torch.Size([10, 32])
    """

    def __init__(self, max_positions: int, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.max_positions = check_int("max_positions", max_positions, minimum=1)
        dim = check_int("dim", dim, minimum=1)
        self.weight = nn.Parameter(torch.randn(self.max_positions, dim) * init_std)  # (N, C)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (T,) or (B, T) integers -> (T, C) or (B, T, C)."""
        pos = _positions_tensor(positions)
        if pos.numel() and int(pos.max()) >= self.max_positions:
            raise ValueError(
                f"positions must be < max_positions={self.max_positions} (a learned table has no row "
                f"for later positions, so it cannot extrapolate), got position {int(pos.max())}"
            )
        return self.weight[pos]  # (..., T, C)


# ----------------------------------------------------------------------------------------------
# RoPE (rotary)


def rope_inv_freq(
    head_dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Rotation frequencies w_i = base^(-2i/D), i = 0..D/2-1: fast pairs first, slow pairs last. (D/2,)"""
    head_dim = _even_dim("head_dim", head_dim)
    base = check_float("base", base, low=0.0, low_open=True)
    # In float32 this is the same arithmetic as transformers, so cos/sin agree with it exactly.
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(dtype) / head_dim  # (D/2,)
    return 1.0 / (base**exponent)


def ntk_scaled_base(base: float, factor: float, head_dim: int) -> float:
    """NTK-aware base: base * factor^(D/(D-2)). The slowest pair then turns ``factor`` times slower
    (its wavelength covers ``factor`` times more positions) while the fastest pair stays almost
    unchanged, so local order is kept sharp and long distances are interpolated."""
    head_dim = _even_dim("head_dim", head_dim)
    return base * factor ** (head_dim / (head_dim - 2))


def rope_cos_sin(
    positions: int | torch.Tensor,
    head_dim: int,
    base: float = 10000.0,
    *,
    scaling: str = "none",
    factor: float = 1.0,
    max_position: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE angles p * w_i, each duplicated to D channels (half-split layout).

    positions: a count T or integer positions (T,) / (B, T). Returns ``(cos, sin)``, each (T, D) or
    (B, T, D). ``scaling`` extends the usable context by ``factor``:
    - ``"linear"``: position interpolation, angles (p / factor) * w_i;
    - ``"ntk"``: static NTK-aware scaling, base -> ``ntk_scaled_base(base, factor, D)``;
    - ``"dynamic"``: NTK scaling whose strength follows the current length L = max(p) + 1 once it
      passes the training length ``max_position``: base * (factor * L / max_position - factor + 1)^(D/(D-2)).

    >>> cos, sin = rope_cos_sin(16, head_dim=8)
    >>> cos.shape
    torch.Size([16, 8])
    """
    pos = _positions_tensor(positions)
    check_choice("scaling", scaling, ROPE_SCALINGS)
    factor = check_float("factor", factor, low=1.0)
    base = check_float("base", base, low=0.0, low_open=True)
    head_dim = _even_dim("head_dim", head_dim)
    if scaling == "ntk":
        base = ntk_scaled_base(base, factor, head_dim)
    elif scaling == "dynamic":
        if max_position is None:
            raise ValueError("max_position (the training context length) is required for scaling='dynamic'")
        max_position = check_int("max_position", max_position, minimum=1)
        length = int(pos.max()) + 1 if pos.numel() else 0
        if length > max_position:
            stretch = factor * length / max_position - (factor - 1)
            base = base * stretch ** (head_dim / (head_dim - 2))
    # Angles are computed in float64 only when float64 output is asked for (precise checks);
    # otherwise in float32, like transformers.
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = rope_inv_freq(head_dim, base, dtype=work, device=pos.device)  # (D/2,) on the positions' device
    if scaling == "linear":
        inv_freq = inv_freq / factor  # same as dividing the positions by `factor`
    angles = pos.to(work)[..., None] * inv_freq  # (..., T, D/2)
    emb = torch.cat((angles, angles), dim=-1)  # (..., T, D): channel i and i + D/2 share an angle
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension: a 90-degree turn per pair."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., D/2) each
    return torch.cat((-x2, x1), dim=-1)  # (..., D)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (i, i + D/2) of x by its angle: x * cos + rotate_half(x) * sin.

    x: (B, H, T, D) queries or keys; cos, sin: (T, D) or (B, T, D) from ``rope_cos_sin``.
    Returns (B, H, T, D). Rotations keep norms, and q_m . k_n then depends on m - n only.

    >>> cos, sin = rope_cos_sin(5, head_dim=8)
    >>> apply_rope(torch.randn(2, 3, 5, 8), cos, sin).shape
    torch.Size([2, 3, 5, 8])
    """
    check_tensor("x", x, ndim=4, layout="(B, H, T, D)")
    check_tensor("cos", cos, ndim=(2, 3), layout="(T, D) or (B, T, D)")
    check_tensor("sin", sin, ndim=(2, 3), layout="(T, D) or (B, T, D)")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    _, _, t, d = x.shape
    if d % 2:
        raise ValueError(f"x's head dimension D must be even for RoPE, got D={d}")
    if cos.shape[-2:] != (t, d):
        raise ValueError(
            f"cos/sin must end in (T, D) = ({t}, {d}) to match x of shape {tuple(x.shape)}, "
            f"got {tuple(cos.shape)}"
        )
    if cos.dim() == 3:
        if cos.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"cos/sin batch size {cos.shape[0]} does not match x's batch size {x.shape[0]}")
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): one angle set for every head
    return x * cos + rotate_half(x) * sin  # (B, H, T, D)


# ----------------------------------------------------------------------------------------------
# ALiBi (attention bias)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head slopes m_h: a geometric sequence 2^(-8/n), 2^(-16/n), ... for n heads. (H,)

    For n not a power of two, take the 2^k = largest power of two below n slopes, then fill the rest
    with every other slope of the 2^(k+1)-head sequence (the rule of the ALiBi code, used by BLOOM).
    """
    num_heads = check_int("num_heads", num_heads, minimum=1)
    closest = 2 ** math.floor(math.log2(num_heads))
    ratio = 2.0 ** (-8.0 / closest)
    slopes = ratio ** torch.arange(1, closest + 1, dtype=torch.float64)  # (closest,)
    if closest < num_heads:
        extra_ratio = 2.0 ** (-4.0 / closest)  # the ratio of the 2 * closest sequence
        odd = torch.arange(1, 2 * (num_heads - closest), 2, dtype=torch.float64)  # (H - closest,)
        slopes = torch.cat([slopes, extra_ratio**odd])  # (H,)
    return slopes.to(torch.float32)


def alibi_bias(num_heads: int, q_len: int, k_len: int | None = None) -> torch.Tensor:
    """Additive attention bias -m_h * |i - j| for query position i and key position j. (H, T, S)

    Queries are the last ``q_len`` of the ``k_len`` positions (as in cached decoding), so query row
    r sits at position r + k_len - q_len. On the causal region (j <= i) this is the paper's
    -m_h * (i - j); combine it with a causal mask for a decoder.

    >>> alibi_bias(4, q_len=3).shape
    torch.Size([4, 3, 3])
    """
    q_len = check_int("q_len", q_len, minimum=1)
    k_len = q_len if k_len is None else check_int("k_len", k_len, minimum=1)
    if q_len > k_len:
        raise ValueError(f"q_len must be <= k_len (queries are the last positions), got {q_len} > {k_len}")
    slopes = alibi_slopes(num_heads)  # (H,)
    q_pos = torch.arange(k_len - q_len, k_len)  # (T,)
    k_pos = torch.arange(k_len)  # (S,)
    distance = (q_pos[:, None] - k_pos[None, :]).abs().float()  # (T, S)
    return -slopes[:, None, None] * distance  # (H, T, S)

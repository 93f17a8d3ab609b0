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
- Frequency-dependent RoPE scaling, as released checkpoints declare it in ``rope_scaling``:
  ``llama3_inv_freq`` (LLaMA-3.1: fast pairs kept, slow pairs interpolated by ``factor``, a smooth
  blend in between; Meta's llama-models ``apply_scaling``) and ``yarn_inv_freq`` with
  ``yarn_attention_factor`` (YaRN, Peng et al. 2023: a ramp over the pair index between the pairs
  that turn ``beta_fast`` and ``beta_slow`` times within the original context, plus a temperature
  on the attention logits). ``scaled_rope_inv_freq`` reads a ``rope_scaling`` dict and dispatches
  like transformers' ``ROPE_INIT_FUNCTIONS``; ``cos_sin_from_inv_freq`` turns any frequencies into
  the cos/sin tables ``apply_rope`` takes.
- ALiBi (Press et al. 2022): ``alibi_slopes`` (with the paper's rule for head counts that are not
  powers of two, as in BLOOM) and ``alibi_bias``, the per-head linear distance penalty added to
  attention scores.

What it leaves out: T5's bucketed relative bias, LongRoPE, dynamic YaRN, xPos, and partial rotary
dimensions. Tensors follow the shape letters of ``llmlab.shapes``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

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
    if scaling == "dynamic":
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
    static = "none" if scaling == "dynamic" else scaling  # linear: w / factor, same as positions / factor
    inv_freq = _scaled_inv_freq(head_dim, base, static, factor, work, pos.device)  # (D/2,) on the positions' device
    return cos_sin_from_inv_freq(pos, inv_freq, dtype=dtype)


def _scaled_inv_freq(
    head_dim: int, base: float, scaling: str, factor: float, dtype: torch.dtype, device=None
) -> torch.Tensor:
    """Frequencies (D/2,) for the static scalings: "none", "linear" (w / factor), "ntk" (scaled base)."""
    if scaling == "ntk":
        base = ntk_scaled_base(base, factor, head_dim)
    inv_freq = rope_inv_freq(head_dim, base, dtype=dtype, device=device)  # (D/2,)
    return inv_freq / factor if scaling == "linear" else inv_freq


class RotaryEmbedding(nn.Module):
    """A model's RoPE tables, built on its device once and grown on demand (transformers'
    ``LlamaRotaryEmbedding`` plays this role).

    ``inv_freq`` (D/2,) is a non-persistent buffer, so it follows ``model.to(device)`` and stays
    out of the state dict. ``forward(end, dtype, device)`` returns (cos, sin), each (S, D) with
    S >= end rows for positions 0..S-1, from a cache that is rebuilt only when a longer table, or
    another device or dtype, is asked for: one decoding step then costs a slice, not a table.
    The values equal ``rope_cos_sin`` at the same positions (the same float operations).

    ``scaling="dynamic"`` depends on the current length, so it is not cached: ``dynamic_tables``
    computes it from the positions of each call (``max_position`` = the training context).

    >>> rotary = RotaryEmbedding(head_dim=8)
    >>> cos, sin = rotary(5, torch.float32, torch.device("cpu"))
    >>> torch.equal(cos[:5], rope_cos_sin(5, head_dim=8)[0])
    True
    """

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        *,
        scaling: str = "none",
        factor: float = 1.0,
        max_position: int | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = _even_dim("head_dim", head_dim)
        self.base = check_float("base", base, low=0.0, low_open=True)
        check_choice("scaling", scaling, ROPE_SCALINGS)
        self.scaling = scaling
        self.factor = check_float("factor", factor, low=1.0)
        if scaling == "dynamic" and max_position is None:
            raise ValueError("max_position (the training context length) is required for scaling='dynamic'")
        self.max_position = None if max_position is None else check_int("max_position", max_position, minimum=1)
        static = "none" if scaling == "dynamic" else scaling
        inv_freq = _scaled_inv_freq(self.head_dim, self.base, static, self.factor, torch.float32)  # (D/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin), each (S, D)

    def forward(self, end: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (S, D) with S >= end, for positions 0..S-1 in ``dtype`` on ``device``."""
        tables = self._tables
        if tables is None or tables[0].shape[0] < end or tables[0].dtype != dtype or tables[0].device != device:
            tables = self._tables = self._build(end, dtype, device)
        return tables

    def _build(self, end: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        old = 0 if self._tables is None else self._tables[0].shape[0]
        size = max(check_int("end", end, minimum=1), 2 * old, 64)  # doubling: O(log S) rebuilds
        # Normal tensors even inside torch.inference_mode(), so that a later training forward may
        # save them for backward.
        with torch.inference_mode(False), torch.no_grad():
            if dtype == torch.float64:  # the precise path of rope_cos_sin: frequencies in float64
                static = "none" if self.scaling == "dynamic" else self.scaling
                inv_freq = _scaled_inv_freq(self.head_dim, self.base, static, self.factor, torch.float64, device)
            else:
                inv_freq = self.inv_freq.to(device=device, dtype=torch.float32)  # (D/2,)
            return cos_sin_from_inv_freq(torch.arange(size, device=device), inv_freq, dtype=dtype)

    def dynamic_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic NTK scaling at ``positions`` (T,) or (B, T): reads max(positions) on the host."""
        return rope_cos_sin(positions, self.head_dim, self.base, scaling="dynamic", factor=self.factor,
                            max_position=self.max_position, dtype=dtype)


def cos_sin_from_inv_freq(
    positions: int | torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles p * inv_freq[i], duplicated to D = 2 * len(inv_freq) channels.

    positions: a count T or integer positions (T,) / (B, T); inv_freq: (D/2,) from any of the
    frequency functions here. Both tables are multiplied by ``attention_factor`` (YaRN's
    temperature, as transformers applies it): q and k are then both scaled, so the attention
    logits grow by ``attention_factor ** 2``. Returns ``(cos, sin)``, each (T, D) or (B, T, D).

    >>> cos, sin = cos_sin_from_inv_freq(16, rope_inv_freq(8))
    >>> cos.shape
    torch.Size([16, 8])
    """
    pos = _positions_tensor(positions)
    check_tensor("inv_freq", inv_freq, ndim=1, layout="(D/2,)")
    attention_factor = check_float("attention_factor", attention_factor, low=0.0, low_open=True)
    angles = pos.to(inv_freq.dtype)[..., None] * inv_freq  # (..., T, D/2)
    emb = torch.cat((angles, angles), dim=-1)  # (..., T, D): channel i and i + D/2 share an angle
    cos, sin = emb.cos(), emb.sin()  # (..., T, D) each
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


# ----------------------------------------------------------------------------------------------
# Frequency-dependent RoPE scaling: LLaMA-3.1 ("llama3") and YaRN ("yarn")


def llama3_inv_freq(
    head_dim: int,
    base: float,
    *,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """LLaMA-3.1's RoPE frequencies (rope_type "llama3"). (D/2,)

    With L = original_max_position_embeddings and wavelength 2 pi / w_i of pair i:
    - wavelength < L / high_freq_factor (fast pairs, local order): w_i unchanged;
    - wavelength > L / low_freq_factor (slow pairs): w_i / factor, i.e. position interpolation;
    - in between: (1 - s) w_i / factor + s w_i with s = (L / wavelength - low) / (high - low).
    The clamp of s to [0, 1] gives the two outer cases. Follows Meta's ``apply_scaling``
    (llama-models, LLaMA-3.1 reference code) and transformers' ``_compute_llama3_parameters``.

    >>> w = llama3_inv_freq(128, 500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    ...                     original_max_position_embeddings=8192)
    >>> w.shape
    torch.Size([64])
    """
    factor = check_float("factor", factor, low=1.0)
    low = check_float("low_freq_factor", low_freq_factor, low=0.0, low_open=True)
    high = check_float("high_freq_factor", high_freq_factor, low=0.0, low_open=True)
    if high <= low:
        raise ValueError(f"high_freq_factor must be > low_freq_factor={low:g}, got {high:g}")
    old_len = check_int("original_max_position_embeddings", original_max_position_embeddings, minimum=1)
    inv_freq = rope_inv_freq(head_dim, base, dtype=dtype)  # (D/2,)
    wavelength = 2 * math.pi / inv_freq  # (D/2,) positions per full turn
    smooth = ((old_len / wavelength - low) / (high - low)).clamp(0.0, 1.0)  # (D/2,) 1 = keep
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq  # (D/2,)


def yarn_attention_factor(factor: float, mscale: float = 1.0) -> float:
    """YaRN's scale of q and k: sqrt(1/t) = 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1).

    Peng et al. 2023, section 3.4 (fitted on LLaMA): the logits q.k/sqrt(D) are divided by the
    temperature t, which softens the sharpening that interpolated frequencies cause.
    """
    factor = check_float("factor", factor, low=0.0, low_open=True)
    mscale = check_float("mscale", mscale)
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_pair_index(rotations: float, head_dim: int, base: float, old_len: int) -> float:
    """The (fractional) pair index i whose angle turns ``rotations`` times over ``old_len``
    positions: old_len * base^(-2i/D) = 2 pi * rotations, solved for i."""
    return head_dim * math.log(old_len / (2 * math.pi * rotations)) / (2 * math.log(base))


def yarn_inv_freq(
    head_dim: int,
    base: float,
    *,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """YaRN's RoPE frequencies ("NTK-by-parts", rope_type "yarn"). (D/2,)

    Pairs that turn more than ``beta_fast`` times within the original context L keep w_i
    (extrapolation: local order stays sharp); pairs that turn less than ``beta_slow`` times get
    w_i / factor (interpolation); between the two boundary pair indices the blend is linear in
    the pair index. ``truncate`` rounds the boundaries outward (floor / ceil), as YaRN's reference
    code and transformers do. Use with ``yarn_attention_factor`` on the attention logits.

    >>> yarn_inv_freq(64, 10000.0, factor=4.0, original_max_position_embeddings=2048).shape
    torch.Size([32])
    """
    head_dim = _even_dim("head_dim", head_dim)
    base = check_float("base", base, low=1.0, low_open=True)
    factor = check_float("factor", factor, low=1.0)
    old_len = check_int("original_max_position_embeddings", original_max_position_embeddings, minimum=1)
    fast = check_float("beta_fast", beta_fast, low=0.0, low_open=True)
    slow = check_float("beta_slow", beta_slow, low=0.0, low_open=True)
    if fast <= slow:
        raise ValueError(f"beta_fast must be > beta_slow={slow:g}, got {fast:g}")
    lo = _yarn_pair_index(fast, head_dim, base, old_len)  # below: fast pairs, kept
    hi = _yarn_pair_index(slow, head_dim, base, old_len)  # above: slow pairs, interpolated
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if hi == lo:
        hi += 0.001  # a step instead of a ramp; avoids dividing by zero
    inv_freq = rope_inv_freq(head_dim, base, dtype=dtype)  # (D/2,)
    pair = torch.arange(head_dim // 2, dtype=dtype)  # (D/2,)
    ramp = ((pair - lo) / (hi - lo)).clamp(0.0, 1.0)  # (D/2,) 0 = keep, 1 = interpolate
    return inv_freq * (1 - ramp) + (inv_freq / factor) * ramp  # (D/2,)


ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def scaled_rope_inv_freq(
    head_dim: int, base: float, rope_scaling: Mapping[str, object] | None = None
) -> tuple[torch.Tensor, float]:
    """Frequencies (D/2,) and attention factor for a config's ``rope_scaling`` dict.

    ``rope_scaling`` uses the published field names (``rope_type``, ``factor``,
    ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``,
    ``beta_fast``, ``beta_slow``, ``mscale``, ``attention_factor``), as in a model's
    ``config.json``; None or rope_type "default" means plain RoPE.

    >>> w, a = scaled_rope_inv_freq(128, 500000.0, {"rope_type": "linear", "factor": 2.0})
    >>> a
    1.0
    """
    if rope_scaling is None:
        return rope_inv_freq(head_dim, base), 1.0
    if not isinstance(rope_scaling, Mapping):
        raise TypeError(f"rope_scaling must be a mapping or None, got {type(rope_scaling).__name__}")
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    check_choice("rope_scaling['rope_type']", kind, ROPE_TYPES)
    if kind == "default":
        return rope_inv_freq(head_dim, base), 1.0
    if "factor" not in rope_scaling:
        raise ValueError(f"rope_scaling of type {kind!r} needs 'factor', got keys {sorted(rope_scaling)}")
    factor = check_float("rope_scaling['factor']", rope_scaling["factor"], low=1.0)
    if kind == "linear":
        return rope_inv_freq(head_dim, base) / factor, 1.0
    old_len = rope_scaling.get("original_max_position_embeddings")
    if old_len is None:
        raise ValueError(f"rope_scaling of type {kind!r} needs 'original_max_position_embeddings'")
    if kind == "llama3":
        inv_freq = llama3_inv_freq(
            head_dim, base, factor=factor, low_freq_factor=rope_scaling["low_freq_factor"],
            high_freq_factor=rope_scaling["high_freq_factor"], original_max_position_embeddings=old_len,
        )
        return inv_freq, 1.0
    inv_freq = yarn_inv_freq(
        head_dim, base, factor=factor, original_max_position_embeddings=old_len,
        beta_fast=rope_scaling.get("beta_fast") or 32.0, beta_slow=rope_scaling.get("beta_slow") or 1.0,
        truncate=rope_scaling.get("truncate", True),
    )
    attention_factor = rope_scaling.get("attention_factor")
    mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    if attention_factor is None and mscale and mscale_all_dim:
        # DeepSeek-V2's variant: a ratio of two such factors (1 when mscale == mscale_all_dim)
        attention_factor = yarn_attention_factor(factor, mscale) / yarn_attention_factor(factor, mscale_all_dim)
    elif attention_factor is None:
        attention_factor = yarn_attention_factor(factor)
    return inv_freq, float(attention_factor)


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

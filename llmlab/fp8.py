"""FP8 formats and scaling: E4M3 and E5M2, per-tensor vs fine-grained block scaling, with real casts.

What it implements
- ``fp8_formats``: the numbers that define each FP8 format, read from ``torch.finfo`` (largest
  value, smallest normal and subnormal, machine epsilon, exponent and mantissa bits): E4M3 (4
  exponent, 3 mantissa bits, ``torch.float8_e4m3fn``: no infinities, max 448) trades range for
  precision; E5M2 (5 and 2, ``torch.float8_e5m2``: max 57344) the opposite (Micikevicius et al.
  2022, "FP8 Formats for Deep Learning").
- ``quantize_fp8`` / ``dequantize_fp8``: scale each block so its largest magnitude maps to the
  format's maximum, cast with PyTorch's float8 dtypes (round to nearest even, on the CPU too),
  and keep one float32 scale per block. ``block=None`` is per-tensor scaling; ``(1, 128)`` the
  per-token, per-128-channel tiles DeepSeek-V3 uses for activations; ``(128, 128)`` its weight
  blocks (DeepSeek-AI 2024, arXiv:2412.19437, section 3.3.2).
- ``fp8_matmul``: x (M, K) @ w (N, K)^T with both operands quantized (x in 1 x b tiles, w in b x b
  blocks, or both per tensor), dequantized and multiplied in float32: the arithmetic of an FP8 GEMM
  with block scales applied in higher precision, simulated (no FP8 tensor cores on a CPU).
- ``relative_error``: ||y - y_ref|| / ||y_ref||.

What it leaves out: FP8 accumulation precision (DeepSeek-V3 promotes partial sums to FP32 every
128 products), delayed scaling from an amax history (Transformer Engine), and
``torch._scaled_mm``, which needs an FP8-capable GPU.
"""

from __future__ import annotations

import torch

from llmlab.shapes import check_int, check_tensor

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
MANTISSA_BITS = {"e4m3": 3, "e5m2": 2}  # stored fraction bits (exponent bits = 7 - these)


def _dtype(fmt: str) -> torch.dtype:
    if fmt not in FP8_DTYPES:
        raise ValueError(f"fmt must be one of {sorted(FP8_DTYPES)}, got {fmt!r}")
    return FP8_DTYPES[fmt]


def fp8_formats() -> dict[str, dict[str, float]]:
    """{"e4m3": {...}, "e5m2": {...}}: max, smallest normal, smallest subnormal, eps, exponent/mantissa bits.

    >>> fp8_formats()["e4m3"]["max"], fp8_formats()["e5m2"]["max"]
    (448.0, 57344.0)
    """
    table = {}
    for fmt, dtype in FP8_DTYPES.items():
        info = torch.finfo(dtype)
        m = MANTISSA_BITS[fmt]
        table[fmt] = {"max": float(info.max), "smallest_normal": float(info.smallest_normal),
                      "smallest_subnormal": float(info.smallest_normal) * 2.0 ** -m, "eps": float(info.eps),
                      "exponent_bits": 7 - m, "mantissa_bits": m}
    return table


def _check_block(x: torch.Tensor, block: tuple[int, int] | None) -> tuple[int, int]:
    check_tensor("x", x, ndim=2, layout="(M, K)")
    if block is None:
        return tuple(x.shape)
    if len(block) != 2:
        raise ValueError(f"block must be a pair (rows, cols) or None, got {block!r}")
    bm, bk = (check_int(f"block[{i}]", b, minimum=1) for i, b in enumerate(block))
    if x.shape[0] % bm or x.shape[1] % bk:
        raise ValueError(f"block {block} must divide the shape of x {tuple(x.shape)}")
    return bm, bk


def quantize_fp8(
    x: torch.Tensor, fmt: str = "e4m3", block: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (FP8 values (M, K), float32 scales (M/bm, K/bk)); x ~ values * scale per block.

    >>> q, s = quantize_fp8(torch.randn(4, 256), block=(1, 128))
    >>> q.dtype, tuple(s.shape)
    (torch.float8_e4m3fn, (4, 2))
    """
    dtype = _dtype(fmt)
    bm, bk = _check_block(x, block)
    m, k = x.shape
    tiles = x.float().reshape(m // bm, bm, k // bk, bk)  # (M/bm, bm, K/bk, bk)
    amax = tiles.abs().amax(dim=(1, 3))  # (M/bm, K/bk): the largest magnitude of each block
    scale = (amax / torch.finfo(dtype).max).clamp(min=torch.finfo(torch.float32).tiny)  # (M/bm, K/bk)
    q = (tiles / scale[:, None, :, None]).to(dtype)  # (M/bm, bm, K/bk, bk): the real cast
    return q.reshape(m, k), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 values (M, K) and block scales (M/bm, K/bk) -> float32 (M, K)."""
    check_tensor("q", q, ndim=2, layout="(M, K)")
    check_tensor("scale", scale, ndim=2, layout="(M/bm, K/bk)")
    m, k = q.shape
    gm, gk = scale.shape
    if m % gm or k % gk:
        raise ValueError(f"scale {tuple(scale.shape)} must tile q {tuple(q.shape)}")
    tiles = q.float().reshape(gm, m // gm, gk, k // gk)  # (M/bm, bm, K/bk, bk)
    return (tiles * scale[:, None, :, None]).reshape(m, k)


def fp8_matmul(x: torch.Tensor, w: torch.Tensor, fmt: str = "e4m3", block: int | None = 128) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T with FP8 operands: x in 1 x block tiles, w in block x block blocks
    (``block=None``: one scale per tensor). Returns float32 (M, N).

    >>> fp8_matmul(torch.randn(2, 256), torch.randn(128, 256)).shape
    torch.Size([2, 128])
    """
    check_tensor("w", w, ndim=2, layout="(N, K)")
    if x.dim() == 2 and x.shape[1] != w.shape[1]:
        raise ValueError(f"x and w must share K, got x {tuple(x.shape)} and w {tuple(w.shape)}")
    x_block = None if block is None else (1, block)
    w_block = None if block is None else (block, block)
    xq = dequantize_fp8(*quantize_fp8(x, fmt, x_block))  # (M, K)
    wq = dequantize_fp8(*quantize_fp8(w, fmt, w_block))  # (N, K)
    return xq @ wq.t()  # (M, N)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    """||y - reference|| / ||reference|| (Frobenius), in float64."""
    check_tensor("y", y)
    check_tensor("reference", reference)
    if y.shape != reference.shape:
        raise ValueError(f"y and reference must have the same shape, got {tuple(y.shape)} and "
                         f"{tuple(reference.shape)}")
    ref = reference.double()
    return float((y.double() - ref).norm() / ref.norm())

"""Weight quantization: 4-bit NormalFloat (NF4) with double quantization, QLoRA, and int8 helpers.

What it implements
- ``NF4_LEVELS``: the 16 NormalFloat-4 code values as published (QLoRA paper, Dettmers et al. 2023,
  appendix E; the same table is bitsandbytes' ``get_4bit_type("nf4")``), and ``nf4_levels_from_normal``,
  which derives them from N(0, 1) quantiles the way the paper describes: 8 quantiles for the positive
  half, 7 for the negative half, an exact zero, all divided by the largest so they span [-1, 1].
- ``quantize_nf4`` / ``dequantize_nf4``: block-wise absmax quantization (block 64: each block of 64
  weights is divided by its largest magnitude and each value is replaced by the index of the nearest
  level), two 4-bit indices packed per byte (``pack_4bit``; first value in the high nibble as in
  bitsandbytes), and optional double quantization of the fp32 block scales: subtract their mean, then
  quantize them to 8 bits in blocks of 256 (QLoRA section 3). Memory: 4 + 32/64 = 4.5 bits per weight
  without double quantization, 4 + 8/64 + 32/(64 * 256) = 4.127 with it (``bits_per_parameter``).
- ``NF4Linear``: a frozen linear layer stored in NF4 and dequantized on the fly for each matmul, and
  ``QLoRALinear`` = ``NF4Linear`` base + a ``LoRALinear`` update in the compute precision; ``prepare_qlora``
  does this to every matching layer of a model. ``merge_qlora`` merges a trained adapter: dequantize
  and merge in the compute precision (exact up to float rounding), or merge and quantize to NF4 again
  (``requantize=True``: a second rounding to the 16 levels, so the merge is no longer exact).
- int8 helpers for the quantization notebook: symmetric absmax (``absmax_quantize``) and asymmetric
  zero-point (``zeropoint_quantize``) quantization, per tensor or per row.
- Integer quantization at 2-8 bits (``quantize_int`` -> ``IntQuantized``): symmetric absmax or
  asymmetric zero-point codes, one scale per tensor, per channel (row) or per group of columns; the
  int8 codes and scales equal PyTorch's observers and ``torch.quantize_per_tensor`` /
  ``torch.quantize_per_channel``. ``int8_matmul`` (exact int32 accumulation), ``w8a8_linear`` (both
  operands int8), ``llm_int8_linear`` (LLM.int8()'s outlier decomposition, Dettmers et al. 2022) and
  ``smoothquant_scales`` / ``smooth_norm_and_linears`` (SmoothQuant, Xiao et al. 2023). GPTQ, which
  uses these codes, lives in ``llmlab.gptq``. ``quantized_linear_kernels``: one linear layer through
  PyTorch's real CPU kernels (fp32, bf16, fp16, int8 weight-only, W8A8, bare int8 GEMM) for timing.

Difference from bitsandbytes, on purpose: the second-level (double) quantization here uses plain
symmetric int8 codes with one absmax per block of 256; bitsandbytes stores the scales in its 8-bit
"dynamic" float format. The memory is the same; the rounding of each scale differs slightly. Left out:
paged optimizers (QLoRA keeps the AdamW state in CUDA unified memory, which the driver evicts to CPU
RAM page by page when the GPU runs out during a memory spike; this needs CUDA, see bitsandbytes'
``PagedAdamW``), FP4, CUDA kernels (dequantization here is plain PyTorch, so it runs anywhere but
saves memory only in storage, not in the matmul). Shape letters follow ``llmlab.shapes`` (N counts
flattened weights or blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.lora import LoRAConfig, LoRALinear, wrap_lora_linears
from llmlab.peft_utils import check_module, replace_module
from llmlab.shapes import check_float, check_int, check_tensor

# The NF4 table as published: QLoRA paper appendix E, and bitsandbytes/functional.py (get_4bit_type,
# "nf4"). Typed in by hand; tests check that nf4_levels_from_normal() reproduces it.
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)  # (16,)

# The outermost quantile: the average of the quantile widths 1/(2*15) and 1/(2*16) is cut from the
# tail, because the quantile function of N(0, 1) is infinite at probability 1.
NF4_OFFSET = 1.0 - 0.5 * (1.0 / 30.0 + 1.0 / 32.0)  # = 0.96770833...


@dataclass(frozen=True)
class NF4Config:
    """How a weight is stored in NF4."""

    block_size: int = 64  # weights per absmax block (QLoRA uses 64)
    double_quant: bool = True  # quantize the fp32 block scales to 8 bits as well
    scale_block_size: int = 256  # block scales per second-level block (QLoRA uses 256)

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size, minimum=2)
        if self.block_size % 2:
            raise ValueError(f"block_size must be even (two 4-bit codes share a byte), got {self.block_size}")
        check_int("scale_block_size", self.scale_block_size, minimum=1)

    @classmethod
    def qlora(cls) -> NF4Config:
        """The QLoRA paper's setting: block 64, double quantization with block 256."""
        return cls(block_size=64, double_quant=True, scale_block_size=256)

    @classmethod
    def no_double_quant(cls) -> NF4Config:
        """Block 64 with fp32 scales: 4.5 bits per weight."""
        return cls(block_size=64, double_quant=False)


def nf4_levels_from_normal(offset: float = NF4_OFFSET) -> torch.Tensor:
    """Derive the 16 NF4 levels from N(0, 1) quantiles (QLoRA section 3, "4-bit NormalFloat"). (16,)

    Positive half: 8 quantiles at probabilities spaced evenly from ``offset`` down to 0.5 (the 0.5
    one, which is 0, dropped); negative half: 7 the same way, mirrored; plus an exact 0. The halves
    differ in size so that zero is represented exactly with 16 codes. Normalised to [-1, 1].
    """
    probs_pos = torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1]  # (8,)
    probs_neg = torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1]  # (7,)
    pos = torch.special.ndtri(probs_pos)  # (8,) the inverse normal CDF
    neg = -torch.special.ndtri(probs_neg)  # (7,)
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values  # (16,)
    return (levels / levels.abs().max()).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# Packing


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble. codes (N,) uint8 in [0, 15] -> (N/2,) uint8."""
    check_tensor("codes", codes, ndim=1, layout="(N,)")
    if codes.numel() % 2:
        raise ValueError(f"codes must have an even length to pack two per byte, got {codes.numel()}")
    pairs = codes.to(torch.uint8).view(-1, 2)  # (N/2, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]  # (N/2,)


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_4bit``: (N/2,) uint8 -> (N,) uint8 codes in [0, 15]."""
    check_tensor("packed", packed, ndim=1, layout="(N/2,)")
    high, low = packed >> 4, packed & 0x0F  # (N/2,) each
    return torch.stack([high, low], dim=1).reshape(-1)  # (N,)


# ----------------------------------------------------------------------------------------------
# Block-wise absmax


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flatten and zero-pad to whole blocks. (...) -> (N, block_size)"""
    flat = x.reshape(-1)  # (N,)
    pad = (-flat.numel()) % block_size
    return F.pad(flat, (0, pad)).view(-1, block_size)  # (N / block_size, block_size)


def _nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for each value (levels sorted). Same shape as x, uint8."""
    midpoints = (levels[1:] + levels[:-1]) / 2  # (15,) decision boundaries
    return torch.bucketize(x, midpoints).to(torch.uint8)


@dataclass(frozen=True)
class QuantizedScales:
    """fp32 block scales stored as int8 codes: scale = codes / 127 * absmax + offset (double quantization)."""

    codes: torch.Tensor  # (N,) int8, one per first-level block
    absmax: torch.Tensor  # (N / scale_block_size,) fp32, one per second-level block
    offset: torch.Tensor  # () fp32: the mean subtracted before quantizing (scales are all positive)
    block_size: int  # scales per second-level block


def quantize_scales(scales: torch.Tensor, block_size: int = 256) -> QuantizedScales:
    """Double quantization: center the positive fp32 scales on their mean, then int8 absmax per block."""
    offset = scales.mean()  # ()
    blocks = _blocks(scales - offset, block_size)  # (N2, 256)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)  # (N2,)
    codes = torch.round(blocks / absmax[:, None] * 127).to(torch.int8)  # (N2, 256)
    codes = codes.reshape(-1)[: scales.numel()]  # (N,): the padding is dropped again
    return QuantizedScales(codes, absmax, offset, block_size)


def dequantize_scales(q: QuantizedScales) -> torch.Tensor:
    """Inverse of ``quantize_scales`` (up to rounding). (N,) fp32"""
    blocks = _blocks(q.codes.to(torch.float32), q.block_size)  # (N2, 256)
    scales = blocks * (q.absmax[:, None] / 127) + q.offset  # (N2, 256)
    return scales.reshape(-1)[: q.codes.numel()]  # (N,)


@dataclass(frozen=True)
class NF4Tensor:
    """A weight stored in NF4: packed codes + block scales (fp32, or double-quantized)."""

    packed: torch.Tensor  # (N/2,) uint8, two 4-bit level indices per byte
    scales: torch.Tensor | QuantizedScales  # (N / block_size,) fp32 absmax per block, or its 8-bit form
    shape: tuple[int, ...]  # the original weight shape
    block_size: int  # weights per block

    def storage_bits(self) -> int:
        """Bits actually held by the tensors (codes, scales, second-level scales, offset)."""
        tensors = [self.packed]
        if isinstance(self.scales, QuantizedScales):
            tensors += [self.scales.codes, self.scales.absmax, self.scales.offset.reshape(1)]  # (1,) offset
        else:
            tensors.append(self.scales)
        return sum(t.numel() * t.element_size() * 8 for t in tensors)

    def bits_per_parameter(self) -> float:
        """Measured storage per original weight, e.g. about 4.127 for block 64 with double quantization."""
        return self.storage_bits() / torch.Size(self.shape).numel()


def quantize_nf4(weight: torch.Tensor, config: NF4Config | None = None) -> NF4Tensor:
    """Block-wise absmax NF4 quantization of any float tensor.

    >>> q = quantize_nf4(torch.randn(64, 32))
    >>> dequantize_nf4(q).shape
    torch.Size([64, 32])
    """
    check_tensor("weight", weight)
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    config = config or NF4Config()
    blocks = _blocks(weight.detach().to(torch.float32), config.block_size)  # (N / 64, 64)
    absmax = blocks.abs().amax(dim=1)  # (N / 64,)
    normalized = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # (N / 64, 64) in [-1, 1]
    codes = _nearest_level(normalized, NF4_LEVELS.to(weight.device))  # (N / 64, 64)
    scales = quantize_scales(absmax, config.scale_block_size) if config.double_quant else absmax
    packed = pack_4bit(codes.reshape(-1))  # (N/2,) uint8
    return NF4Tensor(packed, scales, tuple(weight.shape), config.block_size)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Levels times block scales, reshaped back to the original shape. (same shape as the weight)"""
    absmax = dequantize_scales(q.scales) if isinstance(q.scales, QuantizedScales) else q.scales  # (N / 64,)
    levels = NF4_LEVELS.to(q.packed.device)[unpack_4bit(q.packed).long()]  # (N,)
    values = levels.view(-1, q.block_size) * absmax[:, None]  # (N / 64, 64)
    numel = torch.Size(q.shape).numel()
    return values.reshape(-1)[:numel].view(q.shape).to(dtype)  # (original shape)


def bits_per_parameter(block_size: int = 64, double_quant: bool = True, scale_block_size: int = 256) -> float:
    """Storage per weight: 4 bits + fp32 scale / block, or 4 + 8 / block + 32 / (block * scale_block).

    >>> round(bits_per_parameter(64, double_quant=True), 3), bits_per_parameter(64, double_quant=False)
    (4.127, 4.5)
    """
    block_size = check_int("block_size", block_size, minimum=1)
    if not double_quant:
        return 4 + 32 / block_size
    scale_block_size = check_int("scale_block_size", scale_block_size, minimum=1)
    return 4 + 8 / block_size + 32 / (block_size * scale_block_size)


# ----------------------------------------------------------------------------------------------
# Layers


class _NF4MatMul(torch.autograd.Function):
    """x W^T with W dequantized from NF4 in the forward pass and again in the backward pass, so autograd
    keeps only the 4-bit weight for the backward, never a full-precision copy (bitsandbytes' 4-bit
    matmul does the same). The weight is frozen: only x gets a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dequantized_weight().T  # (..., out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_out @ ctx.layer.dequantized_weight(), None  # (..., in)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 and dequantized for each forward.

    x (..., in) -> (..., out). Build it with ``NF4Linear.from_linear(linear)``.
    """

    def __init__(
        self, weight: NF4Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.block_size = weight.block_size
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_packed", weight.packed)  # (N/2,) uint8
        self.double_quant = isinstance(weight.scales, QuantizedScales)
        if self.double_quant:
            self.scale_block_size = weight.scales.block_size
            self.register_buffer("absmax_codes", weight.scales.codes)  # (N / 64,) int8
            self.register_buffer("absmax_absmax", weight.scales.absmax)  # (N / 16384,) fp32
            self.register_buffer("absmax_offset", weight.scales.offset)  # () fp32
        else:
            self.register_buffer("absmax", weight.scales)  # (N / 64,) fp32
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)  # (out,)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, config: NF4Config | None = None, compute_dtype: torch.dtype | None = None
    ) -> NF4Linear:
        """Quantize an ``nn.Linear``; compute in ``compute_dtype`` (default: the linear's dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        dtype = compute_dtype or linear.weight.dtype
        return cls(quantize_nf4(linear.weight, config), linear.bias, dtype)

    def nf4_tensor(self) -> NF4Tensor:
        """The stored weight as an ``NF4Tensor``."""
        if self.double_quant:
            scales = QuantizedScales(self.absmax_codes, self.absmax_absmax, self.absmax_offset, self.scale_block_size)
        else:
            scales = self.absmax
        return NF4Tensor(self.weight_packed, scales, (self.out_features, self.in_features), self.block_size)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with. (out, in)"""
        return dequantize_nf4(self.nf4_tensor(), self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4MatMul.apply(x.to(self.compute_dtype), self)  # (..., out); dequantized again in backward
        return y if self.bias is None else y + self.bias.to(self.compute_dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
            f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )


class QLoRALinear(LoRALinear):
    """QLoRA (Dettmers et al. 2023): a frozen NF4 base weight plus LoRA in the compute precision.

    y = x W_nf4^T + b + s * B(A(dropout(x))); gradients flow through the dequantized weight into x,
    but only A and B are trained.

    >>> layer = QLoRALinear(nn.Linear(64, 64), r=4, alpha=8.0)
    """

    def __init__(
        self,
        linear: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        nf4: NF4Config | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(NF4Linear.from_linear(linear, nf4, compute_dtype), r, alpha, dropout, use_rslora)

    @torch.no_grad()
    def dequantize_and_merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` with weight dequantize(W_nf4) + s B A: QLoRA's way to ship a merged model."""
        base = self.base_layer
        weight = base.dequantized_weight() + self.delta_weight().to(base.compute_dtype)  # (out, in)
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None)
        linear = linear.to(device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        return linear

    @torch.no_grad()
    def merge_and_requantize(self, nf4: NF4Config | None = None) -> NF4Linear:
        """A 4-bit layer storing NF4(dequantize(W_nf4) + s B A): merging *into* the 4-bit base.

        Not exact, unlike a merge in 16/32 bit: the sum is rounded to the 16 NF4 levels again, which
        adds a second quantization error of the same size as the first, and an update smaller than
        half a level step mostly rounds away. ``nf4`` defaults to the base's own storage format.
        """
        base = self.base_layer
        if nf4 is None:
            nf4 = NF4Config(base.block_size, base.double_quant, getattr(base, "scale_block_size", 256))
        return NF4Linear.from_linear(self.dequantize_and_merge(), nf4, base.compute_dtype)


def merge_qlora(model: nn.Module, requantize: bool = False, nf4: NF4Config | None = None) -> nn.Module:
    """Replace every ``QLoRALinear`` by its merged layer (in place) and return ``model``.

    ``requantize=False``: a dense ``nn.Linear`` holding dequantize(W_nf4) + s B A (the usual practice:
    dequantize, merge in 16/32 bit, then quantize again only if needed). ``requantize=True``: an
    ``NF4Linear`` holding that sum rounded to NF4 again (``QLoRALinear.merge_and_requantize``).

    >>> from llmlab.model import LLM, ModelConfig
    >>> model = prepare_qlora(LLM(ModelConfig.tiny(vocab_size=50)), LoRAConfig.tiny())
    >>> ids = torch.tensor([[1, 2, 3]])  # (B, T)
    >>> before = model(ids).logits
    >>> merged = merge_qlora(model)  # same outputs as the unmerged QLoRA model, up to float rounding
    >>> torch.allclose(merged(ids).logits, before, atol=1e-5), type(merged.model.layers[0].self_attn.q_proj)
    (True, <class 'torch.nn.modules.linear.Linear'>)
    """
    check_module("model", model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QLoRALinear)]
    if not layers:
        raise ValueError("model has no QLoRALinear layers; call prepare_qlora(model, config) first")
    for name, layer in layers:
        merged = layer.merge_and_requantize(nf4) if requantize else layer.dequantize_and_merge()
        replace_module(model, name, merged)
    return model


def prepare_qlora(
    model: nn.Module, config: LoRAConfig, nf4: NF4Config | None = None, compute_dtype: torch.dtype | None = None
) -> nn.Module:
    """Replace every matching ``nn.Linear`` by a ``QLoRALinear`` (in place) and freeze the rest.

    >>> from llmlab.model import LLM, ModelConfig
    >>> model = prepare_qlora(LLM(ModelConfig.tiny(vocab_size=50)), LoRAConfig.all_linear(r=16))
    >>> type(model.model.layers[0].mlp.down_proj).__name__
    'QLoRALinear'
    """
    return wrap_lora_linears(
        model,
        config,
        lambda linear: QLoRALinear(
            linear, config.r, config.alpha, config.dropout, config.use_rslora, nf4, compute_dtype
        ),
    )


# ----------------------------------------------------------------------------------------------
# int8 helpers


def absmax_quantize(x: torch.Tensor, dim: int | None = None, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization: q = round(x / s), s = max|x| / (2^(bits-1) - 1), per tensor or along ``dim``.

    Returns (q int8, s) with s broadcastable to x. Zero maps to zero exactly.
    """
    check_tensor("x", x)
    bits = check_int("bits", bits, minimum=2)
    if bits > 8:
        raise ValueError(f"bits must be <= 8 for int8 storage, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)  # () or x with dim = 1
    scale = amax.clamp_min(torch.finfo(torch.float32).tiny) / qmax
    return torch.round(x / scale).clamp(-qmax, qmax).to(torch.int8), scale


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x ~ q * s."""
    return q.to(scale.dtype) * scale


def zeropoint_quantize(x: torch.Tensor, dim: int | None = None, bits: int = 8) -> tuple[torch.Tensor, ...]:
    """Asymmetric quantization onto [0, 2^bits - 1]: q = round(x / s) + z, with s = (max - min) / (2^bits - 1).

    Returns (q uint8, s, z); uses the whole code range even when x is all positive (e.g. after ReLU).
    """
    check_tensor("x", x)
    bits = check_int("bits", bits, minimum=2)
    if bits > 8:
        raise ValueError(f"bits must be <= 8 for uint8 storage, got {bits}")
    qmax = 2**bits - 1
    lo = x.amin() if dim is None else x.amin(dim=dim, keepdim=True)
    hi = x.amax() if dim is None else x.amax(dim=dim, keepdim=True)
    scale = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny) / qmax
    zero_point = torch.round(-lo / scale)
    q = (torch.round(x / scale) + zero_point).clamp(0, qmax).to(torch.uint8)
    return q, scale, zero_point


def zeropoint_dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """x ~ (q - z) * s."""
    return (q.to(scale.dtype) - zero_point) * scale


# ----------------------------------------------------------------------------------------------
# Integer quantization: symmetric (absmax) and asymmetric (zero-point), per tensor / channel / group
#
# One scale s (and, asymmetric, one integer zero point z) per quantization group:
#   symmetric:  q = clamp(round(x / s), -qmax, qmax),  s = max|x| / qmax,  qmax = 2^(b-1) - 1
#   asymmetric: q = clamp(round(x / s) + z, 0, 2^b - 1),  s = (hi - lo) / (2^b - 1),  z = round(-lo / s)
# with lo = min(min x, 0) and hi = max(max x, 0), so that 0 is exactly representable (zero padding,
# ReLU outputs), as PyTorch's MinMaxObserver and GPTQ's quantizer do. The symmetric range is the
# restricted one, [-127, 127] for int8 ([-7, 7] for int4), so that -x quantizes to -q.
# The code is computed as round(x * (1 / s) + z) in fp32, as PyTorch's quantize_per_tensor /
# quantize_per_channel kernels do, so the codes are bit-identical to theirs (with the zero point
# added after rounding, about 1 code in 10^5 differs; tests/test_quantization.py).

INT_BITS = (2, 3, 4, 5, 6, 7, 8)  # integer widths supported (codes are held in one byte each)
GRANULARITIES = ("tensor", "channel", "group")


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in INT_BITS:
        raise ValueError(f"bits must be one of {INT_BITS}, got {bits!r}")
    return bits


def int_range(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """The code range: symmetric [-(2^(b-1) - 1), 2^(b-1) - 1], asymmetric [0, 2^b - 1].

    >>> int_range(8), int_range(4, symmetric=False)
    ((-127, 127), (0, 15))
    """
    bits = _check_bits(bits)
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def compute_qparams(
    x: torch.Tensor, bits: int = 8, symmetric: bool = True, dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from the range of ``x``, over everything (``dim=None``) or along ``dim``.

    Returns (scale, zero_point), fp32, both broadcastable to x (``keepdim``); the zero point is 0
    for symmetric quantization and an integer value in [0, 2^b - 1] otherwise.
    """
    check_tensor("x", x)
    qmin, qmax = int_range(bits, symmetric)
    eps = torch.finfo(torch.float32).eps  # PyTorch's observers floor the scale at this value too
    x = x.detach().to(torch.float32)
    if symmetric:
        amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
        scale = (amax / qmax).clamp_min(eps)
        return scale, torch.zeros_like(scale)
    lo = x.amin() if dim is None else x.amin(dim=dim, keepdim=True)
    hi = x.amax() if dim is None else x.amax(dim=dim, keepdim=True)
    lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)  # keep 0 inside the range
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


def quantize_with(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int = 8, symmetric: bool = True
) -> torch.Tensor:
    """Integer codes for given parameters: clamp(round(x * (1/s) + z)). int8 (symmetric) or uint8."""
    qmin, qmax = int_range(bits, symmetric)
    q = torch.round(x.to(torch.float32) * (1.0 / scale) + zero_point)  # z added before rounding
    return q.clamp(qmin, qmax).to(torch.int8 if symmetric else torch.uint8)


def dequantize_with(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """x ~ (q - z) * s, fp32."""
    return (q.to(torch.float32) - zero_point) * scale


@dataclass(frozen=True)
class IntQuantized:
    """A tensor stored as b-bit integer codes plus fp scales (and zero points) per group.

    For ``granularity="group"`` the codes keep the original (rows, cols) shape and the parameters
    have shape (rows, cols / group_size, 1) over the grouped view (rows, cols / G, G).
    """

    q: torch.Tensor  # (rows, cols) or any shape for "tensor": int8 codes, uint8 if asymmetric
    scale: torch.Tensor  # () per tensor, (rows, 1) per channel, (rows, cols / G, 1) per group
    zero_point: torch.Tensor  # same shape as scale; all 0 when symmetric
    bits: int  # code width, one of INT_BITS
    symmetric: bool  # absmax (True) or zero-point (False)
    granularity: str  # "tensor", "channel" (one row = one output channel) or "group"
    group_size: int | None  # columns per group when granularity == "group"

    def dequantize(self) -> torch.Tensor:
        """The fp32 values the codes stand for, in the original shape."""
        if self.granularity != "group":
            return dequantize_with(self.q, self.scale, self.zero_point)
        rows, cols = self.q.shape
        grouped = self.q.view(rows, cols // self.group_size, self.group_size)  # (rows, cols / G, G)
        return dequantize_with(grouped, self.scale, self.zero_point).view(rows, cols)

    def storage_bits(self, scale_bits: int = 16) -> int:
        """Bits to store it: b per code, ``scale_bits`` per scale, b per zero point if asymmetric."""
        n_params = self.scale.numel()
        zero_bits = 0 if self.symmetric else self.bits * n_params
        return self.bits * self.q.numel() + scale_bits * n_params + zero_bits


def quantize_int(
    x: torch.Tensor,
    bits: int = 8,
    symmetric: bool = True,
    granularity: str = "channel",
    group_size: int | None = None,
) -> IntQuantized:
    """Round-to-nearest integer quantization of ``x`` at the chosen granularity.

    "tensor": one scale for all of x; "channel": one per row (for a weight (out, in): per output
    channel, as ``torch.quantize_per_channel(..., axis=0)``; for activations (N, C): per token);
    "group": one per ``group_size`` consecutive columns of a row (GPTQ / AWQ style, e.g. 128).

    >>> quantize_int(torch.randn(8, 64), bits=4, granularity="group", group_size=32).scale.shape
    torch.Size([8, 2, 1])
    """
    check_tensor("x", x)
    bits = _check_bits(bits)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "tensor":
        scale, zero = compute_qparams(x, bits, symmetric)
        q = quantize_with(x, scale, zero, bits, symmetric)  # same shape as x
        return IntQuantized(q, scale, zero, bits, symmetric, "tensor", None)
    check_tensor("x", x, ndim=2, layout="(rows, cols)")
    view = x  # (rows, cols): one scale per row
    if granularity != "group":
        group_size = None
    else:
        group_size = check_int("group_size", group_size, minimum=1)
        if x.shape[1] % group_size:
            raise ValueError(f"group_size must divide the number of columns {x.shape[1]}, got {group_size}")
        view = x.reshape(x.shape[0], -1, group_size)  # (rows, cols / G, G)
    scale, zero = compute_qparams(view, bits, symmetric, dim=-1)  # (rows, 1) or (rows, cols / G, 1)
    q = quantize_with(view, scale, zero, bits, symmetric).reshape(x.shape)  # (rows, cols)
    return IntQuantized(q, scale, zero, bits, symmetric, granularity, group_size)


def fake_quantize(
    x: torch.Tensor, bits: int = 8, symmetric: bool = True, granularity: str = "channel", group_size: int | None = None
) -> torch.Tensor:
    """Quantize then dequantize ("simulated" quantization): the values a quantized kernel computes with."""
    return quantize_int(x, bits, symmetric, granularity, group_size).dequantize().to(x.dtype)


# ----------------------------------------------------------------------------------------------
# int8 matrix multiplication, LLM.int8() and SmoothQuant


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 x int8 -> int32 matrix product, a (N, in) @ b (out, in)^T -> (N, out) int32.

    Uses PyTorch's int8 GEMM (``torch._int_mm``, int32 accumulation) where it takes the shapes, else
    float64, which holds every such sum exactly (|sum| <= 127^2 * in << 2^53).
    """
    check_tensor("a", a, ndim=2, layout="(N, in)")
    check_tensor("b", b, ndim=2, layout="(out, in)")
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"a and b must be int8, got {a.dtype} and {b.dtype}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must share the inner size, got {tuple(a.shape)} and {tuple(b.shape)}")
    try:
        return torch._int_mm(a.contiguous(), b.T.contiguous())  # (N, out) int32
    except RuntimeError:  # shapes the kernel does not take on this device
        return (a.double() @ b.double().T).to(torch.int32)  # (N, out)


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, act_granularity: str = "tensor") -> torch.Tensor:
    """y = x W^T with both sides in int8 (W8A8): weight per output channel, activations per tensor or
    per token ("channel"), an int32 product, rescaled by s_x s_w. x (N, in), weight (out, in) -> (N, out)."""
    if act_granularity not in ("tensor", "channel"):
        raise ValueError(f"act_granularity must be 'tensor' or 'channel' (per token), got {act_granularity!r}")
    qx = quantize_int(x, 8, True, act_granularity)  # scale () or (N, 1)
    qw = quantize_int(weight, 8, True, "channel")  # scale (out, 1)
    return int8_matmul(qx.q, qw.q).to(torch.float32) * qx.scale * qw.scale.T  # (N, out)


def outlier_columns(x: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """LLM.int8()'s outlier feature dimensions: columns of x (N, C) with any |value| >= threshold. (C,) bool"""
    check_tensor("x", x, ndim=2, layout="(N, C)")
    return (x.abs() >= threshold).any(dim=0)  # (C,)


def llm_int8_linear(x: torch.Tensor, weight: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """LLM.int8() mixed-precision decomposition (Dettmers et al. 2022, section 3.2, eq. 8).

    The feature dimensions of x that hold an outlier (|x| >= threshold, 6 in the paper) are multiplied
    in floating point with the matching weight columns; all other dimensions go through a
    vector-wise int8 matmul (x per row = per token, W per output channel). x (N, in), weight (out, in)
    -> (N, out). bitsandbytes' ``Linear8bitLt`` does the same but keeps only the int8 weight and
    dequantizes its outlier columns; here the outlier columns use the original weight, as in eq. 8.
    """
    check_tensor("weight", weight, ndim=2, layout="(out, in)")
    outliers = outlier_columns(x, check_float("threshold", threshold, 0.0, low_open=True))  # (in,)
    regular = ~outliers
    y = w8a8_linear(x[:, regular], weight[:, regular], act_granularity="channel")  # (N, out)
    return y + x[:, outliers].to(torch.float32) @ weight[:, outliers].to(torch.float32).T  # (N, out)


def smoothquant_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-input-channel smoothing factors (Xiao et al. 2023, eq. 4). (in,)

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); dividing activation channel j by s_j and multiplying
    weight column j by s_j leaves X W^T unchanged and moves the outliers' range into the weight.
    ``act_absmax`` (in,) is max|X_j| over calibration tokens; ``weight`` (out, in), or the row-wise
    concatenation of every linear that reads the same X (e.g. q, k, v).
    """
    check_tensor("act_absmax", act_absmax, ndim=1, layout="(in,)")
    check_tensor("weight", weight, ndim=2, layout="(out, in)")
    if act_absmax.shape[0] != weight.shape[1]:
        raise ValueError(f"act_absmax must have one entry per weight column ({weight.shape[1]}), "
                         f"got {act_absmax.shape[0]}")  # fmt: skip
    alpha = check_float("alpha", alpha, 0.0, 1.0)
    w_absmax = weight.detach().abs().amax(dim=0).to(torch.float32)  # (in,)
    tiny = torch.finfo(torch.float32).tiny
    s = act_absmax.to(torch.float32).clamp_min(tiny).pow(alpha) / w_absmax.clamp_min(tiny).pow(1 - alpha)
    return s.clamp_min(1e-5)  # (in,); a channel never seen active keeps a finite factor


@torch.no_grad()
def smooth_norm_and_linears(norm: nn.Module, linears: list[nn.Linear], scales: torch.Tensor) -> None:
    """Fold SmoothQuant factors into a model, in place: norm.weight /= s, each linear.weight[:, j] *= s_j.

    The norm's output is the linears' input, so the float model computes exactly the same function
    (up to rounding) while the activations the linears see have a smaller range.
    """
    check_tensor("scales", scales, ndim=1, layout="(in,)")
    if not isinstance(getattr(norm, "weight", None), torch.Tensor) or norm.weight.shape != scales.shape:
        raise ValueError(f"norm must have a weight of shape {tuple(scales.shape)} to absorb 1/s")
    norm.weight.div_(scales.to(norm.weight.dtype))
    for linear in linears:
        if not isinstance(linear, nn.Linear) or linear.in_features != scales.shape[0]:
            raise ValueError(f"linears must be nn.Linear layers with in_features={scales.shape[0]}")
        linear.weight.mul_(scales.to(linear.weight.dtype))  # (out, in) * (in,): column j times s_j


# ----------------------------------------------------------------------------------------------
# Real CPU kernels, for timing "is int8 faster than fp16/bf16?"


def quantized_linear_kernels(weight: torch.Tensor) -> dict[str, object]:
    """y = x W^T through PyTorch's real CPU kernels, one callable per storage format. weight (out, in).

    - "fp32", "bf16", "fp16": dense ``F.linear`` (bf16 uses oneDNN, which has native bf16 dot products
      on CPUs with AVX512-BF16 / AMX; most CPUs have no fp16 arithmetic, so fp16 is emulated).
    - "int8 weight-only": ``torch._weight_int8pack_mm``: int8 weight with one scale per output channel,
      bf16 activations (the CPU kernel's fast path); the weight is read as int8, a quarter of fp32.
    - "int8 W8A8 dynamic": ``torch.ao.nn.quantized.dynamic.Linear`` (fbgemm): each call quantizes x per
      tensor to int8, runs an int8 GEMM with int32 accumulation and rescales to fp32.
    - "int8 GEMM only": ``torch._int_mm`` on int8 operands already quantized, the bare int8 kernel.

    Each callable takes x (N, in) float32 and returns (N, out); the int8 ones are approximate.
    """
    check_tensor("weight", weight, ndim=2, layout="(out, in)")
    w = weight.detach().to(torch.float32).contiguous()  # (out, in)
    w_bf16, w_fp16 = w.to(torch.bfloat16), w.to(torch.float16)
    qw = quantize_int(w, 8, True, "channel")  # (out, in) int8, scale (out, 1)
    w_int8, w_scale = qw.q.contiguous(), qw.scale.view(-1).contiguous()  # (out, in), (out,)
    w_scale_bf16 = w_scale.to(torch.bfloat16)
    w_int8_t = qw.q.T.contiguous()  # (in, out) for torch._int_mm
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    with warnings.catch_warnings():  # PyTorch marks its eager-mode quantization API as deprecated
        warnings.simplefilter("ignore")
        dynamic = DynamicLinear(w.shape[1], w.shape[0], bias_=False, dtype=torch.qint8)
        zero_points = torch.zeros_like(w_scale, dtype=torch.long)  # (out,)
        dynamic.set_weight_bias(torch.quantize_per_channel(w, w_scale.double(), zero_points, 0, torch.qint8), None)
    x_int8_cache: dict[int, torch.Tensor] = {}

    def int_gemm(x: torch.Tensor) -> torch.Tensor:
        key = id(x)
        if key not in x_int8_cache:  # quantized once, outside the timing: the bare GEMM is measured
            x_int8_cache.clear()
            x_int8_cache[key] = quantize_int(x, 8, True, "tensor").q
        return torch._int_mm(x_int8_cache[key], w_int8_t)  # (N, out) int32

    return {
        "fp32": lambda x: F.linear(x, w),
        "bf16": lambda x: F.linear(x.to(torch.bfloat16), w_bf16),
        "fp16": lambda x: F.linear(x.to(torch.float16), w_fp16),
        "int8 weight-only": lambda x: torch._weight_int8pack_mm(x.to(torch.bfloat16), w_int8, w_scale_bf16),
        "int8 W8A8 dynamic": lambda x: dynamic(x),
        "int8 GEMM only": int_gemm,
    }

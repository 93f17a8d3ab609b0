"""GPTQ: weight-only post-training quantization that corrects each rounding error with the Hessian.

What it implements (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1; the structure of the authors' reference code, IST-DASLab/gptq
``gptq.py``, ``fasterquant``):
- The layer-wise objective: find integer weights Q minimising ||X W^T - X Q^T||^2 over calibration
  inputs X (N, in) of one linear layer. Its Hessian with respect to a row of W is H = 2 X^T X / N
  (``hessian``), the same for every row.
- ``gptq_quantize_weight``: quantize the columns of W one at a time (round-to-nearest with a fixed
  per-channel or per-group scale); after each column, spread its rounding error over the columns not
  yet quantized, in proportion to the inverse Hessian: W[:, j:] -= (w_j - q_j) / U_jj * U[j, j:],
  where U is the upper Cholesky factor of H^-1 (H^-1 = U^T U). The Cholesky rows are exactly the rows
  of the successively reduced inverse Hessians that OBQ recomputes after removing each column (the
  paper's section 4, step 3; tests check the two agree), computed once and numerically stable.
  Dampening adds ``damp`` times the mean diagonal to H; inputs that never fire (H_jj = 0) get
  H_jj = 1 and a zero weight column. "Lazy batch" updates (step 2): within a block of
  ``block_size`` columns the update touches only the block, and the rest of W is updated once per
  block with one matrix product, which changes the speed, not the result.
- ``gptq_quantize_model``: quantize the chosen ``nn.Linear`` layers of a model one after another,
  each with inputs captured from the model whose earlier layers are already quantized (as the
  reference code does block by block), and ``rtn_quantize_model``: the round-to-nearest baseline
  with the same scales and format.

What it leaves out: the activation-order heuristic ("act-order": quantizing columns by decreasing
H_jj), packing of the codes into int32 words and the CUDA kernels that multiply with them; the model
keeps fp32 weights that hold the dequantized values ("fake" quantization), which is what the error
and held-out loss measure. Embeddings and the output head are not quantized (as in the paper).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from llmlab.quantization import (
    IntQuantized,
    compute_qparams,
    dequantize_with,
    fake_quantize,
    quantize_int,
    quantize_with,
)
from llmlab.shapes import check_float, check_int, check_tensor

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class GPTQConfig:
    """How GPTQ (and the round-to-nearest baseline) stores a weight."""

    bits: int = 4  # code width (2..8)
    symmetric: bool = False  # zero-point (False, the reference code's default) or absmax codes
    group_size: int | None = None  # columns per scale; None = one scale per output channel
    damp: float = 0.01  # dampening: add damp * mean(diag H) to the diagonal (the paper's 1%)
    block_size: int = 128  # lazy-batch width (columns updated together)

    def __post_init__(self) -> None:
        quantize_int(torch.zeros(1, 2), self.bits)  # validates bits with the package's message
        if self.group_size is not None:
            check_int("group_size", self.group_size, minimum=1)
        check_float("damp", self.damp, 0.0)
        check_int("block_size", self.block_size, minimum=1)

    @property
    def granularity(self) -> str:
        return "channel" if self.group_size is None else "group"


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / N for inputs x (N, in): the Hessian of the mean squared layer-output error. (in, in)"""
    check_tensor("x", x, ndim=2, layout="(N, in)")
    x = x.detach().to(torch.float64)
    return 2.0 * x.T @ x / x.shape[0]  # (in, in)


def layer_output_error(weight: torch.Tensor, quantized: torch.Tensor, x: torch.Tensor) -> float:
    """Relative error of the layer's output, ||X W^T - X Q^T||^2 / ||X W^T||^2, for inputs x (N, in)."""
    x = x.detach().to(torch.float64)
    ref = x @ weight.detach().to(torch.float64).T  # (N, out)
    return float((x @ quantized.detach().to(torch.float64).T - ref).pow(2).sum() / ref.pow(2).sum())


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1, so that H^-1 = U^T U. (in, in)"""
    h = h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)  # (in, in)
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))  # (in, in)
    return torch.linalg.cholesky(h_inv, upper=True)  # (in, in)


def gptq_quantize_weight(weight: torch.Tensor, h: torch.Tensor, config: GPTQConfig | None = None) -> IntQuantized:
    """GPTQ (Algorithm 1) for one weight (out, in) with Hessian h (in, in) -> codes and scales.

    ``result.dequantize()`` is the quantized weight (out, in). Per-channel scales come from the
    original weight; a group's scale from its columns when the algorithm reaches the group (they
    already carry the error compensation of the columns before them), as in the reference code.

    >>> _ = torch.manual_seed(0)
    >>> layer, x = nn.Linear(16, 8), torch.randn(64, 16)  # x: calibration inputs (N, in)
    >>> q = gptq_quantize_weight(layer.weight.detach(), hessian(x), GPTQConfig(bits=4))
    >>> q.dequantize().shape
    torch.Size([8, 16])
    """
    config = config or GPTQConfig()
    check_tensor("weight", weight, ndim=2, layout="(out, in)")
    check_tensor("h", h, ndim=2, layout="(in, in)")
    rows, cols = weight.shape
    if h.shape != (cols, cols):
        raise ValueError(f"h must have shape ({cols}, {cols}) for a weight with {cols} columns, got {tuple(h.shape)}")
    g = config.group_size
    if g is not None and cols % g:
        raise ValueError(f"group_size must divide the number of columns {cols}, got {g}")
    w = weight.detach().to(torch.float64).clone()  # (out, in), updated as columns are quantized
    h = h.detach().to(torch.float64).clone()  # (in, in)
    dead = torch.diag(h) == 0  # inputs that never fire: their weight does not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = _inverse_hessian_cholesky(h, config.damp)  # (in, in)
    bits, sym = config.bits, config.symmetric
    block = config.block_size if g is None else g * max(1, config.block_size // g)  # whole groups
    scale, zero = compute_qparams(w, bits, sym, dim=1)  # (out, 1) each, used when g is None
    q = torch.zeros(rows, cols, dtype=torch.int8 if sym else torch.uint8)  # (out, in) codes
    scales, zeros = [], []
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()  # (out, B) the block, updated column by column
        err1 = torch.zeros_like(w1)  # (out, B) scaled errors, for the lazy update of the rest
        for i in range(i2 - i1):
            if g is not None and i % g == 0:  # a new group: its scale from its current values
                scale, zero = compute_qparams(w1[:, i : i + g], bits, sym, dim=1)  # (out, 1)
                scales.append(scale)
                zeros.append(zero)
            col = w1[:, i].to(torch.float32)[:, None]  # (out, 1)
            q[:, i1 + i] = quantize_with(col, scale, zero, bits, sym)[:, 0]
            deq = dequantize_with(q[:, i1 + i, None], scale, zero)[:, 0].to(torch.float64)  # (out,)
            err = (w1[:, i] - deq) / u[i1 + i, i1 + i]  # (out,)
            w1[:, i:] -= err[:, None] * u[i1 + i, i1 + i : i2][None, :]  # (out, B - i)
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]  # (out, in - i2): the lazy batch update
    if g is None:
        return IntQuantized(q, scale, zero, bits, sym, "channel", None)
    scale = torch.stack(scales, dim=1)  # (out, in / G, 1)
    zero = torch.stack(zeros, dim=1)  # (out, in / G, 1)
    return IntQuantized(q, scale, zero, bits, sym, "group", g)


def capture_inputs(model: nn.Module, module: nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """The inputs ``module`` receives while ``run()`` executes, flattened to (N, in)."""
    seen: list[torch.Tensor] = []

    def hook(_module, args):
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))  # (B * T, in)

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    if not seen:
        raise ValueError("module was not called by run(); is it part of the model?")
    return torch.cat(seen)  # (N, in)


def target_linears(model: nn.Module, names: Iterable[str] = LINEAR_NAMES) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` layers whose last name component is in ``names``, in module order."""
    names = tuple(names)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names]
    if not found:
        raise ValueError(f"model has no nn.Linear named one of {names}")
    return found


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module, calib_ids: torch.Tensor, config: GPTQConfig | None = None, names: Iterable[str] = LINEAR_NAMES
) -> dict[str, IntQuantized]:
    """GPTQ on every target linear of ``model``, in place (weights replaced by their dequantized
    values), sequentially: each layer's Hessian comes from inputs through the already-quantized
    layers before it. calib_ids (B, T) token ids. Returns {layer name: codes and scales}."""
    check_tensor("calib_ids", calib_ids, ndim=2, layout="(B, T)")
    config = config or GPTQConfig()
    was_training = model.training
    model.eval()
    out = {}
    for name, linear in target_linears(model, names):
        x = capture_inputs(model, linear, lambda: model(calib_ids))  # (B * T, in)
        out[name] = gptq_quantize_weight(linear.weight, hessian(x), config)
        linear.weight.copy_(out[name].dequantize().to(linear.weight.dtype))
    model.train(was_training)
    return out


@torch.no_grad()
def rtn_quantize_model(
    model: nn.Module, config: GPTQConfig | None = None, names: Iterable[str] = LINEAR_NAMES
) -> nn.Module:
    """Round-to-nearest baseline in the same format as GPTQ (same bits, scales, groups), in place."""
    config = config or GPTQConfig()
    for _, linear in target_linears(model, names):
        deq = fake_quantize(linear.weight, config.bits, config.symmetric, config.granularity, config.group_size)
        linear.weight.copy_(deq)
    return model


METHODS = ("rtn", "gptq", "nf4")


@torch.no_grad()
def quantize_linears(
    model: nn.Module,
    method: str,
    config: GPTQConfig | None = None,
    calib_ids: torch.Tensor | None = None,
    names: Iterable[str] = LINEAR_NAMES,
) -> tuple[nn.Module, int]:
    """A quantized copy of ``model`` and its weight storage in bytes.

    ``method``: "rtn" (round-to-nearest, ``config``'s format), "gptq" (needs ``calib_ids`` (B, T)) or
    "nf4" (QLoRA's NF4, block 64 with double quantization; ``config`` is ignored). Only the target
    linears are quantized; every other parameter (embeddings, output head, norms) is counted at
    fp32. Storage counts the codes at their width, fp16 scales and, for zero-point codes, b-bit zero
    points (``IntQuantized.storage_bits``), or ``NF4Tensor.storage_bits`` for NF4.
    """
    from llmlab.quantization import dequantize_nf4, quantize_nf4

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    config = config or GPTQConfig()
    quantized = copy.deepcopy(model).eval()
    targets = target_linears(quantized, names)
    target_params = {id(m.weight) for _, m in targets}
    other_bits = sum(32 * p.numel() for p in quantized.parameters() if id(p) not in target_params)
    if method == "gptq":
        if calib_ids is None:
            raise ValueError("calib_ids must be given for method='gptq' (token ids (B, T) to calibrate on)")
        codes = gptq_quantize_model(quantized, calib_ids, config, names)
        return quantized, (other_bits + sum(c.storage_bits() for c in codes.values())) // 8
    bits = other_bits
    for _, linear in targets:
        if method == "nf4":
            q = quantize_nf4(linear.weight)
            linear.weight.copy_(dequantize_nf4(q, linear.weight.dtype))
        else:
            q = quantize_int(linear.weight, config.bits, config.symmetric, config.granularity, config.group_size)
            linear.weight.copy_(q.dequantize().to(linear.weight.dtype))
        bits += q.storage_bits()
    return quantized, bits // 8

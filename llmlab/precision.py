"""Floating-point formats for training, dynamic loss scaling and fp32 master weights.

What it implements
- ``float_format`` / ``FORMATS``: what fp32, fp16 and bf16 can represent, computed from
  ``torch.finfo``: exponent and mantissa bits, largest value, smallest normal value, smallest
  subnormal value (smallest normal * epsilon) and machine epsilon (the gap above 1.0). fp16 has 5
  exponent bits (largest 65504, gradients below 2^-24 ~ 6e-8 flush to zero); bf16 keeps fp32's 8
  exponent bits (same range) with 7 mantissa bits (epsilon 2^-7 = 0.0078).
- ``update_is_lost``: whether w + update rounds back to w in a format, the reason mixed precision
  keeps fp32 master weights (Micikevicius et al. 2018, "Mixed Precision Training", section 3.1: an
  update smaller than half the spacing of w's neighbours is swallowed).
- ``DynamicLossScaler``: multiply the loss by a scale S before backward so small gradients survive
  in 16-bit, unscale the gradients (multiply by 1/S) before the optimizer step, skip the step when
  any gradient is inf or NaN and halve S, double S after ``growth_interval`` clean steps
  (Micikevicius et al. 2018, section 3.2). Written from scratch to behave like
  ``torch.amp.GradScaler``: the same sequence of scales, skipped steps and parameters on the same
  gradients (tested), with the same defaults (init 2^16, growth 2, back-off 0.5, interval 2000).
- ``MasterWeightOptimizer``: a 16-bit model whose optimizer works on fp32 copies: gradients are
  copied to the fp32 masters, the inner optimizer (AdamW by default) updates the masters, and the
  masters are rounded back into the model. Memory per parameter with AdamW: 2 (weight) + 2
  (gradient) + 4 (master) + 8 (m, v) = 16 bytes (Rajbhandari et al. 2020, "ZeRO", section 3.1).

What it leaves out: fp8 formats and their per-tensor scaling, the fused multi-tensor kernels of
apex/torch (``_amp_foreach_non_finite_check_and_unscale_``), loss scaling across ranks (the inf
flag must be all-reduced), and ``torch.autocast`` itself (the notebook uses PyTorch's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from llmlab.shapes import check_choice, check_float, check_int

FORMATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class FloatFormat:
    """What a binary floating-point format represents (all values from ``torch.finfo``)."""

    name: str  # "fp32" | "fp16" | "bf16"
    bits: int  # storage bits
    exponent_bits: int  # bits - 1 (sign) - mantissa_bits
    mantissa_bits: int  # stored fraction bits (-log2(eps))
    max: float  # largest finite value
    smallest_normal: float  # 2^(1 - bias): below it precision falls off (subnormals)
    smallest_subnormal: float  # smallest_normal * eps: anything below half of it rounds to 0
    eps: float  # gap between 1.0 and the next representable value


def float_format(name: str) -> FloatFormat:
    """The facts of "fp32", "fp16" or "bf16" from ``torch.finfo``.

    >>> float_format("fp16").max, float_format("bf16").mantissa_bits
    (65504.0, 7)
    """
    check_choice("name", name, FORMATS)
    info = torch.finfo(FORMATS[name])
    mantissa = round(-math.log2(info.eps))
    return FloatFormat(name=name, bits=info.bits, exponent_bits=info.bits - 1 - mantissa, mantissa_bits=mantissa,
                       max=float(info.max), smallest_normal=float(info.smallest_normal),
                       smallest_subnormal=float(info.smallest_normal * info.eps), eps=float(info.eps))


def _dtype(name_or_dtype: str | torch.dtype, arg: str = "dtype") -> torch.dtype:
    if isinstance(name_or_dtype, torch.dtype):
        if name_or_dtype not in FORMATS.values():
            raise ValueError(f"{arg} must be one of {list(FORMATS.values())}, got {name_or_dtype}")
        return name_or_dtype
    check_choice(arg, name_or_dtype, FORMATS)
    return FORMATS[name_or_dtype]


def update_is_lost(weight: torch.Tensor, update: torch.Tensor, dtype: str | torch.dtype) -> torch.Tensor:
    """Elementwise: does ``weight + update`` computed in ``dtype`` equal ``weight`` in ``dtype``?

    >>> update_is_lost(torch.tensor([1.0]), torch.tensor([1e-4]), "bf16")   # 1e-4 < eps/2 = 0.0039
    tensor([True])
    """
    dtype = _dtype(dtype)
    w = weight.to(dtype)
    return (w + update.to(dtype)) == w


# ----------------------------------------------------------------------------------------------
# Dynamic loss scaling


def _grads(target: torch.optim.Optimizer | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(target, torch.optim.Optimizer):
        return [p.grad for g in target.param_groups for p in g["params"] if p.grad is not None]
    return [p.grad for p in target if p.grad is not None]


class DynamicLossScaler:
    """Loss scaling with back-off on overflow and growth after clean steps (GradScaler's rule).

    Per step: ``scaler.scale(loss).backward()``; ``scaler.step(optimizer)`` (unscales, skips the
    step if any gradient is inf/NaN); ``scaler.update()`` (halve the scale after an overflow,
    double it after ``growth_interval`` clean steps in a row).

    >>> scaler = DynamicLossScaler(init_scale=8.0, growth_interval=1)
    >>> scaler.scale(torch.tensor(1.0)).item()
    8.0
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000) -> None:
        self.scale_value = check_float("init_scale", init_scale, low=0.0, low_open=True)
        self.growth_factor = check_float("growth_factor", growth_factor, low=1.0, low_open=True)
        self.backoff_factor = check_float("backoff_factor", backoff_factor, 0.0, 1.0, low_open=True, high_open=True)
        self.growth_interval = check_int("growth_interval", growth_interval, minimum=1)
        self.growth_tracker = 0  # clean steps since the last change of scale
        self.found_inf = False  # set by unscale_ for the current step
        self._unscaled = False

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """loss * S (in the loss's dtype; S is a power of two, so the product is exact)."""
        return loss * self.scale_value

    def unscale_(self, target: torch.optim.Optimizer | Iterable[torch.Tensor]) -> bool:
        """Multiply every gradient by 1/S in place; return (and remember) whether any is inf or NaN."""
        inv = torch.tensor(self.scale_value, dtype=torch.float64).reciprocal().float()  # as GradScaler does
        found = False
        for g in _grads(target):
            found |= not bool(torch.isfinite(g).all())
            g.mul_(inv.to(g.dtype))
        self.found_inf, self._unscaled = found, True
        return found

    def step(self, optimizer: torch.optim.Optimizer, closure: Callable | None = None) -> bool:
        """Unscale (unless done already) and step unless a gradient overflowed; return True if it stepped."""
        if not self._unscaled:
            self.unscale_(optimizer)
        if self.found_inf:
            return False
        optimizer.step() if closure is None else optimizer.step(closure)
        return True

    def update(self) -> float:
        """Back off after an overflow, grow after ``growth_interval`` clean steps; return the new scale."""
        if self.found_inf:
            self.scale_value *= self.backoff_factor
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                grown = self.scale_value * self.growth_factor
                if math.isfinite(grown):
                    self.scale_value = grown
                self.growth_tracker = 0
        self.found_inf, self._unscaled = False, False
        return self.scale_value


# ----------------------------------------------------------------------------------------------
# fp32 master weights


class MasterWeightOptimizer:
    """Train a 16-bit model with an optimizer that updates fp32 master copies of its parameters.

    ``step()``: copy each 16-bit gradient into its master's fp32 ``.grad`` (unscaling and skipping
    on overflow when a ``DynamicLossScaler`` is given), run the inner optimizer on the masters, free
    the fp32 gradients, and round the masters back into the model's parameters.

    >>> model = nn.Linear(4, 2).to(torch.bfloat16)
    >>> opt = MasterWeightOptimizer(model.parameters(), lr=1e-3)
    >>> opt.master_params[0].dtype
    torch.float32
    """

    def __init__(self, params: Iterable[nn.Parameter], optimizer_cls: type = torch.optim.AdamW, **kwargs) -> None:
        self.model_params = [p for p in params if p.requires_grad]
        if not self.model_params:
            raise ValueError("params must hold at least one parameter that requires grad, got none")
        self.master_params = [p.detach().float().clone().requires_grad_(True) for p in self.model_params]
        self.optimizer = optimizer_cls(self.master_params, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def step(self, scaler: DynamicLossScaler | None = None) -> bool:
        """One update of the masters and the model; return False if the scaler skipped it."""
        for p, m in zip(self.model_params, self.master_params, strict=True):
            m.grad = None if p.grad is None else p.grad.float()  # (same shape) fp32 copy of the gradient
        stepped = True
        if scaler is None:
            self.optimizer.step()
        else:
            stepped = scaler.step(self.optimizer)
        for p, m in zip(self.model_params, self.master_params, strict=True):
            m.grad = None  # the fp32 gradient lives only during the step
            if stepped:
                with torch.no_grad():
                    p.copy_(m)  # round the fp32 master into the 16-bit weight
        return stepped

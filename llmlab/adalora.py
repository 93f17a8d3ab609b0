"""AdaLoRA: an SVD-shaped low-rank update whose rank budget is moved to where it matters.

What it implements (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning", ICLR; reference implementation: peft's ``AdaLoraConfig`` / ``SVDLinear`` / ``RankAllocator``)
- ``SVDLinear``: y = base_layer(x) + (alpha / r) * P diag(lambda) Q x with ``lora_B`` = P (out, R),
  ``lora_E`` = lambda (R, 1) and ``lora_A`` = Q (R, in) (peft's names). lambda starts at zero, so the
  model is unchanged at init; P and Q start N(0, 0.02^2). Pruning a "triplet" (P[:, i], lambda_i,
  Q[i]) means setting lambda_i to zero: unlike truncating a plain B A, this removes one rank-1
  term without touching the others, and it can come back if later judged important.
- ``orthogonal_regularization``: R(P, Q) = ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 (paper eq. 4), which
  keeps P and Q close to orthogonal so that lambda really behaves like singular values. peft uses
  the unsquared Frobenius norm averaged over matrices (``squared=False`` reproduces it).
- ``RankAllocator``: sensitivity I = |w * dL/dw| for every entry, smoothed by an EMA
  (I_bar <- beta1 I_bar + (1 - beta1) I) with an uncertainty EMA (U_bar <- beta2 U_bar + (1 - beta2)
  |I - I_bar|); entry score s = I_bar * U_bar; triplet score S_i = s(lambda_i) + mean_j s(P_ji) +
  mean_j s(Q_ij) (paper eqs. 7-10). The total budget b(t) (number of kept triplets over all modules)
  follows the paper's cubic schedule: b(0) for the first t_i steps (initial warmup), then
  b(T) + (b(0) - b(T)) (1 - (t - t_i) / (T - t_i - t_f))^3, then b(T) for the last t_f steps (final
  warmup, with the ranks fixed). Every ``deltaT`` steps the lowest-scoring triplets are masked so that
  b(t) remain. ``ranks`` reports the rank each module ends with.

Left out: physically shrinking the matrices after allocation (peft does not either), AdaLoRA on
embeddings/convolutions, DeepSpeed gradient gathering. Shape letters follow ``llmlab.shapes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmlab.peft_utils import check_module, wrap_matching_linears
from llmlab.shapes import check_float, check_int


@dataclass(frozen=True)
class AdaLoRAConfig:
    """Where AdaLoRA goes, its starting and target ranks, and the budget schedule."""

    init_r: int = 12  # rank R each module starts with (triplets per module)
    target_r: int = 8  # average rank kept at the end: total budget b(T) = target_r * modules
    alpha: float = 8.0  # the update is scaled by alpha / init_r
    dropout: float = 0.0  # dropout on the update's input only
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")  # name suffixes, or one full-match regex
    total_step: int = 1000  # T: training steps the schedule is laid out over
    tinit: int = 0  # t_i: initial warmup steps at the full budget b(0)
    tfinal: int = 0  # t_f: final steps at b(T) with the ranks frozen
    deltaT: int = 1  # prune every deltaT steps while the budget shrinks
    beta1: float = 0.85  # EMA factor of the sensitivity
    beta2: float = 0.85  # EMA factor of the uncertainty
    orth_reg_weight: float = 0.5  # gamma: weight of the orthogonal regularizer in the loss

    def __post_init__(self) -> None:
        check_int("init_r", self.init_r, minimum=1)
        check_int("target_r", self.target_r, minimum=0)
        if self.target_r > self.init_r:
            raise ValueError(f"target_r must be <= init_r={self.init_r}, got {self.target_r}")
        check_float("alpha", self.alpha, low=0.0, low_open=True)
        check_float("dropout", self.dropout, 0.0, 1.0, high_open=True)
        for name in ("total_step", "deltaT"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("tinit", "tfinal"):
            check_int(name, getattr(self, name), minimum=0)
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"tinit must be < total_step - tfinal = {self.total_step - self.tfinal} to leave "
                f"steps for pruning, got tinit={self.tinit}"
            )
        check_float("beta1", self.beta1, 0.0, 1.0, low_open=True, high_open=True)
        check_float("beta2", self.beta2, 0.0, 1.0, low_open=True, high_open=True)
        check_float("orth_reg_weight", self.orth_reg_weight, low=0.0)
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scaling(self) -> float:
        return self.alpha / self.init_r

    @classmethod
    def tiny(cls, total_step: int = 20) -> AdaLoRAConfig:
        """For tests: rank 4 -> 2 over ``total_step`` steps, 2 warmup steps at each end."""
        return cls(init_r=4, target_r=2, alpha=8.0, total_step=total_step, tinit=2, tfinal=2)


class SVDLinear(nn.Module):
    """A frozen linear layer plus (alpha / r) P diag(lambda) Q: x (..., in) -> (..., out)."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        self.r = check_int("r", r, minimum=1)
        self.scaling = check_float("alpha", alpha, low=0.0, low_open=True) / self.r
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        base_layer.requires_grad_(False)
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=w.device, dtype=w.dtype))  # (R, in) Q
        self.lora_E = nn.Parameter(torch.zeros(self.r, 1, device=w.device, dtype=w.dtype))  # (R, 1) lambda
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, device=w.device, dtype=w.dtype))  # (out, R) P
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("rank_mask", torch.ones(self.r, dtype=torch.bool, device=w.device))  # (R,) kept triplets
        nn.init.normal_(self.lora_A, std=0.02)
        nn.init.normal_(self.lora_B, std=0.02)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) P diag(lambda) Q. (out, in)"""
        return self.scaling * (self.lora_B @ (self.lora_A * self.lora_E))  # (out, R) @ (R, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out)
        h = self.lora_dropout(x) @ (self.lora_A * self.lora_E).T  # (..., R): Q x scaled by lambda
        return y + self.scaling * (h @ self.lora_B.T)  # (..., out)

    @torch.no_grad()
    def apply_mask(self, keep: torch.Tensor) -> None:
        """Prune triplets: lambda_i = 0 where ``keep`` (R,) is False; remember the mask."""
        self.rank_mask.copy_(keep)
        self.lora_E.masked_fill_(~keep[:, None], 0.0)

    @property
    def rank(self) -> int:
        """Triplets kept by the last allocation."""
        return int(self.rank_mask.sum())


def inject_adalora(model: nn.Module, config: AdaLoRAConfig) -> nn.Module:
    """Wrap every matching ``nn.Linear`` in an ``SVDLinear`` (in place) and freeze everything else."""
    check_module("model", model)
    if not isinstance(config, AdaLoRAConfig):
        raise TypeError(f"config must be an AdaLoRAConfig, got {type(config).__name__}")
    return wrap_matching_linears(
        model,
        config.target_modules,
        lambda linear: SVDLinear(linear, config.init_r, config.alpha, config.dropout),
        trainable=lambda name: ".lora_" in name,
        skip=(SVDLinear,),
    )


def svd_layers(model: nn.Module) -> dict[str, SVDLinear]:
    """Every ``SVDLinear`` in ``model``, by module name (sorted, so the order is stable)."""
    return dict(sorted((n, m) for n, m in model.named_modules() if isinstance(m, SVDLinear)))


def orthogonal_regularization(model: nn.Module, squared: bool = True) -> torch.Tensor:
    """Mean over the P and Q matrices of ||P^T P - I||_F^2 and ||Q Q^T - I||_F^2 (paper eq. 4).

    ``squared=False`` uses ||.||_F, as peft does. Zero exactly when P has orthonormal columns and Q
    orthonormal rows.
    """
    terms = []
    for layer in svd_layers(model).values():
        for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):  # (R, R) each
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)  # (R, R)
            norm = torch.linalg.matrix_norm(gram - eye)
            terms.append(norm.square() if squared else norm)
    if not terms:
        raise ValueError("model has no SVDLinear layers; call inject_adalora(model, config) first")
    return torch.stack(terms).mean()  # (): mean over the 2 * modules matrices


def budget_schedule(step: int, config: AdaLoRAConfig, init_budget: int, target_budget: int) -> tuple[int, bool]:
    """(total budget b(t), whether to prune at this step) under the cubic schedule.

    >>> budget_schedule(0, AdaLoRAConfig.tiny(), init_budget=16, target_budget=8)
    (16, False)
    """
    t_i, t_f, total = config.tinit, config.tfinal, config.total_step
    if step <= t_i:  # initial warmup: every triplet is kept and scored
        return init_budget, False
    if step > total - t_f:  # final warmup: ranks fixed at the target
        return target_budget, True
    progress = 1 - (step - t_i) / (total - t_f - t_i)
    budget = int((init_budget - target_budget) * progress**3 + target_budget)
    return budget, step % config.deltaT == 0


class RankAllocator:
    """Scores every triplet of every ``SVDLinear`` and prunes the weakest down to the scheduled budget.

    Call ``step(model, global_step)`` after ``loss.backward()`` (gradients present), before
    ``zero_grad()``, once per optimisation step.
    """

    def __init__(self, model: nn.Module, config: AdaLoRAConfig) -> None:
        self.config = config
        layers = svd_layers(model)
        if not layers:
            raise ValueError("model has no SVDLinear layers; call inject_adalora(model, config) first")
        self.init_budget = sum(layer.r for layer in layers.values())
        self.target_budget = config.target_r * len(layers)
        self.ipt: dict[str, torch.Tensor] = {}  # smoothed sensitivity I_bar per parameter
        self.unc: dict[str, torch.Tensor] = {}  # smoothed uncertainty U_bar per parameter

    @torch.no_grad()
    def update_importance(self, model: nn.Module) -> None:
        """I = |w * grad|; I_bar <- b1 I_bar + (1 - b1) I; U_bar <- b2 U_bar + (1 - b2) |I - I_bar|."""
        b1, b2 = self.config.beta1, self.config.beta2
        for name, layer in svd_layers(model).items():
            for part in ("lora_A", "lora_E", "lora_B"):
                p = getattr(layer, part)
                if p.grad is None:
                    raise ValueError(f"{name}.{part} has no gradient; call step() after loss.backward()")
                key = f"{name}.{part}"
                sensitivity = (p * p.grad).abs()  # same shape as p: (R, in), (R, 1) or (out, R)
                ipt = self.ipt.get(key, torch.zeros_like(p))  # same shape as p
                unc = self.unc.get(key, torch.zeros_like(p))  # same shape as p
                self.ipt[key] = b1 * ipt + (1 - b1) * sensitivity
                self.unc[key] = b2 * unc + (1 - b2) * (sensitivity - self.ipt[key]).abs()

    def triplet_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """S_i = s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji), with s = I_bar * U_bar. (R,) per module."""
        scores = {}
        for name in svd_layers(model):
            s = {
                part: self.ipt[f"{name}.{part}"] * self.unc[f"{name}.{part}"] for part in ("lora_A", "lora_E", "lora_B")
            }
            scores[name] = s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)  # (R,)
        return scores

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, int]:
        """Keep the ``budget`` highest-scoring triplets over all modules; return each module's rank."""
        scores = self.triplet_scores(model)
        pruned = self.init_budget - budget
        if pruned <= 0:
            keep = {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}  # (R,) each
        else:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=pruned).values  # ()
            keep = {name: s > threshold for name, s in scores.items()}
        for name, layer in svd_layers(model).items():
            layer.apply_mask(keep[name])
        return ranks(model)

    def step(self, model: nn.Module, global_step: int) -> int:
        """Update the scores and prune on schedule; during the final warmup, re-apply the fixed mask.

        Returns the budget b(t) for this step.
        """
        global_step = check_int("global_step", global_step, minimum=0)
        final_start = self.config.total_step - self.config.tfinal
        if global_step < final_start:
            self.update_importance(model)
            budget, prune = budget_schedule(global_step, self.config, self.init_budget, self.target_budget)
            if prune:
                self.mask_to_budget(model, budget)
            return budget
        if global_step == final_start:  # the last allocation: b(T), then the ranks stay fixed
            self.mask_to_budget(model, self.target_budget)
        else:
            for layer in svd_layers(model).values():
                layer.apply_mask(layer.rank_mask.clone())
        return self.target_budget


def ranks(model: nn.Module) -> dict[str, int]:
    """The rank each module has after the last allocation (``init_r`` before any pruning)."""
    return {name: layer.rank for name, layer in svd_layers(model).items()}

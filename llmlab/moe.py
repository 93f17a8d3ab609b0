"""Sparse mixture of experts: top-k routing, load-balancing loss, expert capacity and usage stats.

What it implements
- ``route``: the router of Mixtral (Jiang et al. 2024) as in transformers'
  ``MixtralTopKRouter``: softmax over all E router logits (in float32), keep the top k, and
  renormalize those k weights to sum to one (``renormalize=False`` keeps the raw probabilities,
  as Switch Transformer does for k = 1; with k = 1 renormalizing would make every weight 1 and
  cut the router off from the language-model gradient).
- ``load_balancing_loss``: the auxiliary loss of Switch Transformer (Fedus et al. 2021, eq. 4-6),
  E * sum_e f_e * P_e, with f_e the top-k assignments to expert e per token and P_e the mean
  router probability of e, exactly as transformers' ``load_balancing_loss_func`` (all layers'
  tokens pooled). With top-k routing sum_e f_e = k, so a perfectly balanced router scores k.
- ``SparseMoE``: a layer of E SwiGLU experts (``experts.{e}.gate_proj/up_proj/down_proj``) and a
  linear ``gate`` router, equal to transformers' ``MixtralSparseMoeBlock``. An optional capacity
  factor (GShard, Lepikhin et al. 2020; Switch) caps each expert at
  ceil(capacity_factor * N * k / E) assignments; the overflow is dropped (that slot adds nothing,
  the token still passes through the residual connection) and counted.
- ``MoEStats``: per-layer router logits, assignments per expert and dropped assignments.

What it leaves out: router z-loss, jitter noise, shared experts (DeepSeekMoE), expert
parallelism, and fused grouped-GEMM kernels (experts run in a Python loop).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.ffn import SwiGLUMLP
from llmlab.shapes import check_float, check_int, check_tensor


@dataclass
class MoEStats:
    """What one MoE layer did with N tokens and E experts."""

    router_logits: torch.Tensor  # (N, E) router scores before the softmax (for the aux loss)
    expert_indices: torch.Tensor  # (N, k) chosen experts per token, best first
    tokens_per_expert: torch.Tensor  # (E,) assignments routed to each expert (before capacity)
    dropped_per_expert: torch.Tensor  # (E,) assignments dropped because the expert was full
    capacity: int | None  # assignments each expert may take, None = unlimited

    @property
    def dropped_fraction(self) -> float:
        """Share of all (token, expert) assignments that were dropped."""
        total = int(self.tokens_per_expert.sum())
        return float(self.dropped_per_expert.sum()) / total if total else 0.0


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (N, E) -> (weights (N, k) float32, expert indices (N, k)), best expert first.

    >>> w, idx = route(torch.tensor([[0.0, 2.0, 1.0]]), top_k=2)
    >>> idx.tolist()
    [[1, 2]]
    """
    check_tensor("router_logits", router_logits, ndim=2, layout="(N, E)")
    top_k = check_int("top_k", top_k, minimum=1)
    if top_k > router_logits.shape[-1]:
        raise ValueError(f"top_k must be <= the number of experts E={router_logits.shape[-1]}, got {top_k}")
    probs = torch.softmax(router_logits.float(), dim=-1)  # (N, E)
    weights, indices = torch.topk(probs, top_k, dim=-1)  # (N, k) each
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)  # (N, k): the k gates sum to one
    return weights, indices


def load_balancing_loss(
    router_logits: torch.Tensor | Sequence[torch.Tensor],
    top_k: int,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """E * sum_e f_e * P_e over the tokens of one layer (N, E) or of several layers pooled.

    f_e = (top-k assignments to e) / N; P_e = mean router probability of e. Both are 1/E-flat
    (f_e = k/E) for a balanced router; the product term pushes f toward flat because P is
    differentiable. ``token_mask`` (N,) of 1/0 leaves padding tokens out (same mask for every layer).

    >>> float(load_balancing_loss(torch.zeros(4, 8), top_k=2))
    2.0
    """
    layers = [router_logits] if isinstance(router_logits, torch.Tensor) else list(router_logits)
    if not layers:
        raise ValueError("router_logits must hold at least one (N, E) tensor")
    n_experts = layers[0].shape[-1]
    if token_mask is not None:
        check_tensor("token_mask", token_mask, ndim=1, layout="(N,)")
        if token_mask.shape[0] != layers[0].shape[0]:
            raise ValueError(f"token_mask must have N={layers[0].shape[0]} entries, got {token_mask.shape[0]}")
    counts = torch.zeros(n_experts, device=layers[0].device)  # (E,)
    prob_sum = torch.zeros(n_experts, device=layers[0].device)  # (E,)
    rows = torch.zeros((), device=layers[0].device)  # (): number of (unmasked) tokens
    for i, logits in enumerate(layers):
        check_tensor(f"router_logits[{i}]", logits, ndim=2, layout="(N, E)")
        w = torch.ones(logits.shape[0], device=logits.device) if token_mask is None else token_mask.float()  # (N,)
        probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
        _, idx = torch.topk(probs, top_k, dim=-1)  # (N, k)
        onehot = F.one_hot(idx, n_experts).float()  # (N, k, E)
        counts = counts + (onehot.sum(dim=1) * w[:, None]).sum(dim=0)  # (E,)
        prob_sum = prob_sum + (probs * w[:, None]).sum(dim=0)  # (E,)
        rows = rows + w.sum()
    return n_experts * torch.sum((counts / rows) * (prob_sum / rows))


def capacity_keep(indices: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments (N, k) fit into experts of ``capacity`` slots; first choices are served first.

    Slots fill in priority order: every token's first choice (in token order), then every second
    choice, as in GShard. Returns a boolean (N, k) mask.
    """
    order = indices.t().reshape(-1)  # (k*N,): slot-major priority
    onehot = F.one_hot(order, n_experts)  # (k*N, E)
    position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # (k*N,): place in its expert's queue
    keep = position < capacity  # (k*N,)
    return keep.view(indices.shape[1], indices.shape[0]).t()  # (N, k)


class SparseMoE(nn.Module):
    """Top-k routed SwiGLU experts: x (B, T, C) -> (y (B, T, C), MoEStats).

    y_t = sum over the k chosen experts e of gate_e(x_t) * expert_e(x_t).

    >>> moe = SparseMoE(n_embd=16, hidden=32, n_experts=4, top_k=2)
    >>> y, stats = moe(torch.randn(2, 3, 16))
    >>> y.shape, stats.tokens_per_expert.sum().item()
    (torch.Size([2, 3, 16]), 12)
    """

    def __init__(
        self,
        n_embd: int,
        hidden: int,
        n_experts: int,
        top_k: int = 2,
        capacity_factor: float | None = None,
        renormalize: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.n_experts = check_int("n_experts", n_experts, minimum=1)
        self.top_k = check_int("top_k", top_k, minimum=1)
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k must be <= n_experts={n_experts}, got {top_k}")
        if capacity_factor is not None:
            capacity_factor = check_float("capacity_factor", capacity_factor, low=0.0, low_open=True)
        self.capacity_factor = capacity_factor
        self.renormalize = renormalize
        self.gate = nn.Linear(n_embd, n_experts, bias=False)  # the router: one logit per expert
        self.experts = nn.ModuleList(SwiGLUMLP(n_embd, hidden, bias=bias) for _ in range(n_experts))

    def capacity(self, n_tokens: int) -> int | None:
        """ceil(capacity_factor * N * k / E) slots per expert, or None without a capacity factor."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        check_tensor("x", x, ndim=3, layout="(B, T, C)")
        b, t, c = x.shape
        flat = x.reshape(b * t, c)  # (N, C)
        logits = self.gate(flat)  # (N, E)
        weights, indices = route(logits, self.top_k, self.renormalize)  # (N, k) each
        capacity = self.capacity(b * t)
        keep = torch.ones_like(indices, dtype=torch.bool)  # (N, k)
        if capacity is not None:
            keep = capacity_keep(indices, self.n_experts, capacity)  # (N, k)
        out = self._run_experts(flat, weights, indices, keep)  # (N, C)
        counts = torch.bincount(indices.reshape(-1), minlength=self.n_experts)  # (E,)
        dropped = torch.bincount(indices[~keep], minlength=self.n_experts)  # (E,)
        stats = MoEStats(logits, indices, counts, dropped, capacity)
        return out.view(b, t, c), stats  # (B, T, C)

    def _run_experts(self, flat, weights, indices, keep):
        """Send each kept (token, slot) to its expert; sum the gated outputs per token. (N, C)"""
        out = torch.zeros_like(flat)  # (N, C)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where((indices == e) & keep)  # (n_e,) each
            if token_idx.numel() == 0:
                continue
            y = expert(flat[token_idx])  # (n_e, C)
            y = y * weights[token_idx, slot, None].to(y.dtype)  # (n_e, C)
            out.index_add_(0, token_idx, y)
        return out

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

- DeepSeek-style MoE (``DeepSeekMoE``, ``deepseek_route``): fine-grained routed experts plus
  shared experts every token passes through (DeepSeekMoE, Dai et al. 2024); DeepSeek-V3's router
  (DeepSeek-AI 2024, arXiv:2412.19437, section 2.1.2): sigmoid affinities s, top-k chosen on s + b
  within the best ``topk_group`` of ``n_group`` expert groups (group score = sum of its two best
  s + b), gates = the chosen s (not s + b), normalized to sum to one and scaled by
  ``routed_scaling_factor``; equal to transformers' ``DeepseekV3MoE`` (``deepseek_state_from_hf``
  converts its stacked expert weights). The per-expert bias b is the auxiliary-loss-free
  balancing: it only steers the choice, and ``update_routing_bias`` moves it by gamma against each
  expert's load after every step (b_e += gamma * sign(mean load - load_e)).
  ``sequence_balance_loss`` is V3's complementary sequence-wise auxiliary loss.

What it leaves out: router z-loss, jitter noise, expert parallelism, node-limited routing, and
fused grouped-GEMM kernels (experts run in a Python loop).
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


# ----------------------------------------------------------------------------------------------
# DeepSeek-style MoE: shared + fine-grained routed experts, bias-based (auxiliary-loss-free) balancing


def deepseek_route(
    router_logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing: router logits (N, E), bias (E,) -> (gates (N, k), expert indices (N, k)).

    >>> g, idx = deepseek_route(torch.tensor([[0.0, 2.0, 1.0, -1.0]]), torch.zeros(4), top_k=2)
    >>> sorted(idx[0].tolist()), round(float(g.sum()), 4)
    ([1, 2], 1.0)
    """
    check_tensor("router_logits", router_logits, ndim=2, layout="(N, E)")
    n, e = router_logits.shape
    check_tensor("bias", bias, ndim=1, layout="(E,)")
    if bias.shape[0] != e:
        raise ValueError(f"bias must have E={e} entries, got {bias.shape[0]}")
    top_k, n_group, topk_group = (check_int(k, v, minimum=1) for k, v in
                                  (("top_k", top_k), ("n_group", n_group), ("topk_group", topk_group)))
    if e % n_group or topk_group > n_group or top_k > topk_group * (e // n_group):
        raise ValueError(f"need E={e} divisible by n_group={n_group}, topk_group <= n_group and top_k <= "
                         f"topk_group * E / n_group, got topk_group={topk_group}, top_k={top_k}")
    scores = torch.sigmoid(router_logits.float())  # (N, E): affinities s
    choice = scores + bias.float()  # (N, E): s + b decides, s weighs
    grouped = choice.view(n, n_group, e // n_group)  # (N, G, E/G)
    group_score = grouped.topk(min(2, e // n_group), dim=-1).values.sum(-1)  # (N, G)
    keep_group = torch.zeros_like(group_score).scatter_(1, group_score.topk(topk_group, dim=-1).indices, 1.0)
    allowed = keep_group[:, :, None].expand_as(grouped).reshape(n, e).bool()  # (N, E)
    indices = choice.masked_fill(~allowed, float("-inf")).topk(top_k, dim=-1).indices  # (N, k)
    gates = scores.gather(1, indices)  # (N, k)
    if norm_topk_prob:
        gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
    return gates * routed_scaling_factor, indices


def update_routing_bias(bias: torch.Tensor, tokens_per_expert: torch.Tensor, gamma: float) -> torch.Tensor:
    """Auxiliary-loss-free balancing step: b_e + gamma * sign(mean load - load_e), (E,) -> (E,).

    >>> update_routing_bias(torch.zeros(3), torch.tensor([6, 2, 4]), gamma=0.1).tolist()
    [-0.10000000149011612, 0.10000000149011612, 0.0]
    """
    check_tensor("bias", bias, ndim=1, layout="(E,)")
    check_tensor("tokens_per_expert", tokens_per_expert, ndim=1, layout="(E,)")
    gamma = check_float("gamma", gamma, low=0.0)
    load = tokens_per_expert.float()  # (E,)
    return bias + gamma * torch.sign(load.mean() - load)


def sequence_balance_loss(router_logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's balance loss over one sequence's T tokens: sum_e f_e P_e.

    f_e = E / (k T) * (tokens choosing e), P_e = mean over tokens of s_e / sum_j s_j (normalized
    sigmoid affinities); a balanced router scores 1. router_logits (T, E), indices (T, k).
    """
    check_tensor("router_logits", router_logits, ndim=2, layout="(T, E)")
    check_tensor("indices", indices, ndim=2, layout="(T, k)")
    t, e = router_logits.shape
    k = indices.shape[1]
    s = torch.sigmoid(router_logits.float())  # (T, E)
    p = (s / s.sum(dim=-1, keepdim=True)).mean(dim=0)  # (E,)
    f = torch.bincount(indices.reshape(-1), minlength=e).float() * e / (k * t)  # (E,)
    return (f * p).sum()


def max_violation(tokens_per_expert: torch.Tensor) -> float:
    """MaxVio = max_e load_e / mean load - 1 (DeepSeek-AI 2024, Wang et al. 2024): 0 when balanced."""
    load = tokens_per_expert.float()  # (E,)
    return float(load.max() / load.mean() - 1)


class DeepSeekMoE(SparseMoE):
    """Shared experts plus top-k of E fine-grained routed experts: x (B, T, C) -> (y, MoEStats).

    y = shared(x) + sum over chosen e of gate_e(x) expert_e(x). The routing bias lives in the buffer
    ``gate.e_score_correction_bias`` (transformers' name) and is changed only by
    ``update_routing_bias``, never by gradients.

    >>> moe = DeepSeekMoE(n_embd=16, hidden=8, n_experts=8, top_k=2, n_shared_experts=1)
    >>> y, stats = moe(torch.randn(2, 3, 16))
    >>> y.shape, stats.tokens_per_expert.sum().item()
    (torch.Size([2, 3, 16]), 12)
    """

    def __init__(self, n_embd: int, hidden: int, n_experts: int, top_k: int, n_shared_experts: int = 1,
                 n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0) -> None:
        super().__init__(n_embd, hidden, n_experts, top_k)
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.gate.register_buffer("e_score_correction_bias", torch.zeros(n_experts))  # (E,): b
        n_shared = check_int("n_shared_experts", n_shared_experts, minimum=0)
        self.shared_experts = SwiGLUMLP(n_embd, hidden * n_shared) if n_shared else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        check_tensor("x", x, ndim=3, layout="(B, T, C)")
        b, t, c = x.shape
        flat = x.reshape(b * t, c)  # (N, C)
        logits = self.gate(flat)  # (N, E)
        gates, indices = deepseek_route(logits, self.gate.e_score_correction_bias, self.top_k, self.n_group,
                                        self.topk_group, self.norm_topk_prob, self.routed_scaling_factor)
        out = self._run_experts(flat, gates, indices, torch.ones_like(indices, dtype=torch.bool))  # (N, C)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)  # (N, C): every token, no routing
        counts = torch.bincount(indices.reshape(-1), minlength=self.n_experts)  # (E,)
        stats = MoEStats(logits, indices, counts, torch.zeros_like(counts), None)
        return out.view(b, t, c), stats  # (B, T, C)


def deepseek_state_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``DeepseekV3MoE`` state dict -> ``DeepSeekMoE``'s (stacked experts split per expert)."""
    out = {k: v for k, v in state.items() if not k.startswith("experts.")}
    gate_up, down = state["experts.gate_up_proj"], state["experts.down_proj"]  # (E, 2F, C), (E, C, F)
    for e in range(gate_up.shape[0]):
        gate, up = gate_up[e].chunk(2, dim=0)  # (F, C) each
        out[f"experts.{e}.gate_proj.weight"] = gate
        out[f"experts.{e}.up_proj.weight"] = up
        out[f"experts.{e}.down_proj.weight"] = down[e]
    return out

"""Muon: momentum, then orthogonalize each weight matrix's update (Newton-Schulz); AdamW for the rest.

What it implements
- ``newton_schulz``: G (..., A, B) -> an approximately orthogonal matrix with G's singular vectors,
  U S' V^T with every singular value S'_ii pushed toward 1 (G = U S V^T). Five steps of the quintic
  X <- a X + (b X X^T + c (X X^T)^2) X after scaling G to unit Frobenius norm (so every singular
  value starts in (0, 1]). The coefficients (3.4445, -4.7750, 2.0315) make the map steep near 0, so
  small singular values grow fast; the price is that they end near 1 (roughly 0.7 to 1.2), not at 1,
  which does not hurt training (Jordan et al. 2024). With (1.5, -0.5, 0) the step is the classical
  cubic Newton-Schulz iteration, which converges to U V^T itself (tested against the SVD).
- ``Muon`` (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"): for a
  weight matrix W with gradient G, keep a momentum buffer M <- mu M + (1 - mu) G, take the Nesterov
  look-ahead U = (1 - mu) G + mu M, and step W <- W - lr * s * newton_schulz(U), after decoupled
  weight decay W <- (1 - lr * wd) W. Orthogonalizing gives every direction of the update the same
  size, so directions the gradient rarely points along (small singular values) still move; that is
  why it learns faster per step than AdamW on the matrices of a Transformer's blocks. The scale s
  is either ``"match_rms_adamw"``: 0.2 sqrt(max(A, B)), which gives the update the RMS of a typical
  AdamW update, so the AdamW learning rate and weight decay carry over (Liu et al. 2025, "Muon is
  Scalable for LLM Training", Moonshot AI), or ``"original"``: sqrt(max(1, A / B)) (Jordan et al.).
  The same optimizer updates the parameters Muon is not meant for (embeddings, the output head,
  norm gains, biases) with AdamW, group by group (``use_muon`` in each param group), as Jordan's
  ``MuonWithAuxAdam`` does.
- ``muon_param_groups``: splits an ``llmlab.LLM`` (or any module) into Muon groups (the 2-D weights
  of the ``nn.Linear`` layers inside the blocks) and AdamW groups (everything else, with weight decay
  on the untied output head only, the rule of ``llmlab.train.param_groups``).

Checked against ``torch.optim.Muon`` (same step when the iteration runs in bfloat16, as torch's does)
and ``torch.optim.AdamW`` (the AdamW groups). Why not use ``torch.optim.Muon`` directly: it runs the
iteration in bfloat16, one matrix at a time. A CPU computes bfloat16 products several times slower
than float32, and many small products pay a fixed cost each. For the 28 matrices of
``ModelConfig.small``: on one thread, torch's Muon step took about 210 ms and the float32 iteration
one matrix at a time 56 ms; on two threads, the float32 iteration took 107 ms one matrix at a time
and 52 ms with the matrices of one shape stacked into one batched product per step, as here.
torch's Muon also has no AdamW groups.

What it leaves out: distributed Muon (sharded matrices gathered for the iteration), Muon for
convolution kernels, and the per-model learning-rate tuning (the Tiny Shakespeare benchmark in
``benchmarks/bench_shakespeare.py`` measures one recipe).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from llmlab.shapes import check_choice, check_float, check_int, check_tensor

NS_QUINTIC = (3.4445, -4.7750, 2.0315)  # Jordan et al.: steep at 0, ends within about [0.7, 1.2]
NS_CUBIC = (1.5, -0.5, 0.0)  # classical Newton-Schulz: converges to U V^T
ADJUST_LR = ("match_rms_adamw", "original")


def newton_schulz(
    g: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_QUINTIC, eps: float = 1e-7,
    dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """G (..., A, B) -> approximately U V^T (same shape and dtype as G), with G = U S V^T.

    The iteration runs on the wide orientation (A <= B), so X X^T is the smaller Gram matrix, and in
    ``dtype`` (None: G's own dtype).

    >>> newton_schulz(torch.randn(4, 8)).shape
    torch.Size([4, 8])
    """
    check_tensor("g", g, layout="(..., A, B)")
    if g.dim() < 2:
        raise ValueError(f"g must have at least 2 dimensions (..., A, B), got shape {tuple(g.shape)}")
    steps = check_int("steps", steps, minimum=1)
    a, b, c = coefficients
    x = g.to(dtype) if dtype is not None else g  # (..., A, B)
    tall = g.shape[-2] > g.shape[-1]
    if tall:
        x = x.mT  # (..., B, A): iterate on the wide side
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # every singular value now <= 1
    batch_shape, (rows, cols) = x.shape[:-2], x.shape[-2:]
    x = x.reshape(-1, rows, cols)  # (N, A, B): one batched product per step for every matrix
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)  # (N, A, A): X X^T
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # (N, A, A): b X X^T + c (X X^T)^2
        x = torch.baddbmm(x, poly, x, beta=a)  # (N, A, B): a X + poly X
    x = x.reshape(*batch_shape, rows, cols)
    if tall:
        x = x.mT  # back to (..., A, B)
    return x.to(g.dtype)


def adjusted_lr(lr: float, shape: torch.Size | tuple[int, ...], adjust_lr: str) -> float:
    """The learning rate Muon applies to a (..., A, B) matrix: lr * 0.2 sqrt(max(A, B)) or lr * sqrt(max(1, A/B))."""
    check_choice("adjust_lr", adjust_lr, ADJUST_LR)
    a, b = shape[-2], shape[-1]
    if adjust_lr == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(a, b))
    return lr * math.sqrt(max(1.0, a / b))


class Muon(torch.optim.Optimizer):
    """Muon on param groups with ``use_muon=True`` (matrices), AdamW on groups with ``use_muon=False``.

    Plain tensors (not groups) are all Muon parameters. Defaults for both kinds of group:
    lr, weight_decay (decoupled), momentum / nesterov / ns_steps / adjust_lr / ns_dtype (Muon),
    betas / eps (AdamW).

    >>> opt = Muon(muon_param_groups(model, weight_decay=0.1), lr=3e-3)  # doctest: +SKIP
    """

    def __init__(
        self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
        nesterov: bool = True, ns_steps: int = 5, adjust_lr: str = "match_rms_adamw",
        ns_dtype: torch.dtype | None = torch.float32, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
    ) -> None:
        check_float("lr", lr, low=0.0)
        check_float("weight_decay", weight_decay, low=0.0)
        check_float("momentum", momentum, 0.0, 1.0, high_open=True)
        check_int("ns_steps", ns_steps, minimum=1)
        check_choice("adjust_lr", adjust_lr, ADJUST_LR)
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            check_float(f"betas[{i}]", beta, 0.0, 1.0, high_open=True)
        check_float("eps", eps, low=0.0)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        adjust_lr=adjust_lr, ns_dtype=ns_dtype, betas=tuple(betas), eps=eps, use_muon=True)
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            if group["use_muon"]:
                for p in group["params"]:
                    if p.dim() < 2:
                        raise ValueError(f"param group {i} has use_muon=True, so its parameters must be matrices "
                                         f"(..., A, B); got a parameter of shape {tuple(p.shape)}: put vectors "
                                         f"(norm gains, biases) in a group with use_muon=False")

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["use_muon"]:
                self._muon_step(params, group)
            else:
                for p in params:
                    self._adamw_update(p, group)
        return loss

    def _muon_step(self, params: list[torch.Tensor], group: dict) -> None:
        """Momentum, Newton-Schulz and the decayed step for one group. Matrices of one shape (tall ones
        transposed) are orthogonalized as one batch: the same result from far fewer small kernels."""
        mu, lr = group["momentum"], group["lr"]
        updates = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)  # M <- mu M + (1 - mu) G
            updates.append(p.grad.lerp(buf, mu) if group["nesterov"] else buf)  # look-ahead (1 - mu) G + mu M
        for batch in _same_shape_batches(params):
            stack = torch.stack([_wide(updates[i]) for i in batch])  # (N, A, B) with A <= B
            ortho = newton_schulz(stack, group["ns_steps"], dtype=group["ns_dtype"])  # (N, A, B)
            for i, o in zip(batch, ortho, strict=True):
                p = params[i]
                p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
                p.add_(o.mT if _is_tall(p) else o, alpha=-adjusted_lr(lr, p.shape, group["adjust_lr"]))

    def _adamw_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        (beta1, beta2), t = group["betas"], state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(p.grad, 1 - beta1)  # first moment
        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)  # second moment
        denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])  # bias-corrected sqrt(v) + eps
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**t))


def _is_tall(m: torch.Tensor) -> bool:
    return m.shape[-2] > m.shape[-1]


def _wide(m: torch.Tensor) -> torch.Tensor:
    """(A, B) -> the (min, max) orientation, the one the iteration runs on."""
    return m.mT if _is_tall(m) else m


def _same_shape_batches(params: list[torch.Tensor]) -> list[list[int]]:
    """Indices of ``params`` grouped by wide-orientation shape, dtype and device, in first-seen order."""
    batches: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        batches.setdefault((tuple(_wide(p).shape), p.dtype, p.device), []).append(i)
    return list(batches.values())


def muon_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Three groups: Muon for the 2-D weights of ``nn.Linear`` layers except the output head
    (``lm_head``); AdamW with decay for an untied output head; AdamW without decay for the rest
    (embeddings, norm gains, biases). A tied head is the embedding table: no decay, as in
    ``llmlab.train.param_groups``."""
    check_float("weight_decay", weight_decay, low=0.0)
    head = getattr(model, "lm_head", None)
    head_id = id(head.weight) if isinstance(head, nn.Linear) else None
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    matrices, head_params, rest = [], [], []
    for p in model.parameters():  # a tied tensor is yielded once
        if not p.requires_grad:
            continue
        if id(p) == head_id and id(p) not in embedding_ids:
            head_params.append(p)
        elif id(p) in linear_ids and id(p) != head_id and p.dim() == 2:
            matrices.append(p)
        else:
            rest.append(p)
    groups = [{"params": matrices, "use_muon": True, "weight_decay": weight_decay},
              {"params": head_params, "use_muon": False, "weight_decay": weight_decay},
              {"params": rest, "use_muon": False, "weight_decay": 0.0}]  # fmt: skip
    return [g for g in groups if g["params"]]

"""Model parallelism on torch.distributed: Megatron-LM tensor parallelism (Shoeybi et al. 2019,
arXiv:1909.08053) and a GPipe pipeline schedule (Huang et al. 2019, arXiv:1811.06965).

The SwiGLU MLP is split column-parallel (gate_proj and up_proj keep F/N output rows each) then
row-parallel (down_proj keeps F/N input columns), attention is split by heads (H/N query heads and
K/N key/value heads per rank, o_proj split by its input columns). Each sublayer needs one
all-reduce in the forward pass (``g``) and one in the backward pass (``f``, for the input
gradient). What it leaves out: sequence parallelism, vocabulary-parallel embeddings, biases on the
row-parallel projections, the interleaved pipeline schedule. ``one_f_one_b_step`` is the 1F1B
(PipeDream-Flush) schedule of Narayanan et al. 2021 (arXiv:2104.04473).
Reference: Megatron-LM ``megatron/core/tensor_parallel/layers.py``.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from llmlab.attention import Attention
from llmlab.ffn import SwiGLUMLP

__all__ = ["PipelineStage", "TensorParallelAttention", "TensorParallelMLP", "bubble_fraction", "gpipe_step",
           "one_f_one_b_step"]


def _dist():
    import torch.distributed as dist

    return dist


class _CopyToParallel(torch.autograd.Function):
    """Megatron's f: identity forward, all-reduce of the input gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        _dist().all_reduce(grad)
        return grad


class _ReduceFromParallel(torch.autograd.Function):
    """Megatron's g: all-reduce (sum of the partial outputs) forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        _dist().all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def _split(n: int, name: str, world: int, rank: int) -> slice:
    if n % world:
        raise ValueError(f"{name}={n} must be divisible by the world size {world}")
    size = n // world
    return slice(rank * size, (rank + 1) * size)


class TensorParallelMLP(nn.Module):
    """This rank's 1/N of a ``SwiGLUMLP``: x (B, T, C) -> the full MLP output (B, T, C)."""

    def __init__(self, mlp: SwiGLUMLP) -> None:
        super().__init__()
        if not isinstance(mlp, SwiGLUMLP):
            raise TypeError(f"mlp must be a SwiGLUMLP, got {type(mlp).__name__}")
        if mlp.down_proj.bias is not None:
            raise ValueError("mlp must have bias=False (row-parallel biases are left out)")
        dist = _dist()
        rank, world = dist.get_rank(), dist.get_world_size()
        rows = _split(mlp.gate_proj.out_features, "hidden", world, rank)
        hidden = rows.stop - rows.start
        w = mlp.gate_proj.weight
        self.local = SwiGLUMLP(mlp.gate_proj.in_features, hidden, bias=mlp.gate_proj.bias is not None).to(
            w.device, w.dtype)  # on the original's device (CPU or GPU)
        with torch.no_grad():
            for name in ("gate_proj", "up_proj"):  # column parallel: output rows
                src, dst = getattr(mlp, name), getattr(self.local, name)
                dst.weight.copy_(src.weight[rows])  # (F/N, C)
                if src.bias is not None:
                    dst.bias.copy_(src.bias[rows])
            self.local.down_proj.weight.copy_(mlp.down_proj.weight[:, rows])  # (C, F/N): row parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReduceFromParallel.apply(self.local(_CopyToParallel.apply(x)))  # (B, T, C)


class TensorParallelAttention(nn.Module):
    """This rank's heads of an ``Attention``: x (B, T, C) -> the full attention output (B, T, C)."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        if not isinstance(attn, Attention):
            raise TypeError(f"attn must be an Attention, got {type(attn).__name__}")
        if attn.o_proj.bias is not None:
            raise ValueError("attn must have bias=False (row-parallel biases are left out)")
        dist = _dist()
        rank, world = dist.get_rank(), dist.get_world_size()
        d = attn.head_dim
        q_heads = _split(attn.n_head, "n_head", world, rank)
        kv_heads = _split(attn.n_kv_head, "n_kv_head", world, rank)
        q_rows = slice(q_heads.start * d, q_heads.stop * d)
        kv_rows = slice(kv_heads.start * d, kv_heads.stop * d)
        local = copy.deepcopy(attn)
        local.n_head, local.n_kv_head = attn.n_head // world, attn.n_kv_head // world
        with torch.no_grad():
            for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                src = getattr(attn, name)
                lin = nn.Linear(src.in_features, rows.stop - rows.start, bias=src.bias is not None,
                                device=src.weight.device, dtype=src.weight.dtype)
                lin.weight.copy_(src.weight[rows])  # (heads/N * D, C)
                if src.bias is not None:
                    lin.bias.copy_(src.bias[rows])
                setattr(local, name, lin)
            o = nn.Linear(q_rows.stop - q_rows.start, attn.n_embd, bias=False,
                          device=attn.o_proj.weight.device, dtype=attn.o_proj.weight.dtype)
            o.weight.copy_(attn.o_proj.weight[:, q_rows])  # (C, H/N * D)
            local.o_proj = o
        self.local = local

    def forward(self, x: torch.Tensor, **kwargs):
        out, probs = self.local(_CopyToParallel.apply(x), **kwargs)
        return _ReduceFromParallel.apply(out), probs  # (B, T, C)


# ----------------------------------------------------------------------------------------------
# Pipeline parallelism: GPipe (Huang et al. 2019, arXiv:1811.06965)


class PipelineStage(nn.Module):
    """Stage ``stage`` of ``n_stages`` of an ``LLM``: a contiguous run of its layers; stage 0 also
    owns the token embedding, the last stage the final norm and ``lm_head``. Rope or no positions,
    dense feed-forward and untied embeddings only."""

    def __init__(self, model: nn.Module, n_stages: int, stage: int) -> None:
        super().__init__()
        cfg = model.config
        if not 1 <= n_stages <= cfg.n_layer:
            raise ValueError(f"n_stages must be in [1, n_layer={cfg.n_layer}], got {n_stages}")
        if not 0 <= stage < n_stages:
            raise ValueError(f"stage must be in [0, {n_stages}), got {stage}")
        if cfg.position not in ("rope", "none") or cfg.ffn == "moe" or cfg.tie_embeddings:
            raise ValueError("PipelineStage supports position rope/none, dense FFNs, untied embeddings")
        bounds = [round(i * cfg.n_layer / n_stages) for i in range(n_stages + 1)]
        self.config, self.first, self.last = cfg, stage == 0, stage == n_stages - 1
        self.layers = nn.ModuleList(model.model.layers[bounds[stage]:bounds[stage + 1]])
        self.embed_tokens = model.model.embed_tokens if self.first else None
        self.norm = model.model.norm if self.last else None
        self.lm_head = model.lm_head if self.last else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Stage 0: input_ids (b, T) -> (b, T, C); others (b, T, C) -> (b, T, C), the last -> logits."""
        from llmlab.positional import rope_cos_sin

        if self.first:
            h = self.embed_tokens(h)  # (b, T, C)
        t = h.shape[1]
        rope = None
        if self.config.position == "rope":
            rope = rope_cos_sin(torch.arange(t), self.config.head_dim, self.config.rope_base,
                                scaling=self.config.rope_scaling, factor=self.config.rope_factor,
                                dtype=h.dtype)  # each (T, D)
        for layer in self.layers:
            h, _, _ = layer(h, mask=None, is_causal=True, positions=torch.arange(t), cache=None,
                            rope=rope, return_probs=False)  # (b, T, C)
        return self.lm_head(self.norm(h)) if self.last else h  # (b, T, V) or (b, T, C)


def _forward_micro(stage: PipelineStage, input_ids: torch.Tensor, targets: torch.Tensor, i: int, n_micro: int,
                   timeline: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``i`` through one stage: its input sliced (first stage) or received from the
    previous rank, the stage's forward pass (recorded in ``timeline``), and on the last stage that
    micro-batch's share of the mean loss. Returns (input, output); sending is the caller's."""
    import torch.nn.functional as F

    dist = _dist()
    b, t = input_ids.shape
    mb = b // n_micro
    if stage.first:
        h_in = input_ids[i * mb:(i + 1) * mb]  # (b, T)
    else:
        w = next(stage.parameters())  # received tensors live where the stage does
        h_in = torch.empty(mb, t, stage.config.n_embd, device=w.device, dtype=w.dtype)  # (b, T, C)
        dist.recv(h_in, dist.get_rank() - 1)
        h_in.requires_grad_(True)
    start = time.perf_counter()
    out = stage(h_in)
    if stage.last:
        y = targets[i * mb:(i + 1) * mb]  # (b, T)
        out = F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=-100) / n_micro
    timeline.append(("F", i, start, time.perf_counter()))
    return h_in, out


def gpipe_step(stage: PipelineStage, input_ids: torch.Tensor, targets: torch.Tensor, n_micro: int):
    """One GPipe step: all micro-batch forwards, then all backwards; activations and their
    gradients travel between neighbouring ranks with send/recv. Gradients accumulate in the stage.
    Returns (loss on the last rank else None, timeline [(kind, micro, start_s, end_s)])."""

    b, t = input_ids.shape
    if n_micro < 1 or b % n_micro:
        raise ValueError(f"n_micro must divide the batch size {b}, got {n_micro}")
    dist = _dist()
    rank = dist.get_rank()
    mb, c = b // n_micro, stage.config.n_embd
    w = next(stage.parameters())
    like = {"device": w.device, "dtype": w.dtype}  # received tensors live where the stage does
    ins, outs, timeline, loss = [], [], [], None
    for i in range(n_micro):
        h_in, out = _forward_micro(stage, input_ids, targets, i, n_micro, timeline)
        if stage.last:
            loss = out.detach() if loss is None else loss + out.detach()
        else:
            dist.send(out.detach(), rank + 1)
        ins.append(h_in)
        outs.append(out)
    for i in range(n_micro):
        grad = None
        if not stage.last:
            grad = torch.empty(mb, t, c, **like)
            dist.recv(grad, rank + 1)
        start = time.perf_counter()
        outs[i].backward(grad)
        timeline.append(("B", i, start, time.perf_counter()))
        if not stage.first:
            dist.send(ins[i].grad, rank - 1)
    return loss, timeline


def one_f_one_b_step(stage: PipelineStage, input_ids: torch.Tensor, targets: torch.Tensor, n_micro: int):
    """One 1F1B step (PipeDream-Flush; Narayanan et al. 2021): stage r of p runs min(p - r - 1, m)
    warm-up forwards, then alternates one forward and one backward, then drains the backwards.
    Same loss and gradients as ``gpipe_step``, and the same bubble, but a stage holds at most
    p - r micro-batches' activations at once instead of m. Sends are non-blocking (``isend``), so
    the interleaved sends and receives of neighbours cannot deadlock.
    Returns (loss on the last rank else None, timeline, peak number of micro-batches in flight)."""

    b, t = input_ids.shape
    if n_micro < 1 or b % n_micro:
        raise ValueError(f"n_micro must divide the batch size {b}, got {n_micro}")
    dist = _dist()
    rank, p = dist.get_rank(), dist.get_world_size()
    mb, c = b // n_micro, stage.config.n_embd
    w = next(stage.parameters())
    like = {"device": w.device, "dtype": w.dtype}  # received tensors live where the stage does
    pending, sends, timeline, loss, peak = {}, [], [], None, 0

    def forward(i):
        nonlocal loss, peak
        h_in, out = _forward_micro(stage, input_ids, targets, i, n_micro, timeline)
        if stage.last:
            loss = out.detach() if loss is None else loss + out.detach()
        else:
            sends.append(dist.isend(out.detach(), rank + 1))
        pending[i] = (h_in, out)
        peak = max(peak, len(pending))

    def backward(i):
        h_in, out = pending.pop(i)
        grad = None
        if not stage.last:
            grad = torch.empty(mb, t, c, **like)
            dist.recv(grad, rank + 1)
        start = time.perf_counter()
        out.backward(grad)
        timeline.append(("B", i, start, time.perf_counter()))
        if not stage.first:
            sends.append(dist.isend(h_in.grad, rank - 1))

    warmup = min(p - rank - 1, n_micro)
    for i in range(warmup):
        forward(i)
    for i in range(n_micro - warmup):  # steady state: one forward, one backward
        forward(warmup + i)
        backward(i)
    for i in range(n_micro - warmup, n_micro):  # drain
        backward(i)
    for req in sends:
        req.wait()
    return loss, timeline, peak


def bubble_fraction(timeline) -> float:
    """Idle share of one rank's step: 1 - (busy time) / (first start to last end)."""
    busy = sum(end - start for _, _, start, end in timeline)
    span = max(e for *_, e in timeline) - min(s for _, _, s, _ in timeline)
    return 1.0 - busy / span

"""Tensor parallelism in the style of Megatron-LM (Shoeybi et al. 2019, arXiv:1909.08053).

The SwiGLU MLP is split column-parallel (gate_proj and up_proj keep F/N output rows each) then
row-parallel (down_proj keeps F/N input columns), attention is split by heads (H/N query heads and
K/N key/value heads per rank, o_proj split by its input columns). Each sublayer needs one
all-reduce in the forward pass (``g``) and one in the backward pass (``f``, for the input
gradient). What it leaves out: sequence parallelism, vocabulary-parallel embeddings, biases on the
row-parallel projections. Reference: Megatron-LM ``megatron/core/tensor_parallel/layers.py``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from llmlab.attention import Attention
from llmlab.ffn import SwiGLUMLP

__all__ = ["TensorParallelAttention", "TensorParallelMLP"]


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
        self.local = SwiGLUMLP(mlp.gate_proj.in_features, hidden, bias=mlp.gate_proj.bias is not None)
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
                lin = nn.Linear(src.in_features, rows.stop - rows.start, bias=src.bias is not None)
                lin.weight.copy_(src.weight[rows])  # (heads/N * D, C)
                if src.bias is not None:
                    lin.bias.copy_(src.bias[rows])
                setattr(local, name, lin)
            o = nn.Linear(q_rows.stop - q_rows.start, attn.n_embd, bias=False)
            o.weight.copy_(attn.o_proj.weight[:, q_rows])  # (C, H/N * D)
            local.o_proj = o
        self.local = local

    def forward(self, x: torch.Tensor, **kwargs):
        out, probs = self.local(_CopyToParallel.apply(x), **kwargs)
        return _ReduceFromParallel.apply(out), probs  # (B, T, C)

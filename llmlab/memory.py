"""Training-memory helpers: activation checkpointing for llmlab models and micro-batch splitting.

What it implements
- ``enable_activation_checkpointing``: every decoder layer of an ``llmlab.model.LLM`` runs under
  ``torch.utils.checkpoint`` (the non-reentrant implementation). The forward pass keeps only each
  layer's input instead of all the activations inside the layer; the backward pass runs the
  layer's forward a second time to rebuild them. Memory for activations drops from about
  N * (activations of one layer) to N * (one layer input) + (activations of one layer), for the
  price of one extra forward pass of the layers: about a third more compute per training step
  (forward ~ 1 unit, backward ~ 2 units). Chen et al. 2016, "Training Deep Nets with Sublinear
  Memory Cost"; the same switch as transformers' ``model.gradient_checkpointing_enable()``, and,
  like it, active only in training mode with gradients enabled, so generation is unaffected.
  Dropout masks are the same in the recomputation (``torch.utils.checkpoint`` restores the RNG
  state), so gradients equal those of the plain model.
- ``disable_activation_checkpointing`` and ``is_activation_checkpointing``.
- ``split_micro_batches``: cut a batch (x, y) into k equal micro-batches for
  ``llmlab.train.accumulate_gradients``; equal sizes make the accumulated gradient equal the
  gradient of the whole batch.

What it leaves out: selective checkpointing of parts of a layer, CPU offload of activations,
and choosing which layers to checkpoint (here it is all of them or none).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmlab.shapes import check_int, check_tensor


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    from llmlab.model import LLM

    if not isinstance(model, LLM):
        raise TypeError(f"model must be an llmlab.model.LLM, got {type(model).__name__}")
    return model.model.layers


def _checkpointed_forward(layer: nn.Module) -> Callable:
    """A forward for ``layer`` that checkpoints its class forward while training with gradients."""
    plain = type(layer).forward.__get__(layer)  # the class's forward, bound to this layer

    def forward(*args, **kwargs):
        if layer.training and torch.is_grad_enabled():
            return checkpoint(plain, *args, use_reentrant=False, **kwargs)
        return plain(*args, **kwargs)

    forward.activation_checkpointing = True  # lets is_activation_checkpointing recognise it
    return forward


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every decoder layer of ``model`` (in place); return the model.

    Parameters, state dict and outputs are unchanged; only what is kept for the backward pass changes.

    >>> model = enable_activation_checkpointing(LLM(ModelConfig.tiny(vocab_size=50)))
    >>> is_activation_checkpointing(model)
    True
    """
    for layer in _decoder_layers(model):
        layer.forward = _checkpointed_forward(layer)  # an instance attribute overrides the class method
    return model


def disable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Undo ``enable_activation_checkpointing`` (in place); return the model."""
    for layer in _decoder_layers(model):
        layer.__dict__.pop("forward", None)
    return model


def is_activation_checkpointing(model: nn.Module) -> bool:
    """True if every decoder layer of ``model`` is checkpointed."""
    return all(getattr(layer.__dict__.get("forward"), "activation_checkpointing", False)
               for layer in _decoder_layers(model))  # fmt: skip


def split_micro_batches(
    x: torch.Tensor, y: torch.Tensor, num_micro_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y), each (B, T) -> ``num_micro_batches`` pairs, each (B / k, T), in order.

    B must be divisible by k: ``accumulate_gradients`` averages the micro-batch losses with equal
    weights, which equals the mean over the whole batch only when the micro-batches are equally large.

    >>> [xi.shape[0] for xi, _ in split_micro_batches(torch.zeros(8, 4), torch.zeros(8, 4), 4)]
    [2, 2, 2, 2]
    """
    check_tensor("x", x, ndim=2, layout="(B, T)")
    check_tensor("y", y, ndim=2, layout="(B, T)")
    if x.shape != y.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    k = check_int("num_micro_batches", num_micro_batches, minimum=1)
    if x.shape[0] % k:
        raise ValueError(f"the batch size must be divisible by num_micro_batches={k}, got batch size {x.shape[0]}")
    return list(zip(x.chunk(k), y.chunk(k), strict=True))  # k pairs of (B / k, T)

"""Shared test helpers: tiny random models, one llmlab/peft pairing, one few-step training loop.

- ``tiny_llama(seed=0, **overrides)``: a transformers Llama (2 layers, width 32, 4 query heads,
  2 key/value heads, vocabulary 64); any ``LlamaConfig`` field can be overridden.
- ``tiny_llmlab(seed=0, vocab_size=64, **overrides)``: llmlab's ``ModelConfig.tiny`` with the
  same vocabulary; any ``ModelConfig`` field can be overridden.
- ``peft_pair(...)``: an llmlab PEFT model and peft's model of the same method on copies of one
  base model, carrying the same random adapter weights, so a test compares their outputs.
- ``train_steps(...)``: a few optimizer steps on given batches of token ids, returning the losses.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from llmlab.model import LLM, ModelConfig

TINY_LLAMA = {  # the LlamaConfig fields every test model shares unless overridden
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random transformers Llama in eval mode: ``TINY_LLAMA`` updated with ``overrides``."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()


def tiny_llmlab(seed: int = 0, vocab_size: int = 64, training: bool = False, **overrides) -> LLM:
    """A random llmlab LLM: ``ModelConfig.tiny(vocab_size)`` with ``overrides`` (eval mode unless
    ``training``)."""
    torch.manual_seed(seed)
    model = LLM(dataclasses.replace(ModelConfig.tiny(vocab_size=vocab_size), **overrides))
    return model.train(training)


def peft_name(name: str) -> str | None:
    """peft's parameter name under llmlab's naming: no ``base_model.model.`` prefix, no adapter name."""
    return name.removeprefix("base_model.model.").replace(".default", "")


def peft_pair(
    base: nn.Module,
    ours_from: Callable[[nn.Module], nn.Module],
    peft_config,
    *,
    hf_base: nn.Module | None = None,
    rename: Callable[[str], str | None] = peft_name,
    scale: float | Callable[[str], float] = 0.3,
    seed: int = 1,
) -> tuple[nn.Module, nn.Module]:
    """(ours, theirs): ``ours_from(copy of base)`` and ``get_peft_model(copy of hf_base or base,
    peft_config)``, with each of peft's trainable parameters set to N(0, scale^2) noise and copied
    into ours under ``rename(name)`` (skipped where it returns None). Training mode is left as the
    constructors set it."""
    from peft import get_peft_model

    theirs = get_peft_model(copy.deepcopy(hf_base if hf_base is not None else base), peft_config)
    ours = ours_from(copy.deepcopy(base))
    ours_params = dict(ours.named_parameters())
    g = torch.Generator().manual_seed(seed)
    copied = 0
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if not p.requires_grad or (target := rename(name)) is None:
                continue
            factor = scale(name) if callable(scale) else scale
            p.copy_(torch.randn(p.shape, generator=g) * factor)
            ours_params[target].copy_(p)
            copied += 1
    assert copied, "peft_pair copied no parameter: check rename"
    return ours, theirs


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """transformers' convention (also accepted by llmlab's PEFT wrappers): ``labels=ids``, shifted inside."""
    return model(ids, labels=ids).loss


def llmlab_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """llmlab's LLM convention: inputs ``ids[:, :-1]``, next-token targets ``ids[:, 1:]``."""
    return model(ids[:, :-1], targets=ids[:, 1:]).loss


def train_steps(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    lr: float,
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = causal_lm_loss,
) -> list[float]:
    """One optimizer step on the trainable parameters per batch of token ids (B, T); returns each
    step's loss, measured before its update."""
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for ids in batches:
        loss = loss_fn(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses

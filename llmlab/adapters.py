"""Adapters: bottleneck adapters (Houlsby, Pfeiffer) and LLaMA-Adapter's zero-gated adaption prompts.

What it implements
- ``BottleneckAdapter``: h -> h + W_up f(W_down h), a small residual MLP of width m << C (Houlsby
  et al. 2019, "Parameter-Efficient Transfer Learning for NLP"). ``adapter_up`` starts at zero, so a
  model with adapters computes exactly what it computed before. ``inject_adapters`` puts one after
  the outputs named in ``BottleneckConfig.target_modules`` by wrapping those modules
  (``AdapterLayer``): Houlsby's placement is after the attention output projection (``o_proj``) and
  after the feed-forward output (``down_proj``), before each residual addition, with the layer norms
  trained too; Pfeiffer et al. 2021 ("AdapterFusion") keep only the one after the feed-forward block
  (AdapterHub's Pfeiffer configuration also rearranges the residual and LayerNorm around it; here
  both presets insert the adapter at the same point, before the residual addition).
- LLaMA-Adapter (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with
  Zero-init Attention"): ``AdaptedAttention`` gives each of the top L attention layers N learnable
  adaption-prompt vectors (N, C). Their keys and values come from the layer's own frozen ``k_proj`` /
  ``v_proj``; every query attends to them with a *separate* softmax, and the result is multiplied by a
  gate g that starts at zero and added to the attention output (through ``o_proj``):
  out = attn(x) + o_proj(g * softmax(q k_p^T / sqrt(D)) v_p). At initialisation the model is
  unchanged, and the prompts' influence grows only as g is learned: that is how it trains stably
  (random prompts cannot disturb the pretrained attention at the start). ``gate="scalar"`` is one
  raw gate g_l per layer, as in the paper's equation and in peft; ``gate="tanh_per_head"`` is tanh(g_h)
  with one gate per head, as in the official code (OpenGVLab/LLaMA-Adapter, alpaca_finetuning_v1/llama/
  model.py). Both start at zero, so both leave the model unchanged at initialisation.

Reference implementations: peft's ``AdaptionPromptConfig`` (``adaption_prompt`` / ``adaption_gate``
names, Llama query recomputation with RoPE; the tests compare logits with it) and AdapterHub's
bottleneck adapters (``adapter_down`` / ``adapter_up``; peft has no bottleneck adapter). Works on
transformers Llama-style models and on llmlab's ``LLM``. Left out: AdapterFusion, parallel adapters,
LLaMA-Adapter's multimodal branch and V2's bias/scale tuning.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.peft_utils import (  # decoder_layers is re-exported: it used to be defined here
    ModelGeometry,
    check_module,
    decoder_layers,
    set_trainable,
    wrap_matching_linears,
)
from llmlab.positional import apply_rope, rope_cos_sin
from llmlab.shapes import check_choice, check_int, check_tensor

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
GATES = ("scalar", "tanh_per_head")


# ----------------------------------------------------------------------------------------------
# Bottleneck adapters


@dataclass(frozen=True)
class BottleneckConfig:
    """Where bottleneck adapters go and how wide they are."""

    bottleneck_size: int = 16  # m: the adapter's inner width (m << C)
    target_modules: tuple[str, ...] | str = ("o_proj", "down_proj")  # outputs followed by an adapter
    activation: str = "relu"  # nonlinearity between adapter_down and adapter_up
    train_layer_norms: bool = True  # also train the norms (Houlsby does; Pfeiffer does not)

    def __post_init__(self) -> None:
        check_int("bottleneck_size", self.bottleneck_size, minimum=1)
        check_choice("activation", self.activation, ACTIVATIONS)
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module, got an empty value")

    @classmethod
    def houlsby(cls, bottleneck_size: int = 16) -> BottleneckConfig:
        """Two adapters per block (after attention and after the FFN), layer norms trained."""
        return cls(bottleneck_size, ("o_proj", "down_proj"), "relu", train_layer_norms=True)

    @classmethod
    def pfeiffer(cls, bottleneck_size: int = 16) -> BottleneckConfig:
        """One adapter per block, after the FFN; only adapter weights train."""
        return cls(bottleneck_size, ("down_proj",), "relu", train_layer_norms=False)


class BottleneckAdapter(nn.Module):
    """h (..., C) -> h + adapter_up(f(adapter_down(h))) (..., C); identity at init (adapter_up = 0)."""

    def __init__(self, dim: int, bottleneck_size: int, activation: str = "relu") -> None:
        super().__init__()
        dim = check_int("dim", dim, minimum=1)
        check_int("bottleneck_size", bottleneck_size, minimum=1)
        check_choice("activation", activation, ACTIVATIONS)
        self.adapter_down = nn.Linear(dim, bottleneck_size)  # weight (m, C)
        self.act = ACTIVATIONS[activation]()
        self.adapter_up = nn.Linear(bottleneck_size, dim)  # weight (C, m)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.adapter_up(self.act(self.adapter_down(h)))  # (..., C)


class AdapterLayer(nn.Module):
    """A frozen module followed by a bottleneck adapter: x -> adapter(base_layer(x))."""

    def __init__(self, base_layer: nn.Linear, config: BottleneckConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = BottleneckAdapter(base_layer.out_features, config.bottleneck_size, config.activation)
        self.adapter.to(base_layer.weight.device, base_layer.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base_layer(x))  # (..., out)


def inject_adapters(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Wrap every matching ``nn.Linear`` in an ``AdapterLayer`` (in place); train only adapters (and norms).

    >>> from llmlab.model import LLM, ModelConfig
    >>> from llmlab.peft_utils import trainable_parameters
    >>> model = inject_adapters(LLM(ModelConfig.tiny(vocab_size=50)), BottleneckConfig.houlsby(bottleneck_size=16))
    >>> per_adapter = (32 * 16 + 16) + (16 * 32 + 32)  # down and up projections of width C = 32, with biases
    >>> norms = 2 * 2 * 32 + 32  # two RMSNorm gains per layer and the final norm, trained too (Houlsby)
    >>> trainable_parameters(model) == 2 * 2 * per_adapter + norms  # after o_proj and down_proj, 2 layers
    True
    """
    check_module("model", model)
    if not isinstance(config, BottleneckConfig):
        raise TypeError(f"config must be a BottleneckConfig, got {type(config).__name__}")

    def trainable(name: str) -> bool:
        is_norm = config.train_layer_norms and re.search(r"norm", name.rsplit(".", 2)[-2]) is not None
        return ".adapter." in name or is_norm

    return wrap_matching_linears(
        model, config.target_modules, lambda linear: AdapterLayer(linear, config), trainable, skip=(AdapterLayer,)
    )


# ----------------------------------------------------------------------------------------------
# LLaMA-Adapter


@dataclass(frozen=True)
class AdaptionPromptConfig:
    """LLaMA-Adapter: N adaption prompts in each of the top L attention layers, zero-gated."""

    adapter_len: int = 10  # N: adaption prompt vectors per adapted layer (paper: 10)
    adapter_layers: int = 30  # L: how many of the topmost layers get prompts (paper: 30 of 32)
    gate: str = "scalar"  # "scalar" (one raw gate per layer: paper, peft) | "tanh_per_head" (official code)

    def __post_init__(self) -> None:
        check_int("adapter_len", self.adapter_len, minimum=1)
        check_int("adapter_layers", self.adapter_layers, minimum=1)
        check_choice("gate", self.gate, GATES)

    @classmethod
    def paper(cls) -> AdaptionPromptConfig:
        """LLaMA-7B in the paper: prompts of length 10 in the top 30 layers (1.2M parameters)."""
        return cls(adapter_len=10, adapter_layers=30)

    @classmethod
    def tiny(cls) -> AdaptionPromptConfig:
        """For tests on 2-layer models."""
        return cls(adapter_len=4, adapter_layers=1)


def _rotate_queries(attn: nn.Module, q: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Apply the RoPE rotation the wrapped attention applies to its queries. q (B, H, T, D)."""
    if "position_embeddings" in kwargs:  # transformers: (cos, sin), each (B, T, D)
        return apply_rope(q, *kwargs["position_embeddings"])
    if getattr(attn, "position", "none") != "rope":  # llmlab without RoPE (learned, ALiBi, none)
        return q
    rope = kwargs.get("rope")
    if rope is None:  # llmlab's Attention called on its own: compute the angles the same way it does
        positions = kwargs.get("positions")
        if positions is None:
            cache = kwargs.get("cache")
            offset = 0 if cache is None else cache.lengths[attn.layer_idx]
            positions = torch.arange(offset, offset + q.shape[2], device=q.device)  # (T,)
        rope = rope_cos_sin(positions, attn.head_dim, attn.rope_base, dtype=q.dtype)
    return apply_rope(q, rope[0].to(q.device), rope[1].to(q.device))


class AdaptedAttention(nn.Module):
    """An attention layer plus gated attention to N learnable adaption prompts.

    Called exactly like the wrapped attention; returns its output tuple with the first element
    (B, T, C) replaced by attn(x) + o_proj(gate * softmax(q k_p^T / sqrt(D)) v_p).
    """

    def __init__(self, attn: nn.Module, geometry: ModelGeometry, config: AdaptionPromptConfig) -> None:
        super().__init__()
        if isinstance(attn, AdaptedAttention):
            raise TypeError("attn is already an AdaptedAttention; adaption prompts cannot be stacked")
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(attn, name):
                raise TypeError(
                    f"attn must have q_proj, k_proj, v_proj and o_proj, got {type(attn).__name__} without {name}"
                )
        self.base_layer = attn
        self.geometry, self.gate_kind = geometry, config.gate
        weight = attn.q_proj.weight
        n, c = config.adapter_len, geometry.hidden_size
        # N(0, 1) like the official code's nn.Embedding; harmless because the gate starts at zero.
        self.adaption_prompt = nn.Parameter(torch.randn(1, n, c, device=weight.device, dtype=weight.dtype))  # (1, N, C)
        gates = geometry.num_heads if config.gate == "tanh_per_head" else 1
        self.adaption_gate = nn.Parameter(torch.zeros(gates, device=weight.device, dtype=weight.dtype))  # (1,) or (H,)

    def _prompt_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the prompts through the frozen k_proj / v_proj, repeated to H heads."""
        g, attn = self.geometry, self.base_layer
        n = self.adaption_prompt.shape[1]
        k = attn.k_proj(self.adaption_prompt).view(1, n, g.num_kv_heads, g.head_dim).transpose(1, 2)  # (1, K, N, D)
        v = attn.v_proj(self.adaption_prompt).view(1, n, g.num_kv_heads, g.head_dim).transpose(1, 2)  # (1, K, N, D)
        rep = g.num_heads // g.num_kv_heads
        return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (1, H, N, D) each

    def _gate(self) -> torch.Tensor:
        gate = torch.tanh(self.adaption_gate) if self.gate_kind == "tanh_per_head" else self.adaption_gate
        return gate.view(1, -1, 1, 1)  # (1, H or 1, 1, 1)

    def prompt_output(self, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The added term o_proj(gate * softmax(q k_p^T / sqrt(D)) v_p) for hidden states x (B, T, C)."""
        g, attn = self.geometry, self.base_layer
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, g.num_heads, g.head_dim).transpose(1, 2)  # (B, H, T, D)
        q = _rotate_queries(attn, q, kwargs)  # (B, H, T, D); the prompt keys carry no position
        k, v = self._prompt_kv()  # (1, H, N, D) each
        scores = q @ k.transpose(2, 3) / math.sqrt(g.head_dim)  # (B, H, T, N)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (B, H, T, N): its own softmax
        out = (self._gate() * probs) @ v  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(b, t, g.num_heads * g.head_dim)  # (B, T, H*D)
        y = attn.o_proj(out)  # (B, T, C)
        bias = getattr(attn.o_proj, "bias", None)
        return y if bias is None else y - bias  # o_proj's bias is already in attn(x)

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        check_tensor("hidden_states", x, ndim=3, layout="(B, T, C)")
        extra = self.prompt_output(x, kwargs)  # (B, T, C), computed before a cache is updated
        out, *rest = self.base_layer(*args, **kwargs)
        return (out + extra.to(out.dtype), *rest)


def inject_adaption_prompts(model: nn.Module, config: AdaptionPromptConfig) -> nn.Module:
    """Wrap ``self_attn`` of the top ``adapter_layers`` blocks (in place); train only ``adaption_*``.

    >>> from llmlab.model import LLM, ModelConfig
    >>> from llmlab.peft_utils import trainable_parameters
    >>> model = LLM(ModelConfig.tiny(vocab_size=50))
    >>> model = inject_adaption_prompts(model, AdaptionPromptConfig(adapter_len=10, adapter_layers=2))
    >>> trainable_parameters(model) == 2 * (10 * 32 + 1)  # per layer: N x C prompts and one gate
    True
    """
    check_module("model", model)
    if not isinstance(config, AdaptionPromptConfig):
        raise TypeError(f"config must be an AdaptionPromptConfig, got {type(config).__name__}")
    layers = decoder_layers(model)
    if config.adapter_layers > len(layers):
        raise ValueError(f"adapter_layers must be <= the number of layers ({len(layers)}), got {config.adapter_layers}")
    geometry = ModelGeometry.of(model)
    for layer in list(layers)[len(layers) - config.adapter_layers :]:
        layer.self_attn = AdaptedAttention(layer.self_attn, geometry, config)
    set_trainable(model, lambda name: name.rsplit(".", 1)[-1].startswith("adaption_"))
    return model


def adaption_gates(model: nn.Module) -> dict[str, torch.Tensor]:
    """The current gate values by module name (all zero right after injection)."""
    return {name: m.adaption_gate.detach() for name, m in model.named_modules() if isinstance(m, AdaptedAttention)}

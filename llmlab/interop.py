"""Convert ``llmlab.model.LLM`` to and from transformers' Llama, Mixtral and GPT-2 models.

What it implements
- ``to_hf(model)``: build the matching transformers model and copy the weights:
  ``LlamaForCausalLM`` for RoPE + pre-RMSNorm + SwiGLU configs (MHA, GQA, MQA; optional
  biases), ``MixtralForCausalLM`` for the same with ``ffn="moe"``, and ``GPT2LMHeadModel`` for
  learned positions + pre-LayerNorm + GELU + biases (GPT-2's ``Conv1D`` stores each matrix
  transposed, (in, out), and ``c_attn`` fuses the q, k and v projections into one (C, 3C) matrix).
- ``from_hf(hf_model)``: the way back, for those three model types.
- ``hf_config(config)``: just the transformers config, and ``hf_family(config)``: which one fits.
A config with no transformers counterpart (ALiBi, post-norm, DeepNorm, capacity-limited MoE,
GQA in GPT-2, ...) raises a ``ValueError`` that says which field is in the way.

Converted models give the same logits in float32. The Llama mapping is the identity on names
(``llmlab.model`` uses transformers' Llama parameter names). Mixtral experts are stored by
transformers 5 as two stacked tensors, ``experts.gate_up_proj`` (E, 2F, C) and
``experts.down_proj`` (E, C, F); transformers 4 used ``block_sparse_moe.experts.{e}.w1/w2/w3``.
Both layouts are read and written.

Reference implementation: transformers' ``modeling_llama``, ``modeling_mixtral`` and
``modeling_gpt2`` (parameter names and layouts); the tests compare logits and losses with them.
What it leaves out: other families (Mistral's sliding window, Qwen, Gemma), RoPE scaling
configs, and loading from the Hub (pass an already loaded model).
"""

from __future__ import annotations

import torch
from torch import nn

from llmlab.model import LLM, ModelConfig

FAMILIES = ("llama", "mixtral", "gpt2")


# ----------------------------------------------------------------------------------------------
# Which transformers family fits a config


def _require(config: ModelConfig, family: str, **expected) -> None:
    for name, want in expected.items():
        got = getattr(config, name)
        if got != want:
            raise ValueError(f"a {family} model needs {name}={want!r}, but the config has {name}={got!r}")


def hf_family(config: ModelConfig) -> str:
    """"llama", "mixtral" or "gpt2": the transformers model that can hold this config exactly."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    if config.position == "learned" or config.ffn == "gelu":
        _require(config, "GPT-2", position="learned", norm="layernorm", norm_placement="pre", ffn="gelu", bias=True,
                 n_kv_head=config.n_head)
        return "gpt2"
    if config.position != "rope":
        raise ValueError(f"no transformers counterpart for position={config.position!r}: Llama and Mixtral use "
                         "'rope' and GPT-2 uses 'learned'")
    family = "mixtral" if config.ffn == "moe" else "llama"
    _require(config, family.capitalize(), norm="rmsnorm", norm_placement="pre", rope_scaling="none")
    if family == "mixtral":
        _require(config, "Mixtral", bias=False, moe_capacity_factor=None)
    return family


def hf_config(config: ModelConfig):
    """The transformers config (LlamaConfig, MixtralConfig or GPT2Config) equal to ``config``."""
    import transformers

    family = hf_family(config)
    if family == "gpt2":
        # GPT-2's bos/eos id (50256) exists only in its own vocabulary; llmlab models have no such
        # special tokens, so a smaller vocabulary gets none (transformers warns about an id outside it).
        special = {} if config.vocab_size > 50256 else {"bos_token_id": None, "eos_token_id": None}
        return transformers.GPT2Config(
            **special, vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
            n_layer=config.n_layer, n_head=config.n_head, n_inner=config.ffn_hidden, activation_function="gelu_new",
            resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
            layer_norm_epsilon=config.norm_eps, initializer_range=config.init_std,
            tie_word_embeddings=config.tie_embeddings,
        )
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps, rope_theta=config.rope_base,
        attention_dropout=config.dropout, initializer_range=config.init_std, hidden_act="silu",
        tie_word_embeddings=config.tie_embeddings,
    )
    if family == "llama":
        return transformers.LlamaConfig(**common, attention_bias=config.bias, mlp_bias=config.bias)
    return transformers.MixtralConfig(
        **common, num_local_experts=config.n_experts, num_experts_per_tok=config.experts_per_token,
        router_aux_loss_coef=config.moe_aux_loss_coef, output_router_logits=True, sliding_window=None,
    )


# ----------------------------------------------------------------------------------------------
# State-dict mappings (ours -> theirs and back)


# GPT-2, one table for both directions: (our name, GPT2LMHeadModel's name, transposed). GPT-2's
# Conv1D stores each matrix as (in, out), ours as (out, in), so "transposed" entries flip; its c_attn
# fuses q, k and v: our three (C, C) matrices stacked along the output dimension, then transposed.
_GPT2_GLOBAL = (
    ("model.embed_tokens.weight", "transformer.wte.weight", False),
    ("model.embed_positions.weight", "transformer.wpe.weight", False),
    ("model.norm.weight", "transformer.ln_f.weight", False),
    ("model.norm.bias", "transformer.ln_f.bias", False),
    ("lm_head.weight", "lm_head.weight", False),  # absent from a tied GPT-2 state dict: then wte
)
_GPT2_LAYER = (  # names after "model.layers.{i}." and "transformer.h.{i}."
    ("self_attn.{q,k,v}_proj.weight", "attn.c_attn.weight", True),  # 3 x (C, C) <-> (C, 3C)
    ("self_attn.{q,k,v}_proj.bias", "attn.c_attn.bias", False),  # 3 x (C,) <-> (3C,)
    ("self_attn.o_proj.weight", "attn.c_proj.weight", True),  # (C, C)
    ("self_attn.o_proj.bias", "attn.c_proj.bias", False),
    ("mlp.up_proj.weight", "mlp.c_fc.weight", True),  # (F, C) <-> (C, F)
    ("mlp.up_proj.bias", "mlp.c_fc.bias", False),
    ("mlp.down_proj.weight", "mlp.c_proj.weight", True),  # (C, F) <-> (F, C)
    ("mlp.down_proj.bias", "mlp.c_proj.bias", False),
    ("input_layernorm.weight", "ln_1.weight", False),
    ("input_layernorm.bias", "ln_1.bias", False),
    ("post_attention_layernorm.weight", "ln_2.weight", False),
    ("post_attention_layernorm.bias", "ln_2.bias", False),
)


def _gpt2_rows(n_layer: int) -> list[tuple[list[str], str, bool]]:
    """The table expanded for ``n_layer`` layers: (our names (3 for a fused entry), theirs, transposed)."""
    rows = [([ours], theirs, t) for ours, theirs, t in _GPT2_GLOBAL]
    for i in range(n_layer):
        for ours, theirs, t in _GPT2_LAYER:
            names = [ours.replace("{q,k,v}", p) for p in "qkv"] if "{q,k,v}" in ours else [ours]
            rows.append(([f"model.layers.{i}.{n}" for n in names], f"transformer.h.{i}.{theirs}", t))
    return rows


def _gpt2_state(sd: dict[str, torch.Tensor], n_layer: int, to_hf: bool) -> dict[str, torch.Tensor]:
    """Our names -> GPT2LMHeadModel names (``to_hf``) or back, following the one table above."""
    out = {}
    for ours, theirs, transposed in _gpt2_rows(n_layer):
        if to_hf:
            x = torch.cat([sd[n] for n in ours], dim=0)  # fused q, k, v stack along the output dim
            out[theirs] = x.t() if transposed else x
            continue
        x = sd.get(theirs, sd["transformer.wte.weight"]) if theirs == "lm_head.weight" else sd[theirs]
        x = x.t() if transposed else x
        out.update(zip(ours, x.chunk(len(ours), dim=0), strict=True))  # a fused c_attn splits in 3
    return out


def _mixtral_experts_to_hf(sd, hf_keys, n_layer, n_experts):
    """Our per-expert SwiGLU matrices -> transformers' stacked (v5) or per-expert w1/w2/w3 (v4) tensors."""
    out = {k: v for k, v in sd.items() if ".mlp.experts." not in k}
    for i in range(n_layer):
        ours = f"model.layers.{i}.mlp.experts."
        gate = [sd[ours + f"{e}.gate_proj.weight"] for e in range(n_experts)]  # each (F, C)
        up = [sd[ours + f"{e}.up_proj.weight"] for e in range(n_experts)]  # each (F, C)
        down = [sd[ours + f"{e}.down_proj.weight"] for e in range(n_experts)]  # each (C, F)
        if f"model.layers.{i}.mlp.experts.gate_up_proj" in hf_keys:
            out[ours + "gate_up_proj"] = torch.stack([torch.cat(gu) for gu in zip(gate, up, strict=True)])  # (E, 2F, C)
            out[ours + "down_proj"] = torch.stack(down)  # (E, C, F)
        else:  # transformers 4: block_sparse_moe.experts.{e}.w1 (gate), w3 (up), w2 (down)
            legacy = f"model.layers.{i}.block_sparse_moe."
            out[legacy + "gate.weight"] = out.pop(f"model.layers.{i}.mlp.gate.weight")
            for e in range(n_experts):
                out[legacy + f"experts.{e}.w1.weight"] = gate[e]
                out[legacy + f"experts.{e}.w3.weight"] = up[e]
                out[legacy + f"experts.{e}.w2.weight"] = down[e]
    return out


def _mixtral_experts_from_hf(sd, n_layer, n_experts):
    """transformers' Mixtral expert tensors (either layout) -> our per-expert SwiGLU names."""
    out = {k: v for k, v in sd.items() if ".experts." not in k and ".block_sparse_moe.gate." not in k}
    for i in range(n_layer):
        ours, stacked = f"model.layers.{i}.mlp.", f"model.layers.{i}.mlp.experts.gate_up_proj"
        legacy = f"model.layers.{i}.block_sparse_moe."
        if stacked in sd:
            gate, up = sd[stacked].chunk(2, dim=1)  # each (E, F, C)
            down = sd[f"model.layers.{i}.mlp.experts.down_proj"]  # (E, C, F)
        else:
            out[ours + "gate.weight"] = sd[legacy + "gate.weight"]
            gate = torch.stack([sd[legacy + f"experts.{e}.w1.weight"] for e in range(n_experts)])  # (E, F, C)
            up = torch.stack([sd[legacy + f"experts.{e}.w3.weight"] for e in range(n_experts)])  # (E, F, C)
            down = torch.stack([sd[legacy + f"experts.{e}.w2.weight"] for e in range(n_experts)])  # (E, C, F)
        for e in range(n_experts):
            out[ours + f"experts.{e}.gate_proj.weight"] = gate[e]
            out[ours + f"experts.{e}.up_proj.weight"] = up[e]
            out[ours + f"experts.{e}.down_proj.weight"] = down[e]
    return out


# ----------------------------------------------------------------------------------------------
# Public conversions


def _load(target: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``target``; every parameter must be covered (tied copies may be absent)."""
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    missing, unexpected = target.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(getattr(target, "config", None), "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"weight mapping mismatch: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")


def to_hf(model: LLM) -> nn.Module:
    """An equivalent transformers model (eval mode, same dtype and device) with ``model``'s weights.

    >>> hf = to_hf(LLM(ModelConfig.tiny(50)))  # a LlamaForCausalLM
    """
    import transformers

    if not isinstance(model, LLM):
        raise TypeError(f"model must be an llmlab.model.LLM, got {type(model).__name__}")
    config = model.config
    family = hf_family(config)
    cls = {"llama": transformers.LlamaForCausalLM, "mixtral": transformers.MixtralForCausalLM,
           "gpt2": transformers.GPT2LMHeadModel}[family]
    param = next(model.parameters())
    hf = cls(hf_config(config)).to(device=param.device, dtype=param.dtype)
    sd = model.state_dict()
    if family == "gpt2":
        sd = _gpt2_state(sd, config.n_layer, to_hf=True)
    elif family == "mixtral":
        sd = _mixtral_experts_to_hf(sd, set(hf.state_dict()), config.n_layer, config.n_experts)
    _load(hf, sd)
    return hf.eval()


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"RoPE scaling {rope_type!r} has no counterpart in llmlab.model (only the default rope)")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _llama_like_config(cfg, family: str) -> ModelConfig:
    if getattr(cfg, "head_dim", None) not in (None, cfg.hidden_size // cfg.num_attention_heads):
        raise ValueError(f"head_dim={cfg.head_dim} != hidden_size / num_attention_heads is not supported")
    if cfg.hidden_act != "silu":
        raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {cfg.hidden_act!r}")
    bias = bool(getattr(cfg, "attention_bias", False))
    if bias != bool(getattr(cfg, "mlp_bias", bias)):
        raise ValueError("attention_bias and mlp_bias must agree (llmlab has one `bias` switch)")
    fields = dict(
        vocab_size=cfg.vocab_size, block_size=cfg.max_position_embeddings, n_layer=cfg.num_hidden_layers,
        n_head=cfg.num_attention_heads, n_kv_head=cfg.num_key_value_heads or cfg.num_attention_heads,
        n_embd=cfg.hidden_size, ffn_hidden=cfg.intermediate_size, position="rope", rope_base=_rope_theta(cfg),
        norm="rmsnorm", norm_placement="pre", bias=bias, tie_embeddings=bool(cfg.tie_word_embeddings),
        norm_eps=float(cfg.rms_norm_eps), init_std=float(cfg.initializer_range),
        dropout=float(getattr(cfg, "attention_dropout", 0.0)),
    )
    if family == "mixtral":
        window = getattr(cfg, "sliding_window", None)
        if window is not None and window < cfg.max_position_embeddings:
            raise ValueError(f"sliding_window={window} is not supported (llmlab attends to the whole context)")
        fields.update(ffn="moe", n_experts=cfg.num_local_experts, experts_per_token=cfg.num_experts_per_tok,
                      moe_aux_loss_coef=float(cfg.router_aux_loss_coef))
    return ModelConfig(**fields)


def _gpt2_config(cfg) -> ModelConfig:
    if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function must be the tanh GELU ('gelu_new'), got {cfg.activation_function!r}")
    if cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn or not cfg.scale_attn_weights:
        raise ValueError("GPT-2 attention variants (scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn, "
                         "unscaled attention) are not supported")
    return ModelConfig(
        vocab_size=cfg.vocab_size, block_size=cfg.n_positions, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_kv_head=cfg.n_head, n_embd=cfg.n_embd, ffn_hidden=cfg.n_inner or 4 * cfg.n_embd, position="learned",
        norm="layernorm", norm_placement="pre", ffn="gelu", bias=True,
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)), dropout=float(cfg.resid_pdrop),
        norm_eps=float(cfg.layer_norm_epsilon), init_std=float(cfg.initializer_range),
    )


def from_hf(hf_model: nn.Module) -> LLM:
    """An ``LLM`` with the weights of a LlamaForCausalLM, MixtralForCausalLM or GPT2LMHeadModel.

    >>> model = from_hf(to_hf(LLM(ModelConfig.tiny(50))))
    """
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"hf_model must be a Llama, Mixtral or GPT-2 causal LM, got {type(hf_model).__name__} "
                         f"(model_type={model_type!r})")
    cfg = hf_model.config
    config = _gpt2_config(cfg) if model_type == "gpt2" else _llama_like_config(cfg, model_type)
    sd = hf_model.state_dict()
    if model_type == "gpt2":
        sd = _gpt2_state(sd, config.n_layer, to_hf=False)
    elif model_type == "mixtral":
        sd = _mixtral_experts_from_hf(sd, config.n_layer, config.n_experts)
    param = next(hf_model.parameters())
    model = LLM(config).to(device=param.device, dtype=param.dtype)
    _load(model, sd)
    return model.eval()

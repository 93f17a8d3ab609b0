"""One configurable decoder-only Transformer language model: GPT-2 and LLaMA are two presets.

What it implements
- ``ModelConfig``: a frozen, JSON-serializable description (``dataclasses.asdict`` round-trips
  through ``ModelConfig(**d)``) with presets ``tiny`` (unit tests), ``small`` (the shipped
  checkpoint and Tiny Shakespeare), ``tiny_moe`` and ``gpt2_baseline`` (nanoGPT's CPU "baby GPT":
  4 layers, 4 heads, width 128, context 64). Variants come from ``dataclasses.replace``.
- ``LLM``: token embedding -> n_layer blocks of (self-attention, feed-forward) -> final norm ->
  ``lm_head``. The choices the interview questions compare are all switches:
  positions (RoPE, learned, sinusoidal, ALiBi, none), RMSNorm or LayerNorm, pre-norm (GPT-2,
  LLaMA), post-norm (the original Transformer) or DeepNorm (DeepNet, Wang et al. 2022: post-norm
  with the residual scaled by alpha = (2N)^(1/4) and some weights initialized with gain
  beta = (8N)^(-1/4), the decoder-only constants of the paper; ChatGLM-6B/GLM-130B use
  alpha = (2N)^(1/2)), SwiGLU / GELU / mixture-of-experts feed-forward, MHA / GQA / MQA.
- Parameter names follow transformers' ``LlamaForCausalLM`` (``model.embed_tokens``,
  ``model.layers.{i}.self_attn.q_proj``, ``.mlp.gate_proj``, ``input_layernorm``,
  ``post_attention_layernorm``, ``model.norm``, ``lm_head``), so ``llmlab.interop`` maps them
  onto Llama, Mixtral and GPT-2 one to one.
- Training loss: mean next-token cross-entropy (targets already shifted by the caller,
  ignore_index -100) plus ``moe_aux_loss_coef`` times the load-balancing loss for MoE models.
- Cached decoding with ``llmlab.attention.KVCache``: a prompt and then one token at a time give
  the same logits as one uncached forward.

What it leaves out: fused kernels beyond PyTorch's SDPA, sliding-window attention, parallel
attention/FFN blocks (GPT-J), encoder-decoder models, and generation (a separate decoding module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.attention import ATTENTION_IMPLS, Attention, KVCache, causal_mask, padding_mask
from llmlab.ffn import GELUMLP, SwiGLUMLP, swiglu_hidden
from llmlab.moe import MoEStats, SparseMoE, load_balancing_loss
from llmlab.norms import NORMS, RMSNorm, make_norm
from llmlab.parameters import count_trainable_parameters
from llmlab.positional import ROPE_SCALINGS, LearnedPositionalEmbedding, RotaryEmbedding, sinusoidal_encoding
from llmlab.shapes import check_choice, check_float, check_int, check_tensor

POSITIONS = ("rope", "learned", "sinusoidal", "alibi", "none")
NORM_PLACEMENTS = ("pre", "post", "deepnorm")
FFNS = ("swiglu", "gelu", "moe")


@dataclass(frozen=True)
class ModelConfig:
    """Every architectural choice of ``LLM``. Defaults describe a small LLaMA-style model."""

    vocab_size: int  # V: number of token ids
    block_size: int = 128  # maximum context length in tokens
    n_layer: int = 4  # number of Transformer blocks (N in the DeepNorm constants)
    n_head: int = 4  # H: query heads
    n_kv_head: int = 4  # K: key/value heads (H = MHA, 1 = MQA, in between = GQA)
    n_embd: int = 128  # C: model width
    ffn_hidden: int = 352  # F: feed-forward hidden width (8C/3 rounded up for SwiGLU, 4C for GELU)
    position: str = "rope"  # "rope" | "learned" | "sinusoidal" | "alibi" | "none"
    rope_base: float = 10000.0  # RoPE theta (LLaMA-3 uses 500000)
    # "none" | "linear" (position interpolation) | "ntk" (NTK-aware base) | "dynamic" (NTK scaling that
    # starts past block_size and grows with the length); the list is llmlab.positional.ROPE_SCALINGS
    rope_scaling: str = "none"
    rope_factor: float = 1.0  # context extension factor s for rope_scaling (positions / s, or base * s^(D/(D-2)))
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_placement: str = "pre"  # "pre" (GPT-2, LLaMA) | "post" (2017 Transformer) | "deepnorm"
    ffn: str = "swiglu"  # "swiglu" | "gelu" | "moe" (SwiGLU experts)
    n_experts: int = 4  # E: experts per MoE layer (used when ffn == "moe")
    experts_per_token: int = 2  # k: experts each token is routed to
    moe_capacity_factor: float | None = None  # expert capacity = factor * N * k / E; None = no limit
    moe_aux_loss_coef: float = 0.01  # weight of the load-balancing loss in .loss (Mixtral: 0.02)
    bias: bool = False  # biases in linear layers and LayerNorm (GPT-2: True, LLaMA: False)
    tie_embeddings: bool = False  # lm_head shares the embed_tokens matrix (GPT-2: True)
    dropout: float = 0.0  # dropout on attention probabilities and residual branches
    norm_eps: float = 1e-5  # epsilon inside the norms
    # "sdpa" (fused PyTorch kernel) | "manual" (llmlab's from-scratch path) | "flash" (llmlab.flash_attention's
    # tiled kernel and its recomputation backward: causal mask only, no padding mask, ALiBi or attention dropout)
    attn_impl: str = "sdpa"
    init_std: float = 0.02  # std of the normal init of linear and embedding weights

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("n_experts", self.n_experts, minimum=1)
        check_int("experts_per_token", self.experts_per_token, minimum=1)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd must be divisible by n_head, got n_embd={self.n_embd}, n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head must be a multiple of n_kv_head, got n_head={self.n_head}, n_kv_head={self.n_kv_head}"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim n_embd/n_head, got {self.head_dim}")
        if self.position == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        if self.experts_per_token > self.n_experts:
            raise ValueError(f"experts_per_token must be <= n_experts={self.n_experts}, got {self.experts_per_token}")
        check_choice("position", self.position, POSITIONS)
        check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        check_choice("norm", self.norm, NORMS)
        check_choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        check_choice("ffn", self.ffn, FFNS)
        check_choice("attn_impl", self.attn_impl, ATTENTION_IMPLS)
        if self.attn_impl == "flash" and self.position == "alibi":
            raise ValueError("attn_impl='flash' takes no attention bias, so it cannot run position='alibi'")
        self._check_floats()

    def _check_floats(self) -> None:
        check_float("rope_base", self.rope_base, low=0.0, low_open=True)
        check_float("rope_factor", self.rope_factor, low=1.0)
        check_float("moe_aux_loss_coef", self.moe_aux_loss_coef, low=0.0)
        check_float("dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_float("norm_eps", self.norm_eps, low=0.0)
        check_float("init_std", self.init_std, low=0.0)
        if self.moe_capacity_factor is not None:
            check_float("moe_capacity_factor", self.moe_capacity_factor, low=0.0, low_open=True)
        for name in ("bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")

    @property
    def head_dim(self) -> int:
        """D = C / H."""
        return self.n_embd // self.n_head

    @classmethod
    def tiny(cls, vocab_size: int) -> ModelConfig:
        """LLaMA-style (RoPE, pre-RMSNorm, SwiGLU, GQA 4:2, no bias), 2 layers of width 32: for unit tests."""
        return cls(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=96)

    @classmethod
    def small(cls, vocab_size: int) -> ModelConfig:
        """The project's small LLaMA-style model: 4 layers, width 128, 4 heads, context 128, about 0.8M
        non-embedding parameters. Used for the shipped checkpoint and the Tiny Shakespeare benchmark."""
        return cls(vocab_size=vocab_size, block_size=128, n_layer=4, n_head=4, n_kv_head=4, n_embd=128,
                   ffn_hidden=swiglu_hidden(128))

    @classmethod
    def tiny_moe(cls, vocab_size: int) -> ModelConfig:
        """``tiny`` with a 4-expert, top-2 SwiGLU mixture of experts in every block (Mixtral-style)."""
        return cls(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=64,
                   ffn="moe", n_experts=4, experts_per_token=2)

    @classmethod
    def gpt2_baseline(cls, vocab_size: int) -> ModelConfig:
        """nanoGPT's CPU "baby GPT" (4 layers, 4 heads, width 128, context 64): learned positions,
        pre-LayerNorm with bias, GELU MLP of width 4C, tied embeddings, no dropout."""
        return cls(vocab_size=vocab_size, block_size=64, n_layer=4, n_head=4, n_kv_head=4, n_embd=128,
                   ffn_hidden=512, position="learned", norm="layernorm", ffn="gelu", bias=True,
                   tie_embeddings=True)


@dataclass
class CausalLMOutput:
    """What ``LLM.forward`` returns."""

    logits: torch.Tensor  # (B, T, V) next-token scores
    loss: torch.Tensor | None = None  # cross-entropy (+ coef * aux_loss for MoE) when targets are given
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss (unweighted), None for dense models
    attentions: list[torch.Tensor] | None = None  # per layer (B, H, T, S), with output_attentions=True
    moe_stats: list[MoEStats] = field(default_factory=list)  # per MoE layer routing statistics


# ----------------------------------------------------------------------------------------------
# Blocks


def deepnorm_constants(n_layer: int) -> tuple[float, float]:
    """DeepNet's decoder-only (alpha, beta) = ((2N)^(1/4), (8N)^(-1/4)) for N layers."""
    n_layer = check_int("n_layer", n_layer, minimum=1)
    return (2 * n_layer) ** 0.25, (8 * n_layer) ** -0.25


class DecoderLayer(nn.Module):
    """One block: self-attention then feed-forward, each wrapped in a residual and a norm.

    pre:      x = x + f(norm(x))              (GPT-2, LLaMA)
    post:     x = norm(x + f(x))              (the 2017 Transformer)
    deepnorm: x = norm(alpha * x + f(x))      (DeepNet; ChatGLM-6B with another alpha)
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.placement = config.norm_placement
        self.alpha = deepnorm_constants(config.n_layer)[0] if self.placement == "deepnorm" else 1.0
        attn_position = config.position if config.position in ("rope", "alibi") else "none"
        self.self_attn = Attention(
            config.n_embd, config.n_head, config.n_kv_head, bias=config.bias, position=attn_position,
            rope_base=config.rope_base, impl=config.attn_impl, dropout=config.dropout, layer_idx=layer_idx,
        )
        self.mlp = _make_ffn(config)
        self.input_layernorm = make_norm(config.norm, config.n_embd, config.norm_eps, config.bias)
        self.post_attention_layernorm = make_norm(config.norm, config.n_embd, config.norm_eps, config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def _residual(self, x, h, norm):
        """Add the sublayer output h to the residual stream x with the configured norm placement."""
        if self.placement == "pre":
            return x + _dropout(self.dropout, h)
        return norm(self.alpha * x + _dropout(self.dropout, h))  # alpha = 1 for post-norm

    def forward(self, x, *, mask, is_causal, positions, cache, rope, return_probs):
        """x (B, T, C) -> (x (B, T, C), attention probs or None, MoEStats or None)."""
        pre = self.placement == "pre"
        h = self.input_layernorm(x) if pre else x  # pre-norm normalizes the sublayer's input
        h, probs = self.self_attn(h, mask=mask, is_causal=is_causal, positions=positions, cache=cache, rope=rope,
                                  return_probs=return_probs)  # (B, T, C)
        x = self._residual(x, h, self.input_layernorm)  # (B, T, C)
        h = self.mlp(self.post_attention_layernorm(x) if pre else x)  # (B, T, C) or ((B, T, C), MoEStats)
        h, stats = h if isinstance(self.mlp, SparseMoE) else (h, None)
        x = self._residual(x, h, self.post_attention_layernorm)  # (B, T, C)
        return x, probs, stats


def _dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, skipped when it is the identity (eval mode or p = 0): one call less per step."""
    return module(x) if module.training and module.p > 0 else x


def _make_ffn(config: ModelConfig) -> nn.Module:
    if config.ffn == "swiglu":
        return SwiGLUMLP(config.n_embd, config.ffn_hidden, bias=config.bias)
    if config.ffn == "gelu":
        return GELUMLP(config.n_embd, config.ffn_hidden, bias=config.bias)
    return SparseMoE(config.n_embd, config.ffn_hidden, config.n_experts, config.experts_per_token,
                     capacity_factor=config.moe_capacity_factor, bias=config.bias)



def _scaled_residual_init(layer: DecoderLayer, std: float) -> None:
    """GPT-2: the matrices that write into the residual stream (o_proj, down_proj) get a smaller std."""
    for name, p in layer.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            nn.init.normal_(p, mean=0.0, std=std)


def _deepnorm_init(layer: DecoderLayer, beta: float) -> None:
    """DeepNet: Xavier-normal, gain beta for v_proj, o_proj and the FFN; gain 1 for q_proj, k_proj."""
    attn = layer.self_attn
    for proj in (attn.q_proj, attn.k_proj):
        nn.init.xavier_normal_(proj.weight, gain=1.0)
    for proj in (attn.v_proj, attn.o_proj):
        nn.init.xavier_normal_(proj.weight, gain=beta)
    for name, p in layer.mlp.named_parameters():
        if p.dim() == 2 and not name.startswith("gate."):  # the MoE router keeps its normal init
            nn.init.xavier_normal_(p, gain=beta)


class DecoderModel(nn.Module):
    """The body (transformers' ``LlamaModel``): embeddings, blocks and the final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position == "learned":
            self.embed_positions = LearnedPositionalEmbedding(config.block_size, config.n_embd, config.init_std)
        if config.position == "rope":  # cos/sin tables shared by every layer, cached on the model's device
            self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_base, scaling=config.rope_scaling,
                                              factor=config.rope_factor, max_position=config.block_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layer))
        # Post-norm blocks already end in a norm; only pre-norm needs one after the last block.
        if config.norm_placement == "pre":
            self.norm = make_norm(config.norm, config.n_embd, config.norm_eps, config.bias)
        else:
            self.norm = nn.Identity()
        self.dropout = nn.Dropout(config.dropout)


# ----------------------------------------------------------------------------------------------
# The language model


class LLM(nn.Module):
    """Decoder-only Transformer language model: input_ids (B, T) -> CausalLMOutput with logits (B, T, V).

    >>> model = LLM(ModelConfig.tiny(vocab_size=50))
    >>> model(torch.randint(0, 50, (2, 7))).logits.shape
    torch.Size([2, 7, 50])
    """

    # Check the range of token ids on accelerators too (a host sync per forward); on the CPU they are
    # always checked, as the ids are already on the host.
    validate_inputs: bool = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one (V, C) matrix for input and output
        if config.position == "sinusoidal":
            pe = sinusoidal_encoding(config.block_size, config.n_embd)  # (T, C)
            self.register_buffer("sinusoidal_pe", pe, persistent=False)
        self.reset_parameters()

    # --- initialization ---------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, zero biases, unit norms; residual outputs scaled per placement.

        pre-norm: o_proj and down_proj get std / sqrt(2 N) (GPT-2), so the residual stream's variance
        does not grow with depth. deepnorm: Xavier-normal with gain beta on v_proj, o_proj and the
        feed-forward matrices, gain 1 on q_proj and k_proj (DeepNet, Algorithm 1).
        """
        cfg = self.config
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, LearnedPositionalEmbedding)):
                nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()
        for layer in self.model.layers:
            if cfg.norm_placement == "pre":
                _scaled_residual_init(layer, cfg.init_std / math.sqrt(2 * cfg.n_layer))
            elif cfg.norm_placement == "deepnorm":
                _deepnorm_init(layer, deepnorm_constants(cfg.n_layer)[1])

    # --- helpers ----------------------------------------------------------------------------

    def num_parameters(self, trainable_only: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied matrices counted once). ``exclude_embeddings`` drops token/position tables."""
        trainable, total = count_trainable_parameters(self)  # the package's one counter
        count = trainable if trainable_only else total
        if exclude_embeddings:
            tables = [self.model.embed_tokens.weight]
            if hasattr(self.model, "embed_positions"):
                tables.append(self.model.embed_positions.weight)
            count -= sum(t.numel() for t in tables if t.requires_grad or not trainable_only)  # counted above
        return count

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty KVCache with one slot per layer (``max_len`` preallocates, e.g. block_size)."""
        return KVCache(self.config.n_layer, max_len=max_len)

    def _check_inputs(self, input_ids, targets, cache, attention_mask):
        check_tensor("input_ids", input_ids, ndim=2, layout="(B, T)")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids must hold at least one token per row, got T=0")
        if input_ids.numel() and (input_ids.device.type == "cpu" or self.validate_inputs):
            low, high = (int(v) for v in torch.aminmax(input_ids))  # a host sync off the CPU
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"input_ids must be in [0, {self.config.vocab_size}), got values in [{low}, {high}]")
        if targets is not None:
            check_tensor("targets", targets, ndim=2, layout="(B, T)")
            if targets.shape != input_ids.shape:
                raise ValueError(f"targets must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(targets.shape)}")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache or None, got {type(cache).__name__}")
        past = 0 if cache is None else cache.seq_len
        if self.config.position in ("learned", "sinusoidal") and past + input_ids.shape[1] > self.config.block_size:
            raise ValueError(f"sequence length {past + input_ids.shape[1]} exceeds block_size="
                             f"{self.config.block_size}, the longest {self.config.position} position table")
        if attention_mask is not None:
            check_tensor("attention_mask", attention_mask, ndim=(2, 4), layout="(B, S) or (B, 1, T, S)")
        return past

    def _positions(self, input_ids, past, attention_mask):
        """Absolute positions (B, T) or (T,). With a (B, S) padding mask, a row's first real token is
        position 0, so left padding does not shift the positions of the real tokens."""
        t = input_ids.shape[1]
        if attention_mask is not None and attention_mask.dim() == 2:
            pos = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # (B, S)
            return pos[:, -t:]  # (B, T)
        return torch.arange(past, past + t, device=input_ids.device)  # (T,)

    def _mask(self, attention_mask, t, s, device):
        """Returns (boolean mask broadcastable to (B, H, T, S) or None, is_causal for the kernel)."""
        if attention_mask is None:
            return None, True
        if attention_mask.dim() == 4:  # a full custom mask (e.g. prefix LM); used as given
            if attention_mask.dtype != torch.bool:
                raise TypeError(f"a 4-D attention_mask must be boolean, got {attention_mask.dtype}")
            return attention_mask, False
        if attention_mask.shape[1] != s:
            raise ValueError(f"attention_mask (B, S) must cover cached + new tokens S={s}, "
                             f"got {tuple(attention_mask.shape)}")
        return causal_mask(t, s, device=device) & padding_mask(attention_mask), False  # (B, 1, T, S)

    def _rope(self, positions, past, t, x):
        """(cos, sin) for the new tokens, each (T, D) or (B, T, D), from the model's cached tables."""
        rotary = self.model.rotary_emb
        if rotary.scaling == "dynamic":  # depends on the current length: computed per call
            return rotary.dynamic_tables(positions, x.dtype)
        cos, sin = rotary(past + t, x.dtype, x.device)  # (S, D) each, S >= past + t
        if positions.dim() == 1:  # positions past..past+t-1: a slice, no gather
            return cos[past:past + t], sin[past:past + t]  # (T, D) each
        return cos[positions], sin[positions]  # (B, T, D) each; padded positions are <= past + t - 1

    def _embed(self, input_ids, positions):
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        if self.config.position == "learned":
            x = x + self.model.embed_positions(positions)  # (B, T, C)
        elif self.config.position == "sinusoidal":
            x = x + self.sinusoidal_pe[positions].to(x.dtype)  # (B, T, C)
        return _dropout(self.model.dropout, x)

    # --- forward ----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> CausalLMOutput:
        """input_ids (B, T) -> CausalLMOutput(logits (B, T, V), loss, aux_loss, attentions, moe_stats).

        targets (B, T): the token after each input position (-100 = ignore). cache: a KVCache from
        ``new_cache()``, extended in place. attention_mask: (B, S) 1/0 padding mask over cached + new
        tokens (S = past + T), or a boolean (B or 1, 1, T, S) mask used as is (True = may attend).
        """
        past = self._check_inputs(input_ids, targets, cache, attention_mask)
        t = input_ids.shape[1]
        positions = self._positions(input_ids, past, attention_mask)  # (T,) or (B, T)
        mask, is_causal = self._mask(attention_mask, t, past + t, input_ids.device)
        x = self._embed(input_ids, positions)  # (B, T, C)
        rope = self._rope(positions, past, t, x) if self.config.position == "rope" else None
        attentions, moe_stats = [], []
        for layer in self.model.layers:
            x, probs, stats = layer(x, mask=mask, is_causal=is_causal, positions=positions, cache=cache, rope=rope,
                                    return_probs=output_attentions)
            attentions.append(probs)
            if stats is not None:
                moe_stats.append(stats)
        logits = self.lm_head(self.model.norm(x))  # (B, T, V)
        return self._output(logits, targets, attention_mask, attentions if output_attentions else None, moe_stats)

    def _output(self, logits, targets, attention_mask, attentions, moe_stats):
        aux_loss = None
        if moe_stats:
            token_mask = None
            if attention_mask is not None and attention_mask.dim() == 2:
                token_mask = attention_mask[:, -logits.shape[1]:].reshape(-1)  # (N,)
            aux_loss = load_balancing_loss([s.router_logits for s in moe_stats], self.config.experts_per_token,
                                           token_mask)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long(), ignore_index=-100)
            if aux_loss is not None:
                loss = loss + self.config.moe_aux_loss_coef * aux_loss
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux_loss, attentions=attentions, moe_stats=moe_stats)

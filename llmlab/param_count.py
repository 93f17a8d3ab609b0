"""Exact parameter counts of published decoder-only LLMs, from their configurations alone.

What it implements
- ``Architecture``: a frozen description of a published decoder-only Transformer (GPT-2/GPT-3
  style: learned positions, pre-LayerNorm with biases, GELU MLP of width 4C, tied embeddings; or
  LLaMA style: RoPE, pre-RMSNorm, SwiGLU MLP, no biases, untied output head, optional GQA),
  with presets typed in from the published configurations, each naming its source:
  ``gpt3_175b``, ``llama_7b``, ``llama2_7b``, ``llama2_70b``, ``llama3_8b``, ``llama3_70b``.
- ``count_parameters``: the exact count, broken down by component (token and position
  embeddings, attention, feed-forward, norms, output head). Per block, with width C, H query
  heads, K key/value heads, head dim D = C/H and feed-forward width F:
  attention C*H*D + 2*C*K*D + H*D*C (plus H*D + 2*K*D + C biases), SwiGLU 3*C*F, GELU 2*C*F
  (plus F + C biases), two norms of C (LayerNorm with bias: 2C).
- ``Architecture.to_transformers_config()``: the matching ``LlamaConfig`` or ``GPT2Config``, so a
  test can instantiate the model on the meta device (no memory) and compare the counts, and
  ``to_model_config()`` / ``Architecture.from_model_config`` to and from ``llmlab.model.ModelConfig``.

What it leaves out: encoder-decoder models, mixture-of-experts, biases in only some layers
(e.g. Qwen's q/k/v biases), and GPT-3's alternating dense / locally banded sparse attention
layers, which change the attention pattern but not the parameter count (Brown et al. 2020, 2.1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llmlab.shapes import check_choice, check_float, check_int

FAMILIES = ("gpt2", "llama")  # GPT-2/GPT-3 layout, LLaMA layout


@dataclass(frozen=True)
class Architecture:
    """What determines the parameter count of a decoder-only LLM, plus the facts the notebooks compare."""

    name: str  # display name, e.g. "LLaMA-2-7B"
    family: str  # "gpt2" (learned positions, LayerNorm, GELU, biases) | "llama" (RoPE, RMSNorm, SwiGLU)
    vocab_size: int  # V: token-embedding rows
    n_layer: int  # N: Transformer blocks
    n_embd: int  # C: model width (d_model)
    n_head: int  # H: query heads
    n_kv_head: int  # K: key/value heads (K = H: multi-head; K < H: grouped-query attention)
    ffn_hidden: int  # F: feed-forward hidden width
    context_length: int  # training context in tokens (GPT: rows of the learned position table)
    tie_embeddings: bool  # the output head reuses the token-embedding matrix
    bias: bool  # biases in every linear layer and LayerNorm
    rope_base: float | None = None  # RoPE theta for the llama family; None for learned positions
    norm_eps: float = 1e-5  # epsilon of the norms (not a parameter; carried into transformers configs)
    train_tokens: float | None = None  # pre-training tokens reported by the authors
    source: str = ""  # where the numbers come from

    def __post_init__(self) -> None:
        check_choice("family", self.family, FAMILIES)
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "ffn_hidden", "context_length"):
            check_int(name, getattr(self, name), minimum=1)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd must be divisible by n_head, got n_embd={self.n_embd}, n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head must be a multiple of n_kv_head, got n_head={self.n_head}, n_kv_head={self.n_kv_head}"
            )
        for name in ("tie_embeddings", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.family == "gpt2" and self.n_kv_head != self.n_head:
            raise ValueError(f"the gpt2 family has no grouped-query attention: n_kv_head must equal "
                             f"n_head={self.n_head}, got {self.n_kv_head}")
        if self.family == "llama" and self.rope_base is None:
            raise ValueError("the llama family needs rope_base (RoPE theta), got None")
        if self.rope_base is not None:
            check_float("rope_base", self.rope_base, low=0.0, low_open=True)
        check_float("norm_eps", self.norm_eps, low=0.0)

    @property
    def head_dim(self) -> int:
        """D = C / H."""
        return self.n_embd // self.n_head

    # --- presets: typed in from the published configurations --------------------------------

    @classmethod
    def gpt3_175b(cls) -> Architecture:
        """GPT-3 175B: Brown et al. 2020, Table 2.1 (96 layers, d_model 12288, 96 heads of 128, context
        2048) and section 2.1 (GPT-2's architecture and BPE vocabulary of 50257; d_ff = 4 d_model)."""
        return cls(name="GPT-3 175B", family="gpt2", vocab_size=50257, n_layer=96, n_embd=12288, n_head=96,
                   n_kv_head=96, ffn_hidden=4 * 12288, context_length=2048, tie_embeddings=True, bias=True,
                   train_tokens=300e9, source="Brown et al. 2020, Table 2.1 and section 2.2 (300B tokens)")

    @classmethod
    def llama_7b(cls) -> Architecture:
        """LLaMA-7B: Touvron et al. 2023a, Table 2 (dim 4096, 32 heads, 32 layers, 1.0T tokens);
        FFN 11008 and vocab 32000 from Meta's params.json / transformers' converted config."""
        return cls(name="LLaMA-7B", family="llama", vocab_size=32000, n_layer=32, n_embd=4096, n_head=32,
                   n_kv_head=32, ffn_hidden=11008, context_length=2048, tie_embeddings=False, bias=False,
                   rope_base=10000.0, norm_eps=1e-6, train_tokens=1.0e12,
                   source="Touvron et al. 2023a (LLaMA), Table 2; huggyllama/llama-7b config.json")

    @classmethod
    def llama2_7b(cls) -> Architecture:
        """LLaMA-2-7B: Touvron et al. 2023b, Table 1 (context 4096, 2.0T tokens, no GQA at 7B);
        sizes from meta-llama/Llama-2-7b-hf config.json."""
        return cls(name="LLaMA-2-7B", family="llama", vocab_size=32000, n_layer=32, n_embd=4096, n_head=32,
                   n_kv_head=32, ffn_hidden=11008, context_length=4096, tie_embeddings=False, bias=False,
                   rope_base=10000.0, norm_eps=1e-5, train_tokens=2.0e12,
                   source="Touvron et al. 2023b (Llama 2), Table 1; meta-llama/Llama-2-7b-hf config.json")

    @classmethod
    def llama2_70b(cls) -> Architecture:
        """LLaMA-2-70B: GQA with 8 key/value heads (Touvron et al. 2023b, Table 1 and 2.2);
        width 8192, 80 layers, 64 heads, FFN 28672 from meta-llama/Llama-2-70b-hf config.json."""
        return cls(name="LLaMA-2-70B", family="llama", vocab_size=32000, n_layer=80, n_embd=8192, n_head=64,
                   n_kv_head=8, ffn_hidden=28672, context_length=4096, tie_embeddings=False, bias=False,
                   rope_base=10000.0, norm_eps=1e-5, train_tokens=2.0e12,
                   source="Touvron et al. 2023b (Llama 2), Table 1; meta-llama/Llama-2-70b-hf config.json")

    @classmethod
    def llama3_8b(cls) -> Architecture:
        """LLaMA-3-8B: vocab 128256, FFN 14336, GQA 8, RoPE theta 500000, context 8192, over 15T tokens
        (meta-llama/Meta-Llama-3-8B config.json and model card)."""
        return cls(name="LLaMA-3-8B", family="llama", vocab_size=128256, n_layer=32, n_embd=4096, n_head=32,
                   n_kv_head=8, ffn_hidden=14336, context_length=8192, tie_embeddings=False, bias=False,
                   rope_base=500000.0, norm_eps=1e-5, train_tokens=15e12,
                   source="meta-llama/Meta-Llama-3-8B config.json and model card; Dubey et al. 2024")

    @classmethod
    def llama3_70b(cls) -> Architecture:
        """LLaMA-3-70B: width 8192, 80 layers, 64 heads, GQA 8, FFN 28672, vocab 128256, theta 500000
        (meta-llama/Meta-Llama-3-70B config.json and model card)."""
        return cls(name="LLaMA-3-70B", family="llama", vocab_size=128256, n_layer=80, n_embd=8192, n_head=64,
                   n_kv_head=8, ffn_hidden=28672, context_length=8192, tie_embeddings=False, bias=False,
                   rope_base=500000.0, norm_eps=1e-5, train_tokens=15e12,
                   source="meta-llama/Meta-Llama-3-70B config.json and model card; Dubey et al. 2024")

    @classmethod
    def presets(cls) -> dict[str, Architecture]:
        """Every published preset by method name."""
        names = ("gpt3_175b", "llama_7b", "llama2_7b", "llama2_70b", "llama3_8b", "llama3_70b")
        return {n: getattr(cls, n)() for n in names}

    # --- conversions --------------------------------------------------------------------------

    def to_transformers_config(self):
        """The transformers ``GPT2Config`` or ``LlamaConfig`` of this architecture (no download)."""
        import transformers

        if self.family == "gpt2":
            return transformers.GPT2Config(
                vocab_size=self.vocab_size, n_positions=self.context_length, n_embd=self.n_embd,
                n_layer=self.n_layer, n_head=self.n_head, n_inner=self.ffn_hidden, activation_function="gelu_new",
                layer_norm_epsilon=self.norm_eps, tie_word_embeddings=self.tie_embeddings,
            )
        return transformers.LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.n_embd, intermediate_size=self.ffn_hidden,
            num_hidden_layers=self.n_layer, num_attention_heads=self.n_head, num_key_value_heads=self.n_kv_head,
            max_position_embeddings=self.context_length, rms_norm_eps=self.norm_eps, hidden_act="silu",
            rope_theta=self.rope_base, attention_bias=self.bias, mlp_bias=self.bias,
            tie_word_embeddings=self.tie_embeddings,
        )

    def to_model_config(self):
        """The equivalent ``llmlab.model.ModelConfig`` (instantiate it only for small sizes)."""
        from llmlab.model import ModelConfig

        common = dict(vocab_size=self.vocab_size, block_size=self.context_length, n_layer=self.n_layer,
                      n_head=self.n_head, n_kv_head=self.n_kv_head, n_embd=self.n_embd, ffn_hidden=self.ffn_hidden,
                      bias=self.bias, tie_embeddings=self.tie_embeddings, norm_eps=self.norm_eps)
        if self.family == "gpt2":
            return ModelConfig(**common, position="learned", norm="layernorm", ffn="gelu")
        return ModelConfig(**common, position="rope", rope_base=self.rope_base, norm="rmsnorm", ffn="swiglu")

    @classmethod
    def from_model_config(cls, config, name: str = "llmlab model") -> Architecture:
        """The architecture of an ``llmlab.model.ModelConfig`` with pre-norm and a dense FFN.

        GELU + learned positions + LayerNorm map to the gpt2 family, SwiGLU + RoPE + RMSNorm to llama.
        """
        from llmlab.model import ModelConfig

        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a llmlab ModelConfig, got {type(config).__name__}")
        if config.norm_placement != "pre":
            raise ValueError(f"only pre-norm models are counted (post-norm has no final norm), got "
                             f"norm_placement={config.norm_placement!r}")
        layouts = {("learned", "layernorm", "gelu"): "gpt2", ("rope", "rmsnorm", "swiglu"): "llama"}
        family = layouts.get((config.position, config.norm, config.ffn))
        if family is None:
            raise ValueError(f"(position, norm, ffn) must be one of {sorted(layouts)}, got "
                             f"{(config.position, config.norm, config.ffn)}")
        return cls(name=name, family=family, vocab_size=config.vocab_size, n_layer=config.n_layer,
                   n_embd=config.n_embd, n_head=config.n_head, n_kv_head=config.n_kv_head,
                   ffn_hidden=config.ffn_hidden, context_length=config.block_size,
                   tie_embeddings=config.tie_embeddings, bias=config.bias,
                   rope_base=config.rope_base if family == "llama" else None, norm_eps=config.norm_eps)


# ----------------------------------------------------------------------------------------------
# Counting


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of one architecture by component; ``total`` is their sum."""

    embeddings: int  # token embedding V*C plus the learned position table T*C (gpt2 family)
    attention: int  # q, k, v, o projections of every block
    ffn: int  # feed-forward matrices (and biases) of every block
    norms: int  # two norms per block plus the final norm
    lm_head: int  # untied output matrix V*C (0 when tied to the token embedding)

    @property
    def total(self) -> int:
        return self.embeddings + self.attention + self.ffn + self.norms + self.lm_head

    @property
    def non_embedding(self) -> int:
        """Everything but the embedding tables and the output head (Kaplan et al. 2020's N)."""
        return self.attention + self.ffn + self.norms

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


def attention_parameters(arch: Architecture) -> int:
    """One block's q/k/v/o projections: C*H*D + 2*C*K*D + H*D*C weights, plus H*D + 2*K*D + C biases."""
    c, q_out, kv_out = arch.n_embd, arch.n_head * arch.head_dim, arch.n_kv_head * arch.head_dim
    weights = c * q_out + 2 * c * kv_out + q_out * c
    return weights + ((q_out + 2 * kv_out + c) if arch.bias else 0)


def ffn_parameters(arch: Architecture) -> int:
    """One block's MLP: SwiGLU 3*C*F (+ 2F + C biases) or GELU 2*C*F (+ F + C biases)."""
    c, f = arch.n_embd, arch.ffn_hidden
    if arch.family == "llama":
        return 3 * c * f + ((2 * f + c) if arch.bias else 0)
    return 2 * c * f + ((f + c) if arch.bias else 0)


def norm_parameters(arch: Architecture) -> int:
    """One norm: RMSNorm has a gain of C; LayerNorm a gain and, with biases, a shift (2C)."""
    if arch.family == "llama":
        return arch.n_embd
    return 2 * arch.n_embd if arch.bias else arch.n_embd


def count_parameters(arch: Architecture) -> ParameterCount:
    """Exact parameter count of ``arch`` by component, e.g. LLaMA-2-7B: total 6,738,415,616.

    >>> count_parameters(Architecture.llama2_7b()).total
    6738415616
    """
    if not isinstance(arch, Architecture):
        raise TypeError(f"arch must be an Architecture, got {type(arch).__name__}")
    v, c, n = arch.vocab_size, arch.n_embd, arch.n_layer
    positions = arch.context_length * c if arch.family == "gpt2" else 0  # RoPE has no parameters
    return ParameterCount(
        embeddings=v * c + positions,
        attention=n * attention_parameters(arch),
        ffn=n * ffn_parameters(arch),
        norms=(2 * n + 1) * norm_parameters(arch),
        lm_head=0 if arch.tie_embeddings else v * c,
    )

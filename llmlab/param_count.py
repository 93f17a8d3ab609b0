"""Exact parameter counts of published decoder-only LLMs, from their configurations alone.

What it implements
- ``Architecture``: a frozen description of a published decoder-only Transformer (GPT-2/GPT-3
  style: learned positions, pre-LayerNorm with biases, GELU MLP of width 4C, tied embeddings; or
  LLaMA style: RoPE, pre-RMSNorm, SwiGLU MLP, no biases, untied output head, optional GQA),
  optionally with biases on q/k/v only (ChatGLM2/3) or a mixture of SwiGLU experts (Mixtral).
- Presets built from the published configurations committed under ``llmlab/reference_configs``
  (``Architecture.from_reference(name)``, see ``llmlab.reference_configs``): ``gpt2``,
  ``gpt3_175b``, ``llama_7b``, ``llama2_7b``, ``llama2_70b``, ``llama3_8b``, ``llama3_70b``,
  ``llama3_1_8b``, ``mistral_7b``, ``mistral_7b_v03``, ``mixtral_8x7b``, ``chatglm2_6b``,
  ``chatglm3_6b``.
- ``count_parameters``: the exact count, broken down by component (token and position
  embeddings, attention, feed-forward, norms, output head). Per block, with width C, H query
  heads, K key/value heads, head dim D = C/H and feed-forward width F:
  attention C*H*D + 2*C*K*D + H*D*C (plus H*D + 2*K*D + C biases), SwiGLU 3*C*F, GELU 2*C*F
  (plus F + C biases), two norms of C (LayerNorm with bias: 2C). A mixture of E experts has E
  feed-forward blocks plus a router of C*E; ``count_active_parameters`` counts the k experts a
  token uses (Mixtral: 46.7B total, 12.9B active).
- ``Architecture.to_transformers_config()``: the matching ``LlamaConfig`` or ``GPT2Config``, so a
  test can instantiate the model on the meta device (no memory) and compare the counts, and
  ``to_model_config()`` / ``Architecture.from_model_config`` to and from ``llmlab.model.ModelConfig``.

What it leaves out: encoder-decoder models, shared experts and dense first layers (DeepSeek-MoE),
multi-head latent attention (DeepSeek-V2), GLM-130B/ChatGLM-6B's 2D positions, and GPT-3's
alternating dense / locally banded sparse attention layers, which change the attention pattern but
not the parameter count (Brown et al. 2020, 2.1). Sliding windows and RoPE scaling change no
parameter either: read them from ``llmlab.reference_configs``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llmlab.shapes import check_choice, check_float, check_int

FAMILIES = ("gpt2", "llama")  # GPT-2/GPT-3 layout, LLaMA layout
PRESET_NAMES = ("gpt2", "gpt3_175b", "llama_7b", "llama2_7b", "llama2_70b", "llama3_8b", "llama3_70b",
                "llama3_1_8b", "mistral_7b", "mistral_7b_v03", "mixtral_8x7b", "chatglm2_6b", "chatglm3_6b")


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
    qkv_bias: bool = False  # biases on the q, k, v projections only (ChatGLM2/3, Qwen); bias=True implies them
    n_experts: int = 1  # E: feed-forward experts per block (1 = dense; Mixtral 8)
    experts_per_token: int = 1  # k: experts each token is routed to (Mixtral 2)
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
        for name in ("tie_embeddings", "bias", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.family == "gpt2" and self.n_kv_head != self.n_head:
            raise ValueError(f"the gpt2 family has no grouped-query attention: n_kv_head must equal "
                             f"n_head={self.n_head}, got {self.n_kv_head}")
        if self.family == "llama" and self.rope_base is None:
            raise ValueError("the llama family needs rope_base (RoPE theta), got None")
        if self.rope_base is not None:
            check_float("rope_base", self.rope_base, low=0.0, low_open=True)
        check_int("n_experts", self.n_experts, minimum=1)
        check_int("experts_per_token", self.experts_per_token, minimum=1)
        if self.experts_per_token > self.n_experts:
            raise ValueError(f"experts_per_token must be <= n_experts={self.n_experts}, got {self.experts_per_token}")
        if self.family == "gpt2" and (self.n_experts > 1 or self.qkv_bias):
            raise ValueError(f"the gpt2 family has dense GELU blocks with all biases: n_experts must be 1 and "
                             f"qkv_bias False, got n_experts={self.n_experts}, qkv_bias={self.qkv_bias}")
        check_float("norm_eps", self.norm_eps, low=0.0)

    @property
    def head_dim(self) -> int:
        """D = C / H."""
        return self.n_embd // self.n_head

    # --- presets: built from the published configurations in llmlab/reference_configs ----------

    @classmethod
    def from_reference(cls, name: str) -> Architecture:
        """The architecture of the committed published configuration ``name`` (see
        ``llmlab.reference_configs.reference_config_names()``), reading the fields under their
        published names; ``train_tokens`` comes from the reference's published totals.

        >>> Architecture.from_reference("chatglm2-6b").n_kv_head   # multi_query_group_num
        2
        """
        from llmlab.reference_configs import load_reference_config

        ref = load_reference_config(name)
        convert = _FROM_FIELDS.get(ref.model_type)
        if convert is None:
            raise ValueError(f"name must be a reference the Architecture can describe (model_type in "
                             f"{sorted(str(k) for k in _FROM_FIELDS)}), got {name!r} with model_type "
                             f"{ref.model_type!r}")
        tokens = ref.published.get("train_tokens", {}).get("value")
        src = ref.source
        return cls(name=ref.display_name, train_tokens=tokens,
                   source=f"{src['repository']} {src['path']} (revision: {src['revision'].split(' (')[0]})",
                   **convert(ref.fields))

    @classmethod
    def gpt2(cls) -> Architecture:
        """GPT-2 small (124M): openai-community/gpt2 config.json."""
        return cls.from_reference("gpt2")

    @classmethod
    def gpt3_175b(cls) -> Architecture:
        """GPT-3 175B: Brown et al. 2020, Table 2.1 (96 layers, d_model 12288, 96 heads of 128) and
        section 2.1 (context 2048, d_ff = 4 d_model, GPT-2's architecture and vocabulary of 50257)."""
        return cls.from_reference("gpt3-175b")

    @classmethod
    def llama_7b(cls) -> Architecture:
        """LLaMA-7B: huggyllama/llama-7b config.json (Touvron et al. 2023a, Table 2)."""
        return cls.from_reference("llama-7b")

    @classmethod
    def llama2_7b(cls) -> Architecture:
        """LLaMA-2-7B: meta-llama/Llama-2-7b-hf config.json (Touvron et al. 2023b, Table 1)."""
        return cls.from_reference("llama-2-7b")

    @classmethod
    def llama2_70b(cls) -> Architecture:
        """LLaMA-2-70B, GQA with 8 key/value heads: meta-llama/Llama-2-70b-hf config.json."""
        return cls.from_reference("llama-2-70b")

    @classmethod
    def llama3_8b(cls) -> Architecture:
        """LLaMA-3-8B: meta-llama/Meta-Llama-3-8B config.json (vocab 128256, GQA 8, theta 500000)."""
        return cls.from_reference("llama-3-8b")

    @classmethod
    def llama3_70b(cls) -> Architecture:
        """LLaMA-3-70B: meta-llama/Meta-Llama-3-70B config.json."""
        return cls.from_reference("llama-3-70b")

    @classmethod
    def llama3_1_8b(cls) -> Architecture:
        """LLaMA-3.1-8B: meta-llama/Llama-3.1-8B config.json (the 3-8B sizes; its RoPE scaling, which
        adds no parameter, is in the reference's ``rope_scaling``)."""
        return cls.from_reference("llama-3.1-8b")

    @classmethod
    def mistral_7b(cls) -> Architecture:
        """Mistral-7B-v0.1: mistralai/Mistral-7B-v0.1 config.json (sliding window 4096 in the reference)."""
        return cls.from_reference("mistral-7b-v0.1")

    @classmethod
    def mistral_7b_v03(cls) -> Architecture:
        """Mistral-7B-v0.3: mistralai/Mistral-7B-v0.3 config.json (vocab 32768, no sliding window)."""
        return cls.from_reference("mistral-7b-v0.3")

    @classmethod
    def mixtral_8x7b(cls) -> Architecture:
        """Mixtral-8x7B: mistralai/Mixtral-8x7B-v0.1 config.json (8 experts, 2 per token)."""
        return cls.from_reference("mixtral-8x7b")

    @classmethod
    def chatglm2_6b(cls) -> Architecture:
        """ChatGLM2-6B: THUDM/chatglm2-6b config.json (MQA groups 2, biases on q/k/v only)."""
        return cls.from_reference("chatglm2-6b")

    @classmethod
    def chatglm3_6b(cls) -> Architecture:
        """ChatGLM3-6B: THUDM/chatglm3-6b config.json (ChatGLM2's sizes, 8192-token context)."""
        return cls.from_reference("chatglm3-6b")

    @classmethod
    def presets(cls) -> dict[str, Architecture]:
        """Every published preset by method name."""
        return {n: getattr(cls, n)() for n in PRESET_NAMES}

    # --- conversions --------------------------------------------------------------------------

    def to_transformers_config(self):
        """The transformers config of this architecture (no download): ``GPT2Config``; ``LlamaConfig``;
        ``MixtralConfig`` when it has experts; ``Qwen2Config`` when only q/k/v carry biases."""
        import transformers

        if self.family == "gpt2":
            return transformers.GPT2Config(
                vocab_size=self.vocab_size, n_positions=self.context_length, n_embd=self.n_embd,
                n_layer=self.n_layer, n_head=self.n_head, n_inner=self.ffn_hidden, activation_function="gelu_new",
                layer_norm_epsilon=self.norm_eps, tie_word_embeddings=self.tie_embeddings,
            )
        common = dict(
            vocab_size=self.vocab_size, hidden_size=self.n_embd, intermediate_size=self.ffn_hidden,
            num_hidden_layers=self.n_layer, num_attention_heads=self.n_head, num_key_value_heads=self.n_kv_head,
            max_position_embeddings=self.context_length, rms_norm_eps=self.norm_eps, hidden_act="silu",
            rope_theta=self.rope_base, tie_word_embeddings=self.tie_embeddings,
        )
        if self.n_experts > 1 or (self.qkv_bias and not self.bias):
            if self.bias:
                raise ValueError("transformers has no mixture-of-experts config with biases in every layer: "
                                 "bias must be False when n_experts > 1")
            if self.n_experts > 1 and self.qkv_bias:
                raise ValueError("transformers' MixtralConfig has no q/k/v biases: qkv_bias must be False "
                                 "when n_experts > 1")
            if self.n_experts > 1:
                return transformers.MixtralConfig(**common, num_local_experts=self.n_experts,
                                                  num_experts_per_tok=self.experts_per_token)
            return transformers.Qwen2Config(**common, use_sliding_window=False)
        return transformers.LlamaConfig(**common, attention_bias=self.bias, mlp_bias=self.bias)

    def to_model_config(self):
        """The equivalent ``llmlab.model.ModelConfig`` (instantiate it only for small sizes)."""
        from llmlab.model import ModelConfig

        if self.qkv_bias and not self.bias:
            raise ValueError("llmlab's ModelConfig has no q/k/v-only biases: qkv_bias must be False, got True")
        common = dict(vocab_size=self.vocab_size, block_size=self.context_length, n_layer=self.n_layer,
                      n_head=self.n_head, n_kv_head=self.n_kv_head, n_embd=self.n_embd, ffn_hidden=self.ffn_hidden,
                      bias=self.bias, tie_embeddings=self.tie_embeddings, norm_eps=self.norm_eps)
        if self.family == "gpt2":
            return ModelConfig(**common, position="learned", norm="layernorm", ffn="gelu")
        if self.n_experts > 1:
            return ModelConfig(**common, position="rope", rope_base=self.rope_base, norm="rmsnorm", ffn="moe",
                               n_experts=self.n_experts, experts_per_token=self.experts_per_token)
        return ModelConfig(**common, position="rope", rope_base=self.rope_base, norm="rmsnorm", ffn="swiglu")

    @classmethod
    def from_model_config(cls, config, name: str = "llmlab model") -> Architecture:
        """The architecture of an ``llmlab.model.ModelConfig`` with pre-norm and a dense FFN.

        GELU + learned positions + LayerNorm map to the gpt2 family, SwiGLU (or SwiGLU experts) + RoPE +
        RMSNorm to llama.
        """
        from llmlab.model import ModelConfig

        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a llmlab ModelConfig, got {type(config).__name__}")
        if config.norm_placement != "pre":
            raise ValueError(f"only pre-norm models are counted (post-norm has no final norm), got "
                             f"norm_placement={config.norm_placement!r}")
        layouts = {("learned", "layernorm", "gelu"): "gpt2", ("rope", "rmsnorm", "swiglu"): "llama",
                   ("rope", "rmsnorm", "moe"): "llama"}
        family = layouts.get((config.position, config.norm, config.ffn))
        if family is None:
            raise ValueError(f"(position, norm, ffn) must be one of {sorted(layouts)}, got "
                             f"{(config.position, config.norm, config.ffn)}")
        return cls(name=name, family=family, vocab_size=config.vocab_size, n_layer=config.n_layer,
                   n_embd=config.n_embd, n_head=config.n_head, n_kv_head=config.n_kv_head,
                   ffn_hidden=config.ffn_hidden, context_length=config.block_size,
                   tie_embeddings=config.tie_embeddings, bias=config.bias,
                   rope_base=config.rope_base if family == "llama" else None, norm_eps=config.norm_eps,
                   n_experts=config.n_experts if config.ffn == "moe" else 1,
                   experts_per_token=config.experts_per_token if config.ffn == "moe" else 1)


# ----------------------------------------------------------------------------------------------
# Counting


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of one architecture by component; ``total`` is their sum."""

    embeddings: int  # token embedding V*C plus the learned position table T*C (gpt2 family)
    attention: int  # q, k, v, o projections of every block
    ffn: int  # feed-forward matrices (and biases) of every block, all experts and routers included
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
    """One block's q/k/v/o projections: C*H*D + 2*C*K*D + H*D*C weights, plus H*D + 2*K*D biases on
    q/k/v (with ``bias`` or ``qkv_bias``) and C on the output projection (with ``bias``)."""
    c, q_out, kv_out = arch.n_embd, arch.n_head * arch.head_dim, arch.n_kv_head * arch.head_dim
    weights = c * q_out + 2 * c * kv_out + q_out * c
    qkv_biases = (q_out + 2 * kv_out) if (arch.bias or arch.qkv_bias) else 0
    return weights + qkv_biases + (c if arch.bias else 0)


def expert_parameters(arch: Architecture) -> int:
    """One feed-forward expert (the whole MLP of a dense block): SwiGLU 3*C*F (+ 2F + C biases) or
    GELU 2*C*F (+ F + C biases)."""
    c, f = arch.n_embd, arch.ffn_hidden
    if arch.family == "llama":
        return 3 * c * f + ((2 * f + c) if arch.bias else 0)
    return 2 * c * f + ((f + c) if arch.bias else 0)


def ffn_parameters(arch: Architecture) -> int:
    """One block's feed-forward part: E experts plus, when E > 1, a router of C*E (no bias, as in
    Mixtral and Switch Transformer)."""
    router = arch.n_embd * arch.n_experts if arch.n_experts > 1 else 0
    return arch.n_experts * expert_parameters(arch) + router


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


def count_active_parameters(arch: Architecture) -> int:
    """Parameters one token uses: the total less the E - k experts it is not routed to in each
    block (Mixtral's convention, embeddings included: 12.9B of 46.7B). Equals the total when dense.

    >>> count_active_parameters(Architecture.mixtral_8x7b())
    12879925248
    """
    if not isinstance(arch, Architecture):
        raise TypeError(f"arch must be an Architecture, got {type(arch).__name__}")
    unused = arch.n_experts - arch.experts_per_token
    return count_parameters(arch).total - arch.n_layer * unused * expert_parameters(arch)


# ----------------------------------------------------------------------------------------------
# Reading the published fields (llmlab/reference_configs/*.json) under their published names


def _gpt2_fields(f: dict) -> dict:
    """openai-community/gpt2 config.json (n_inner absent = 4 * n_embd; tie_word_embeddings absent = tied)."""
    return dict(family="gpt2", vocab_size=f["vocab_size"], n_layer=f["n_layer"], n_embd=f["n_embd"],
                n_head=f["n_head"], n_kv_head=f["n_head"], ffn_hidden=f.get("n_inner") or 4 * f["n_embd"],
                context_length=f["n_positions"], tie_embeddings=f.get("tie_word_embeddings", True), bias=True,
                norm_eps=f["layer_norm_epsilon"])


def _gpt3_fields(f: dict) -> dict:
    """Brown et al. 2020, Table 2.1 names: GPT-2's layout (tied embeddings, biases, LayerNorm eps 1e-5)."""
    if f["n_heads"] * f["d_head"] != f["d_model"]:
        raise ValueError(f"n_heads * d_head must equal d_model, got {f['n_heads']} * {f['d_head']} != {f['d_model']}")
    return dict(family="gpt2", vocab_size=f["n_vocab"], n_layer=f["n_layers"], n_embd=f["d_model"],
                n_head=f["n_heads"], n_kv_head=f["n_heads"], ffn_hidden=f["d_ff"], context_length=f["n_ctx"],
                tie_embeddings=True, bias=True)


def _llama_fields(f: dict) -> dict:
    """LlamaConfig / MistralConfig / MixtralConfig names. Absent fields take transformers' defaults:
    num_key_value_heads = num_attention_heads, rope_theta 10000 (also Meta's reference code),
    no biases."""
    bias = bool(f.get("attention_bias", False))
    if bias != bool(f.get("mlp_bias", bias)):
        raise ValueError("attention_bias and mlp_bias must agree for an Architecture, got "
                         f"{f.get('attention_bias')} and {f.get('mlp_bias')}")
    return dict(family="llama", vocab_size=f["vocab_size"], n_layer=f["num_hidden_layers"],
                n_embd=f["hidden_size"], n_head=f["num_attention_heads"],
                n_kv_head=f.get("num_key_value_heads") or f["num_attention_heads"],
                ffn_hidden=f["intermediate_size"], context_length=f["max_position_embeddings"],
                tie_embeddings=f.get("tie_word_embeddings", False), bias=bias,
                rope_base=float(f.get("rope_theta", 10000.0)), norm_eps=f["rms_norm_eps"],
                n_experts=f.get("num_local_experts", 1), experts_per_token=f.get("num_experts_per_tok", 1))


def _chatglm_fields(f: dict) -> dict:
    """THUDM ChatGLM2/3 names (num_layers, ffn_hidden_size, multi_query_group_num, kv_channels,
    padded_vocab_size, seq_length). ChatGLM-6B (GLM's 2D positions, GELU) is not of this layout."""
    if not f.get("rmsnorm"):
        raise ValueError("only ChatGLM2/3 (rmsnorm: true, SwiGLU) map onto an Architecture, got rmsnorm="
                         f"{f.get('rmsnorm')!r}")
    heads = f["num_attention_heads"]
    if f["kv_channels"] * heads != f["hidden_size"]:
        raise ValueError(f"kv_channels * num_attention_heads must equal hidden_size, got "
                         f"{f['kv_channels']} * {heads} != {f['hidden_size']}")
    return dict(family="llama", vocab_size=f["padded_vocab_size"], n_layer=f["num_layers"],
                n_embd=f["hidden_size"], n_head=heads,
                n_kv_head=f["multi_query_group_num"] if f.get("multi_query_attention") else heads,
                ffn_hidden=f["ffn_hidden_size"], context_length=f["seq_length"],
                tie_embeddings=f.get("tie_word_embeddings", False), bias=bool(f["add_bias_linear"]),
                qkv_bias=bool(f["add_qkv_bias"]), rope_base=10000.0 * f.get("rope_ratio", 1),
                norm_eps=f["layernorm_epsilon"])


_FROM_FIELDS = {"gpt2": _gpt2_fields, None: _gpt3_fields, "llama": _llama_fields, "mistral": _llama_fields,
                "mixtral": _llama_fields, "chatglm": _chatglm_fields}

"""Multi-head latent attention (MLA): a low-rank joint key-value latent plus a decoupled RoPE key.

What it implements
- ``MLAConfig``: the sizes of DeepSeek-V2's attention (DeepSeek-AI 2024, "DeepSeek-V2: A Strong,
  Economical, and Efficient Mixture-of-Experts Language Model", arXiv:2405.04434, section 2.1),
  under the names of the published ``config.json`` (``kv_lora_rank``, ``qk_nope_head_dim`` ...),
  with a ``tiny`` preset and ``from_reference`` for the committed DeepSeek configurations.
- ``MultiHeadLatentAttention``: per token, the input is compressed to a latent
  c_kv = RMSNorm(W_DKV x) of width r (``kv_lora_rank``) and one RoPE key k_rope = RoPE(W_KR x)
  of width d_r shared by all heads; keys and values of every head are up-projections of c_kv
  (``kv_b_proj``), to which k_rope is appended. Only (c_kv, k_rope), r + d_r numbers per token
  and layer, need to be cached. Queries go through an optional low-rank bottleneck
  (``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``). Parameter names are those of transformers'
  ``DeepseekV3Attention`` (``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``),
  so its state dict loads as is; the test checks equality with it on a tiny random config.
- ``forward(x, absorbed=True)``: the inference form of section 2.1.2: W_UK is folded into the query
  (q_h^T W_UK,h is computed once, then dotted with the cached latents) and W_UV is applied after the
  attention-weighted sum of latents, so keys and values are never materialized per head. It equals
  the naive form up to float rounding.
- ``kv_cache_elements_per_token`` / ``mla_cache_elements_per_token``: cache sizes per token for
  MHA / GQA / MQA (2 L K D) and MLA (L (r + d_r)), as in Table 1 of the paper.

RoPE uses the half-split ("rotate_half") channel layout of ``llmlab.positional`` (transformers'
``rope_interleave=False``); DeepSeek's released weights use the interleaved layout, a fixed
permutation of the rope rows of ``q_b_proj`` and ``kv_a_proj_with_mqa``. Leaves out: YaRN scaling of
the softmax temperature, an incremental latent cache for decoding, and fused MLA kernels (FlashMLA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmlab.norms import RMSNorm
from llmlab.positional import apply_rope, rope_cos_sin
from llmlab.shapes import check_int, check_tensor

NORM_EPS = 1e-6  # eps of the q/kv latent RMSNorms (DeepSeek and transformers use 1e-6)


@dataclass(frozen=True)
class MLAConfig:
    """Sizes of one MLA layer, under the names of DeepSeek's config.json."""

    hidden_size: int  # C: model width
    num_attention_heads: int  # H: query heads (each also gets its own key and value head)
    kv_lora_rank: int  # r: width of the cached joint key-value latent c_kv
    qk_nope_head_dim: int  # d_n: per-head query/key channels without position (from the latent)
    qk_rope_head_dim: int  # d_r: per-head query channels and the one shared key with RoPE
    v_head_dim: int  # d_v: per-head value channels
    q_lora_rank: int | None = None  # r_q: query bottleneck width, None = a full q_proj
    rope_theta: float = 10000.0  # RoPE base

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim"):
            check_int(name, getattr(self, name), minimum=1)
        if self.q_lora_rank is not None:
            check_int("q_lora_rank", self.q_lora_rank, minimum=1)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        """d_n + d_r: the query/key width each head's dot product runs over."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @classmethod
    def tiny(cls, q_lora_rank: int | None = 16) -> MLAConfig:
        """Width 32, 4 heads, latent 8, d_n 8, d_r 4, d_v 6: for tests."""
        return cls(hidden_size=32, num_attention_heads=4, kv_lora_rank=8, qk_nope_head_dim=8,
                   qk_rope_head_dim=4, v_head_dim=6, q_lora_rank=q_lora_rank)

    @classmethod
    def from_reference(cls, name: str) -> MLAConfig:
        """The attention sizes of a committed DeepSeek configuration, e.g. ``"deepseek-v3"``."""
        from llmlab.reference_configs import load_reference_config

        f = load_reference_config(name).fields
        if "kv_lora_rank" not in f:
            raise ValueError(f"name must be a configuration with MLA (kv_lora_rank), got {name!r}")
        return cls(hidden_size=f["hidden_size"], num_attention_heads=f["num_attention_heads"],
                   kv_lora_rank=f["kv_lora_rank"], qk_nope_head_dim=f["qk_nope_head_dim"],
                   qk_rope_head_dim=f["qk_rope_head_dim"], v_head_dim=f["v_head_dim"],
                   q_lora_rank=f.get("q_lora_rank"), rope_theta=float(f.get("rope_theta", 10000.0)))


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA: x (B, T, C) -> (B, T, C); ``absorbed=True`` uses the folded inference form.

    >>> attn = MultiHeadLatentAttention(MLAConfig.tiny())
    >>> x = torch.randn(2, 5, 32)
    >>> torch.allclose(attn(x), attn(x, absorbed=True), atol=1e-5)
    True
    """

    def __init__(self, config: MLAConfig) -> None:
        super().__init__()
        self.config = c = config
        h = c.num_attention_heads
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, h * c.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)  # W_DQ
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps=NORM_EPS)
            self.q_b_proj = nn.Linear(c.q_lora_rank, h * c.qk_head_dim, bias=False)  # W_UQ and W_QR
        # W_DKV and W_KR in one matrix: the latent and the shared RoPE key come from one matmul
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, eps=NORM_EPS)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), bias=False)  # W_UK, W_UV
        self.o_proj = nn.Linear(h * c.v_head_dim, c.hidden_size, bias=False)
        self.scale = c.qk_head_dim ** -0.5  # 1/sqrt(d_n + d_r)

    def _queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, c.num_attention_heads, c.qk_head_dim).transpose(1, 2)  # (B, H, T, d_n + d_r)
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)  # (B, H, T, d_n), (.., d_r)
        return q_nope, apply_rope(q_rope, cos, sin)

    def latent_cache(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What MLA caches per token: (c_kv (B, T, r), k_rope (B, T, d_r)) at positions 0..T-1."""
        check_tensor("x", x, ndim=3, layout="(B, T, C)")
        c = self.config
        cos, sin = rope_cos_sin(x.shape[1], c.qk_rope_head_dim, c.rope_theta, dtype=x.dtype)  # (T, d_r) each
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        k_rope = apply_rope(k_rope[:, None], cos, sin)[:, 0]  # (B, T, d_r): one RoPE key for all heads
        return self.kv_a_layernorm(c_kv), k_rope  # (B, T, r), (B, T, d_r)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        w = self.kv_b_proj.weight.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        return w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]  # W_UK (H, d_n, r), W_UV (H, d_v, r)

    def forward(self, x: torch.Tensor, absorbed: bool = False) -> torch.Tensor:
        check_tensor("x", x, ndim=3, layout="(B, T, C)")
        if x.shape[-1] != self.config.hidden_size:
            raise ValueError(f"x must have C={self.config.hidden_size} channels, got {x.shape[-1]}")
        b, t, _ = x.shape
        cos, sin = rope_cos_sin(t, self.config.qk_rope_head_dim, self.config.rope_theta, dtype=x.dtype)
        q_nope, q_rope = self._queries(x, cos, sin)  # (B, H, T, d_n), (B, H, T, d_r)
        c_kv, k_rope = self.latent_cache(x)  # (B, T, r), (B, T, d_r)
        w_uk, w_uv = self._up_weights()  # (H, d_n, r), (H, d_v, r)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()  # (T, S)
        rope_scores = q_rope @ k_rope[:, None].transpose(-1, -2)  # (B, H, T, S)
        if absorbed:  # q_h^T W_UK,h first, then dot with the cached latent: no per-head keys
            q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, H, T, r)
            scores = q_latent @ c_kv[:, None].transpose(-1, -2) + rope_scores  # (B, H, T, S)
        else:  # naive: materialize every head's keys from the latent
            k_nope = torch.einsum("bsr,hdr->bhsd", c_kv, w_uk)  # (B, H, S, d_n)
            scores = q_nope @ k_nope.transpose(-1, -2) + rope_scores  # (B, H, T, S)
        probs = torch.softmax((scores * self.scale).masked_fill(~causal, float("-inf")), dim=-1)  # (B, H, T, S)
        if absorbed:  # weight the latents, then W_UV,h once per query
            out = torch.einsum("bhtr,hvr->bhtv", probs @ c_kv[:, None], w_uv)  # (B, H, T, d_v)
        else:
            v = torch.einsum("bsr,hvr->bhsv", c_kv, w_uv)  # (B, H, S, d_v)
            out = probs @ v  # (B, H, T, d_v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, C)


def kv_cache_elements_per_token(n_layers: int, n_kv_heads: int, head_dim: int) -> int:
    """2 L K D: keys and values of every key/value head in every layer (MHA: K = H; MQA: K = 1).

    >>> kv_cache_elements_per_token(32, 8, 128)  # Llama-3-8B, GQA with 8 key/value heads
    65536
    """
    for name, v in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
        check_int(name, v, minimum=1)
    return 2 * n_layers * n_kv_heads * head_dim


def mla_cache_elements_per_token(n_layers: int, kv_lora_rank: int, qk_rope_head_dim: int) -> int:
    """L (r + d_r): the latent and the shared RoPE key of every layer (DeepSeek-V2, Table 1).

    >>> mla_cache_elements_per_token(60, 512, 64)
    34560
    """
    for name, v in (("n_layers", n_layers), ("kv_lora_rank", kv_lora_rank), ("qk_rope_head_dim", qk_rope_head_dim)):
        check_int(name, v, minimum=1)
    return n_layers * (kv_lora_rank + qk_rope_head_dim)

"""Scaled dot-product attention, attention masks, a KV cache and the multi-head attention layer.

What it implements
- ``scaled_dot_product_attention``: softmax(q k^T * scale + mask) v written out from scratch
  ("Attention Is All You Need", Vaswani et al. 2017, eq. 1), with the calling convention of
  ``torch.nn.functional.scaled_dot_product_attention`` (boolean mask True = may attend, or an
  additive float mask; ``is_causal``; ``scale``; ``enable_gqa``). Two deliberate differences:
  a query row that may attend to nothing returns zeros (never NaN), and with ``is_causal`` and
  more keys than queries (S > T) the queries are the *last* T positions, as in cached decoding
  (PyTorch aligns the causal triangle to the top-left corner instead).
- Mask builders: ``causal_mask``, ``prefix_lm_mask`` (bidirectional over a prefix, causal after
  it: T5 paper section 3.2.1, ChatGLM-6B v1), ``full_mask`` (an encoder), ``padding_mask`` and
  ``combine_masks`` (logical and).
- ``KVCache``: per-layer keys and values for incremental decoding, growing with ``torch.cat`` or
  written into a preallocated buffer, with beam reordering and copying (the role of
  transformers' ``DynamicCache`` / ``StaticCache``).
- ``Attention``: the layer with ``q_proj``/``k_proj``/``v_proj``/``o_proj`` as in transformers'
  ``LlamaAttention``, covering multi-head (K = H), grouped-query (1 < K < H, Ainslie et al. 2023)
  and multi-query attention (K = 1, Shazeer 2019); RoPE or ALiBi from ``llmlab.positional``; the
  fused PyTorch kernel by default (``impl="sdpa"``) and the from-scratch path on request
  (``impl="manual"``, which can also return the attention probabilities).

What it leaves out: sliding-window and sparse attention, cross-attention, paged attention (a
separate module builds on this one). The tiled kernel behind ``impl="flash"`` lives in
``llmlab.flash_attention``; both modules validate q, k, v with ``llmlab.shapes.check_qkv``.
Shape letters follow ``llmlab.shapes``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.flash_attention import flash_attention
from llmlab.positional import alibi_bias, apply_rope, rope_cos_sin
from llmlab.shapes import check_choice, check_float, check_int, check_qkv, check_tensor

ATTENTION_IMPLS = ("sdpa", "manual", "flash")
ATTENTION_POSITIONS = ("rope", "alibi", "none")


# ----------------------------------------------------------------------------------------------
# Masks (boolean, True = this query may attend to this key)


def causal_mask(q_len: int, k_len: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Lower-triangular (T, S) mask; queries are the last T of S positions: row i sees keys j <= i + S - T.

    >>> causal_mask(3).int().tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    q_len = check_int("q_len", q_len, minimum=1)
    k_len = q_len if k_len is None else check_int("k_len", k_len, minimum=1)
    if q_len > k_len:
        raise ValueError(f"q_len must be <= k_len (queries are the last positions), got {q_len} > {k_len}")
    ones = torch.ones(q_len, k_len, dtype=torch.bool, device=device)  # (T, S)
    return torch.tril(ones, diagonal=k_len - q_len)  # (T, S)


def full_mask(q_len: int, k_len: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """All-True (T, S) mask: every query sees every key, as in an encoder (BERT)."""
    q_len = check_int("q_len", q_len, minimum=1)
    k_len = q_len if k_len is None else check_int("k_len", k_len, minimum=1)
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device)  # (T, S)


def prefix_lm_mask(seq_len: int, prefix_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, T) prefix-LM mask: every position sees the whole prefix; after it, attention is causal.

    >>> prefix_lm_mask(4, prefix_len=2).int().tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    """
    seq_len = check_int("seq_len", seq_len, minimum=1)
    prefix_len = check_int("prefix_len", prefix_len, minimum=0)
    if prefix_len > seq_len:
        raise ValueError(f"prefix_len must be <= seq_len={seq_len}, got {prefix_len}")
    mask = causal_mask(seq_len, device=device)  # (T, T)
    mask[:, :prefix_len] = True  # the prefix is visible from everywhere, including itself
    return mask


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) of 1 (real token) / 0 (padding) -> boolean (B, 1, 1, S): no query attends to padding.

    >>> padding_mask(torch.tensor([[0, 1, 1]])).shape
    torch.Size([1, 1, 1, 3])
    """
    check_tensor("attention_mask", attention_mask, ndim=2, layout="(B, S)")
    if attention_mask.is_floating_point() and not torch.all((attention_mask == 0) | (attention_mask == 1)):
        raise ValueError("attention_mask must hold only 0 and 1")
    return attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)


def combine_masks(*masks: torch.Tensor | None) -> torch.Tensor | None:
    """Logical and of broadcastable boolean masks (None entries are skipped; all None -> None).

    >>> combine_masks(causal_mask(3), padding_mask(torch.tensor([[0, 1, 1]]))).shape
    torch.Size([1, 1, 3, 3])
    """
    out = None
    for i, m in enumerate(masks):
        if m is None:
            continue
        check_tensor(f"masks[{i}]", m)
        if m.dtype != torch.bool:
            raise TypeError(f"masks[{i}] must be a boolean mask (True = may attend), got dtype {m.dtype}")
        out = m if out is None else out & m
    return out


def mask_to_bias(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean mask -> additive bias: 0 where attention is allowed, -inf where it is not."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)  # same shape as mask
    return bias.masked_fill(~mask, float("-inf"))


# ----------------------------------------------------------------------------------------------
# Scaled dot-product attention from scratch


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, K, S, D) -> (B, K * n_rep, S, D): each key/value head serves n_rep query heads (GQA)."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)  # (B, H, S, D)


def attention_bias(
    mask: torch.Tensor | None, is_causal: bool, q_len: int, k_len: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor | None:
    """Turn (mask, is_causal) into one additive bias broadcastable to (B, H, T, S), or None."""
    if mask is not None:
        check_tensor("mask", mask, ndim=(2, 3, 4), layout="broadcastable to (B, H, T, S)")
        if mask.shape[-2] not in (1, q_len) or mask.shape[-1] not in (1, k_len):
            raise ValueError(f"mask must broadcast to (..., T, S) = (..., {q_len}, {k_len}), got {tuple(mask.shape)}")
        mask = mask_to_bias(mask, dtype) if mask.dtype == torch.bool else mask.to(dtype)
    if is_causal:
        causal = mask_to_bias(causal_mask(q_len, k_len, device=device), dtype)  # (T, S)
        mask = causal if mask is None else mask + causal
    return mask


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) over the keys; rows that may attend to nothing are all zeros.

    q (B, H, T, D), k (B, K, S, D) -> probabilities (B, H, T, S).
    """
    n_rep = check_qkv(q, k, k, enable_gqa, is_causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale  # 1/sqrt(d_k): keeps logits at unit variance
    k = repeat_kv(k, n_rep)  # (B, H, S, D)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    bias = attention_bias(mask, is_causal, q.shape[-2], k.shape[-2], q.device, scores.dtype)
    if bias is not None:
        scores = scores + bias  # (B, H, T, S)
    # A row of only -inf has no softmax (0/0). Softmax a harmless row of zeros instead and zero the
    # result, so neither the output nor the gradient ever holds a NaN.
    live = torch.isfinite(scores).any(dim=-1, keepdim=True)  # (B, H, T, 1)
    probs = torch.softmax(torch.where(live, scores, 0.0), dim=-1)  # (B, H, T, S)
    return torch.where(live, probs, 0.0)  # (B, H, T, S)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Attention(q, k, v) = softmax(q k^T / sqrt(D) + mask) v, from scratch.

    q (B, H, T, D), k and v (B, K, S, D) -> (B, H, T, D). ``mask``: boolean (True = may attend) or
    additive float, broadcastable to (B, H, T, S). ``is_causal``: queries are the last T of S positions.

    >>> q = k = v = torch.randn(1, 2, 5, 8)
    >>> scaled_dot_product_attention(q, k, v, is_causal=True).shape
    torch.Size([1, 2, 5, 8])
    """
    n_rep = check_qkv(q, k, v, enable_gqa, is_causal)
    probs = attention_probs(q, k, mask, is_causal, scale, enable_gqa)  # (B, H, T, S)
    return probs @ repeat_kv(v, n_rep)  # (B, H, T, D)


# ----------------------------------------------------------------------------------------------
# KV cache


def kv_cache_bytes(
    n_layer: int, n_kv_head: int, head_dim: int, tokens: int, batch_size: int = 1, bytes_per_value: int = 2
) -> int:
    """Bytes of keys and values cached for ``tokens`` positions of ``batch_size`` sequences:
    2 (K and V) * L layers * K heads * D * tokens * B * bytes per value (2 for fp16/bf16).

    >>> kv_cache_bytes(32, 32, 128, tokens=1)  # LLaMA-2-7B in fp16: 0.5 MiB per token
    524288
    """
    counts = {"n_layer": n_layer, "n_kv_head": n_kv_head, "head_dim": head_dim, "bytes_per_value": bytes_per_value}
    for name, value in counts.items():
        check_int(name, value, minimum=1)
    check_int("tokens", tokens, minimum=0)
    check_int("batch_size", batch_size, minimum=1)
    return 2 * n_layer * n_kv_head * head_dim * tokens * batch_size * bytes_per_value


def check_kv_update(layer_idx: int, k: torch.Tensor, v: torch.Tensor, keys: list[torch.Tensor | None]) -> None:
    """Check one cache update (every KV cache's ``update`` starts with this), given the cache's keys per
    layer: ``layer_idx`` names a layer; k and v are both (B, K, T, D), of one shape; and, when the layer
    already holds keys (B, K, S, D), k has the same batch, KV heads and head dimension."""
    check_int("layer_idx", layer_idx, minimum=0)
    if layer_idx >= len(keys):
        raise ValueError(f"layer_idx must be < n_layer={len(keys)}, got {layer_idx}")
    cached = keys[layer_idx]
    check_tensor("k", k, ndim=4, layout="(B, K, T, D)")
    check_tensor("v", v, ndim=4, layout="(B, K, T, D)")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if cached is not None and (cached.shape[:2] != k.shape[:2] or cached.shape[-1] != k.shape[-1]):
        raise ValueError(
            f"k of shape {tuple(k.shape)} does not continue the cached (B, K, S, D) = {tuple(cached.shape)}"
        )


class KVCache:
    """Keys and values of every layer seen so far, so a new token attends to the past without
    recomputing it. Layer i holds k, v of shape (B, K, S, D).

    With ``max_len`` the buffers are allocated once (B, K, max_len, D) and written in place (what a
    serving engine does); without it they grow with ``torch.cat`` (simple, but copies each step).

    >>> cache = KVCache(n_layer=2)
    >>> k_all, v_all = cache.update(0, torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    >>> cache.seq_len
    3
    """

    def __init__(self, n_layer: int, max_len: int | None = None) -> None:
        self.n_layer = check_int("n_layer", n_layer, minimum=1)
        self.max_len = None if max_len is None else check_int("max_len", max_len, minimum=1)
        self.keys: list[torch.Tensor | None] = [None] * self.n_layer  # each (B, K, S or max_len, D)
        self.values: list[torch.Tensor | None] = [None] * self.n_layer  # each (B, K, S or max_len, D)
        self.lengths: list[int] = [0] * self.n_layer  # filled positions per layer

    def _check_update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        check_kv_update(layer_idx, k, v, self.keys)
        if self.max_len is not None and self.lengths[layer_idx] + k.shape[2] > self.max_len:
            raise ValueError(
                f"cache is full: {self.lengths[layer_idx]} cached + {k.shape[2]} new > max_len={self.max_len}"
            )

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, K, T, D) to layer ``layer_idx``; return all of its keys and values (B, K, S, D)."""
        self._check_update(layer_idx, k, v)
        start, end = self.lengths[layer_idx], self.lengths[layer_idx] + k.shape[2]
        if self.max_len is None:
            old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
            self.keys[layer_idx] = k if old_k is None else torch.cat([old_k, k], dim=2)  # (B, K, S, D)
            self.values[layer_idx] = v if old_v is None else torch.cat([old_v, v], dim=2)  # (B, K, S, D)
        else:
            if self.keys[layer_idx] is None:
                b, kv, _, d = k.shape
                self.keys[layer_idx] = k.new_zeros(b, kv, self.max_len, d)  # (B, K, max_len, D)
                self.values[layer_idx] = v.new_zeros(b, kv, self.max_len, d)  # (B, K, max_len, D)
            self.keys[layer_idx][:, :, start:end] = k
            self.values[layer_idx][:, :, start:end] = v
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]  # (B, K, S, D) each

    @property
    def seq_len(self) -> int:
        """Positions cached in layer 0 (the offset of the next token)."""
        return self.lengths[0]

    def nbytes(self) -> int:
        """Bytes held by the cached tensors (the whole buffer when preallocated)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def reset(self) -> None:
        """Forget everything (buffers are released)."""
        self.keys = [None] * self.n_layer
        self.values = [None] * self.n_layer
        self.lengths = [0] * self.n_layer

    def reorder(self, beam_indices: torch.Tensor) -> None:
        """Keep batch rows ``beam_indices`` (N,) in that order, e.g. the surviving beams of beam search."""
        check_tensor("beam_indices", beam_indices, ndim=1, layout="(N,)")
        if beam_indices.is_floating_point():
            raise TypeError(f"beam_indices must be integer indices, got dtype {beam_indices.dtype}")
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None:
                idx = beam_indices.to(k.device)
                self.keys[i], self.values[i] = k.index_select(0, idx), v.index_select(0, idx)  # (N, K, S, D)

    def copy(self) -> KVCache:
        """An independent deep copy (tensors cloned)."""
        return copy.deepcopy(self)

    def __len__(self) -> int:
        return self.seq_len


# ----------------------------------------------------------------------------------------------
# The attention layer


class Attention(nn.Module):
    """Multi-head self-attention with separate key/value head count (MHA, GQA, MQA).

    x (B, T, C) -> (B, T, C). Parameters: q_proj (C -> H*D), k_proj and v_proj (C -> K*D),
    o_proj (H*D -> C). ``position`` is "rope" (rotate q and k), "alibi" (bias the scores) or
    "none" (absolute positions, if any, were added to the embeddings).

    >>> attn = Attention(n_embd=32, n_head=4, n_kv_head=2)
    >>> attn(torch.randn(2, 5, 32))[0].shape
    torch.Size([2, 5, 32])
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        n_kv_head: int | None = None,
        *,
        bias: bool = False,
        position: str = "rope",
        rope_base: float = 10000.0,
        impl: str = "sdpa",
        dropout: float = 0.0,
        layer_idx: int = 0,
    ) -> None:
        super().__init__()
        self.n_embd = check_int("n_embd", n_embd, minimum=1)
        self.n_head = check_int("n_head", n_head, minimum=1)
        self.n_kv_head = self.n_head if n_kv_head is None else check_int("n_kv_head", n_kv_head, minimum=1)
        if n_embd % n_head:
            raise ValueError(f"n_embd must be divisible by n_head, got n_embd={n_embd}, n_head={n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head must be a multiple of n_kv_head, got n_head={n_head}, n_kv_head={n_kv_head}")
        check_choice("position", position, ATTENTION_POSITIONS)
        check_choice("impl", impl, ATTENTION_IMPLS)
        if impl == "flash" and position == "alibi":
            raise ValueError("impl='flash' takes no attention bias, so it cannot run position='alibi'; "
                             "use impl='sdpa' or 'manual'")
        self.head_dim = n_embd // n_head
        self.position, self.impl = position, impl
        self.rope_base = check_float("rope_base", rope_base, low=0.0, low_open=True)
        self.dropout = check_float("dropout", dropout, 0.0, 1.0, high_open=True)
        self.layer_idx = check_int("layer_idx", layer_idx, minimum=0)
        self.q_proj = nn.Linear(n_embd, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(n_embd, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(n_embd, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, n_embd, bias=bias)

    def _split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, _ = x.shape
        if t == 1:  # one token (a decoding step): (B, 1, heads, D) and (B, heads, 1, D) share one layout
            return x.view(b, heads, 1, self.head_dim)  # (B, heads, 1, D)
        return x.view(b, t, heads, self.head_dim).transpose(1, 2)  # (B, heads, T, D)

    def _rope(self, q, k, positions, rope):
        """Rotate q (B, H, T, D) and k (B, K, T, D) by their absolute positions."""
        if rope is None:  # a standalone layer; LLM passes its cached tables
            rope = rope_cos_sin(positions, self.head_dim, self.rope_base, dtype=q.dtype)  # on positions' device
        return apply_rope(q, *rope), apply_rope(k, *rope)  # (B, H, T, D), (B, K, T, D)

    def _mask(self, mask, is_causal, q_len, k_len, device, dtype):
        """The mask for the kernel: None (plus is_causal) when the plain causal mask suffices."""
        if self.position != "alibi" and mask is None and (not is_causal or q_len == 1 or q_len == k_len):
            return None, is_causal and q_len > 1
        bias = attention_bias(mask, is_causal, q_len, k_len, device, dtype)  # (T, S) or (B, 1|H, T, S)
        if self.position == "alibi":
            alibi = alibi_bias(self.n_head, q_len, k_len).to(device=device, dtype=dtype)  # (H, T, S)
            bias = alibi if bias is None else bias + alibi  # (B, H, T, S) or (H, T, S)
        return bias, False

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        is_causal: bool = True,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_probs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, C) -> (out (B, T, C), probs (B, H, T, S) if ``return_probs`` else None).

        mask: boolean/additive, broadcastable to (B, H, T, S), combined with the causal mask when
        ``is_causal``. positions: (T,) or (B, T) absolute positions for RoPE (default: continue
        after the cache). cache: keys/values of earlier tokens, updated in place. rope: precomputed
        (cos, sin), each (T, D) or (B, T, D). ``return_probs`` uses the from-scratch path.
        """
        check_tensor("x", x, ndim=3, layout="(B, T, C)")
        b, t, c = x.shape
        if c != self.n_embd:
            raise ValueError(f"x must have C={self.n_embd} channels, got shape {tuple(x.shape)}")
        q = self._split_heads(self.q_proj(x), self.n_head)  # (B, H, T, D)
        k = self._split_heads(self.k_proj(x), self.n_kv_head)  # (B, K, T, D)
        v = self._split_heads(self.v_proj(x), self.n_kv_head)  # (B, K, T, D)
        if self.position == "rope":
            if positions is None and rope is None:
                offset = 0 if cache is None else cache.lengths[self.layer_idx]
                positions = torch.arange(offset, offset + t, device=x.device)  # (T,)
            q, k = self._rope(q, k, positions, rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D) each
        out, probs = self._attend(q, k, v, mask, is_causal, return_probs)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.o_proj(out), probs  # (B, T, C)

    def _attend(self, q, k, v, mask, is_causal, return_probs):
        """Run the chosen kernel on q (B, H, T, D), k/v (B, K, S, D) -> ((B, H, T, D), probs or None)."""
        if self.impl == "flash" and not return_probs:
            return self._flash(q, k, v, mask, is_causal), None
        bias, causal = self._mask(mask, is_causal, q.shape[2], k.shape[2], q.device, q.dtype)
        n_rep = self.n_head // self.n_kv_head
        p_drop = self.dropout if self.training else 0.0
        if self.impl == "manual" or return_probs:
            probs = attention_probs(q, k, bias, causal, enable_gqa=True)  # (B, H, T, S)
            out = F.dropout(probs, p_drop, self.training) @ repeat_kv(v, n_rep)  # (B, H, T, D)
            return out, (probs if return_probs else None)
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, S, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p_drop, is_causal=causal)
        if bias is not None:
            # The fused kernel may return NaN for a row with nothing to attend to; define it as zeros.
            live = torch.isfinite(bias).any(dim=-1, keepdim=True)  # (..., T, 1)
            out = torch.where(live, out, 0.0)  # (B, H, T, D)
        return out, None

    def _flash(self, q, k, v, mask, is_causal):
        """llmlab.flash_attention's tiled kernel (its own backward pass): causal or unmasked only."""
        if mask is not None:
            raise ValueError("impl='flash' supports the causal mask only, got an attention mask (padding or "
                             "custom); use impl='sdpa' or 'manual'")
        if self.training and self.dropout > 0:
            raise ValueError(f"impl='flash' has no attention dropout, got dropout={self.dropout} in training mode")
        # Queries are the last T of S positions (cached decoding), the kernel's convention as well.
        return flash_attention(q, k, v, is_causal=is_causal and q.shape[2] > 1, enable_gqa=True)  # (B, H, T, D)

"""Attention sinks: StreamingLLM's rolling KV cache (Xiao et al. 2024, "Efficient Streaming
Language Models with Attention Sinks", ICLR).

What it implements
- ``SinkCache``: per layer, the keys (before RoPE) and values of the first ``n_sink`` tokens plus the
  last ``window`` tokens; everything in between is evicted. ``token_index`` records which original
  tokens are held, so the eviction rule can be checked.
- ``streaming_logits``: feeds a sequence one token at a time through an ``llmlab.model.LLM`` with a
  ``SinkCache``. As in the paper (section 3.2), positions are assigned *within the cache*: the
  cached keys are rotated by RoPE at positions 0..S-1 of the cache at every step, and the query at
  position S-1, so positions never exceed the cache size even for an unbounded stream.
  ``n_sink=0`` is plain window attention (the paper's baseline that fails once the first tokens
  are evicted).
- ``sliding_window_logits``: the reference, "sliding window with re-computation": the prediction
  after token t comes from a fresh forward pass over the last ``window`` tokens (O(T W^2)).

What it leaves out: batched rows of different lengths, MoE and non-RoPE models, and the paper's
learnable sink token trained in pre-training (section 3.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmlab.attention import check_kv_update, repeat_kv
from llmlab.positional import apply_rope
from llmlab.shapes import check_int, check_tensor


class SinkCache:
    """Rolling KV cache: the first ``n_sink`` tokens plus the most recent ``window`` tokens.

    Layer i holds keys before RoPE and values, each (B, K, S, D) with S <= n_sink + window.

    >>> cache = SinkCache(n_layer=1, n_sink=2, window=3)
    >>> for _ in range(7):
    ...     _ = cache.update(0, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))
    >>> cache.token_index[0]
    [0, 1, 4, 5, 6]
    """

    def __init__(self, n_layer: int, n_sink: int, window: int) -> None:
        self.n_layer = check_int("n_layer", n_layer, minimum=1)
        self.n_sink = check_int("n_sink", n_sink, minimum=0)
        self.window = check_int("window", window, minimum=1)
        self.keys: list[torch.Tensor | None] = [None] * self.n_layer  # each (B, K, S, D), no RoPE
        self.values: list[torch.Tensor | None] = [None] * self.n_layer  # each (B, K, S, D)
        self.token_index: list[list[int]] = [[] for _ in range(self.n_layer)]  # original token ids held
        self.seen: list[int] = [0] * self.n_layer  # tokens appended so far per layer

    @property
    def capacity(self) -> int:
        """Most tokens held at once: n_sink + window."""
        return self.n_sink + self.window

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, K, T, D) (keys before RoPE), evict, return the held (B, K, S, D) each."""
        check_kv_update(layer_idx, k, v, self.keys)
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        keys = k if old_k is None else torch.cat([old_k, k], dim=2)  # (B, K, S + T, D)
        values = v if old_v is None else torch.cat([old_v, v], dim=2)  # (B, K, S + T, D)
        start = self.seen[layer_idx]
        index = self.token_index[layer_idx] + list(range(start, start + k.shape[2]))
        self.seen[layer_idx] = start + k.shape[2]
        if len(index) > self.capacity:  # keep the sinks and the last `window` tokens
            keep = list(range(self.n_sink)) + list(range(len(index) - self.window, len(index)))
            sel = torch.tensor(keep, device=keys.device)
            keys, values = keys.index_select(2, sel), values.index_select(2, sel)  # (B, K, capacity, D)
            index = [index[i] for i in keep]
        self.keys[layer_idx], self.values[layer_idx], self.token_index[layer_idx] = keys, values, index
        return keys, values


def _check_model(model) -> None:
    cfg = getattr(model, "config", None)
    if cfg is None or cfg.position != "rope" or cfg.norm_placement != "pre" or cfg.ffn == "moe":
        raise ValueError("streaming_logits needs an llmlab LLM with position='rope', norm_placement='pre' "
                         f"and a dense feed-forward, got config {cfg}")
    if cfg.rope_scaling == "dynamic":
        raise ValueError("streaming_logits does not support rope_scaling='dynamic'")


@torch.no_grad()
def streaming_logits(model, input_ids: torch.Tensor, n_sink: int, window: int) -> torch.Tensor:
    """Next-token logits (B, T, V) of ``model`` run token by token with a ``SinkCache``.

    RoPE positions are positions in the cache (0..S-1), as in StreamingLLM; with
    n_sink + window >= T nothing is evicted and the logits equal an ordinary forward pass.
    """
    _check_model(model)
    check_tensor("input_ids", input_ids, ndim=2, layout="(B, T)")
    cfg = model.config
    cache = SinkCache(cfg.n_layer, n_sink, window)
    rotary = model.model.rotary_emb
    out = []
    for t in range(input_ids.shape[1]):
        x = model.model.embed_tokens(input_ids[:, t:t + 1])  # (B, 1, C)
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)  # (B, 1, C)
            b = h.shape[0]
            q = attn.q_proj(h).view(b, 1, attn.n_head, attn.head_dim).transpose(1, 2)  # (B, H, 1, D)
            k = attn.k_proj(h).view(b, 1, attn.n_kv_head, attn.head_dim).transpose(1, 2)  # (B, K, 1, D)
            v = attn.v_proj(h).view(b, 1, attn.n_kv_head, attn.head_dim).transpose(1, 2)  # (B, K, 1, D)
            keys, values = cache.update(i, k, v)  # (B, K, S, D) each
            s = keys.shape[2]
            cos, sin = rotary(s, x.dtype, x.device)  # (>= S, D) each
            q = apply_rope(q, cos[s - 1:s], sin[s - 1:s])  # the query sits at cache position S-1
            keys = apply_rope(keys, cos[:s], sin[:s])  # cached keys at cache positions 0..S-1
            n_rep = attn.n_head // attn.n_kv_head
            o = F.scaled_dot_product_attention(q, repeat_kv(keys, n_rep), repeat_kv(values, n_rep))  # (B, H, 1, D)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))  # (B, 1, C)
            x = x + layer.mlp(layer.post_attention_layernorm(x))  # (B, 1, C)
        out.append(model.lm_head(model.model.norm(x)))  # (B, 1, V)
    return torch.cat(out, dim=1)  # (B, T, V)


@torch.no_grad()
def sliding_window_logits(model, input_ids: torch.Tensor, window: int, batch: int = 256) -> torch.Tensor:
    """Reference logits (B, T, V): position t predicted from a fresh pass over tokens t-window+1..t.

    Every prediction sees exactly the context a model trained on ``window``-token crops expects
    (its first token at position 0); it costs one forward pass of up to ``window`` tokens per token.
    """
    check_tensor("input_ids", input_ids, ndim=2, layout="(B, T)")
    window = check_int("window", window, minimum=1)
    b, t = input_ids.shape
    first = model(input_ids[:, :window]).logits  # (B, min(T, W), V): no eviction yet
    if t <= window:
        return first
    crops = input_ids.unfold(1, window, 1)[:, 1:]  # (B, T - W, W): crop j ends at token W + j
    flat = crops.reshape(-1, window)  # (B * (T - W), W)
    last = torch.cat([model(flat[i:i + batch]).logits[:, -1] for i in range(0, flat.shape[0], batch)])
    return torch.cat([first, last.view(b, t - window, -1)], dim=1)  # (B, T, V)

"""FlashAttention in plain PyTorch: tiling, the online softmax, and the memory and IO it saves.

What it implements
- ``online_softmax``: the one-pass softmax normaliser (running max m and running sum l over a
  stream of chunks; Milakov and Gimelshein 2018, "Online normalizer calculation for softmax").
- ``flash_attention_forward``: the exact attention forward pass of FlashAttention (Dao et al. 2022)
  in the loop order of FlashAttention-2 (Dao 2023, Algorithm 1): an outer loop over tiles of
  ``block_q`` queries, an inner loop over tiles of ``block_k`` keys/values, the online softmax
  update with rescaling of the output accumulator, and the log-sum-exp L that the backward pass
  keeps. With ``is_causal`` the tiles above the diagonal are skipped, not computed and masked;
  the result carries the counts of computed and skipped tiles, the matmul FLOPs done and the
  elements moved between slow memory (HBM) and the tile buffers (SRAM) as a GPU kernel would,
  which ``flash_forward_stats`` derives from the sizes alone (the loop does not count).
- ``flash_attention_backward`` and ``flash_attention`` (autograd): the recomputation backward pass
  of FlashAttention-2 (Algorithm 2): P is rebuilt tile by tile from Q, K and L, never stored.
- The standard algorithm that materialises the (T, S) score and probability matrices, for
  comparison, is ``llmlab.attention.scaled_dot_product_attention``.
- Counting helpers: ``attention_flops`` (4 T S D per head), ``hbm_traffic_standard`` and
  ``hbm_traffic_flash`` (the IO analysis of the FlashAttention paper, section 3.2, counted for this
  module's FlashAttention-2 loop order; the paper's Theorem 2 is for its K/V-outer loop). Peak
  memory is measured with ``llmlab.memory.measure_peak_memory``.

Conventions follow ``llmlab.attention.scaled_dot_product_attention`` (and so the signature of
``torch.nn.functional.scaled_dot_product_attention``): q (B, H, T, D), k and v (B, K, S, D), GQA
with ``enable_gqa``, and with ``is_causal`` the queries are the *last* T of the S positions (the
convention of cached decoding and of the flash-attn package since 2.1).

What it leaves out: dropout, arbitrary masks and ALiBi, variable-length batches, and everything
that makes the real kernel fast (it is a Python loop of small matmuls; on a CPU it is slower than
the naive version). The reference kernels are Tri Dao's flash-attn (``csrc/flash_attn``) and
PyTorch's ``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from llmlab.shapes import check_int, check_qkv, check_tensor

# ----------------------------------------------------------------------------------------------
# Configuration and results


@dataclass(frozen=True)
class FlashConfig:
    """Tile sizes of the tiled attention loop."""

    block_q: int = 64  # B_r: query rows per tile; their output accumulator stays in SRAM
    block_k: int = 64  # B_c: key/value rows per tile streamed through SRAM

    def __post_init__(self) -> None:
        check_int("block_q", self.block_q, minimum=1)
        check_int("block_k", self.block_k, minimum=1)

    @classmethod
    def tiny(cls) -> FlashConfig:
        """Small tiles for tests and hand-checked examples."""
        return cls(block_q=16, block_k=16)

    @classmethod
    def for_sram(cls, sram_bytes: int, head_dim: int, element_size: int = 4) -> FlashConfig:
        """Tile sizes for an SRAM of M elements: ceil(M / 4D) rows for the resident tile, at most D
        rows for the streamed one (FlashAttention Algorithm 1, line 1). There the key tile is the
        resident one; this loop keeps the query tile resident (FlashAttention-2's order), so the two
        roles are exchanged: block_q = ceil(M / 4D), block_k = min(block_q, D). Either way K and V
        (or Q and O) are re-read T / ceil(M / 4D) times: Theta(T S D^2 / M) traffic.

        >>> FlashConfig.for_sram(96 * 1024, head_dim=64)
        FlashConfig(block_q=96, block_k=64)
        """
        m = check_int("sram_bytes", sram_bytes, minimum=1) // check_int("element_size", element_size, minimum=1)
        d = check_int("head_dim", head_dim, minimum=1)
        block_q = max(1, math.ceil(m / (4 * d)))
        return cls(block_q=block_q, block_k=min(block_q, d))


@dataclass(frozen=True)
class FlashStats:
    """What one tiled pass did; counts are summed over batch and heads."""

    tiles_computed: int  # (query tile, key tile) pairs that ran a matmul
    tiles_skipped: int  # pairs skipped because the causal mask hides all of them
    tiles_masked: int  # computed pairs that straddle the diagonal and needed an element mask
    flops: int  # multiply-adds x 2 of the two matmuls (Q K^T and P V) actually done
    hbm_reads: int  # elements read from slow memory: Q, K, V tiles
    hbm_writes: int  # elements written to slow memory: O and L


@dataclass(frozen=True)
class FlashResult:
    """Output of ``flash_attention_forward``."""

    output: torch.Tensor  # (B, H, T, D) attention output
    lse: torch.Tensor  # (B, H, T) log-sum-exp of each score row, log(sum_j exp(s_ij)), in float32/64
    stats: FlashStats  # tile, FLOP and IO counts


# ----------------------------------------------------------------------------------------------
# Online softmax


def online_softmax(chunks: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over chunks of logits x (split along the last dim): return (m, l) with
    m = max_j x_j and l = sum_j exp(x_j - m), so softmax(x)_j = exp(x_j - m) / l and
    logsumexp(x) = m + log l. Each chunk updates m_new = max(m, max(chunk)) and
    l_new = l * exp(m - m_new) + sum(exp(chunk - m_new)).

    chunks: tensors (..., N_i) with the same leading shape; returns m and l of shape (...).

    >>> x = torch.randn(3, 10)
    >>> m, l = online_softmax(x.split(4, dim=-1))
    """
    m = l = None
    for i, chunk in enumerate(chunks):
        check_tensor(f"chunks[{i}]", chunk)
        if chunk.shape[-1] == 0:
            continue
        chunk_max = chunk.amax(dim=-1)  # (...,)
        m_new = chunk_max if m is None else torch.maximum(m, chunk_max)  # (...,)
        chunk_sum = torch.exp(chunk - m_new[..., None]).sum(dim=-1)  # (...,)
        l = chunk_sum if l is None else l * torch.exp(m - m_new) + chunk_sum  # old sum rescaled to the new max
        m = m_new
    if m is None:
        raise ValueError("chunks must hold at least one non-empty tensor, got none")
    return m, l


# ----------------------------------------------------------------------------------------------
# Checks shared by the entry points


def _scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)  # 1/sqrt(D) keeps the logits at unit variance
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


def _check_config(config: FlashConfig | None) -> FlashConfig:
    if config is None:
        return FlashConfig()
    if not isinstance(config, FlashConfig):
        raise TypeError(f"config must be a FlashConfig, got {type(config).__name__}")
    return config


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate half precision in float32, as the CUDA kernels do."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# The tiled forward pass


def _visible_keys(q_end: int, offset: int, s: int, is_causal: bool) -> int:
    """How many leading keys the query rows before ``q_end`` may see: query i sees keys j <= i + offset."""
    return min(s, q_end + offset) if is_causal else s


def _tile_mask(q0: int, q1: int, k0: int, k1: int, offset: int, device: torch.device) -> torch.Tensor | None:
    """Boolean (bq, bk) mask of the causal tile (True = may attend), or None when the tile is fully visible."""
    if k1 - 1 <= q0 + offset:
        return None  # every key of the tile is at or before the first query's position
    rows = torch.arange(q0, q1, device=device)[:, None] + offset  # (bq, 1)
    cols = torch.arange(k0, k1, device=device)[None, :]  # (1, bk)
    return cols <= rows  # (bq, bk)


def _online_step(
    m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, s: torch.Tensor, v_tile: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One key tile of the online softmax: m_new = max(m, rowmax(S)), P = exp(S - m_new),
    l_new = e^(m - m_new) l + rowsum(P), O_new = e^(m - m_new) O + P V.

    m, l (B, K, G, bq); acc (B, K, G, bq, D); s (B, K, G, bq, bk); v_tile (B, K, 1, bk, D).
    """
    m_new = torch.maximum(m, s.amax(dim=-1))  # (B, K, G, bq); finite: the first key tile is never masked
    alpha = torch.exp(m - m_new)  # (B, K, G, bq): shrinks what was summed under the old max
    p = torch.exp(s - m_new[..., None])  # (B, K, G, bq, bk)
    l = alpha * l + p.sum(dim=-1)  # (B, K, G, bq)
    acc = alpha[..., None] * acc + p @ v_tile  # (B, K, G, bq, D)
    return m_new, l, acc


def _query_tile(q_tile, k, v, q0, offset, is_causal, scale, block_k):
    """Attend one query tile (B, K, G, bq, D) to all visible key tiles; return (out, lse)."""
    b, kv, g, bq, d = q_tile.shape
    m = q_tile.new_full((b, kv, g, bq), float("-inf"))  # (B, K, G, bq) running max
    l = q_tile.new_zeros(b, kv, g, bq)  # (B, K, G, bq) running sum of exp(s - m)
    acc = q_tile.new_zeros(b, kv, g, bq, d)  # (B, K, G, bq, D) unnormalised output
    n_keys = _visible_keys(q0 + bq, offset, k.shape[2], is_causal)
    for k0 in range(0, n_keys, block_k):
        k1 = min(k0 + block_k, n_keys)
        k_tile, v_tile = k[:, :, None, k0:k1], v[:, :, None, k0:k1]  # (B, K, 1, bk, D) each
        s = (q_tile @ k_tile.transpose(-2, -1)) * scale  # (B, K, G, bq, bk): the only score block in memory
        mask = _tile_mask(q0, q0 + bq, k0, k1, offset, q_tile.device) if is_causal else None
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))  # (B, K, G, bq, bk)
        m, l, acc = _online_step(m, l, acc, s, v_tile)
    return acc / l[..., None], m + torch.log(l)  # (B, K, G, bq, D), (B, K, G, bq)


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    config: FlashConfig | None = None,
) -> FlashResult:
    """Exact attention by tiles: memory beyond inputs and output is O(block_q * block_k), not O(T * S).

    q (B, H, T, D), k and v (B, K, S, D) -> FlashResult(output (B, H, T, D), lse (B, H, T), stats).

    >>> res = flash_attention_forward(*torch.randn(3, 1, 2, 100, 16), is_causal=True, config=FlashConfig.tiny())
    >>> res.output.shape, res.stats.tiles_skipped
    (torch.Size([1, 2, 100, 16]), 42)
    """
    group = check_qkv(q, k, v, enable_gqa, is_causal)
    config = _check_config(config)
    scale = _scale(scale, q.shape[-1])
    b, h, t, d = q.shape
    kv, s_len, work = k.shape[1], k.shape[2], _work_dtype(q.dtype)
    qg = q.reshape(b, kv, group, t, d).to(work)  # (B, K, G, T, D): query heads grouped by their k/v head
    k, v = k.to(work), v.to(work)  # (B, K, S, D) each; no copy unless half precision
    out = torch.empty(b, kv, group, t, d, dtype=q.dtype, device=q.device)  # (B, K, G, T, D)
    lse = torch.empty(b, kv, group, t, dtype=work, device=q.device)  # (B, K, G, T)
    for q0 in range(0, t, config.block_q):
        q1 = min(q0 + config.block_q, t)
        q_tile = qg[:, :, :, q0:q1]  # (B, K, G, bq, D)
        o_tile, lse_tile = _query_tile(q_tile, k, v, q0, s_len - t, is_causal, scale, config.block_k)
        out[:, :, :, q0:q1], lse[:, :, :, q0:q1] = o_tile, lse_tile
    stats = flash_forward_stats(t, s_len, d, config, is_causal, batch_heads=b * h)
    return FlashResult(out.reshape(b, h, t, d), lse.reshape(b, h, t), stats)  # (B, H, T, D), (B, H, T)


def flash_forward_stats(
    t: int, s: int, d: int, config: FlashConfig | None = None, is_causal: bool = False, batch_heads: int = 1
) -> FlashStats:
    """What ``flash_attention_forward`` does for T queries and S keys of head dim D, from the sizes
    alone (per head, times ``batch_heads`` = B * H): the tiles it computes, skips and masks, the
    matmul FLOPs and the elements it reads and writes.

    Query tile [q0, q1) sees the first n = min(S, q1 + S - T) keys under ``is_causal`` (all S
    otherwise): ceil(n / block_k) tiles, of which those whose last key lies after the tile's first
    query position need an element mask; K and V are read n rows each, once per query tile.

    >>> flash_forward_stats(100, 100, 16, FlashConfig.tiny(), is_causal=True).tiles_skipped
    21
    """
    config = _check_config(config)
    t, s, d, bh = (check_int(n, x, minimum=1) for n, x in (("t", t), ("s", s), ("d", d), ("batch_heads", batch_heads)))
    offset, tiles, masked, keys_read, computed_pairs = s - t, 0, 0, 0, 0
    for q0 in range(0, t, config.block_q):
        q1 = min(q0 + config.block_q, t)
        n_keys = _visible_keys(q1, offset, s, is_causal)
        tiles += math.ceil(n_keys / config.block_k)
        if is_causal:  # mirrors _tile_mask: the tile's last key is after the first query's position
            masked += sum(min(k0 + config.block_k, n_keys) - 1 > q0 + offset for k0 in range(0, n_keys, config.block_k))
        keys_read += n_keys
        computed_pairs += (q1 - q0) * n_keys  # exact query-key pairs inside computed tiles
    q_tiles, k_tiles = math.ceil(t / config.block_q), math.ceil(s / config.block_k)
    return FlashStats(
        tiles_computed=tiles * bh,
        tiles_skipped=(q_tiles * k_tiles - tiles) * bh,
        tiles_masked=masked * bh,
        flops=4 * computed_pairs * d * bh,  # 2 D per pair for q.k, 2 D per pair for p * v
        hbm_reads=(t * d + 2 * keys_read * d) * bh,  # Q once; K and V once per query tile
        hbm_writes=(t * d + t) * bh,  # O and L once
    )


# ----------------------------------------------------------------------------------------------
# The backward pass (recomputation) and autograd


def _key_tile_grads(qg, dog, delta, lse, k_tile, v_tile, k0, offset, is_causal, scale, block_q, dq):
    """Gradients for one key tile (FlashAttention-2 Algorithm 2, inner loop over query tiles).

    P = exp(S - L) is recomputed from the saved L; dV_j = sum_i P^T dO_i; dP = dO_i V_j^T;
    dS = P * (dP - delta_i) with delta_i = rowsum(dO_i * O_i); dQ_i += dS K_j; dK_j += dS^T Q_i.
    qg, dog (B, K, G, T, D); delta, lse (B, K, G, T); k_tile, v_tile (B, K, 1, bk, D); dq is updated.
    """
    t, bk = qg.shape[3], k_tile.shape[3]
    dk = torch.zeros_like(k_tile[:, :, 0])  # (B, K, bk, D)
    dv = torch.zeros_like(v_tile[:, :, 0])  # (B, K, bk, D)
    first = max(0, k0 - offset) if is_causal else 0  # earlier query rows see none of these keys
    for q0 in range(first - first % block_q, t, block_q):
        q1 = min(q0 + block_q, t)
        q_i, do_i = qg[:, :, :, q0:q1], dog[:, :, :, q0:q1]  # (B, K, G, bq, D) each
        s = (q_i @ k_tile.transpose(-2, -1)) * scale  # (B, K, G, bq, bk)
        mask = _tile_mask(q0, q1, k0, k0 + bk, offset, qg.device) if is_causal else None
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))  # (B, K, G, bq, bk)
        p = torch.exp(s - lse[:, :, :, q0:q1, None])  # (B, K, G, bq, bk): exact probabilities again
        dv += (p.transpose(-2, -1) @ do_i).sum(dim=2)  # (B, K, bk, D): summed over the G query heads
        ds = p * (do_i @ v_tile.transpose(-2, -1) - delta[:, :, :, q0:q1, None])  # (B, K, G, bq, bk)
        dq[:, :, :, q0:q1] += (ds @ k_tile) * scale  # (B, K, G, bq, D)
        dk += (ds.transpose(-2, -1) @ q_i).sum(dim=2) * scale  # (B, K, bk, D)
    return dk, dv


def flash_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    is_causal: bool = False,
    scale: float | None = None,
    config: FlashConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of attention from the saved output and log-sum-exp, by tiles.

    q, out, grad_out (B, H, T, D); k, v (B, K, S, D); lse (B, H, T) -> dq (B, H, T, D), dk, dv (B, K, S, D).
    """
    group = check_qkv(q, k, v, enable_gqa=True, is_causal=is_causal)
    config = _check_config(config)
    for name, x, shape in (("out", out, q.shape), ("grad_out", grad_out, q.shape), ("lse", lse, q.shape[:3])):
        check_tensor(name, x)
        if x.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)} to match q, got {tuple(x.shape)}")
    scale = _scale(scale, q.shape[-1])
    b, h, t, d = q.shape
    kv, s_len, work = k.shape[1], k.shape[2], _work_dtype(q.dtype)
    qg = q.reshape(b, kv, group, t, d).to(work)  # (B, K, G, T, D)
    dog = grad_out.reshape(b, kv, group, t, d).to(work)  # (B, K, G, T, D)
    delta = (dog * out.reshape(b, kv, group, t, d).to(work)).sum(dim=-1)  # (B, K, G, T): rowsum(dO * O)
    lse = lse.reshape(b, kv, group, t).to(work)  # (B, K, G, T)
    k, v = k.to(work), v.to(work)  # (B, K, S, D) each
    dq = torch.zeros_like(qg)  # (B, K, G, T, D)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)  # (B, K, S, D) each
    for k0 in range(0, s_len, config.block_k):
        k1 = min(k0 + config.block_k, s_len)
        k_tile, v_tile = k[:, :, None, k0:k1], v[:, :, None, k0:k1]  # (B, K, 1, bk, D) each
        dk[:, :, k0:k1], dv[:, :, k0:k1] = _key_tile_grads(
            qg, dog, delta, lse, k_tile, v_tile, k0, s_len - t, is_causal, scale, config.block_q, dq
        )
    return dq.reshape(b, h, t, d).to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)  # (B, H, T, D), (B, K, S, D) x 2


class _FlashAttentionFunction(torch.autograd.Function):
    """Saves q, k, v, O and L (linear in T), not the (T, S) probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal, scale, enable_gqa, config):
        res = flash_attention_forward(q, k, v, is_causal, scale, enable_gqa, config)
        ctx.save_for_backward(q, k, v, res.output, res.lse)
        ctx.options = (is_causal, scale, config)
        return res.output

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(q, k, v, out, lse, grad_out, *ctx.options)
        return dq, dk, dv, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    config: FlashConfig | None = None,
) -> torch.Tensor:
    """Tiled exact attention with a tiled backward pass; a drop-in for scaled_dot_product_attention.

    q (B, H, T, D), k and v (B, K, S, D) -> (B, H, T, D).

    >>> q = torch.randn(1, 2, 40, 8, requires_grad=True)
    >>> flash_attention(q, q, q, is_causal=True).sum().backward()
    """
    return _FlashAttentionFunction.apply(q, k, v, is_causal, scale, enable_gqa, config)


# ----------------------------------------------------------------------------------------------
# Counting: FLOPs, memory traffic, peak memory


def attention_flops(t: int, s: int, d: int, batch: int = 1, heads: int = 1) -> int:
    """FLOPs of the two matmuls of standard attention: 2 T S D for Q K^T plus 2 T S D for P V, per head.

    The softmax's O(T S) exponentials and sums are left out (they are not matmul FLOPs).

    >>> attention_flops(1024, 1024, 64)
    268435456
    """
    sizes = [check_int(n, x, minimum=1) for n, x in (("t", t), ("s", s), ("d", d), ("batch", batch), ("heads", heads))]
    return 4 * math.prod(sizes)


def hbm_traffic_standard(t: int, s: int, d: int) -> int:
    """Elements moved between HBM and the chip by standard attention, per head (FlashAttention paper,
    Algorithm 0): read Q, K, write S; read S, write P; read P, V, write O = 2TD + 2SD + 4TS."""
    t, s, d = (check_int(n, x, minimum=1) for n, x in (("t", t), ("s", s), ("d", d)))
    return 2 * t * d + 2 * s * d + 4 * t * s


def hbm_traffic_flash(t: int, s: int, d: int, block_q: int) -> int:
    """Elements moved by the tiled forward pass, per head, without causal skipping: Q read once, K and V
    read once per query tile, O and L written once = 2TD + T + 2 S D ceil(T / B_r).

    This is the loop order of FlashAttention-2 (query tiles outside). The first paper's Algorithm 1 puts
    the K/V tiles outside and re-reads Q and re-reads and re-writes O, l and m once per key tile; its
    Theorem 2 bounds that by Theta(T S D^2 / M) for an SRAM of M elements. With B_r = Theta(M / D) the
    count here has the same order.
    """
    t, s, d = (check_int(n, x, minimum=1) for n, x in (("t", t), ("s", s), ("d", d)))
    return 2 * t * d + t + 2 * s * d * math.ceil(t / check_int("block_q", block_q, minimum=1))

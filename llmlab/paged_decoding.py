"""Decoding an llmlab ``LLM`` with its keys and values stored in a paged KV cache.

What it implements
- ``PagedCache``: a drop-in for ``llmlab.attention.KVCache`` (``LLM.forward(..., cache=...)``
  accepts it) whose storage is one ``llmlab.paged_attention.PagedKVCache`` block pool per layer.
  Each batch row is a sequence with its own block table. ``update`` appends the new keys and
  values of every row into that row's blocks and returns the row's whole past, read back through
  the block table, so the model computes exactly what it computes with a contiguous cache.
- ``fork`` and ``reorder``: a row is copied by sharing its blocks (reference counts go up,
  nothing is copied; the first append to a shared, partly filled block copies that block only),
  which is how beam search and parallel sampling share a prompt (Kwon et al. 2023, the vLLM
  paper, section 4.4).
- ``PagedLLMAdapter``: the ``llmlab.decoding.DecodingModel`` adapter (prefill / step / reorder)
  that gives greedy search, sampling and beam search a ``PagedCache`` instead of a ``KVCache``.

What it leaves out: attention reading the blocks directly (the model attends to the gathered,
contiguous keys; ``llmlab.paged_attention.paged_attention`` is the kernel that reads through
the tables), rows of different lengths in one batch, and preemption when the pool runs out
(``OutOfBlocksError`` is raised instead).
"""

from __future__ import annotations

import torch

from llmlab.attention import KVCache
from llmlab.decoding import LLMAdapter
from llmlab.paged_attention import PagedCacheConfig, PagedKVCache
from llmlab.shapes import check_int, check_tensor


class PagedCache(KVCache):
    """Per-layer paged block pools behind the ``KVCache`` interface: layer i, row r -> the blocks
    of sequence ``seq_ids[r]`` in pool i. All layers hold the same block tables.

    >>> cache = PagedCache(n_layer=2, n_kv_head=2, head_dim=8, num_blocks=8, block_tokens=4)
    >>> k_all, v_all = cache.update(0, torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8))
    >>> k_all.shape, cache.pools[0].manager.block_table(cache.seq_ids[0])
    (torch.Size([1, 2, 6, 8]), [0, 1])
    """

    def __init__(
        self,
        n_layer: int,
        n_kv_head: int,
        head_dim: int,
        num_blocks: int = 256,
        block_tokens: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(n_layer)
        config = PagedCacheConfig(num_blocks=num_blocks, block_tokens=block_tokens, n_kv_head=n_kv_head,
                                  head_dim=head_dim)
        self.pools = [PagedKVCache(config, dtype=dtype, device=device) for _ in range(self.n_layer)]
        self.seq_ids: list[int] = []  # sequence id of each batch row
        self._ids_used = 0  # sequence ids are never reused

    def _new_id(self) -> int:
        self._ids_used += 1
        return self._ids_used - 1

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_blocks: int = 256, block_tokens: int = 16) -> PagedCache:
        """A pool shaped for ``model`` (an llmlab LLM), on its device and in its dtype."""
        cfg, weight = model.config, next(model.parameters())
        return cls(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, num_blocks, block_tokens, weight.dtype, weight.device)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, K, T, D) row by row to the rows' sequences in layer ``layer_idx``; return
        every row's keys and values so far, read through the block tables: (B, K, S, D) each."""
        check_int("layer_idx", layer_idx, minimum=0)
        if layer_idx >= self.n_layer:
            raise ValueError(f"layer_idx must be < n_layer={self.n_layer}, got {layer_idx}")
        check_tensor("k", k, ndim=4, layout="(B, K, T, D)")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if not self.seq_ids:  # the first update (layer 0 of the prefill) fixes the batch
            self.seq_ids = [self._new_id() for _ in range(k.shape[0])]
            for pool in self.pools:
                for sid in self.seq_ids:
                    pool.add_sequence(sid)
        if k.shape[0] != len(self.seq_ids):
            raise ValueError(f"k has {k.shape[0]} rows but the cache holds {len(self.seq_ids)} sequences")
        pool = self.pools[layer_idx]
        for row, sid in enumerate(self.seq_ids):
            pool.append(sid, k[row].transpose(0, 1), v[row].transpose(0, 1))  # (T, K, D) each
        gathered = [pool.gather(sid) for sid in self.seq_ids]  # per row ((K, S, D), (K, S, D))
        self.lengths[layer_idx] = pool.length(self.seq_ids[0])
        keys = torch.stack([kv[0] for kv in gathered])  # (B, K, S, D)
        values = torch.stack([kv[1] for kv in gathered])  # (B, K, S, D)
        return keys, values

    def reorder(self, beam_indices: torch.Tensor) -> None:
        """Keep rows ``beam_indices`` (N,) in that order. Every kept row becomes a fork of its source
        (blocks shared, nothing copied), then the old sequences are freed: blocks that no row uses
        any more return to the pool."""
        check_tensor("beam_indices", beam_indices, ndim=1, layout="(N,)")
        if beam_indices.is_floating_point():
            raise TypeError(f"beam_indices must be integer indices, got dtype {beam_indices.dtype}")
        sources = [self.seq_ids[i] for i in beam_indices.tolist()]
        children = [self._new_id() for _ in sources]
        for pool in self.pools:
            for parent, child in zip(sources, children, strict=True):
                pool.fork(parent, child)
            for old in self.seq_ids:
                pool.free(old)
        self.seq_ids = children

    def fork(self, row: int) -> int:
        """Append a copy of batch row ``row`` as a new last row (its blocks shared); return its index."""
        row = check_int("row", row, minimum=0)
        if row >= len(self.seq_ids):
            raise ValueError(f"row must be < {len(self.seq_ids)} (the rows in the cache), got {row}")
        child = self._new_id()
        for pool in self.pools:
            pool.fork(self.seq_ids[row], child)
        self.seq_ids.append(child)
        return len(self.seq_ids) - 1

    def nbytes(self) -> int:
        """Bytes of the block pools (allocated up front, whatever they hold)."""
        return sum(p.key_cache.nbytes + p.value_cache.nbytes for p in self.pools)

    def reset(self) -> None:
        """Free every sequence; the pools stay allocated."""
        for pool in self.pools:
            for sid in self.seq_ids:
                pool.free(sid)
        self.seq_ids = []
        self.lengths = [0] * self.n_layer


class PagedLLMAdapter(LLMAdapter):
    """``llmlab.decoding``'s adapter for an ``LLM`` whose state is a ``PagedCache``: pass it to
    ``greedy_search``, ``sample`` or ``beam_search`` in place of the model."""

    def __init__(self, model: torch.nn.Module, num_blocks: int = 256, block_tokens: int = 16) -> None:
        super().__init__(model)
        self.num_blocks = check_int("num_blocks", num_blocks, minimum=1)
        self.block_tokens = check_int("block_tokens", block_tokens, minimum=1)

    def prefill(self, input_ids: torch.Tensor):
        cache = PagedCache.for_model(self.model, self.num_blocks, self.block_tokens)
        return self._forward(input_ids, cache)

"""PagedAttention: a KV cache stored in fixed-size blocks behind per-sequence block tables.

What it implements (Kwon et al. 2023, "Efficient Memory Management for Large Language Model
Serving with PagedAttention", the vLLM paper, sections 4.1 to 4.4)
- ``BlockAllocator``: a pool of ``num_blocks`` physical blocks with a free list and reference
  counts; running out raises ``OutOfBlocksError`` (a serving engine would preempt a sequence).
- ``BlockManager``: the bookkeeping only (no tensors), like vLLM's block space manager: a block
  table per sequence (logical block i -> physical block), slot allocation for the next token,
  ``fork`` (a child shares all of its parent's blocks, reference counts go up: parallel sampling
  and beam search share the prompt) and copy-on-write when a shared, partly filled last block is
  appended to. ``stats`` reports reserved vs filled slots and the last-block waste.
- ``PagedKVCache``: the key and value block pools (N, block_tokens, K, D) plus a ``BlockManager``;
  ``append`` writes a token's k and v into its slot, ``gather`` rebuilds a contiguous (K, S, D).
- ``paged_attention``: one decoding query per sequence attends to its keys and values read
  through the block table (sequences of different lengths in one batch), the job of vLLM's
  ``paged_attention_v1`` kernel (``csrc/attention/attention_kernels.cuh``).
The serving workload that compares paging with contiguous preallocation over time is simulated
in ``llmlab.serving_sim`` on top of ``BlockManager``.

What it leaves out: swapping and recomputation on preemption, the scheduler, block sizes tuned to
the kernel, prefix caching by hash across requests, and multi-layer pools (each layer of a real
engine has its own pool indexed by the same block tables). Shape letters follow
``llmlab.shapes``; ``block_tokens`` is written out in shape comments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmlab.shapes import check_float, check_int, check_tensor

# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class PagedCacheConfig:
    """Size of one layer's paged KV cache."""

    num_blocks: int = 256  # physical blocks in the pool
    block_tokens: int = 16  # token slots per block (vLLM's ``block_size``, default 16; ModelConfig.block_size
    # is the context length, a different size)
    n_kv_head: int = 2  # K: key/value heads (ModelConfig's name)
    head_dim: int = 64  # D: head dimension

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_tokens", "n_kv_head", "head_dim"):
            check_int(name, getattr(self, name), minimum=1)

    @classmethod
    def tiny(cls) -> PagedCacheConfig:
        """A pool small enough to print: 16 blocks of 4 slots, 2 heads of dimension 8."""
        return cls(num_blocks=16, block_tokens=4, n_kv_head=2, head_dim=8)

    @property
    def num_slots(self) -> int:
        """Token slots in the whole pool."""
        return self.num_blocks * self.block_tokens


class OutOfBlocksError(RuntimeError):
    """The block pool has no free block left."""


# ----------------------------------------------------------------------------------------------
# Physical blocks: free list and reference counts


class BlockAllocator:
    """Hands out physical block ids 0..num_blocks-1 and takes them back when no sequence uses them.

    >>> alloc = BlockAllocator(4)
    >>> b = alloc.allocate(); alloc.incref(b)
    >>> alloc.ref_count(b), alloc.num_free
    (2, 3)
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = check_int("num_blocks", num_blocks, minimum=1)
        self._free = list(range(self.num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first
        self._refs = [0] * self.num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        """Take a free block (reference count 1); raise ``OutOfBlocksError`` when none is left."""
        if not self._free:
            raise OutOfBlocksError(
                f"out of KV cache blocks: all {self.num_blocks} blocks are in use; free finished "
                "sequences (or preempt one) before appending, or create the cache with more num_blocks"
            )
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def _check(self, block: int) -> int:
        block = check_int("block", block, minimum=0)
        if block >= self.num_blocks or self._refs[block] == 0:
            raise ValueError(f"block must be an allocated block id in [0, {self.num_blocks}), got {block}")
        return block

    def ref_count(self, block: int) -> int:
        """How many sequences use ``block`` (0 when it is free)."""
        block = check_int("block", block, minimum=0)
        return self._refs[block] if block < self.num_blocks else 0

    def incref(self, block: int) -> None:
        """One more sequence uses ``block`` (a fork)."""
        self._refs[self._check(block)] += 1

    def decref(self, block: int) -> bool:
        """One sequence fewer uses ``block``; return True if that freed it."""
        block = self._check(block)
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)
            return True
        return False


# ----------------------------------------------------------------------------------------------
# Block tables


@dataclass(frozen=True)
class CacheStats:
    """Memory use of a paged cache, in token slots."""

    num_sequences: int  # sequences in the cache
    blocks_used: int  # physical blocks taken from the pool
    slots_reserved: int  # blocks_used * block_tokens
    slots_filled: int  # slots that hold a token's k and v (a shared block counts once)
    logical_tokens: int  # sum of sequence lengths (what the sequences see; > slots_filled with sharing)

    @property
    def last_block_waste(self) -> int:
        """Internal fragmentation: reserved slots that hold nothing (only in last blocks)."""
        return self.slots_reserved - self.slots_filled

    @property
    def waste_fraction(self) -> float:
        """Share of the reserved slots that hold nothing."""
        return self.last_block_waste / self.slots_reserved if self.slots_reserved else 0.0


def contiguous_reserved_slots(num_sequences: int, max_len: int) -> int:
    """Slots a contiguous cache reserves when each sequence gets a buffer of the maximum length up front."""
    return check_int("num_sequences", num_sequences, minimum=0) * check_int("max_len", max_len, minimum=1)


class BlockManager:
    """Block tables and slot allocation for many sequences over one ``BlockAllocator``.

    >>> bm = BlockManager(num_blocks=8, block_tokens=4)
    >>> bm.add_sequence(0); _ = [bm.append_slot(0) for _ in range(6)]
    >>> bm.block_table(0), bm.length(0)
    ([0, 1], 6)
    """

    def __init__(self, num_blocks: int, block_tokens: int) -> None:
        self.allocator = BlockAllocator(num_blocks)
        self.block_tokens = check_int("block_tokens", block_tokens, minimum=1)
        self._tables: dict[int, list[int]] = {}  # sequence id -> physical block per logical block
        self._lengths: dict[int, int] = {}  # sequence id -> tokens stored

    def _seq(self, seq_id: int) -> list[int]:
        if seq_id not in self._tables:
            raise ValueError(f"seq_id {seq_id!r} is not in the cache; known ids: {sorted(self._tables)}")
        return self._tables[seq_id]

    def add_sequence(self, seq_id: int) -> None:
        """Register an empty sequence (it takes no block until its first token)."""
        if seq_id in self._tables:
            raise ValueError(f"seq_id {seq_id!r} is already in the cache")
        self._tables[seq_id], self._lengths[seq_id] = [], 0

    def block_table(self, seq_id: int) -> list[int]:
        """Physical block of each logical block of the sequence (a copy)."""
        return list(self._seq(seq_id))

    def length(self, seq_id: int) -> int:
        self._seq(seq_id)
        return self._lengths[seq_id]

    @property
    def seq_ids(self) -> list[int]:
        return list(self._tables)

    def append_slot(self, seq_id: int) -> tuple[int, int, int | None]:
        """Reserve the slot of the sequence's next token; return (block, slot, copy_from).

        A new block is taken when the last one is full. If the last block is partly filled but shared
        with another sequence (reference count > 1), it is copied first (copy-on-write): ``copy_from``
        is the block whose filled slots the caller must copy into ``block``; otherwise it is None.
        """
        table, n = self._seq(seq_id), self._lengths[seq_id]
        slot, copy_from = n % self.block_tokens, None
        if slot == 0:
            table.append(self.allocator.allocate())
        elif self.allocator.ref_count(table[-1]) > 1:  # shared with a fork: copy before writing
            copy_from, new = table[-1], self.allocator.allocate()
            self.allocator.decref(copy_from)  # still used by the other sequences
            table[-1] = new
        self._lengths[seq_id] = n + 1
        return table[-1], slot, copy_from

    def fork(self, parent_id: int, child_id: int) -> None:
        """Make ``child_id`` a sequence with the same tokens, sharing every block of the parent."""
        table = self._seq(parent_id)
        if child_id in self._tables:
            raise ValueError(f"child_id {child_id!r} is already in the cache")
        for block in table:
            self.allocator.incref(block)
        self._tables[child_id], self._lengths[child_id] = list(table), self._lengths[parent_id]

    def free(self, seq_id: int) -> None:
        """Drop a finished sequence; blocks no other sequence uses go back to the free list."""
        for block in self._seq(seq_id):
            self.allocator.decref(block)
        del self._tables[seq_id], self._lengths[seq_id]

    def _block_fill(self) -> dict[int, int]:
        """Filled slots of every physical block in use, from the block tables and the lengths alone.

        Logical block i of a sequence of length n holds min(block_tokens, n - i * block_tokens)
        tokens. Sequences that share a block (a fork) agree on its fill, because a write into a shared
        block copies it first; so each physical block is counted once.
        """
        fill: dict[int, int] = {}
        for seq_id, table in self._tables.items():
            n = self._lengths[seq_id]
            for i, block in enumerate(table):
                fill[block] = min(self.block_tokens, n - i * self.block_tokens)
        return fill

    def stats(self) -> CacheStats:
        """Memory use computed from the state (block tables, lengths, the allocator), not counted along the way."""
        used = self.allocator.num_used
        return CacheStats(
            num_sequences=len(self._tables),
            blocks_used=used,
            slots_reserved=used * self.block_tokens,
            slots_filled=sum(self._block_fill().values()),
            logical_tokens=sum(self._lengths.values()),
        )


# ----------------------------------------------------------------------------------------------
# The cache tensors


class PagedKVCache:
    """One layer's keys and values in block pools (N, block_tokens, K, D), addressed by block tables.

    >>> cache = PagedKVCache(PagedCacheConfig.tiny())
    >>> cache.add_sequence(0)
    >>> cache.append(0, torch.randn(6, 2, 8), torch.randn(6, 2, 8))  # six tokens (T, K, D)
    >>> cache.gather(0)[0].shape
    torch.Size([2, 6, 8])
    """

    def __init__(
        self, config: PagedCacheConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> None:
        if not isinstance(config, PagedCacheConfig):
            raise TypeError(f"config must be a PagedCacheConfig, got {type(config).__name__}")
        self.config = config
        self.manager = BlockManager(config.num_blocks, config.block_tokens)
        shape = (config.num_blocks, config.block_tokens, config.n_kv_head, config.head_dim)
        self.key_cache = torch.zeros(shape, dtype=dtype, device=device)  # (N, block_tokens, K, D)
        self.value_cache = torch.zeros(shape, dtype=dtype, device=device)  # (N, block_tokens, K, D)

    def add_sequence(self, seq_id: int) -> None:
        self.manager.add_sequence(seq_id)

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares the parent's blocks; nothing is copied until one of them appends."""
        self.manager.fork(parent_id, child_id)

    def free(self, seq_id: int) -> None:
        self.manager.free(seq_id)

    def length(self, seq_id: int) -> int:
        return self.manager.length(seq_id)

    def stats(self) -> CacheStats:
        return self.manager.stats()

    def _tokens(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Accept one token (K, D) or several (T, K, D); return (T, K, D)."""
        check_tensor(name, x, ndim=(2, 3), layout="(K, D) or (T, K, D)")
        want = (self.config.n_kv_head, self.config.head_dim)
        if tuple(x.shape[-2:]) != want:
            raise ValueError(f"{name} must end in (K, D) = {want} (the cache's heads, head dim), got {tuple(x.shape)}")
        return x.reshape(-1, *want)  # (T, K, D)

    def append(self, seq_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the keys and values of one token (K, D) or of T tokens (T, K, D) at the sequence's end."""
        k, v = self._tokens("k", k), self._tokens("v", v)  # (T, K, D) each
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        self.manager.length(seq_id)  # a known sequence, or a ValueError naming it
        needed = self._blocks_needed(seq_id, k.shape[0])
        if needed > self.manager.allocator.num_free:
            raise OutOfBlocksError(
                f"out of KV cache blocks: appending {k.shape[0]} tokens to sequence {seq_id!r} needs {needed} "
                f"free blocks, {self.manager.allocator.num_free} of {self.config.num_blocks} are free; free "
                "finished sequences (or preempt one), or create the cache with more num_blocks"
            )
        for i in range(k.shape[0]):
            block, slot, copy_from = self.manager.append_slot(seq_id)
            if copy_from is not None:  # copy-on-write of a shared last block
                self.key_cache[block, :slot] = self.key_cache[copy_from, :slot]
                self.value_cache[block, :slot] = self.value_cache[copy_from, :slot]
            self.key_cache[block, slot], self.value_cache[block, slot] = k[i], v[i]

    def _blocks_needed(self, seq_id: int, n_tokens: int) -> int:
        """New blocks that appending n_tokens takes (one more if the shared last block must be copied)."""
        bs, n = self.config.block_tokens, self.manager.length(seq_id)
        new = math.ceil((n + n_tokens) / bs) - math.ceil(n / bs)
        table = self.manager.block_table(seq_id)
        shared_partial = n % bs != 0 and self.manager.allocator.ref_count(table[-1]) > 1
        return new + int(shared_partial and n_tokens > 0)

    def gather(self, seq_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's keys and values as contiguous tensors (K, S, D), read through its block table."""
        table = torch.tensor(self.manager.block_table(seq_id), dtype=torch.long, device=self.key_cache.device)
        s = self.manager.length(seq_id)
        k = self.key_cache[table].flatten(0, 1)[:s]  # (S, K, D): blocks in logical order, last one cut
        v = self.value_cache[table].flatten(0, 1)[:s]  # (S, K, D)
        return k.transpose(0, 1), v.transpose(0, 1)  # (K, S, D) each


# ----------------------------------------------------------------------------------------------
# Attention through the block tables


def _table_tensor(cache: PagedKVCache, seq_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables padded to the longest one (B, N) and sequence lengths (B,)."""
    tables = [cache.manager.block_table(i) for i in seq_ids]
    width = max(len(t) for t in tables)
    device = cache.key_cache.device
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device)  # (B, N)
    lengths = torch.tensor([cache.length(i) for i in seq_ids], dtype=torch.long, device=device)  # (B,)
    return padded, lengths


def _check_decode_inputs(q: torch.Tensor, cache: PagedKVCache, seq_ids: list[int]) -> int:
    """Validate a decoding batch; return the group size G = H / K."""
    check_tensor("q", q, ndim=3, layout="(B, H, D)")
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    if not isinstance(seq_ids, (list, tuple)) or len(seq_ids) != q.shape[0]:
        got = len(seq_ids) if isinstance(seq_ids, (list, tuple)) else type(seq_ids).__name__
        raise ValueError(f"seq_ids must be a list with one id per row of q (B={q.shape[0]}), got {got}")
    h, d, kv = q.shape[1], q.shape[2], cache.config.n_kv_head
    if d != cache.config.head_dim:
        raise ValueError(f"q's head dim D must be the cache's head_dim={cache.config.head_dim}, got {d}")
    if h % kv:
        raise ValueError(f"q's head count H={h} must be a multiple of the cache's key/value heads K={kv}")
    empty = [i for i in seq_ids if cache.length(i) == 0]
    if empty:
        raise ValueError(f"sequences {empty} hold no tokens yet; append the prompt's keys and values first")
    return h // kv


def paged_attention(
    q: torch.Tensor, cache: PagedKVCache, seq_ids: list[int], scale: float | None = None
) -> torch.Tensor:
    """Decode step: each sequence's newest query attends to all of its cached keys and values.

    q (B, H, D), one row per id in ``seq_ids``; the sequences may have different lengths.
    Returns (B, H, D). Keys and values are read block by block through the block tables (here
    gathered into a padded batch; the CUDA kernel reads the blocks in place).

    >>> cache = PagedKVCache(PagedCacheConfig.tiny())
    >>> cache.add_sequence(7); cache.append(7, torch.randn(5, 2, 8), torch.randn(5, 2, 8))
    >>> paged_attention(torch.randn(1, 4, 8), cache, [7]).shape
    torch.Size([1, 4, 8])
    """
    group = _check_decode_inputs(q, cache, seq_ids)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else check_float("scale", scale, low=0.0, low_open=True)
    b, h, d = q.shape
    tables, lengths = _table_tensor(cache, list(seq_ids))  # (B, N), (B,)
    k = cache.key_cache[tables].flatten(1, 2).transpose(1, 2)  # (B, K, S, D): S = N * block_tokens slots
    v = cache.value_cache[tables].flatten(1, 2).transpose(1, 2)  # (B, K, S, D)
    qg = q.reshape(b, -1, group, d).to(k.dtype)  # (B, K, G, D): query heads grouped by their k/v head
    scores = (qg @ k.transpose(-2, -1)) * scale  # (B, K, G, S)
    filled = torch.arange(k.shape[2], device=q.device)[None, :] < lengths[:, None]  # (B, S)
    scores = scores.masked_fill(~filled[:, None, None, :], float("-inf"))  # empty slots of last blocks and padding
    out = torch.softmax(scores, dim=-1) @ v  # (B, K, G, D)
    return out.reshape(b, h, d).to(q.dtype)  # (B, H, D)

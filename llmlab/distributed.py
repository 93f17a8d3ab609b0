"""Data-parallel training on real ``torch.distributed``: a process launcher, a ring all-reduce from
point-to-point messages, DDP from scratch, ZeRO-1 optimizer-state sharding and ZeRO's accounting.

What it implements
- ``launch(fn, world_size, *args)``: run ``fn(rank, world_size, *args)`` in ``world_size`` CPU
  processes (``torch.multiprocessing`` spawn, the gloo backend on 127.0.0.1 and a free port),
  return every rank's result, re-raise a rank's error with its rank in the message, and always
  terminate every process (also on a timeout). The same ``fn`` runs under ``torchrun`` with NCCL
  on GPUs; only the launcher and the backend change.
- ``ring_all_reduce``: all-reduce as reduce-scatter then all-gather around a ring built from
  ``send``/``recv`` (Patarasuk and Yuan 2009; the algorithm NCCL's ring uses), returning the bytes
  each rank sent: 2 (N - 1) / N times the tensor's bytes.
- ``DataParallel``: ``torch.nn.parallel.DistributedDataParallel`` from scratch (Li et al. 2020,
  "PyTorch Distributed"): rank 0's weights broadcast at construction, gradients averaged by
  asynchronous all-reduces launched from per-parameter hooks during backward (optionally
  bucketed), ``finish_gradient_synchronization()`` waits for them.
- ``ShardedOptimizer``: ZeRO stage 1 (Rajbhandari et al. 2020) with the interface of
  ``torch.distributed.optim.ZeroRedundancyOptimizer``: each rank keeps optimizer state only for
  its size-balanced shard of the parameters, steps it and broadcasts the updated shard.
- ``ZeroMixedPrecision``: ZeRO stages 0-3 from scratch for mixed-precision AdamW (16-bit
  parameters and gradients, fp32 master weights and moments) on flat buffers, with the bytes each
  rank holds; ``OffloadOptimizer``: ZeRO-Offload's step (Ren et al. 2021) with bytes per place.
- ``zero_bytes_per_rank`` (ZeRO's formula), ``tensor_bytes``/``optimizer_state_bytes`` (measured
  bytes) and ``CommunicationCounter`` (bytes handed to each torch.distributed call).

What it leaves out: NCCL-specific features (streams, communication hooks, gradient compression),
``find_unused_parameters``-style graph traversal (unused parameters are reduced as zeros at
``finish_gradient_synchronization``), and ZeroRedundancyOptimizer's ``overlap_with_ddp``.
Reference implementations: ``torch/nn/parallel/distributed.py``,
``torch/distributed/optim/zero_redundancy_optimizer.py``.
"""

from __future__ import annotations

import math
import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable, Iterable

import torch
from torch import nn

from llmlab.shapes import check_int

__all__ = [
    "CommunicationCounter",
    "DataParallel",
    "OffloadOptimizer",
    "adamw_update_",
    "single_process_group",
    "ShardedOptimizer",
    "ZeroMixedPrecision",
    "free_port",
    "launch",
    "optimizer_state_bytes",
    "ring_all_reduce",
    "tensor_bytes",
    "zero_bytes_per_rank",
]


def _dist():
    """``torch.distributed``, imported on first use so that ``import llmlab`` stays light."""
    import torch.distributed as dist

    return dist


# ----------------------------------------------------------------------------------------------
# Launching processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class single_process_group:
    """Context manager: a gloo process group of world size 1 in this process (no spawn), for
    running a ``launch`` worker function as rank 0 of 1, e.g. ``fn(0, 1)``, from a notebook."""

    def __enter__(self) -> single_process_group:
        dist = _dist()
        if dist.is_initialized():
            raise RuntimeError("a process group is already initialized in this process")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1)
        return self

    def __exit__(self, *exc) -> None:
        _dist().destroy_process_group()


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    """One rank: join the gloo group, run ``fn``, send back ("ok", result) or ("error", exception)."""
    dist = _dist()
    torch.set_num_threads(1)  # ranks share the machine's cores
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
        out = ("ok", fn(rank, world_size, *args))
    except BaseException as exc:  # noqa: BLE001 - every error goes back to the caller
        out = ("error", (exc, traceback.format_exc()))
    try:
        payload = pickle.dumps(out)
    except Exception as exc:  # noqa: BLE001 - an unpicklable result or exception
        payload = pickle.dumps(("error", (RuntimeError(f"could not pickle the result: {exc}"),
                                          traceback.format_exc())))
    results.put((rank, payload))
    if dist.is_initialized():
        dist.destroy_process_group()


def _with_rank(exc: BaseException, rank: int, trace: str) -> BaseException:
    """The rank's exception with "rank r: " prefixed to its message (same type when possible)."""
    msg = f"rank {rank}: {exc}\n--- traceback in rank {rank} ---\n{trace}"
    try:
        new = type(exc)(msg)
    except Exception:  # noqa: BLE001 - an exception type with a different constructor
        new = RuntimeError(msg)
    return new


def _stop(procs) -> None:
    """Terminate, then kill, every process still alive; join them all (skip ones never started)."""
    procs = [p for p in procs if p.pid is not None]
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def launch(fn: Callable, world_size: int, *args, timeout: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return the results by rank.

    ``fn`` must be importable by name (defined in a module, not in a notebook cell), and its
    arguments and result picklable. Each rank runs with one thread in a gloo process group on
    127.0.0.1. If a rank raises, ``launch`` raises the same exception type with "rank r:" and the
    rank's traceback in the message; after ``timeout`` seconds it raises ``TimeoutError``. In
    every case all processes are stopped before ``launch`` returns.

    >>> launch(operator.add, 2, 10)  # doctest: +SKIP
    [10, 11]
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    world_size = check_int("world_size", world_size, minimum=1)
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results), daemon=True)
             for r in range(world_size)]
    try:
        for p in procs:
            p.start()
        return _collect(procs, results, world_size, timeout)
    finally:
        _stop(procs)
        results.close()
        results.join_thread()


def _check_progress(procs, out: dict, world_size: int, timeout: float, deadline: float) -> None:
    """Raise if the deadline passed or a rank died without sending a result."""
    if time.monotonic() > deadline:
        missing = sorted(set(range(world_size)) - set(out))
        raise TimeoutError(f"launch: ranks {missing} did not finish within timeout={timeout} s")
    for r, p in enumerate(procs):
        if r not in out and p.exitcode is not None and p.exitcode != 0:
            raise RuntimeError(f"rank {r} exited with code {p.exitcode} and no result")


def _collect(procs, results, world_size: int, timeout: float) -> list:
    """Wait for one message per rank; raise the first error, a dead rank or a timeout."""
    out: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    while len(out) < world_size:
        try:
            rank, payload = results.get(timeout=0.2)
        except queue_module.Empty:
            _check_progress(procs, out, world_size, timeout, deadline)
            continue
        status, value = pickle.loads(payload)
        if status == "error":
            exc, trace = value
            raise _with_rank(exc, rank, trace) from None
        out[rank] = value
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    return [out[r] for r in range(world_size)]


# ----------------------------------------------------------------------------------------------
# Ring all-reduce from send/recv


def ring_all_reduce(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum ``tensor`` over all ranks with a ring; return (the sum, bytes this rank sent).

    The flat tensor is cut into N chunks. Reduce-scatter: in step s (N - 1 steps) rank r sends
    chunk (r - s) mod N to rank r + 1 and adds the chunk it receives from rank r - 1, so rank r
    ends up owning the full sum of chunk (r + 1) mod N. All-gather: N - 1 more steps pass the
    finished chunks around. Each rank sends 2 (N - 1) chunks, i.e. 2 (N - 1) / N of the tensor,
    whatever N is: the ring is bandwidth-optimal. Call it on every rank with same-shaped tensors.
    """
    dist = _dist()
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    rank, n = dist.get_rank(), dist.get_world_size()
    flat = tensor.detach().reshape(-1).clone()  # (numel,)
    if n == 1:
        return flat.view_as(tensor), 0
    chunks = list(flat.tensor_split(n))  # N views into flat, sizes differ by at most 1
    right, left = (rank + 1) % n, (rank - 1) % n
    sent = 0
    for s in range(n - 1):  # reduce-scatter
        send_idx, recv_idx = (rank - s) % n, (rank - s - 1) % n
        sent += _exchange(chunks[send_idx], right, left, chunks[recv_idx], add=True)
    for s in range(n - 1):  # all-gather: pass the finished chunks on
        send_idx, recv_idx = (rank + 1 - s) % n, (rank - s) % n
        sent += _exchange(chunks[send_idx], right, left, chunks[recv_idx], add=False)
    return flat.view_as(tensor), sent


def _exchange(send: torch.Tensor, dst: int, src: int, into: torch.Tensor, add: bool) -> int:
    """Send ``send`` to ``dst`` while receiving a same-sized chunk from ``src`` into ``into``."""
    dist = _dist()
    buf = torch.empty_like(into)
    req = dist.isend(send.contiguous(), dst)  # non-blocking, so the ring cannot deadlock
    dist.recv(buf, src)
    req.wait()
    if add:
        into.add_(buf)
    else:
        into.copy_(buf)
    return send.numel() * send.element_size()


# ----------------------------------------------------------------------------------------------
# Data parallel (DDP from scratch)


class DataParallel(nn.Module):
    """``module`` replicated on every rank, gradients averaged during backward (DDP from scratch).

    At construction rank 0's parameters and buffers are broadcast, so every replica starts equal.
    A hook on each trainable parameter fires when its gradient is accumulated and launches an
    asynchronous all-reduce of it (or of its bucket of about ``bucket_size_mb`` MB once the whole
    bucket is ready), so communication overlaps with the rest of backward. Tied parameters are one
    parameter (one hook); parameters with ``requires_grad=False`` are skipped. Call
    ``finish_gradient_synchronization()`` after ``backward()`` and before ``optimizer.step()``.
    """

    def __init__(self, module: nn.Module, bucket_size_mb: float | None = None) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if bucket_size_mb is not None and (not isinstance(bucket_size_mb, (int, float))
                                           or bucket_size_mb <= 0):
            raise ValueError(f"bucket_size_mb must be a positive number or None, got {bucket_size_mb!r}")
        dist = _dist()
        self.module = module
        self.world_size = dist.get_world_size()
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
        self._params = [p for p in module.parameters() if p.requires_grad]  # tied: listed once
        self._buckets = _make_buckets(self._params, bucket_size_mb)
        self._bucket_of = {id(p): b for b, bucket in enumerate(self._buckets) for p in bucket}
        self._ready: list[set[int]] = [set() for _ in self._buckets]
        self._pending: list[tuple[int, object, torch.Tensor]] = []  # (bucket, work, flat buffer)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _on_grad(self, p: torch.Tensor) -> None:
        b = self._bucket_of[id(p)]
        self._ready[b].add(id(p))
        if len(self._ready[b]) == len(self._buckets[b]):
            self._launch(b)

    def _launch(self, b: int) -> None:
        """Start the asynchronous all-reduce of bucket ``b`` (gradients flattened into one buffer)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._buckets[b]]
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(self.world_size)  # (numel of bucket,)
        work = _dist().all_reduce(flat, async_op=True)
        self._pending.append((b, work, flat))
        self._ready[b] = {-1}  # launched; ignore further hooks until the next step

    def finish_gradient_synchronization(self) -> None:
        """Wait for every all-reduce of this backward and write the averaged gradients back."""
        for b in range(len(self._buckets)):
            if -1 not in self._ready[b]:  # a parameter got no gradient: reduce zeros for it
                self._launch(b)
        for b, work, flat in self._pending:
            work.wait()
            offset = 0
            for p in self._buckets[b]:
                g = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
        self._pending = []
        self._ready = [set() for _ in self._buckets]


def _make_buckets(params: list[torch.Tensor], bucket_size_mb: float | None) -> list[list[torch.Tensor]]:
    """One parameter per bucket, or buckets of about ``bucket_size_mb`` MB in reverse registration
    order (gradients arrive roughly from the last layer to the first, as DDP assumes)."""
    if bucket_size_mb is None:
        return [[p] for p in params]
    limit = bucket_size_mb * 2**20
    buckets, current, size = [], [], 0
    for p in reversed(params):
        current.append(p)
        size += p.numel() * p.element_size()
        if size >= limit:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


# ----------------------------------------------------------------------------------------------
# ZeRO stage 1: optimizer-state sharding


def _partition(params: list[torch.Tensor], world_size: int, loads: list[int] | None = None) -> list[int]:
    """Owner rank of each parameter: largest first, each to the least-loaded rank (greedy)."""
    loads = [0] * world_size if loads is None else loads
    owner = [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: -params[i].numel()):
        r = min(range(world_size), key=lambda r: loads[r])
        owner[i] = r
        loads[r] += params[i].numel()
    return owner


class ShardedOptimizer(torch.optim.Optimizer):
    """ZeRO stage 1 from scratch, with ``ZeroRedundancyOptimizer``'s interface.

    ``params`` (tensors or param-group dicts) are split across ranks balanced by size. Rank r builds
    ``optimizer_cls(**kwargs)`` over its shard only, so it holds 1/N of the optimizer state. After
    the local ``step`` every rank broadcasts the parameters it owns, so all replicas stay equal.
    ``state_dict()`` needs ``consolidate_state_dict(to)`` first on every rank, like the original.
    """

    def __init__(self, params: Iterable, optimizer_cls: type, **kwargs) -> None:
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
        dist = _dist()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._optimizer_cls, self._kwargs = optimizer_cls, kwargs
        self._loads = [0] * self.world_size
        self._owner: dict[int, int] = {}  # id(param) -> owner rank
        self.optim: torch.optim.Optimizer | None = None  # the local optimizer over this rank's shard
        self._consolidated: dict | None = None
        # the class's full defaults (betas, eps, ...), so param_groups match a plain optimizer's
        defaults = optimizer_cls([torch.zeros(1, requires_grad=True)], **kwargs).defaults
        super().__init__(params, dict(defaults))

    def add_param_group(self, param_group: dict) -> None:
        """Add a group: its parameters are assigned to ranks; this rank's part joins ``self.optim``."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        owners = _partition(group["params"], self.world_size, self._loads)
        for p, r in zip(group["params"], owners, strict=True):
            self._owner[id(p)] = r
        local = {k: v for k, v in group.items() if k != "params"}
        local["params"] = [p for p, r in zip(group["params"], owners, strict=True) if r == self.rank]
        if not local["params"]:
            return
        if self.optim is None:
            self.optim = self._optimizer_cls([local], **self._kwargs)
        else:
            self.optim.add_param_group(local)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter (all shards: every rank computes all gradients)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        """Step this rank's shard, then broadcast every shard from its owner."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.optim is not None:
            self._sync_hyperparameters()
            self.optim.step()
        dist = _dist()
        for group in self.param_groups:
            for p in group["params"]:
                dist.broadcast(p.data, src=self._owner[id(p)])
        return loss

    def _sync_hyperparameters(self) -> None:
        """Copy lr etc. from the global groups (a scheduler edits those) to the local groups."""
        local_groups = iter(self.optim.param_groups)
        for group in self.param_groups:
            if any(self._owner[id(p)] == self.rank for p in group["params"]):
                local = next(local_groups)
                for k, v in group.items():
                    if k != "params":
                        local[k] = v

    def local_state_dict(self) -> dict:
        """This rank's optimizer state keyed by global parameter index."""
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        if self.optim is None:
            return {}
        return {index[id(p)]: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                for p, s in self.optim.state.items()}

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather every rank's shard of the state on rank ``to`` (a collective: call on all ranks)."""
        dist = _dist()
        shards = [None] * self.world_size
        dist.all_gather_object(shards, self.local_state_dict())
        self._consolidated = None
        if self.rank == to:
            state = {}
            for shard in shards:
                state.update(shard)
            self._consolidated = state

    def state_dict(self) -> dict:
        """The full state dict, in ``torch.optim.Optimizer.state_dict()`` layout (rank ``to`` only)."""
        if self._consolidated is None:
            raise RuntimeError("call consolidate_state_dict(to=this rank) on every rank before state_dict()")
        full = super().state_dict()  # param_groups with global indices; state is empty here
        full["state"] = dict(sorted(self._consolidated.items()))
        return full


# ----------------------------------------------------------------------------------------------
# Bytes: measured and ZeRO's formula


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by distinct tensors (a tensor seen twice counts once)."""
    seen = {id(t): t for t in tensors if t is not None}
    return sum(t.numel() * t.element_size() for t in seen.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (for ZeRO: the local optimizer's state)."""
    return tensor_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def zero_bytes_per_rank(
    num_params: int, world_size: int, stage: int, param_bytes: float = 2, grad_bytes: float = 2,
    optim_bytes: float = 12,
) -> dict[str, float]:
    """Model-state bytes per rank under ZeRO ``stage`` (Rajbhandari et al. 2020, Figure 1).

    Stage 1 shards the optimizer state, stage 2 also the gradients, stage 3 also the parameters.
    Defaults are the paper's mixed-precision Adam (fp16 parameters and gradients, 12 bytes of fp32
    master weights, momentum and variance): stage 0 16 Psi, stage 1 4 Psi + 12 Psi / N,
    stage 2 2 Psi + 14 Psi / N, stage 3 16 Psi / N. Plain fp32 Adam is (4, 4, 8).

    >>> zero_bytes_per_rank(10**9, 64, 1)["total"] / 1e9
    4.1875
    """
    num_params = check_int("num_params", num_params, minimum=0)
    world_size = check_int("world_size", world_size, minimum=1)
    stage = check_int("stage", stage, minimum=0)
    if stage > 3:
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage}")
    n = world_size
    out = {
        "params": param_bytes * num_params / (n if stage >= 3 else 1),
        "grads": grad_bytes * num_params / (n if stage >= 2 else 1),
        "optimizer": optim_bytes * num_params / (n if stage >= 1 else 1),
    }
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


# ----------------------------------------------------------------------------------------------
# ZeRO stages 0-3 in mixed precision, from scratch on flat buffers


@torch.no_grad()
def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                  exp_avg_sq: torch.Tensor, step: int, lr: float = 1e-3, betas=(0.9, 0.999),
                  eps: float = 1e-8, weight_decay: float = 0.0) -> None:
    """One AdamW update in place (Loshchilov and Hutter 2019), elementwise, as in
    ``torch.optim.AdamW`` (single-tensor path); ``step`` counts from 1. All tensors same shape.

    Elementwise, so updating a slice gives the same numbers as updating the whole and slicing:
    that is what lets ZeRO shard the optimizer without changing the result.
    """
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)  # decoupled weight decay
    exp_avg.lerp_(grad, 1 - beta1)  # m = beta1 m + (1 - beta1) g
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v = beta2 v + (1 - beta2) g^2
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


class ZeroMixedPrecision(nn.Module):
    """Data-parallel mixed-precision AdamW with ZeRO ``stage`` 0, 1, 2 or 3 (Rajbhandari et al. 2020).

    The model runs in 16 bits (``param_dtype``, bf16 by default); the fp32 master weights and
    AdamW's two moments live in one flat fp32 buffer each. The trainable parameters are laid end to
    end in a flat index space of Psi elements, padded to a multiple of N; rank r owns the slice
    [r S, (r + 1) S) with S = padded Psi / N. Per rank, in the paper's accounting:

    - stage 0 (plain data parallel): 2 Psi 16-bit params + 2 Psi 16-bit grads + 12 Psi fp32 state;
      gradients all-reduced.
    - stage 1: the fp32 master, m and v only for the owned slice (12 Psi / N); gradients
      all-reduced; after the step the updated 16-bit slices are all-gathered.
    - stage 2: also the gradients: as soon as backward produces a parameter's gradient, each piece
      of it is summed onto the rank owning that piece (``dist.reduce``: a reduce-scatter done one
      parameter at a time) and every rank frees the full gradient, so a rank keeps 2 Psi / N.
    - stage 3: also the 16-bit parameters: a rank stores only its slice (2 Psi / N); ``forward``
      all-gathers the full parameters and ``step`` frees them again.

    ``group``: a process group (``dist.new_group``) to shard over instead of the whole world.

    Simplification: stage 3 gathers the whole model for a step; DeepSpeed and FSDP gather one
    unit (layer) at a time, so their transient working set is smaller. Gradients are summed in
    fp32 and rounded to 16 bits once, and the update (``adamw_update_``, AdamW from scratch) is
    elementwise, so every stage computes the same updates as stage 0. Call
    ``finish_gradient_synchronization()`` after ``backward()``, then ``step()`` and ``zero_grad()``.
    """

    def __init__(self, module: nn.Module, stage: int, lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 param_dtype: torch.dtype = torch.bfloat16, group=None) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        self.stage = check_int("stage", stage, minimum=0)
        if self.stage > 3:
            raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage}")
        dist = _dist()
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.module = module.to(param_dtype)
        _broadcast_flat(list(module.parameters()) + list(module.buffers()), self._global(0), group)
        self._params = [p for p in module.parameters() if p.requires_grad]  # tied: listed once
        self.device = self._params[0].device  # buffers live where the model lives (CPU or GPU)
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._shapes = [p.shape for p in self._params]
        self._offsets, total = [], 0
        for p in self._params:
            self._offsets.append(total)
            total += p.numel()
        self.num_params = total
        n = self.world_size
        self.shard_size = -(-total // n)  # S = ceil(Psi / N)
        lo = self.rank * self.shard_size if self.stage >= 1 else 0
        size = self.shard_size if self.stage >= 1 else total
        self._lo, self._hi = lo, lo + size  # the flat slice this rank's optimizer state covers
        flat = self._flat_params()  # (N S,) fp32 copy of the 16-bit weights
        self.master = flat[lo:lo + size].clone()  # (S,) or (Psi,) fp32 master weights
        self.exp_avg = torch.zeros_like(self.master)  # AdamW m, same slice
        self.exp_avg_sq = torch.zeros_like(self.master)  # AdamW v, same slice
        self.hparams = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self.steps = 0
        self.param_dtype = param_dtype
        self.grad_shard = None  # stages 2-3: (S,) 16-bit reduced gradients of the owned slice
        self.param_shard = None  # stage 3: (S,) 16-bit parameters of the owned slice
        if self.stage >= 3:
            self.param_shard = flat[lo:lo + size].to(param_dtype)
            self._release()
        self._hooks = []
        if self.stage >= 2:
            self._hooks = [p.register_post_accumulate_grad_hook(self._reduce_to_owners)
                           for p in self._params]

    def _global(self, rank: int) -> int:
        """The global rank of ``rank`` in this engine's group."""
        return rank if self.group is None else _dist().get_global_rank(self.group, rank)

    def _flat_params(self) -> torch.Tensor:
        """All trainable parameters in fp32, end to end, zero-padded to N S elements."""
        flat = torch.zeros(self.shard_size * self.world_size, device=self.device)  # (N S,)
        for p, off in zip(self._params, self._offsets, strict=True):
            flat[off:off + p.numel()] = p.detach().reshape(-1).float()
        return flat

    def _release(self) -> None:
        """Stage 3: drop the full 16-bit parameters (each becomes an empty tensor)."""
        for p in self._params:
            p.data = torch.empty(0, dtype=self.param_dtype, device=self.device)

    def _gather(self) -> None:
        """Stage 3: all-gather every rank's 16-bit slice and point the parameters into it."""
        if self._params[0].numel() > 0:
            return
        parts = [torch.empty_like(self.param_shard) for _ in range(self.world_size)]
        _dist().all_gather(parts, self.param_shard, group=self.group)
        full = torch.cat(parts)  # (N S,) 16-bit, transient
        for p, off, shape in zip(self._params, self._offsets, self._shapes, strict=True):
            p.data = full[off:off + shape.numel()].view(shape)

    def forward(self, *args, **kwargs):
        if self.stage >= 3:
            self._gather()
        return self.module(*args, **kwargs)

    def _pieces(self, off: int, numel: int):
        """(owner rank, start, stop) of the pieces of flat range [off, off + numel) by owner."""
        s = self.shard_size
        start = off
        while start < off + numel:
            owner = start // s
            stop = min(off + numel, (owner + 1) * s)
            yield owner, start, stop
            start = stop

    def _reduce_to_owners(self, p: torch.Tensor) -> None:
        """Stages 2-3 hook: sum each piece of p's gradient onto its owner, then free the gradient."""
        off, g = self._offsets[self._index[id(p)]], p.grad.reshape(-1).float()  # (numel,) fp32 for an exact sum
        if self.grad_shard is None:
            self.grad_shard = torch.zeros(self.shard_size, dtype=self.param_dtype,
                                          device=self.device)  # (S,)
        for owner, start, stop in self._pieces(off, p.numel()):
            piece = g[start - off:stop - off].clone()
            _dist().reduce(piece, dst=self._global(owner), group=self.group)
            if owner == self.rank:
                lo = start - self._lo
                self.grad_shard[lo:lo + stop - start] += (piece / self.world_size).to(self.param_dtype)
        p.grad = None  # this rank keeps only the gradients of its own slice

    def finish_gradient_synchronization(self) -> None:
        """Stages 0-1: all-reduce (average) every gradient. Stages 2-3: the hooks did the work."""
        if self.stage >= 2:
            return
        flat = torch.cat([torch.zeros(p.numel(), device=self.device) if p.grad is None else p.grad.reshape(-1).float()
                          for p in self._params])  # (Psi,) fp32, so the sum is exact
        _dist().all_reduce(flat, group=self.group)  # one call for all gradients
        for p, off in zip(self._params, self._offsets, strict=True):
            p.grad = (flat[off:off + p.numel()] / self.world_size).to(self.param_dtype).view_as(p)

    def _flat_grad_slice(self) -> torch.Tensor:
        """fp32 gradient of this rank's optimizer slice, (S,) or (Psi,)."""
        if self.stage >= 2:
            if self.grad_shard is None:
                return torch.zeros(self._hi - self._lo, device=self.device)
            return self.grad_shard.float()
        flat = torch.zeros(self.shard_size * self.world_size, device=self.device)  # (N S,)
        for p, off in zip(self._params, self._offsets, strict=True):
            if p.grad is not None:
                flat[off:off + p.numel()] = p.grad.reshape(-1).float()
        return flat[self._lo:self._hi]

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on the fp32 master slice, then the 16-bit weights from it (gathered in stage 1-2)."""
        self.steps += 1
        adamw_update_(self.master, self._flat_grad_slice(), self.exp_avg, self.exp_avg_sq,
                      self.steps, **self.hparams)
        new16 = self.master.detach().to(self.param_dtype)  # (S,) or (Psi,)
        if self.stage >= 3:
            self.param_shard.copy_(new16)
            self._release()
            return
        if self.stage >= 1:
            parts = [torch.empty_like(new16) for _ in range(self.world_size)]
            _dist().all_gather(parts, new16, group=self.group)
            new16 = torch.cat(parts)  # (N S,)
        for p, off in zip(self._params, self._offsets, strict=True):
            p.copy_(new16[off:off + p.numel()].view_as(p))

    def zero_grad(self) -> None:
        for p in self._params:
            p.grad = None
        if self.grad_shard is not None:
            self.grad_shard.zero_()

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds now: 16-bit params, 16-bit grads, fp32 master + AdamW m and v."""
        params = tensor_bytes([p for p in self._params if p.numel() > 0])
        if self.param_shard is not None:
            params += tensor_bytes([self.param_shard])
        grads = tensor_bytes([p.grad for p in self._params])
        if self.grad_shard is not None:
            grads += tensor_bytes([self.grad_shard])
        optim = tensor_bytes([self.master, self.exp_avg, self.exp_avg_sq])
        return {"params": params, "grads": grads, "optimizer": optim,
                "total": params + grads + optim}

    def full_parameters(self) -> list[torch.Tensor]:
        """Every trainable parameter in full, 16-bit (a collective in stage 3: call on all ranks)."""
        if self.stage >= 3:
            self._gather()
            out = [p.detach().clone() for p in self._params]
            self._release()
            return out
        return [p.detach().clone() for p in self._params]


def _broadcast_flat(tensors: list[torch.Tensor], src: int, group=None) -> None:
    """Broadcast ``tensors`` from ``src`` in one call per dtype (flattened, then copied back)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in {id(t): t for t in tensors}.values():
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in ts])  # (sum of numels,)
        _dist().broadcast(flat, src=src, group=group)
        offset = 0
        with torch.no_grad():
            for t in ts:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


# ----------------------------------------------------------------------------------------------
# ZeRO-Offload: optimizer state and step on the CPU


class OffloadOptimizer:
    """ZeRO-Offload's split of one mixed-precision AdamW step (Ren et al. 2021, arXiv:2101.06840).

    The 16-bit parameters, the forward and the backward stay on the accelerator (the parameters'
    device); the fp32 master weights, AdamW's m and v and the update live on ``offload_device``
    (the CPU). ``step()`` moves the 16-bit gradients to the CPU (2 Psi bytes), updates the fp32
    masters there, and copies the rounded 16-bit weights back (2 Psi bytes). ``log`` gets one
    entry per step with the bytes held on each side and the bytes moved each way. On a CPU-only
    machine both "places" are the CPU; the bytes per place are the same as on a GPU.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-3,
                 offload_device: str | torch.device = "cpu", **adamw_kwargs) -> None:
        self.model_params = [p for p in params if p.requires_grad]
        if not self.model_params:
            raise ValueError("params must hold at least one parameter that requires grad, got none")
        self.offload_device = torch.device(offload_device)
        self.master_params = [p.detach().to(self.offload_device, torch.float32).clone()
                              .requires_grad_(True) for p in self.model_params]
        self.optimizer = torch.optim.AdamW(self.master_params, lr=lr, foreach=False, **adamw_kwargs)
        self.log: list[dict[str, int]] = []

    def zero_grad(self) -> None:
        for p in self.model_params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """Gradients to the CPU, AdamW on the fp32 masters there, 16-bit weights back."""
        to_cpu = to_device = 0
        device_grads = tensor_bytes(p.grad for p in self.model_params)
        for p, m in zip(self.model_params, self.master_params, strict=True):
            g = p.grad.to(self.offload_device)  # 16-bit gradient crosses to the CPU
            to_cpu += g.numel() * g.element_size()
            m.grad = g.float()  # fp32 only on the CPU
        self.optimizer.step()
        for p, m in zip(self.model_params, self.master_params, strict=True):
            m.grad = None
            new = m.detach().to(p.dtype).to(p.device)  # rounded on the CPU, 16 bits cross back
            to_device += new.numel() * new.element_size()
            p.copy_(new)
        self.log.append({
            "device_params": tensor_bytes(self.model_params),
            "device_grads": device_grads,
            "cpu_master": tensor_bytes(self.master_params),
            "cpu_adam_state": tensor_bytes(v for st in self.optimizer.state.values()
                                           for v in st.values() if v.dim() > 0),  # m and v
            "to_cpu": to_cpu,
            "to_device": to_device,
        })


# ----------------------------------------------------------------------------------------------
# Counting communication


_COUNTED = ("all_reduce", "reduce", "broadcast", "all_gather", "send", "isend", "recv", "irecv")


class CommunicationCounter:
    """Context manager that counts the bytes this rank hands to ``torch.distributed`` calls.

    Inside ``with CommunicationCounter() as c:`` every ``all_reduce``, ``reduce``, ``broadcast``,
    ``all_gather``, ``send``/``isend`` and ``recv``/``irecv`` is wrapped; ``c.bytes[name]`` is the
    payload (the tensor's bytes; ``all_gather``: the input) and ``c.calls[name]`` the number of
    calls. Payload is not wire traffic: a ring all-reduce of P bytes sends 2 (N - 1) / N P per rank.
    """

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._saved: dict[str, Callable] = {}

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def counted(*args, **kwargs):
            t = args[1] if name == "all_gather" else args[0]
            self.bytes[name] = self.bytes.get(name, 0) + t.numel() * t.element_size()
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return counted

    def __enter__(self) -> CommunicationCounter:
        dist = _dist()
        for name in _COUNTED:
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc) -> None:
        dist = _dist()
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved = {}

    def total(self) -> int:
        """Bytes handed to every counted call (receives included)."""
        return sum(self.bytes.values())

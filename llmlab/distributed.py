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
- ``zero_bytes_per_rank`` (ZeRO's formula) and ``tensor_bytes``/``optimizer_state_bytes``
  (measured bytes).

What it leaves out: NCCL-specific features (streams, communication hooks, gradient compression),
``find_unused_parameters``-style graph traversal (unused parameters are reduced as zeros at
``finish_gradient_synchronization``), and ZeroRedundancyOptimizer's ``overlap_with_ddp``.
Reference implementations: ``torch/nn/parallel/distributed.py``,
``torch/distributed/optim/zero_redundancy_optimizer.py``.
"""

from __future__ import annotations

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
    "DataParallel",
    "ShardedOptimizer",
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
    """Terminate, then kill, every process still alive; join them all."""
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

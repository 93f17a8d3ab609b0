"""Data parallelism: gradient all-reduce overlapped with backward (hooks) vs after backward.

Two gloo CPU ranks (one compute thread each) train a 4-layer LLaMA-style model of width 256
(``llmlab.distributed_demos.tiny_model``, about 3.4 M fp32 parameters, 14 MB of gradients) on
4 x 64 tokens per rank. Three ways per step, alternated, best and median of several steps:

- ``backward only``: ``loss.backward()`` with no communication (the compute floor);
- ``all-reduce after backward``: backward, then the same buckets all-reduced one after another
  (what data parallelism costs without overlap);
- ``overlapped (hooks)``: ``llmlab.distributed.DataParallel(bucket_size_mb=...)``, whose hooks
  launch each bucket's asynchronous all-reduce as soon as its gradients are ready, then
  ``finish_gradient_synchronization()``.

Both communicating variants are checked to give the same averaged gradients. How much the
overlap hides depends on the machine: gloo runs its collectives on its own threads, which need
free cores; with 2 ranks on 2 shared cores there is little to overlap with.

    .venv/bin/python benchmarks/bench_distributed.py

Output committed in benchmarks/results/bench_distributed.txt.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from llmlab.distributed import DataParallel, launch
from llmlab.distributed_demos import tiny_model


def _after_backward(model, buckets, world):
    """All-reduce ``buckets`` (lists of parameters) one by one, after backward."""
    import torch.distributed as dist

    for bucket in buckets:
        flat = torch.cat([p.grad.reshape(-1) for p in bucket]).div_(world)  # (bucket numel,)
        dist.all_reduce(flat)
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def _worker(rank, world, steps, bucket_mb, n_embd):
    import torch.distributed as dist

    base = tiny_model(n_layer=4, n_embd=n_embd)
    plain = copy.deepcopy(base)
    dp = DataParallel(copy.deepcopy(base), bucket_size_mb=bucket_mb)
    buckets = [[dict(plain.named_parameters())[n] for n in names] for names in
               ([next(k for k, q in dp.module.named_parameters() if q is p) for p in b]
                for b in dp._buckets)]  # the same buckets, on the plain copy
    g = torch.Generator().manual_seed(rank)
    rows = torch.randint(0, 64, (4, 65), generator=g)  # (B, T+1) this rank's batch
    times = {"backward only": [], "all-reduce after backward": [], "overlapped (hooks)": []}
    for step in range(steps + 1):  # step 0 warms up
        for name in times:
            model = dp if name == "overlapped (hooks)" else plain
            model.zero_grad(set_to_none=False)
            loss = model(rows[:, :-1], rows[:, 1:]).loss
            dist.barrier()
            t0 = time.perf_counter()
            loss.backward()
            if name == "all-reduce after backward":
                _after_backward(plain, buckets, world)
            elif name == "overlapped (hooks)":
                dp.finish_gradient_synchronization()
            if step:
                times[name].append(time.perf_counter() - t0)
    diff = max((p.grad - q.grad).abs().max().item()
               for p, q in zip(plain.parameters(), dp.module.parameters(), strict=True))
    return {"times": times, "grad_diff": diff, "buckets": len(buckets),
            "params": sum(p.numel() for p in plain.parameters())}


def main(steps=8, bucket_mb=1.0, n_embd=256) -> str:
    out = launch(_worker, 2, steps, bucket_mb, n_embd, timeout=600)
    lines = [f"DataParallel on 2 gloo ranks (1 thread each), {out[0]['params']:,} parameters, "
             f"{out[0]['buckets']} buckets of ~{bucket_mb} MB, 4 x 64 tokens per rank; "
             f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}",
             f"{'per step (rank 0)':28s} {'best':>8s} {'median':>8s}"]
    for name, ts in out[0]["times"].items():
        lines.append(f"{name:28s} {min(ts) * 1e3:6.0f} ms {statistics.median(ts) * 1e3:6.0f} ms")
    t = {k: statistics.median(v) for k, v in out[0]["times"].items()}
    comm = t["all-reduce after backward"] - t["backward only"]
    hidden = t["all-reduce after backward"] - t["overlapped (hooks)"]
    lines.append(f"communication after backward: {comm * 1e3:.0f} ms; hidden by overlap: {hidden * 1e3:.0f} ms "
                 f"(medians)")
    lines.append(f"max |gradient difference| between the two communicating variants: "
                 f"{max(o['grad_diff'] for o in out):.1e}")
    assert max(o["grad_diff"] for o in out) < 1e-5
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--bucket-mb", type=float, default=1.0)
    args = parser.parse_args()
    print(main(args.steps, args.bucket_mb))

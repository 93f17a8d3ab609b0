"""llmlab.distributed on real torch.distributed (gloo, CPU processes): launch, ring all-reduce,
DataParallel vs DDP, ShardedOptimizer vs ZeroRedundancyOptimizer, ZeRO accounting.

Worker functions live at module level so that spawned processes can import them by name.
"""

import multiprocessing
import os
import time

import pytest
import torch

from llmlab import distributed as D

TIMEOUT = 90.0  # seconds per launch: a hang fails the test instead of blocking the run


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split(")")[-1].split()[0] != "Z"


# --- workers ------------------------------------------------------------------------------------


def _ring_worker(rank, world, numel):
    import torch.distributed as dist

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(numel, generator=g, dtype=torch.float64).view(-1, 1)  # (numel, 1)
    ours, sent = D.ring_all_reduce(x)
    ref = x.clone()
    dist.all_reduce(ref)
    return {"pid": os.getpid(), "err": (ours - ref).abs().max().item(), "sent": sent,
            "input_unchanged": torch.equal(x, torch.randn(numel, generator=torch.Generator().manual_seed(rank),
                                                          dtype=torch.float64).view(-1, 1))}


def _raising_worker(rank, world):
    if rank == 1:
        raise ValueError("bad shard size")
    time.sleep(600)  # rank 0 would hang: launch must kill it


def _sleeping_worker(rank, world, pid_dir):
    with open(os.path.join(pid_dir, str(rank)), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


# --- launch ---------------------------------------------------------------------------------------


def test_launch_and_ring_all_reduce_world_2():
    # 1001 elements: chunks of 501 and 500, so the byte count checks the uneven split too
    out = D.launch(_ring_worker, 2, 1001, timeout=TIMEOUT)
    assert [o["err"] for o in out] == [0.0, 0.0]  # two summands: the ring adds in the same order
    assert all(o["input_unchanged"] for o in out)
    # each rank sends one 501-element and one 500-element chunk: 2 (N - 1) / N of 1001 * 8 bytes
    assert [o["sent"] for o in out] == [1001 * 8, 1001 * 8]
    assert len({o["pid"] for o in out}) == 2 and os.getpid() not in {o["pid"] for o in out}
    assert not any(_alive(o["pid"]) for o in out)


def test_ring_all_reduce_world_4_bytes():
    numel = 4096
    out = D.launch(_ring_worker, 4, numel, timeout=TIMEOUT)
    for o in out:
        assert o["err"] < 1e-12  # four summands in another order: float64 rounding only
        assert o["sent"] == 2 * (4 - 1) * numel * 8 // 4  # 2 (N-1)/N of the tensor's bytes


def test_launch_reraises_with_rank_and_leaves_no_process():
    before = set(multiprocessing.active_children())
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="rank 1: bad shard size"):
        D.launch(_raising_worker, 2, timeout=TIMEOUT)
    assert time.monotonic() - t0 < 60  # rank 0's sleep was cut short
    assert set(multiprocessing.active_children()) <= before


def test_launch_timeout_kills_ranks(tmp_path):
    before = set(multiprocessing.active_children())
    with pytest.raises(TimeoutError, match="timeout=5"):
        D.launch(_sleeping_worker, 2, str(tmp_path), timeout=5)
    assert set(multiprocessing.active_children()) <= before
    pids = [int(f.read_text()) for f in tmp_path.iterdir()]  # the ranks that got to start fn
    assert not any(_alive(p) for p in pids)


def test_launch_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        D.launch(_ring_worker, 0)
    with pytest.raises(TypeError, match="fn must be callable"):
        D.launch(3, 2)
    with pytest.raises(ValueError, match="timeout"):
        D.launch(_ring_worker, 2, timeout=0)

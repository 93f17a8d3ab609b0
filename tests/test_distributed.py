"""llmlab.distributed on real torch.distributed (gloo, CPU processes): launch, ring all-reduce,
DataParallel vs DDP, ShardedOptimizer vs ZeroRedundancyOptimizer, ZeRO accounting.

Worker functions live at module level so that spawned processes can import them by name.
"""

import copy
import multiprocessing
import os
import time

import pytest
import torch
from torch import nn

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


# --- DataParallel and ShardedOptimizer ----------------------------------------------------------


def _tiny_llm(seed):
    from llmlab.model import LLM, ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig.tiny(vocab_size=64)
    model = LLM(ModelConfig(**{**cfg.__dict__, "tie_embeddings": True}))  # tied lm_head/embeddings
    model.model.norm.weight.requires_grad_(False)  # a frozen parameter
    return model


def _max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _dp_worker(rank, world):
    import copy

    from torch.nn.parallel import DistributedDataParallel as DDP

    base = _tiny_llm(seed=rank)  # replicas differ until rank 0's weights are broadcast
    ours = D.DataParallel(copy.deepcopy(base))
    bucketed = D.DataParallel(copy.deepcopy(base), bucket_size_mb=0.004)  # about 1,000 floats
    ddp = DDP(copy.deepcopy(base))
    single = copy.deepcopy(ours.module)  # rank 0's weights, trained alone on the whole batch
    g = torch.Generator().manual_seed(123)
    steps, b = 3, 2
    data = torch.randint(0, 64, (steps, b * world, 9), generator=g)  # (S, B*N, T+1), same on all ranks
    models = [ours, bucketed, ddp, single]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    for s in range(steps):
        local = data[s, rank * b:(rank + 1) * b]  # (B, T+1): this rank's slice
        for m, opt in zip(models, opts, strict=True):
            rows = data[s] if m is single else local
            m(rows[:, :-1], rows[:, 1:]).loss.backward()
            if isinstance(m, D.DataParallel):
                m.finish_gradient_synchronization()
            opt.step()
            opt.zero_grad()
    return {
        "start_equal": _max_diff(ours.module, single),
        "ours_ddp": _max_diff(ours.module, ddp.module),
        "bucketed_ddp": _max_diff(bucketed.module, ddp.module),
        "ours_single": _max_diff(ours.module, single),
        "buckets": len(bucketed._buckets),
        "params": [p.detach().clone() for p in ours.module.parameters()],
        "frozen_grad": ours.module.model.norm.weight.grad,
    }


def test_data_parallel_equals_ddp_and_single_process():
    out = D.launch(_dp_worker, 2, timeout=TIMEOUT)
    for o in out:
        assert o["ours_ddp"] < 1e-5 and o["bucketed_ddp"] < 1e-5
        assert o["ours_single"] < 1e-4  # the concatenated batch: one mean over 4 rows vs two over 2
        assert o["buckets"] > 1 and o["frozen_grad"] is None
    for p, q in zip(out[0]["params"], out[1]["params"], strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # replicas stay identical
    assert out[0]["params"][0].abs().sum() > 0


def _zero_worker(rank, world):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    models = [copy.deepcopy(base) for _ in range(3)]
    first = [list(m.parameters())[:4] for m in models]
    last = [list(m.parameters())[4:] for m in models]
    opts = [D.ShardedOptimizer(first[0], torch.optim.AdamW, lr=1e-2),
            ZeroRedundancyOptimizer(first[1], optimizer_class=torch.optim.AdamW, lr=1e-2),
            torch.optim.AdamW(first[2], lr=1e-2)]
    for opt, params in zip(opts, last, strict=True):
        opt.add_param_group({"params": params, "lr": 3e-3})
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)  # same on every rank
        for m, opt in zip(models, opts, strict=True):
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad()
    ours, zero, plain = opts
    ours.consolidate_state_dict(to=0)
    full = ours.state_dict() if rank == 0 else None
    return {
        "ours_plain": _max_diff(models[0], models[2]),
        "zero_plain": _max_diff(models[1], models[2]),
        "ours_bytes": D.optimizer_state_bytes(ours.optim),
        "zero_bytes": D.optimizer_state_bytes(zero.optim),
        "plain_bytes": D.optimizer_state_bytes(plain),
        "full_state": full,
        "plain_state": plain.state_dict(),
    }


def test_sharded_optimizer_equals_zero_redundancy_optimizer():
    out = D.launch(_zero_worker, 2, timeout=TIMEOUT)
    plain = out[0]["plain_bytes"]
    assert plain == 2 * 4 * (8 * 32 + 32 + 32 * 16 + 16 + 16 * 4 + 4) + 6 * 4  # exp_avg, exp_avg_sq, step
    for o in out:
        assert o["ours_plain"] < 1e-6 and o["zero_plain"] < 1e-6
    ours = [o["ours_bytes"] for o in out]
    assert sum(ours) == plain and max(ours) < 0.6 * plain  # each rank holds about 1/N
    assert sum(o["zero_bytes"] for o in out) == plain
    full, ref = out[0]["full_state"], out[0]["plain_state"]
    assert full["param_groups"] == ref["param_groups"]
    assert sorted(full["state"]) == sorted(ref["state"])
    for i, s in ref["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(full["state"][i][k], v, rtol=1e-5, atol=1e-7)


def test_zero_bytes_formula():
    psi, n = 10**9, 64
    assert D.zero_bytes_per_rank(psi, n, 0)["total"] == 16 * psi
    assert D.zero_bytes_per_rank(psi, n, 1)["total"] == 4 * psi + 12 * psi / n
    assert D.zero_bytes_per_rank(psi, n, 2)["total"] == 2 * psi + 14 * psi / n
    assert D.zero_bytes_per_rank(psi, n, 3)["total"] == 16 * psi / n
    # the paper's example: 7.5B parameters on 64 GPUs -> 120 GB, 31.4 GB, 16.6 GB, 1.88 GB
    totals = [D.zero_bytes_per_rank(7_500_000_000, 64, s)["total"] / 1e9 for s in range(4)]
    assert [round(t, 2) for t in totals] == [120.0, 31.41, 16.64, 1.88]
    with pytest.raises(ValueError, match="stage"):
        D.zero_bytes_per_rank(psi, n, 4)
    with pytest.raises(ValueError, match="world_size"):
        D.zero_bytes_per_rank(psi, 0, 1)

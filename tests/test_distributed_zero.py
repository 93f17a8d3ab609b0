"""ZeRO stages 0-3 from scratch (ZeroMixedPrecision) on process groups of 2 and 4 gloo ranks in one
launch of 4 processes (and 1 rank in this process): per-rank bytes equal the ZeRO paper's
4Psi+12Psi/N, 2Psi+14Psi/N and 16Psi/N, stages 1-3 reach stage 0's weights bit for bit; ShardedOptimizer equals
ZeroRedundancyOptimizer on 4 ranks; CommunicationCounter; bad shapes on 4 ranks name the argument.
In-process: adamw_update_ equals torch.optim.AdamW, OffloadOptimizer equals MasterWeightOptimizer
with the bytes per place, single_process_group.
"""

import copy

import pytest
import torch
from torch import nn

from llmlab import distributed as D
from llmlab.distributed_demos import in_flight_peak, tiny_model, zero_stages

TIMEOUT = 120.0


def _sharded_vs_zero_redundancy(rank, world):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    models = [copy.deepcopy(base) for _ in range(3)]
    opts = [D.ShardedOptimizer(models[0].parameters(), torch.optim.AdamW, lr=1e-2),
            ZeroRedundancyOptimizer(models[1].parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2),
            torch.optim.AdamW(models[2].parameters(), lr=1e-2)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)  # same on every rank
        for m, opt in zip(models, opts, strict=True):
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad()
    diff = [max((p - q).abs().max().item() for p, q in zip(m.parameters(), models[2].parameters(), strict=True))
            for m in models[:2]]
    return {"diff": diff, "ours_bytes": D.optimizer_state_bytes(opts[0].optim),
            "zero_bytes": D.optimizer_state_bytes(opts[1].optim), "plain_bytes": D.optimizer_state_bytes(opts[2])}


def _errors(rank, world):
    """Bad shapes on 4 ranks: each error is caught here and its message returned."""
    from llmlab.parallel import TensorParallelAttention

    out = {}
    attn = tiny_model(n_layer=1).model.layers[0].self_attn  # 4 heads, 4 KV heads: divisible by 4
    attn.n_kv_head = 2  # a GQA layout with 2 KV heads cannot split over 4 ranks
    for name, fn in (("tp_kv", lambda: TensorParallelAttention(attn)),
                     ("zero_batch", lambda: zero_stages(rank, world, batch=6))):
        try:
            fn()
            out[name] = None
        except ValueError as exc:
            out[name] = str(exc)
    return out


def _counter(rank, world):
    import torch.distributed as dist

    original = dist.all_reduce
    with D.CommunicationCounter() as c:
        wrapped = dist.all_reduce is not original
        dist.all_reduce(torch.ones(10))  # 40 bytes
        dist.broadcast(torch.ones(3, dtype=torch.float64), src=0)  # 24 bytes
        _, sent = D.ring_all_reduce(torch.ones(8))  # isend 2 (N-1) chunks of 2 floats, recv as many
    return {"bytes": c.bytes, "calls": c.calls, "sent": sent, "wrapped": wrapped,
            "restored": dist.all_reduce is original}


def _zero_worker(rank, world):
    import torch.distributed as dist

    out = {"zero": {}}
    for n in (2, 4):  # N = 1: test_single_process_group_and_bad_stage
        groups = [dist.new_group(list(range(s, s + n))) for s in range(0, world, n)]
        out["zero"][n] = zero_stages(rank % n, n, steps=2, group=groups[rank // n])
    out["zero1"] = _sharded_vs_zero_redundancy(rank, world)
    out["errors"] = _errors(rank, world)
    out["counter"] = _counter(rank, world)
    return out


@pytest.fixture(scope="module")
def four_ranks():
    return D.launch(_zero_worker, 4, timeout=TIMEOUT)


def test_zero_stages_bytes_match_the_paper_on_2_and_4_ranks(four_ranks):
    psi = four_ranks[0]["zero"][2]["num_params"]
    assert psi % 4 == 0  # no padding: the formula holds exactly
    for n in (2, 4):
        for r in range(4):
            for stage in range(4):
                held = four_ranks[r]["zero"][n]["stages"][stage]["bytes"]
                paper = D.zero_bytes_per_rank(psi, n, stage)
                for k in ("params", "grads", "optimizer", "total"):
                    assert held[k] == paper[k], (n, r, stage, k)
    # the stage order: optimizer state (stage 1), then gradients (2), then parameters (3)
    b = [four_ranks[0]["zero"][4]["stages"][s]["bytes"] for s in range(4)]
    assert b[1]["optimizer"] < b[0]["optimizer"] and b[1]["grads"] == b[0]["grads"]
    assert b[2]["grads"] < b[1]["grads"] and b[2]["params"] == b[1]["params"]
    assert b[3]["params"] < b[2]["params"]


def test_zero_stages_train_to_the_same_weights_as_stage_0(four_ranks):
    for n in (2, 4):
        stages = four_ranks[0]["zero"][n]["stages"]
        for stage in (1, 2, 3):
            for p, q in zip(stages[stage]["weights"], stages[0]["weights"], strict=True):
                assert torch.equal(p, q), (n, stage)
        assert four_ranks[1]["zero"][n]["stages"][0]["weights"] is None  # only rank 0 returns them
    start = [p.detach().to(torch.bfloat16).float() for p in tiny_model(n_layer=2).parameters()]
    moved = max((p - q).abs().max().item() for p, q in zip(four_ranks[0]["zero"][4]["stages"][3]["weights"],
                                                            start, strict=True))
    assert moved > 1e-3


def test_sharded_optimizer_equals_zero_redundancy_optimizer_on_4_ranks(four_ranks):
    plain = four_ranks[0]["zero1"]["plain_bytes"]
    for o in four_ranks:
        assert o["zero1"]["diff"][0] < 1e-6 and o["zero1"]["diff"][1] < 1e-6
    ours = [o["zero1"]["ours_bytes"] for o in four_ranks]
    # greedy by size: the largest parameter (32 x 16 weight: AdamW m, v and step) sits alone on one rank
    assert sum(ours) == plain and max(ours) == 8 * 32 * 16 + 4 and min(ours) > 0
    assert sum(o["zero1"]["zero_bytes"] for o in four_ranks) == plain


def test_bad_shapes_on_4_ranks_name_the_argument(four_ranks):
    for o in four_ranks:
        assert o["errors"]["tp_kv"] == "n_kv_head=2 must be divisible by the world size 4"
        assert o["errors"]["zero_batch"] == "batch=6 must be divisible by the world size 4"


def test_communication_counter(four_ranks):
    for o in four_ranks:
        c = o["counter"]
        assert c["bytes"]["all_reduce"] == 40 and c["calls"]["all_reduce"] == 1
        assert c["bytes"]["broadcast"] == 24
        assert c["sent"] == 2 * 3 * 2 * 4  # 2 (N-1) chunks of 8/4 floats
        assert c["bytes"]["isend"] == c["sent"] and c["bytes"]["recv"] == c["sent"]
        assert c["wrapped"] and c["restored"]


def test_adamw_update_equals_torch_adamw():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(1000, generator=g)
    ref = p.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, foreach=False)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for step in range(1, 4):
        grad = torch.randn(1000, generator=g)
        ref.grad = grad.clone()
        opt.step()
        D.adamw_update_(p, grad, m, v, step, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m, opt.state[ref]["exp_avg"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(v, opt.state[ref]["exp_avg_sq"], rtol=1e-6, atol=1e-10)


def test_offload_optimizer_equals_master_weight_step_and_logs_bytes():
    from llmlab.precision import MasterWeightOptimizer

    model = tiny_model(n_layer=1).to(torch.bfloat16)
    ref_model = copy.deepcopy(model)
    psi = sum(p.numel() for p in model.parameters())
    off = D.OffloadOptimizer(model.parameters(), lr=1e-2)
    ref = MasterWeightOptimizer(ref_model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        rows = torch.randint(0, 64, (2, 9), generator=g)  # (B, T+1)
        for m, opt in ((model, off), (ref_model, ref)):
            m(rows[:, :-1], rows[:, 1:]).loss.backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert off.log == [{"device_params": 2 * psi, "device_grads": 2 * psi, "cpu_master": 4 * psi,
                        "cpu_adam_state": 8 * psi, "to_cpu": 2 * psi, "to_device": 2 * psi}] * 2
    assert all(m.device.type == "cpu" and m.dtype == torch.float32 for m in off.master_params)
    with pytest.raises(ValueError, match="params must hold at least one parameter"):
        D.OffloadOptimizer([])


def test_single_process_group_and_bad_stage():
    with D.single_process_group():
        out = zero_stages(0, 1, steps=1)
        psi = out["num_params"]
        assert all(s["bytes"]["total"] == 16 * psi for s in out["stages"].values())
        with pytest.raises(RuntimeError, match="already initialized"):
            D.single_process_group().__enter__()
        with pytest.raises(ValueError, match="stage must be 0, 1, 2 or 3, got 4"):
            D.ZeroMixedPrecision(nn.Linear(2, 2), 4)
        with pytest.raises(TypeError, match="module must be an nn.Module"):
            D.ZeroMixedPrecision("model", 1)
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_in_flight_peak_counts_forwards_not_yet_backwarded():
    gpipe = [("F", i, 0, 0) for i in range(4)] + [("B", i, 0, 0) for i in range(4)]
    one_f_one_b = [("F", 0, 0, 0), ("F", 1, 0, 0), ("B", 0, 0, 0), ("F", 2, 0, 0), ("B", 1, 0, 0),
                   ("B", 2, 0, 0)]
    assert in_flight_peak(gpipe) == 4 and in_flight_peak(one_f_one_b) == 2 and in_flight_peak([]) == 0

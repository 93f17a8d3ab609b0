"""ZeRO-3 with PyTorch FSDP2 ``fully_shard`` on 2 gloo processes: per-rank bytes of parameters,
gradients and AdamW state are halved, and training reaches the same weights as unsharded AdamW,
with and without resharding after forward."""

import copy

import torch
from torch import nn

from llmlab import distributed as D


def _fsdp_worker(rank, world):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    plain = copy.deepcopy(base)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    out = {}
    for reshard in (True, False):
        m = copy.deepcopy(base)
        for layer in m:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, reshard_after_forward=reshard)
        fully_shard(m, reshard_after_forward=reshard)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)  # same on all ranks
            nn.functional.mse_loss(m(x), y).backward()
            grad_bytes = D.tensor_bytes(p.grad.to_local() for p in m.parameters())
            opt.step()
            opt.zero_grad()
        state = [v.to_local() for s in opt.state.values() for v in s.values() if v.dim() > 0]
        out[reshard] = {
            "param_bytes": D.tensor_bytes(p.to_local() for p in m.parameters()),
            "grad_bytes": grad_bytes,
            "state_bytes": D.tensor_bytes(state),
            "weights": [p.full_tensor().detach() for p in m.parameters()],
        }
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)
        nn.functional.mse_loss(plain(x), y).backward()
        plain_opt.step()
        plain_opt.zero_grad()
    out["plain"] = [p.detach() for p in plain.parameters()]
    return out


def test_fsdp2_shards_params_grads_and_state():
    out = D.launch(_fsdp_worker, 2, timeout=90.0)
    psi = 8 * 32 + 32 + 32 * 16 + 16 + 16 * 4 + 4  # 884 parameters
    for o in out:
        for reshard in (True, False):
            r = o[reshard]
            assert r["param_bytes"] == 4 * psi // 2  # fp32 parameters: 4 Psi / N
            assert r["grad_bytes"] == 4 * psi // 2  # fp32 gradients: 4 Psi / N
            assert r["state_bytes"] == 8 * psi // 2  # AdamW exp_avg + exp_avg_sq: 8 Psi / N
            for p, q in zip(r["weights"], o["plain"], strict=True):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

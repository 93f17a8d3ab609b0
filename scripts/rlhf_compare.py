"""RLHF on the shipped model, several seeds: reward model, PPO with and without the KL penalty, DPO
and GRPO on the "feeling" preference task of ``llmlab.rl_tasks``; writes
``llmlab/results/rlhf_compare.json`` (read by notebooks/17_rlhf_dpo.ipynb).

    python scripts/rlhf_compare.py      # 3 seeds in one process
    # what made the committed file: one process per seed (about 20 minutes each on a loaded CPU), then
    for s in 0 1 2; do python scripts/rlhf_compare.py --seeds $s --out /tmp/rlhf_$s.json & done; wait
    python scripts/rlhf_compare.py --merge /tmp/rlhf_0.json /tmp/rlhf_1.json /tmp/rlhf_2.json

Per seed: 200 prompts x 4 samples of the shipped model give the comparison data (pairs whose
answers both are feelings: the labellers compared on-topic answers only); 80% train the reward
model (Bradley-Terry), 20% measure its held-out accuracy. The reward model's score is
standardized on samples of the shipped model. Then each method starts from the shipped model.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import llmlab
from llmlab.alignment import RewardModel, preference_accuracy
from llmlab.rl_tasks import feeling_prompts, feeling_reward, preference_pairs, sample_continuations
from llmlab.rlhf import (
    PPOConfig,
    ValueModel,
    dpo_step,
    evaluate_policy,
    grpo_step,
    ppo_step,
    reward_scores,
    sequence_logps,
    train_reward_model,
)

OUT = Path(__file__).resolve().parents[1] / "llmlab" / "results" / "rlhf_compare.json"


def encode(tok, texts):
    return torch.tensor([tok.encode(t) for t in texts])  # (N, T), equal lengths


def comparison_data(base, tok, seed, n_prompts=200, k=4):
    g = torch.Generator().manual_seed(10_000 + seed)
    prompts = feeling_prompts(n_prompts, seed=10_000 + seed)
    y = sample_continuations(base, encode(tok, prompts).repeat_interleave(k, 0), generator=g)  # (N*k, R)
    texts = [tok.decode(r.tolist()) for r in y]
    groups = [texts[i * k:(i + 1) * k] for i in range(n_prompts)]
    return [p for p in preference_pairs(prompts, groups) if feeling_reward(p[2]) >= 0]


def train_rm(base, tok, pairs, seed, steps, lr, max_train=None):
    n_train = int(0.8 * len(pairs)) if max_train is None else min(max_train, int(0.8 * len(pairs)))
    chosen = encode(tok, [p + c for p, c, _ in pairs])  # (N, P+R)
    rejected = encode(tok, [p + r for p, _, r in pairs])  # (N, P+R)
    torch.manual_seed(seed)
    rm = RewardModel(copy.deepcopy(base))
    train_reward_model(rm, chosen[:n_train], rejected[:n_train], steps=steps, batch_size=16, lr=lr,
                       generator=torch.Generator().manual_seed(seed))
    rm.requires_grad_(False)
    with torch.no_grad():
        acc = preference_accuracy(rm(chosen[n_train:]), rm(rejected[n_train:]))
    return rm, acc, n_train


def make_score(rm, base, tok, temperature, seed):
    x = encode(tok, feeling_prompts(128, seed=20_000 + seed))
    with torch.no_grad():
        y = sample_continuations(base, x, generator=torch.Generator().manual_seed(seed), temperature=temperature)
        s = reward_scores(rm, x, y)  # (128,)
    mu, sd = s.mean(), s.std()
    return lambda xx, yy: (reward_scores(rm, xx, yy) - mu) / sd


def run_method(name, base, tok, rm, score, pairs, seed, args):
    torch.manual_seed(seed)
    policy, ref = copy.deepcopy(base), base
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    g, ge = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(30_000 + seed)
    x_eval = encode(tok, feeling_prompts(args.eval_prompts, seed=40_000 + seed))
    temp = args.hot_temperature if name.startswith("ppo_t2") else args.temperature
    if name.startswith("ppo"):
        vm = ValueModel(copy.deepcopy(base))
        vm.load_state_dict(rm.state_dict())  # value model initialized from the reward model
        vm.requires_grad_(True)
        vopt = torch.optim.AdamW(vm.parameters(), lr=args.value_lr, weight_decay=0.0)
        cfg = PPOConfig(kl_coef=args.kl_small if name.endswith("kl0") else args.kl_coef, temperature=temp)
    if name == "dpo":
        batch_all = {"prompt": encode(tok, [p for p, _, _ in pairs]),
                     "chosen": encode(tok, [c for _, c, _ in pairs]),
                     "rejected": encode(tok, [r for _, _, r in pairs])}
        with torch.no_grad():
            batch_all["ref_chosen"] = sequence_logps(ref, batch_all["prompt"], batch_all["chosen"])
            batch_all["ref_rejected"] = sequence_logps(ref, batch_all["prompt"], batch_all["rejected"])
    curve, seconds = [], 0.0
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            ev = evaluate_policy(policy, ref, x_eval, tok.decode, feeling_reward, score, generator=ge,
                                 temperature=temp)
            curve.append({"step": step, **{k: round(v, 4) for k, v in ev.items()}})
        if step == args.steps:
            break
        t0 = time.perf_counter()
        x = encode(tok, feeling_prompts(args.batch, seed=seed * 1000 + step))
        if name.startswith("ppo"):
            ppo_step(policy, ref, vm, score, x, opt, vopt, cfg, generator=g)
        elif name == "dpo":
            idx = torch.randint(0, len(pairs), (args.batch,), generator=g)
            dpo_step(policy, {k: v[idx] for k, v in batch_all.items()}, opt, beta=args.dpo_beta)
        else:  # grpo: batch // group_size prompts, group_size samples each, the rule as reward
            def rule(xx, yy):
                return torch.tensor([feeling_reward(tok.decode(r.tolist())) for r in yy])
            grpo_step(policy, ref, rule, x[:args.batch // args.group_size], args.group_size, opt,
                      kl_coef=args.grpo_kl, generator=g)
        seconds += time.perf_counter() - t0
    y = sample_continuations(policy, x_eval[:8], generator=ge, temperature=temp)
    return {"curve": curve, "seconds_per_step": round(seconds / args.steps, 3),
            "samples": [tok.decode(r.tolist()) for r in y]}


def best_of_n(base, tok, rm, score, seed, args):
    """Rejection sampling against the reward model: keep the best of N samples per prompt."""
    x = encode(tok, feeling_prompts(args.bon_prompts, seed=50_000 + seed))  # (M, P)
    n_max = max(args.bon_n)
    with torch.no_grad():
        y = sample_continuations(base, x.repeat_interleave(n_max, 0), generator=torch.Generator().manual_seed(seed),
                                 temperature=args.bon_temperature)  # (M*n_max, R)
        s = score(x.repeat_interleave(n_max, 0), y).view(-1, n_max)  # (M, n_max)
    true = torch.tensor([feeling_reward(tok.decode(r.tolist())) for r in y]).view(-1, n_max)  # (M, n_max)
    rows = []
    for n in args.bon_n:
        best = s[:, :n].argmax(dim=1)  # (M,)
        pick = torch.arange(len(best))
        rows.append({"n": n, "rm_score": round(s[pick, best].mean().item(), 4),
                     "true_reward": round(true[pick, best].mean().item(), 4),
                     "broken": round((true[pick, best] < 0).float().mean().item(), 4)})
    return rows


def summarize(per_seed, methods):
    out = {}
    for m in methods:
        finals = [s[m]["curve"][-1] for s in per_seed]
        out[m] = {k: {"mean": round(statistics.mean(f[k] for f in finals), 4),
                      "std": round(statistics.stdev(f[k] for f in finals), 4) if len(finals) > 1 else 0.0}
                  for k in finals[0] if k != "step"}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--value-lr", type=float, default=1e-4)
    ap.add_argument("--rm-steps", type=int, default=15)
    ap.add_argument("--rm-lr", type=float, default=1e-3)
    ap.add_argument("--rm-train-pairs", type=int, default=None, help="cap on the RM's training pairs")
    ap.add_argument("--kl-coef", type=float, default=1.0)
    ap.add_argument("--kl-small", type=float, default=0.0)
    ap.add_argument("--dpo-beta", type=float, default=0.1)
    ap.add_argument("--grpo-kl", type=float, default=0.04)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--eval-prompts", type=int, default=48)
    ap.add_argument("--methods", nargs="+", default=["ppo", "ppo_kl0", "dpo", "grpo", "ppo_t2", "ppo_t2_kl0"])
    ap.add_argument("--hot-temperature", type=float, default=2.0, help="rollout temperature of ppo_t2*")
    ap.add_argument("--merge", type=Path, nargs="+", help="merge per-seed result files into --out")
    ap.add_argument("--bon-n", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--bon-temperature", type=float, default=2.0)
    ap.add_argument("--bon-prompts", type=int, default=32)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        result = {**parts[0], "per_seed": [s for p in parts for s in p["per_seed"]]}
        result["final_mean_std"] = summarize(result["per_seed"], result["scope"]["methods"])
        result["rm_heldout_accuracy"] = [s["rm_heldout_accuracy"] for s in result["per_seed"]]
        result["scope"]["seeds"] = [s["seed"] for s in result["per_seed"]]
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
        return
    torch.set_num_threads(1)
    base, tok = llmlab.load_pretrained()
    base.eval()
    per_seed = []
    for seed in args.seeds:
        pairs = comparison_data(base, tok, seed)
        rm, acc, n_train = train_rm(base, tok, pairs, seed, args.rm_steps, args.rm_lr, args.rm_train_pairs)
        score = make_score(rm, base, tok, args.temperature, seed)
        row = {"seed": seed, "pairs": len(pairs), "rm_train_pairs": n_train, "rm_heldout_accuracy": acc}
        row["best_of_n"] = best_of_n(base, tok, rm, score, seed, args)
        print(seed, "best_of_n", row["best_of_n"], flush=True)
        for m in args.methods:
            row[m] = run_method(m, base, tok, rm, score, pairs[:n_train], seed, args)
            print(seed, m, row[m]["curve"][-1], row[m]["samples"][:3], flush=True)
        per_seed.append(row)
    result = {
        "command": "python scripts/rlhf_compare.py",
        "scope": {"model": "shipped tiny-char (0.82 M parameters)", "threads": 1, **{
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}},
        "per_seed": per_seed,
        "final_mean_std": summarize(per_seed, args.methods),
        "rm_heldout_accuracy": [s["rm_heldout_accuracy"] for s in per_seed],
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

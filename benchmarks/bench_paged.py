"""KV-cache memory reserved per useful slot on a simulated serving workload: paging (blocks of 16
slots behind block tables, as in vLLM) vs contiguous preallocation of the maximum length per request.

Requests arrive at random (Poisson, seeded), with prompt and output lengths uniform in [16, 512]
tokens and a context limit of 2048; each decodes one token per step and is freed when done.
``llmlab.serving_sim.simulate_workload`` sums, over all steps, the slots that hold a token
(useful), the slots paging reserves, and the slots a contiguous cache reserves. The claim checked:
paging wastes under 5% of what it reserves; contiguous preallocation wastes far more. It also runs
the same workload at other block sizes and another seed, to show where the waste comes from, at
other context limits (``max_model_len``), to show that the contiguous waste is set by the workload
(about 1 - mean length / max_model_len) while paging's is not, and with 4 parallel samples per
request that share their prompt's blocks (fork + copy-on-write). Kwon et al. 2023 (section 1,
Figure 2) measured 60-80% waste on real serving systems; this simulation shows the mechanism, not
their numbers.

    .venv/bin/python benchmarks/bench_paged.py

Output committed in benchmarks/results/bench_paged.txt.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from llmlab.serving_sim import WorkloadConfig, simulate_workload

MAX_PAGED_WASTE = 0.05


def row(label: str, config: WorkloadConfig) -> float:
    r = simulate_workload(config)
    print(
        f"{label:28s} {r.paged_per_filled:8.3f} {r.paged_waste:8.1%} {r.contiguous_per_filled:8.3f} "
        f"{r.contiguous_waste:8.1%} {r.peak_paged_slots:8d} {r.peak_contiguous_slots:8d}"
    )
    return r.paged_waste


def main() -> int:
    base = WorkloadConfig()
    print(f"workload: {base}")
    print("reserved/useful = slots reserved / slots holding a token, summed over decoding steps")
    print(f"{'':28s} {'paged':>17s} {'contiguous':>17s} {'peak slots':>17s}")
    print(f"{'run':28s} {'res/used':>8s} {'waste':>8s} {'res/used':>8s} {'waste':>8s} {'paged':>8s} {'contig':>8s}")
    waste = row("block_tokens 16, seed 0", base)
    row("block_tokens 16, seed 1", replace(base, seed=1))
    for block_tokens in (1, 8, 32, 128):
        row(f"block_tokens {block_tokens}, seed 0", replace(base, block_tokens=block_tokens))
    for limit in (1024, 4096):
        row(f"max_model_len {limit}, seed 0", replace(base, max_model_len=limit))
    shared = simulate_workload(replace(base, samples_per_request=4))
    row("4 samples/request (fork)", replace(base, samples_per_request=4))
    print(
        f"with 4 parallel samples the forks share each prompt's blocks: paging stores {shared.sharing_saving:.1%} "
        f"fewer token slots than the samples see; paged reservation per logical token "
        f"{shared.paged_slot_steps / shared.logical_slot_steps:.3f}"
    )
    print(f"paged waste at block_tokens 16 = {waste:.2%} (claim: < {MAX_PAGED_WASTE:.0%})")
    return 0 if waste < MAX_PAGED_WASTE else 1


if __name__ == "__main__":
    sys.exit(main())

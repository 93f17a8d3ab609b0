"""GPipe's pipeline bubble measured from per-rank timelines, against (p - 1) / (m + p - 1), for
notebook 15.

For p = 2 and 4 pipeline ranks (gloo CPU processes, one thread each) and m = 1, 2, 4, 8
micro-batches, one GPipe step (``llmlab.parallel.gpipe_step``) of a 4-layer LLaMA-style model of
width 128 (``llmlab.distributed_demos.tiny_model``) on a batch of 32 x 128 tokens; each (p, m) is
run 5 times and the step with the shortest span is kept. Measured bubble of a rank = 1 - (its
forward and backward time) / (the step's span over all ranks, first start to last end); the
result is the mean over ranks. Timings depend on the machine: on a CPU with fewer free cores than
p the stages cannot all compute at once, which the formula assumes.

    python scripts/distributed_bubble.py            # a few minutes on a 2-core CPU
    python scripts/distributed_bubble.py --out /tmp/b.json --micro 1 2   # a smoke test
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from llmlab.distributed import launch
from llmlab.distributed_demos import pipeline_timelines
from llmlab.notebook import save_result

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "llmlab" / "results" / "distributed_bubble.json"


def measured_bubble(timelines: list) -> float:
    """Mean over ranks of 1 - busy / span, the span taken over all ranks' events."""
    start = min(e[2] for tl in timelines for e in tl)
    end = max(e[3] for tl in timelines for e in tl)
    busy = [sum(e[3] - e[2] for e in tl) for tl in timelines]
    return sum(1 - b / (end - start) for b in busy) / len(busy)


def main(out=DEFAULT_OUT, stages=(2, 4), micro=(1, 2, 4, 8), repeats=5, batch=32, length=128) -> dict:
    rows = []
    t0 = time.perf_counter()
    for p in stages:
        per_rank = launch(pipeline_timelines, p, tuple(micro), batch, length, 128, repeats, timeout=900)
        for m in micro:
            timelines = [r[m] for r in per_rank]
            span = max(e[3] for tl in timelines for e in tl) - min(e[2] for tl in timelines for e in tl)
            rows.append({"p": p, "m": m, "measured": round(measured_bubble(timelines), 4),
                         "formula": round((p - 1) / (m + p - 1), 4), "span_ms": round(span * 1e3, 1)})
            print(rows[-1])
    result = {
        "command": "python scripts/distributed_bubble.py",
        "model": f"4 layers, width 128, 4 heads, vocabulary 64; batch {batch} x {length} tokens; fp32",
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 1),
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return save_result(result, out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    main(args.out, micro=tuple(args.micro))

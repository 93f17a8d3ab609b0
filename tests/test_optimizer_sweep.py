"""Smoke test of scripts/optimizer_sweep.py (AdamW vs Muon behind notebook 07) with a tiny budget, and a
check that it writes the layout the notebook reads (the committed result: test_data_files.py)."""

import json
import math
import sys
from pathlib import Path

from llmlab.data import generate_corpus
from llmlab.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # the script imports the ablation's model from its own folder
import optimizer_sweep  # noqa: E402


def _check_layout(result: dict) -> None:
    assert set(result["runs"]) == {"adamw", "muon"}
    for per_seed in result["runs"].values():
        assert len(per_seed) == len(result["seeds"])
        for sweep in per_seed:
            assert [r["lr"] for r in sweep] == result["learning_rates"]


def test_recipes_differ_only_in_the_optimizer_and_its_rate():
    adamw, muon = optimizer_sweep.recipe("adamw", 2e-2, 200, 0), optimizer_sweep.recipe("muon", 2e-2, 200, 0)
    assert (adamw.optimizer, adamw.lr, adamw.min_lr, adamw.muon_lr) == ("adamw", 2e-2, 2e-3, None)
    assert (muon.optimizer, muon.lr, muon.muon_lr) == ("muon", optimizer_sweep.ADAMW_LR_FOR_MUON_RUNS, 2e-2)
    for field in ("warmup_iters", "max_iters", "batch_size", "seed", "weight_decay", "betas", "grad_clip"):
        assert getattr(adamw, field) == getattr(muon, field), field


def test_script_runs_and_writes_the_layout_the_notebook_reads(tmp_path):
    out = tmp_path / "result.json"
    optimizer_sweep.run(iters=2, seeds=1, eval_windows=2, out=out)
    result = json.loads(out.read_text())
    _check_layout(result)
    uniform = math.log(CharTokenizer.from_text(generate_corpus(300_000, seed=1)).vocab_size)  # the script's corpus
    for per_seed in result["runs"].values():  # two steps from a small random init: about ln V at any rate
        assert all(abs(r["heldout_loss"] - uniform) < 0.5 for r in per_seed[0])

"""Data checks of the committed result files under llmlab/results: each was written by the command it
names, has the layout its notebook reads, and holds numbers consistent with what was trained (losses
below the uniform guess ln V, learning curves that fall, sweeps that bracket their optimum).
The scripts' own code is tested with tiny budgets in tests/test_<script>.py."""

import json
import math
from pathlib import Path

import pytest

from llmlab.data import generate_corpus
from llmlab.notebook import load_result
from llmlab.tokenizer import CharTokenizer
from tests.test_ablation_llama_choices import _check_layout as check_ablation
from tests.test_optimizer_sweep import _check_layout as check_sweep
from tests.test_peft_comparison import NAMES, _check_rows, experiment
from tests.test_positional_extrapolation import _check_layout as check_positional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "llmlab" / "results"


@pytest.fixture(scope="module")
def uniform_loss():
    """ln V: the loss of a uniform guess over the character vocabulary every recorded run trained on
    (``generate_corpus(300_000, seed=1)``, the scripts' default)."""
    return math.log(CharTokenizer.from_text(generate_corpus(300_000, seed=1)).vocab_size)


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.stem)
def test_every_result_file_names_the_command_that_wrote_it(path):
    command = json.loads(path.read_text())["command"].split()
    assert command[0].endswith("python"), command
    script = command[1]  # e.g. scripts/peft_comparison.py: the script must be in the repository
    assert script.startswith(("scripts/", "benchmarks/")) and (ROOT / script).is_file(), command


def test_ablation_runs_learn_and_are_complete(uniform_loss):
    result = load_result("ablation_llama_choices")
    check_ablation(result)
    assert result["command"].startswith("python scripts/ablation_llama_choices.py")
    assert math.log(result["vocab_size"]) == uniform_loss and len(result["seeds"]) >= 3
    for name, runs in result["runs"].items():
        for run in runs:
            assert run["heldout_loss"] < uniform_loss - 1.0, name  # well below the uniform guess
            assert run["train_curve"][-1] < run["train_curve"][0] - 1.0, name  # the curve falls


def test_optimizer_sweep_brackets_each_optimum(uniform_loss):
    result = load_result("optimizer_sweep")
    check_sweep(result)
    assert result["command"].startswith("python scripts/optimizer_sweep.py")
    assert len(result["seeds"]) >= 3  # notebook 07 ranks the optimizers over at least three seeds
    rates = result["learning_rates"]
    for optimizer, per_seed in result["runs"].items():
        for sweep in per_seed:
            losses = [r["heldout_loss"] for r in sweep]
            assert max(losses) < uniform_loss, optimizer  # even the worst rate learned something
            best = losses.index(min(losses))
            assert 0 < best < len(rates) - 1, (optimizer, rates[best])  # the grid brackets the best rate


def test_positional_extrapolation_is_complete(uniform_loss):
    result = load_result("positional_extrapolation")
    check_positional(result)
    assert result["command"].startswith("python scripts/positional_extrapolation.py")
    in_range = result["train_len"] // result["bucket"]  # buckets inside the training length
    for name, loss in result["val_loss_at_train_len"].items():
        assert loss < uniform_loss - 1.0, name
    for name, curve in result["loss_by_position"].items():
        assert min(curve[:in_range]) < uniform_loss, name  # some trained positions beat the uniform guess


def test_peft_comparison_is_complete_and_consistent():
    result = load_result("peft_comparison")
    assert result["command"].startswith("python scripts/peft_comparison.py")
    _check_rows(result, NAMES)
    rows = {r["name"]: r for r in result["methods"]}
    assert rows["full fine-tuning"]["trainable_params"] == result["base"]["params"]
    assert rows["QLoRA r=16"]["resident_bytes"] < rows["LoRA r=16"]["resident_bytes"] / 3  # 4-bit base weights
    ranks = rows["AdaLoRA r=16->4"]["extras"]["ranks"]
    assert sum(ranks.values()) == 4 * len(ranks)  # the final budget: target_r = 4 on average


def test_peft_sweep_is_complete_and_reproduces_the_table_at_seed_0():
    sweep = load_result("peft_lr_sweep")
    table = {r["name"]: r for r in load_result("peft_comparison")["methods"]}
    assert sweep["command"] == "python scripts/peft_comparison.py --sweep"
    assert sweep["run"] == load_result("peft_comparison")["run"]
    found = {(r["name"], r["lr_multiplier"], r["seed"]) for r in sweep["runs"]}
    expected = {(name, round(m, 4), s) for name, grid in experiment.SWEEP_GRID.items() for m in grid
                for s in experiment.SWEEP_SEEDS}  # fmt: skip
    assert found == expected
    for r in sweep["runs"]:
        if r["lr_multiplier"] == 1.0 and r["seed"] == 0:  # the table's own setting, retrained
            assert r["new_val_loss"] == table[r["name"]]["new_val_loss"]
            assert r["orig_val_loss"] == table[r["name"]]["orig_val_loss"]


def test_shakespeare_benchmark_meets_its_targets():
    result = load_result("bench_shakespeare")
    assert set(result["runs"]) == {"small + Muon", "small + AdamW", "gpt2_baseline"}
    assert result["char_budget"] == 1_536_000
    small, base = result["runs"]["small + Muon"], result["runs"]["gpt2_baseline"]
    assert small["val_loss_64"] <= result["target_loss"] and small["val_loss_own"] <= result["target_loss"]
    assert small["train_seconds"] <= base["train_seconds"]

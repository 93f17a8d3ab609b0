"""Smoke test of benchmarks/bench_shakespeare.py at a tiny fraction of its budget (on generated text: the
Tiny Shakespeare file is not part of the repository); the committed result notebook 07 reads is checked in
test_data_files.py."""

import importlib.util
import json
from pathlib import Path

import pytest

from llmlab.data import generate_corpus

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_shakespeare", ROOT / "benchmarks" / "bench_shakespeare.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
RUNS = {"small + Muon", "small + AdamW", "gpt2_baseline"}


def test_every_recipe_spends_the_same_character_budget():
    for recipe in (bench.SMALL_RECIPE, bench.ADAMW_RECIPE, bench.BASELINE_RECIPE):
        assert recipe.tokens_per_step * recipe.max_iters == bench.CHAR_BUDGET == 1_536_000
    assert bench.SMALL_RECIPE.optimizer == "muon" and bench.ADAMW_RECIPE.optimizer == "adamw"


def test_smoke_run_writes_the_result(tmp_path):
    data, out = tmp_path / "text.txt", tmp_path / "result.json"
    data.write_text(generate_corpus(40_000))
    result = bench.main(["--data", str(data), "--scale", "0.004", "--threads", "1", "--out", str(out)])
    stored = json.loads(out.read_text())
    assert set(stored["runs"]) == RUNS and stored["command"].startswith("python benchmarks/bench_shakespeare.py --data")
    assert stored["runs"]["small + Muon"]["steps"] == 2 and result["char_budget"] == round(1_536_000 * 0.004)
    with pytest.raises(SystemExit, match="--data"):
        bench.main(["--data", str(tmp_path / "missing.txt")])

"""Smoke test of scripts/positional_extrapolation.py (the experiment behind notebook 03) with a tiny
budget: it writes the shape the notebook reads (the committed result: test_data_files.py)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from llmlab.data import generate_corpus
from llmlab.notebook import load_result
from llmlab.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "positional_extrapolation.py"
_spec = importlib.util.spec_from_file_location("positional_extrapolation", SCRIPT)
experiment = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(experiment)


def _check_layout(result: dict) -> None:
    buckets = result["eval_len"] // result["bucket"]
    assert set(result["val_loss_at_train_len"]) == set(experiment.ENCODINGS)
    expected = {e for e in experiment.ENCODINGS if e != "learned"} | set(experiment.ROPE_SCALINGS)
    assert set(result["loss_by_position"]) == expected
    for curve in result["loss_by_position"].values():
        assert len(curve) == buckets


def test_script_runs_and_writes_the_layout_the_notebook_reads(tmp_path):
    out = tmp_path / "result.json"
    experiment.run(iters=2, out=out, corpus_chars=30_000, windows=2)
    result = json.loads(out.read_text())
    _check_layout(result)
    uniform = math.log(CharTokenizer.from_text(generate_corpus(30_000, seed=1)).vocab_size)  # the run's corpus
    for curve in result["loss_by_position"].values():
        # two steps from a small random init: no worse than the uniform guess ln V, and far from trained
        assert all(uniform - 1.0 < v < uniform + 0.1 for v in curve)


def test_unknown_result_name_is_a_clear_error():
    with pytest.raises(ValueError, match="name must be one of the committed results"):
        load_result("no_such_experiment")

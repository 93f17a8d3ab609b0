"""Smoke test of scripts/positional_extrapolation.py (the experiment behind notebook 03) with a tiny
budget, and a check that the committed result has the shape the notebook reads."""

import importlib.util
import json
from pathlib import Path

import pytest

from llmlab.notebook import load_result

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
        assert len(curve) == buckets and all(0.0 < v < 20.0 for v in curve)


def test_script_runs_and_writes_the_layout_the_notebook_reads(tmp_path):
    out = tmp_path / "result.json"
    experiment.run(iters=2, out=out, corpus_chars=30_000, windows=2)
    _check_layout(json.loads(out.read_text()))


def test_committed_result_is_complete_and_names_its_command():
    result = load_result("positional_extrapolation")
    _check_layout(result)
    assert result["command"].startswith("python scripts/positional_extrapolation.py")


def test_unknown_result_name_is_a_clear_error():
    with pytest.raises(ValueError, match="name must be one of the committed results"):
        load_result("no_such_experiment")

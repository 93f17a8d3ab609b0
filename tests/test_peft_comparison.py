"""Smoke test of scripts/peft_comparison.py (the fine-tuning comparison behind notebooks 11 and 12)
with a tiny budget (the committed results are checked in test_data_files.py)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "peft_comparison.py"
_spec = importlib.util.spec_from_file_location("peft_comparison", SCRIPT)
experiment = importlib.util.module_from_spec(_spec)
sys.modules["peft_comparison"] = experiment  # dataclasses look their module up while the file runs
_spec.loader.exec_module(experiment)

NAMES = [m.name for m in experiment.METHODS]
ZERO_INIT = ("full", "selective", "LoRA", "QLoRA", "AdaLoRA", "adapters", "LLaMA-Adapter")  # output unchanged at init
ROW_KEYS = {"name", "category", "where", "lr", "trainable_params", "total_params", "resident_bytes", "extras",
            "trainable_state_bytes", "step_peak_bytes", "peak_train_bytes", "train_seconds", "seconds_per_step",
            "step_loss", "new_val_loss_init", "new_val_loss", "orig_val_loss_init", "orig_val_loss"}  # fmt: skip


def _check_rows(result: dict, names: list[str]) -> None:
    rows = result["methods"]
    assert [r["name"] for r in rows] == names
    steps = result["run"]["steps"]
    for r in rows:
        assert set(r) == ROW_KEYS, r["name"]
        assert r["category"] in ("full", "selective", "additive", "reparameterized")
        state = r["trainable_state_bytes"]
        assert state["params"] == state["grads"] == 4 * r["trainable_params"]  # float32
        assert state["adam_moments"] == 8 * r["trainable_params"] and state["total"] == 16 * r["trainable_params"]
        assert r["peak_train_bytes"] == r["resident_bytes"] + r["step_peak_bytes"]
        assert r["step_peak_bytes"] > state["grads"] + state["adam_moments"]  # activations come on top
        assert len(r["step_loss"]) == steps
        if r["name"].startswith(ZERO_INIT):  # zero-initialised updates change nothing before training
            tol = 0.1 if r["name"].startswith("QLoRA") else 0.0  # QLoRA's base is already quantized
            assert abs(r["new_val_loss_init"] - result["base"]["new_val_loss"]) <= tol
            assert abs(r["orig_val_loss_init"] - result["base"]["orig_val_loss"]) <= tol


def test_script_runs_and_writes_the_layout_the_notebooks_read(tmp_path):
    names = [
        "full fine-tuning",
        "LoRA r=1",
        "QLoRA r=16",
        "AdaLoRA r=16->4",
        "prompt tuning",
        "prefix tuning",
        "adapters (Houlsby)",
        "LLaMA-Adapter",
    ]  # one of each code path
    run = experiment.RunConfig(steps=2, batch_size=1, block_size=16, eval_windows=1, recipe_chars=3000)
    out = tmp_path / "result.json"
    experiment.run_comparison(run, out, experiment.select_methods(names))
    result = json.loads(out.read_text())
    _check_rows(result, names)
    assert result["command"].startswith("python scripts/peft_comparison.py --steps 2 --batch-size 1")
    assert "--only 'LoRA r=1'" in result["command"]


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="method names must be among"):
        experiment.select_methods(["LoRA r=3"])


def test_sweep_trains_each_multiplier_and_seed_and_resumes(tmp_path):
    run = experiment.RunConfig(steps=2, batch_size=1, block_size=16, eval_windows=1, recipe_chars=3000)
    out = tmp_path / "sweep.json"
    first = experiment.run_sweep(run, out, {"LoRA r=1": (1.0,)}, seeds=(0, 1))
    assert [(r["name"], r["lr_multiplier"], r["seed"]) for r in first["runs"]] == [
        ("LoRA r=1", 1.0, 0), ("LoRA r=1", 1.0, 1)]  # fmt: skip
    assert first["runs"][0]["new_val_loss"] != first["runs"][1]["new_val_loss"]  # the seed matters
    lora_lr = {m.name: m.lr for m in experiment.METHODS}["LoRA r=1"]
    grid = {"LoRA r=1": (1.0, 3.0), "prompt tuning": (1.0,)}
    second = experiment.run_sweep(run, out, grid, seeds=(0, 1))
    assert second["runs"][:2] == first["runs"]  # kept, not retrained
    assert [(r["name"], r["lr"]) for r in second["runs"][2:4]] == [("LoRA r=1", 3 * lora_lr)] * 2
    assert len(second["runs"]) == 6 and second["total_seconds"] > first["total_seconds"]
    assert second["command"].startswith("python scripts/peft_comparison.py --sweep --steps 2")
    with pytest.raises(ValueError, match="another run config"):
        experiment.run_sweep(experiment.RunConfig(steps=3), out, grid)

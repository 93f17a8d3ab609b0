"""Smoke test of scripts/ablation_llama_choices.py (the ablation behind notebook 07) with a tiny budget,
and that it writes the layout the notebook reads (the committed result is checked in test_data_files.py)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from llmlab.model import LLM

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ablation_llama_choices.py"
_spec = importlib.util.spec_from_file_location("ablation_llama_choices", SCRIPT)
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)


def _check_layout(result: dict) -> None:
    assert set(result["runs"]) == set(ablation.VARIANTS)
    for runs in result["runs"].values():
        assert len(runs) == len(result["seeds"])
        for run in runs:
            assert len(run["train_curve"]) == -(-result["iters"] // result["curve_bin"])


def test_variants_change_only_their_switch_and_keep_the_feed_forward_size():
    configs = {name: ablation.variant_config(name, vocab_size=50) for name in ablation.VARIANTS}
    llama = configs["llama"]
    assert (llama.position, llama.norm, llama.ffn) == ("rope", "rmsnorm", "swiglu")
    assert (configs["gpt"].position, configs["gpt"].norm, configs["gpt"].ffn) == ("learned", "layernorm", "gelu")
    ffn_params = {name: sum(p.numel() for p in LLM(c).model.layers[0].mlp.parameters()) for name, c in configs.items()}
    assert ffn_params["gelu_mlp"] == ffn_params["llama"] == 3 * 48 * 128  # 8C/3 SwiGLU == 4C GELU MLP
    with pytest.raises(ValueError, match="name must be one of"):
        ablation.variant_config("mamba", vocab_size=50)


def test_binned_means():
    assert ablation.binned([1.0, 2.0, 3.0, 4.0, 5.0], size=2) == [1.5, 3.5, 5.0]


def test_script_runs_and_writes_the_layout_the_notebook_reads(tmp_path):
    out = tmp_path / "result.json"
    ablation.run(iters=2, seeds=1, eval_windows=2, out=out)
    result = json.loads(out.read_text())
    _check_layout(result)
    for runs in result["runs"].values():  # two steps from a small random init: about the uniform guess ln V
        assert abs(runs[0]["heldout_loss"] - math.log(result["vocab_size"])) < 0.5

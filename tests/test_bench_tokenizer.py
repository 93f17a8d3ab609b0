"""Smoke test of benchmarks/bench_tokenizer.py on 30 KB of text: it runs, the fast and plain trainers
agree and llmlab's cl100k_base ids equal tiktoken's (the script exits otherwise)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_tokenizer", ROOT / "benchmarks" / "bench_tokenizer.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_bench_tokenizer_smoke(capsys):
    pytest.importorskip("tiktoken")
    pytest.importorskip("tokenizers")
    assert bench.main(["--bytes", "30000", "--vocab-size", "300"]) == 0
    out = capsys.readouterr().out
    assert "merges identical to fast: True" in out
    assert "ids identical to tiktoken: True" in out


def test_stdlib_text_has_the_asked_size():
    text = bench.stdlib_text(5000)
    assert len(text.encode("utf-8")) <= 5000 and len(text) > 4000

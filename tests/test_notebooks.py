"""Every notebook follows NOTEBOOK_STANDARD.md: header with its own Colab badge and the questions in
English and Chinese, the generated setup cell, the required sections, and stored outputs from one
top-to-bottom run. (Strict nbval then checks that those outputs are what a fresh run produces.)"""

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REQUIRED_SECTIONS = ("Short answer", "Common wrong answers", "Follow-up questions", "References")
CJK = re.compile(r"[\u4e00-\u9fff]")

_spec = importlib.util.spec_from_file_location("nbtools", ROOT / "scripts" / "nbtools.py")
nbtools = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nbtools)


def _src(cell) -> str:
    return cell.source if isinstance(cell.source, str) else "".join(cell.source)


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb file"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_name_is_numbered(path):
    assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_badge_and_setup_cell_are_generated_from_the_repository_url(path):
    assert nbtools.problems(path) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_header_lists_questions_in_english_and_chinese(path):
    header = _src(nbformat.read(path, as_version=4).cells[0])
    assert header.startswith("# "), "the header starts with the notebook title"
    questions = [line for line in header.splitlines() if line.startswith("- ") and "?" in line]
    assert questions, "the header lists the questions it answers as '- English? (中文)' bullets"
    for line in questions:
        assert CJK.search(line), f"question without its original Chinese wording: {line}"
    assert re.search(r"time to run", header, re.IGNORECASE), "the header says how long it takes to run"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_required_sections_in_order(path):
    cells = nbformat.read(path, as_version=4).cells
    headings = [
        line.lstrip("#").strip()
        for cell in cells
        if cell.cell_type == "markdown"
        for line in _src(cell).splitlines()
        if line.startswith("## ")
    ]
    positions = []
    for section in REQUIRED_SECTIONS:
        hits = [i for i, h in enumerate(headings) if h.startswith(section)]
        assert hits, f"missing section '## {section}'"
        positions.append(hits[0])
    assert positions == sorted(positions), f"sections out of order: {REQUIRED_SECTIONS}"
    assert any(("assert " in _src(c)) for c in cells if c.cell_type == "code"), "no assert cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_stored_from_one_top_to_bottom_run(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(_src(c).strip() for c in code), "empty code cell"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        "execution counts are not 1..N: run `make notebooks NB=...` (fresh kernel, top to bottom)"
    )
    for c in code:
        errors = [o for o in c.outputs if o.output_type == "error"]
        if "raises-exception" in c.metadata.get("tags", []):
            assert errors, f"cell tagged raises-exception shows no error:\n{_src(c)[:200]}"
        else:
            assert not errors, f"unexpected error output in:\n{_src(c)[:200]}"
        for o in c.outputs:
            # A figure shown by plt.show() is display_data (PNG plus a "<Figure ...>" text fallback): fine.
            # A figure or artist left as the cell's value is an execute_result: a forgotten plt.show().
            if o.output_type != "execute_result":
                continue
            text = "".join(o.get("data", {}).get("text/plain", ""))
            assert not re.match(r"<(Figure|matplotlib)", text), "a plot cell prints a repr; end it with plt.show()"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_readme_lists_the_notebook_with_its_badge(path):
    readme = (ROOT / "README.md").read_text()
    assert f"notebooks/{path.name}" in readme
    assert nbtools.colab_url(path.name) in readme

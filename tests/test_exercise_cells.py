"""Every notebook ends with two or three exercises, built the same way: a task, a stub cell that runs a
checker from llmlab.exercises (and stores its FAIL verdict), and a solution cell that JupyterLab and the
study site show collapsed and that asserts the checker accepts it. Every checker is used by a notebook."""

import re
from pathlib import Path

import nbformat
import pytest

from llmlab import exercises

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CHECK_CALL = re.compile(r"\b(check_\w+)\(")


def _src(cell) -> str:
    return cell.source if isinstance(cell.source, str) else "".join(cell.source)


def _exercises(path: Path) -> list[tuple[str, object, object]]:
    """(title, stub cell, solution cell) for each '### Exercise' heading after '## Exercises'."""
    cells = nbformat.read(path, as_version=4).cells
    headings = [i for i, c in enumerate(cells) if c.cell_type == "markdown" and _src(c).startswith("## ")]
    start = next((i for i in headings if _src(cells[i]).startswith("## Exercises")), None)
    assert start is not None, "the notebook has no '## Exercises' section"
    assert start == headings[-1], "'## Exercises' is the last section of the notebook"
    found = []
    for i in range(start + 1, len(cells)):
        text = _src(cells[i])
        if cells[i].cell_type == "markdown" and text.startswith("### Exercise"):
            assert i + 2 < len(cells), f"{text.splitlines()[0]!r} has no stub and solution cells after it"
            found.append((text.splitlines()[0], cells[i + 1], cells[i + 2]))
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_notebook_ends_with_two_or_three_exercises(path):
    found = _exercises(path)
    assert 2 <= len(found) <= 3, f"{len(found)} exercises"
    numbers = [int(re.match(r"### Exercise (\d+)", title).group(1)) for title, _, _ in found]
    assert numbers == list(range(1, len(found) + 1)), numbers


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_each_exercise_has_a_failing_stub_and_a_collapsed_checked_solution(path):
    for title, stub, solution in _exercises(path):
        stub_src, solution_src = _src(stub), _src(solution)
        assert stub.cell_type == "code" and 'raise NotImplementedError("write your solution here")' in stub_src, title
        checks = CHECK_CALL.findall(stub_src)
        assert len(set(checks)) == 1 and checks[0] in exercises.__all__, (title, checks)
        stored = "".join(o.get("text", "") for o in stub.outputs if o.output_type == "stream")
        assert stored.startswith("FAIL [") and "\nHint: " in stored, (title, stored)
        assert solution.cell_type == "code" and solution.metadata.get("jupyter", {}).get("source_hidden"), (
            f"{title}: the solution cell is not collapsed (metadata jupyter.source_hidden)")
        assert solution_src.startswith("# Solution"), title
        assert f"assert {checks[0]}(" in solution_src, f"{title}: the solution does not assert {checks[0]} passes"
        passed = "".join(o.get("text", "") for o in solution.outputs if o.output_type == "stream")
        assert passed.startswith("PASS ["), (title, passed)


def test_every_checker_is_used_by_a_notebook():
    used = set()
    for path in NOTEBOOKS:
        for _, stub, _ in _exercises(path):
            used.update(CHECK_CALL.findall(_src(stub)))
    checkers = {name for name in exercises.__all__ if name.startswith("check_")}
    assert checkers <= used, f"checkers no notebook uses: {sorted(checkers - used)}"

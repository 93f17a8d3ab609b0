"""Every notebook follows NOTEBOOK_STANDARD.md: header with its own Colab badge and the questions in
English and Chinese, the generated setup cell, the required sections, and stored outputs from one
top-to-bottom run. (Strict nbval then checks that those outputs are what a fresh run produces.)"""

import copy
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


# --- The short answer (NOTEBOOK_STANDARD.md, item 3) --------------------------------------------
SHORT_ANSWER_PARTS = ("Say this", "中文回答", "The numbers behind it")
PART_RE = re.compile(r"^\*\*(Say this|中文回答|The numbers behind it)\*\*[ \t]*$", re.MULTILINE)
MAX_SAY_THIS_WORDS = 150
MAX_CHINESE_CHARACTERS = 300


def short_answer_parts(markdown: str) -> dict[str, str]:
    """The three parts of a "## Short answer" cell, by name, in the order they appear."""
    pieces = PART_RE.split(markdown)
    return dict(zip(pieces[1::2], (p.strip() for p in pieces[2::2]), strict=True))


def spoken_words(text: str) -> int:
    """Words a speaker says: each $...$ math span counts as one word."""
    return len(re.findall(r"[A-Za-z0-9][A-Za-z0-9'\-\.]*", re.sub(r"\$[^$]*\$", "x", text)))


def test_short_answer_parser_and_limits_can_fail():
    text = "## Short answer\n\n**Say this**\n\nOne two $x^2$ three.\n\n**中文回答**\n\n一二 三\n\n" \
           "**The numbers behind it**\n\n- [C1] 4 s"
    parts = short_answer_parts(text)
    assert list(parts) == list(SHORT_ANSWER_PARTS)
    assert spoken_words(parts["Say this"]) == 4
    assert len(re.sub(r"\s", "", parts["中文回答"])) == 3
    assert "中文回答" not in short_answer_parts("**Say this**\n\nhi\n\n**The numbers behind it**\n\n- x")


def _short_answer(path) -> str:
    cells = nbformat.read(path, as_version=4).cells
    found = [_src(c) for c in cells if c.cell_type == "markdown" and _src(c).startswith("## Short answer")]
    assert len(found) == 1, "exactly one markdown cell starts with '## Short answer'"
    return found[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_short_answer_has_the_three_parts_within_their_limits(path):
    parts = short_answer_parts(_short_answer(path))
    assert list(parts) == list(SHORT_ANSWER_PARTS), f"parts found {list(parts)}, expected {SHORT_ANSWER_PARTS}"
    words = spoken_words(parts["Say this"])
    assert 0 < words <= MAX_SAY_THIS_WORDS, f"'Say this' has {words} words (at most {MAX_SAY_THIS_WORDS})"
    chinese = re.sub(r"\s", "", parts["中文回答"])
    assert len(CJK.findall(chinese)) > len(chinese) / 2, "the Chinese answer is mostly not Chinese"
    assert len(chinese) <= MAX_CHINESE_CHARACTERS, (
        f"'中文回答' has {len(chinese)} characters (at most {MAX_CHINESE_CHARACTERS})"
    )
    numbers = parts["The numbers behind it"]
    bullets = [line for line in numbers.splitlines() if line.startswith("- ")]
    assert bullets, "'The numbers behind it' is a list of '- ' bullets"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_claim_tag_of_the_short_answer_has_a_check_cell(path):
    tags = set(re.findall(r"\[(C\d+)\]", _short_answer(path)))
    assert tags, "the short answer tags its claims [C1], [C2], ... with the checks that back them"
    code = "\n".join(_src(c) for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    missing = sorted((t for t in tags if not re.search(rf"\b{t}\b", code)), key=lambda t: int(t[1:]))
    assert not missing, f"claims without a check cell that names them: {missing}"


# --- Clean outputs (NOTEBOOK_STANDARD.md, "Clean outputs") ---------------------------------------
MACHINE_PATH_RE = re.compile(r"site-packages|(?<![\w:/.~-])/(?:[\w.-]+/){2,}[\w.-]+")


def _output_texts(output) -> list[str]:
    texts = [output.get("text", "")] if output.get("output_type") == "stream" else []
    texts += [v if isinstance(v, str) else "".join(v) for k, v in output.get("data", {}).items()
              if k.startswith("text/")]
    texts += output.get("traceback", [])
    return [t if isinstance(t, str) else "".join(t) for t in texts]


def test_machine_path_scan_can_fail():
    assert MACHINE_PATH_RE.search("/home/alice/llmlab/notebooks/x.py:3: Warning")
    assert MACHINE_PATH_RE.search(f"{ROOT}/llmlab/model.py")
    assert not MACHINE_PATH_RE.search("see https://arxiv.org/abs/2104.09864 and notebooks/03_x.ipynb")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_stored_output_shows_a_machine_path(path):
    for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
        for output in cell.get("outputs", []):
            for text in _output_texts(output):
                hit = MACHINE_PATH_RE.search(text) or (str(ROOT) in text and str(ROOT))
                assert not hit, f"cell {i} stores a machine path: {text[:300]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_error_cells_show_the_error_line_only(path):
    for cell in nbformat.read(path, as_version=4).cells:
        for output in cell.get("outputs", []):
            if output.output_type == "error":
                assert len(output.traceback) == 1, f"a {output.ename} shows a {len(output.traceback)}-line traceback"


MAX_CODE_LINE = 100


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_lines_fit_a_laptop_screen(path):
    long = [line for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"
            for line in _src(c).splitlines() if len(line) > MAX_CODE_LINE]
    assert not long, f"{len(long)} code lines over {MAX_CODE_LINE} characters, e.g. {long[0]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_open_and_save_in_jupyterlab_leaves_the_file_unchanged(path):
    # nbtools.jupyterlab_saved_text was checked against JupyterLab in a browser
    # (scripts/check_jupyterlab_save.py); this compares every notebook with it on every run.
    text = path.read_text(encoding="utf-8")
    assert text == nbtools.jupyterlab_saved_text(path), (
        "JupyterLab would rewrite this file on open and save (kernel spec, or nbformat layout): "
        "re-execute it with `make notebooks NB=...`"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stream_outputs_are_stored_merged(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == nbtools.jupyterlab_outputs(copy.deepcopy(cell.outputs)), (
                "consecutive stream outputs are stored unmerged: re-execute with `make notebooks NB=...`"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_time_to_run_comes_from_a_measurement(path):
    header = _src(nbformat.read(path, as_version=4).cells[0])
    line = nbtools.TIME_TO_RUN_RE.search(header)
    assert line, "the header has a '**Time to run**:' line"
    seconds = re.match(r"\*\*Time to run\*\*: (\d+) s", line.group(0))
    assert seconds and line.group(0) == nbtools.time_to_run_line(int(seconds.group(1))), (
        "the run time is written by `make notebooks` from its measurement"
    )
    assert int(seconds.group(1)) <= 90, "over the 90 s ceiling"


# --- What a notebook imports is what the package declares (core dependencies or named extras) ----
NOTEBOOK_ENVIRONMENT = {"IPython", "ipywidgets"}  # come with every Jupyter front end, Colab included


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_top_level_modules(path) -> set[str]:
    import ast
    import sys

    modules = set()
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        lines = [re.sub(r"^(\s*)[%!].*", r"\1pass", line) for line in _src(cell).splitlines()]  # magics
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"llmlab", "__future__"} - NOTEBOOK_ENVIRONMENT


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_imports_only_what_its_install_line_brings(path):
    import importlib.metadata
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = nbtools.notebook_extras(nbformat.read(path, as_version=4))
    declared = {_requirement_name(r) for r in project["dependencies"]}
    for extra in extras:
        declared |= {_requirement_name(r) for r in project["optional-dependencies"][extra]}
    providers = importlib.metadata.packages_distributions()
    for module in sorted(_imported_top_level_modules(path)):
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        assert dists & declared, (
            f"imports {module} (from {sorted(dists) or 'no installed distribution'}), which neither the "
            f"core dependencies nor the extras {list(extras)} in its metadata declare; on Colab the "
            "setup cell would not install it"
        )

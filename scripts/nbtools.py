"""Notebook maintenance for llmlab.

The repository URL is defined once, in pyproject.toml ([project.urls] Repository). Every
notebook's Colab badge and the install line of its setup cell are generated from it:

    python scripts/nbtools.py check                 # exit 1 if a badge or setup cell is out of sync
    python scripts/nbtools.py fix                   # regenerate badges and setup-cell preambles
    python scripts/nbtools.py execute NB [NB ...]   # re-execute in place (fresh kernel, top to bottom)
    python scripts/nbtools.py new 04_attention "Attention"   # start a notebook from the standard outline

`make notebooks` runs `execute` on every notebook; strict nbval in `make test` then compares the
stored outputs with a fresh run.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
BADGE_RE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")
SETUP_TAG = "nbval-ignore-output"


def repo_url() -> str:
    """The repository URL from pyproject.toml, without a trailing slash or .git."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return meta["project"]["urls"]["Repository"].rstrip("/").removesuffix(".git")


def colab_url(notebook_name: str) -> str:
    owner_repo = repo_url().split("github.com/", 1)[1]
    return f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{notebook_name}"


def badge(notebook_name: str) -> str:
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(notebook_name)})"


def setup_preamble() -> list[str]:
    """The first lines of every setup cell: install llmlab on Colab only."""
    return [
        "# Setup. On Colab, install llmlab from the project repository; locally `make lab` already did.",
        "import sys",
        "",
        'if "google.colab" in sys.modules:',
        f'    %pip install --quiet "llmlab @ git+{repo_url()}"',
    ]


def _source(cell) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def problems(path: Path) -> list[str]:
    """What is out of sync in one notebook's badge and setup cell (empty when all is well)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    found = []
    if len(nb.cells) < 2:
        return [f"{path.name}: needs a header cell and a setup cell"]
    header, setup = nb.cells[0], nb.cells[1]
    badges = BADGE_RE.findall(_source(header)) if header.cell_type == "markdown" else []
    if badges != [badge(path.name)]:
        found.append(f"{path.name}: header must hold exactly one Colab badge {badge(path.name)}; found {badges}")
    if setup.cell_type != "code":
        found.append(f"{path.name}: cell 2 must be the setup code cell")
        return found
    lines = _source(setup).splitlines()
    if lines[: len(setup_preamble())] != setup_preamble():
        found.append(f"{path.name}: setup cell must start with the generated Colab install preamble")
    if SETUP_TAG not in setup.metadata.get("tags", []):
        found.append(f"{path.name}: setup cell must be tagged {SETUP_TAG}")
    return found


def fix(path: Path) -> bool:
    """Regenerate the badge and the setup preamble of one notebook; return True if it changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    header, setup = nb.cells[0], nb.cells[1]
    text = _source(header)
    header.source = BADGE_RE.sub(badge(path.name), text) if BADGE_RE.search(text) else text
    lines = _source(setup).splitlines()
    pip_line = next((i for i, line in enumerate(lines) if "%pip install" in line), None)
    rest = lines[pip_line + 1 :] if pip_line is not None else lines
    setup.source = "\n".join(setup_preamble() + rest)
    setup.metadata["tags"] = sorted(set(setup.metadata.get("tags", [])) | {SETUP_TAG})
    after = nbformat.writes(nb)
    if after != before:
        nbformat.write(nb, path)
    return after != before


def execute(path: Path, timeout: int = 600) -> float:
    """Run a notebook top to bottom in a fresh kernel, in its own folder; store outputs; return seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,
        allow_errors=False,
    )
    client.execute()
    seconds = time.perf_counter() - start
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    return seconds


NEW_OUTLINE = [
    ("markdown", "# {title}\n\n{badge}\n\n**Questions this notebook answers**\n\n"
     "- English question? (中文原题)\n\n**After reading you can explain** ...\n\n"
     "**Time to run**: about N s on a laptop CPU."),
    ("code", "\n".join(["{preamble}", "", "import torch", "", "import llmlab", "", "llmlab.setup_notebook(seed=0)"])),
    ("markdown", "## Short answer\n\n..."),
    ("markdown", "## 1. Build-up\n\n..."),
    ("markdown", "## Common wrong answers\n\n..."),
    ("markdown", "## Follow-up questions\n\n..."),
    ("markdown", "## References\n\n..."),
]


def new(stem: str, title: str) -> Path:
    import nbformat

    path = NOTEBOOKS / f"{stem}.ipynb"
    if path.exists():
        raise SystemExit(f"{path} exists already")
    nb = nbformat.v4.new_notebook()
    fill = {"title": title, "badge": badge(path.name), "preamble": "\n".join(setup_preamble())}
    for kind, text in NEW_OUTLINE:
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(make(text.format(**fill)))
    nb.cells[1].metadata["tags"] = [SETUP_TAG]
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nbformat.write(nb, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check")
    sub.add_parser("fix")
    run = sub.add_parser("execute")
    run.add_argument("notebooks", nargs="+", type=Path)
    create = sub.add_parser("new")
    create.add_argument("stem")
    create.add_argument("title")
    args = parser.parse_args(argv)
    notebooks = sorted(NOTEBOOKS.glob("*.ipynb"))
    if args.cmd == "check":
        found = [p for nb in notebooks for p in problems(nb)]
        print("\n".join(found) or f"{len(notebooks)} notebooks: badges and setup cells in sync with {repo_url()}")
        return 1 if found else 0
    if args.cmd == "fix":
        for nb in notebooks:
            print(f"{'fixed' if fix(nb) else 'ok   '} {nb.name}")
        return 0
    if args.cmd == "execute":
        for nb in args.notebooks:
            print(f"executing {nb} ...", flush=True)
            print(f"  done in {execute(nb.resolve()):.1f} s", flush=True)
        return 0
    print(new(args.stem, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())

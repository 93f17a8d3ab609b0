"""Build the llmlab study site: every notebook as a page with its stored outputs, a question index,
and static full-text search in English and Chinese.

    python scripts/build_site.py              # build/site/ (open build/site/index.html via a server)
    python scripts/build_site.py questions    # regenerate docs/questions.json from CURRICULUM.md
    python scripts/build_site.py serve        # build, then serve build/site on http://127.0.0.1:8000

Tools: MkDocs with Material for MkDocs renders the pages and mkdocs-jupyter renders each notebook
from its stored outputs through nbconvert (nothing is executed), so the site shows exactly what CI
checked. MathJax 2.7 comes from the jupyter-server-mathjax package and is copied into the site, so
pages render math with no network. Pagefind (the `pagefind[extended]` wheel ships the binary)
indexes the built HTML into a static search index; its extended build segments Chinese text, so
"复读机" finds the decoding notebook without a server.

Nothing is written by hand twice: the page sources are staged into build/site-src from the
committed notebooks, docs/home.md and docs/questions.json (the question bank, generated once from
the curriculum with the `questions` command and committed).
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
DOCS = ROOT / "docs"
QUESTIONS_JSON = DOCS / "questions.json"
CURRICULUM = ROOT.parent / "shared" / "CURRICULUM.md"
STAGE = ROOT / "build" / "site-src"
SITE = ROOT / "build" / "site"
REPOSITORY_BLOB = "https://github.com/llmlab-dev/llmlab/blob/main/"
CJK_RE = re.compile(r"[\u3400-\u9fff]")
BADGE_RE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\(([^)]*)\)")
HIDDEN_TAG = "llmlab-source-hidden"  # added in the staged copy to cells JupyterLab shows collapsed

# --- The question bank -----------------------------------------------------------------------

SECTION_RE = re.compile(r"^## (\d\d) (.+?) — `notebooks/(\d\d_\w+)\.ipynb`\s*$")
PROSE_SECTION = "## Prose questions with no notebook of their own"
# The curriculum's last section lists prose questions in English only, after its one Chinese item.
# Their Chinese wording here is llmlab's translation (marked "zh_source": "translation").
PROSE_TRANSLATIONS = {
    "hyper-parameter iteration": "大模型超参数如何迭代调整",
    "dataset sources": "大模型训练数据集从哪里来",
    "compliant output": "如何保证大模型输出合规",
    "LLM pros and cons": "大模型的优点和缺点",
    "honesty": "如何让大模型诚实(不知道就说不知道)",
    "application frameworks": "大模型应用框架有哪些",
}


def _split_question(body: str) -> tuple[str, str, str]:
    """'English (中文) [C: note]' -> (English, 中文, 'C' or 'P')."""
    tag = re.search(r"\[([CP])\b[^\]]*\]\s*$", body)
    kind = tag.group(1) if tag else "P"
    body = body[: tag.start()].rstrip() if tag else body.rstrip()
    # the last parenthesized group holding Chinese is the original wording
    depth, start = 0, None
    for i in range(len(body) - 1, -1, -1):
        if body[i] == ")":
            depth += 1
        elif body[i] == "(":
            depth -= 1
            if depth == 0:
                start = i
                break
    if start is None or not CJK_RE.search(body[start:]):
        return body.strip(), "", kind
    return body[:start].strip(), body[start + 1 : -1].strip(), kind


def parse_curriculum(text: str) -> list[dict]:
    """Every question of CURRICULUM.md in order: id, notebook stem, English, Chinese, kind C/P."""
    questions, section, count = [], None, 0
    for line in text.splitlines():
        match = SECTION_RE.match(line)
        if match:
            section, count = match.group(3), 0
            continue
        if line.startswith(PROSE_SECTION):
            section, count = "prose", 0
            continue
        if line.startswith("## "):
            section = None
            continue
        if section and section != "prose" and line.startswith("- ") and not line.startswith("- In circulation"):
            en, zh, kind = _split_question(line[2:])
            count += 1
            questions.append({"id": f"{section[:2]}-{count}", "notebook": section, "en": en, "zh": zh,
                              "zh_source": "curriculum", "kind": kind})
        elif section == "prose" and line.strip():
            listed = line.split(":", 1)[0].strip()  # the instruction after the colon is not a question
            for item in re.split(r",\s*(?![^()]*\))", listed):
                en, zh, _ = _split_question(item.strip())
                if not en:
                    continue
                count += 1
                source = "curriculum" if zh else "translation"
                zh = zh or PROSE_TRANSLATIONS.get(en, "")
                questions.append({"id": f"P-{count}", "notebook": None, "en": en[:1].upper() + en[1:],
                                  "zh": zh, "zh_source": source, "kind": "P"})
    return questions


def load_questions() -> list[dict]:
    """The committed question bank (docs/questions.json)."""
    return json.loads(QUESTIONS_JSON.read_text(encoding="utf-8"))["questions"]


def write_questions(curriculum: Path = CURRICULUM) -> list[dict]:
    questions = parse_curriculum(curriculum.read_text(encoding="utf-8"))
    data = {
        "source": "CURRICULUM.md of the llmlab project (shared/, outside this repository); generated by "
        "`python scripts/build_site.py questions`. Chinese marked zh_source=translation is llmlab's.",
        "questions": questions,
    }
    QUESTIONS_JSON.parent.mkdir(parents=True, exist_ok=True)
    QUESTIONS_JSON.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return questions


def zh_parts(zh: str) -> list[str]:
    """The Chinese wording split at ' / ' into its parts, normalized (NFKC, no spaces)."""
    text = unicodedata.normalize("NFKC", zh)
    return [re.sub(r"\s+", "", p) for p in text.split("/") if p.strip()]


# --- Reading a notebook ----------------------------------------------------------------------


def _src(cell) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def slugify(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc extension) gives a heading."""
    from markdown.extensions.toc import slugify as toc_slugify

    text = re.sub(r"\$[^$]*\$", lambda m: m.group(0), heading)
    return toc_slugify(text, "-")


@dataclass
class NotebookInfo:
    """What the study tools read from one notebook."""

    stem: str  # e.g. "08_decoding"
    title: str  # the header title without its number
    questions: list[tuple[str, str]]  # header bullets: (English, Chinese)
    short_answer: dict[str, str] = field(default_factory=dict)  # Say this / 中文回答 / The numbers behind it
    headings: list[str] = field(default_factory=list)  # "## " and "### " headings in order

    @property
    def page(self) -> str:
        return f"{self.stem}.html"


SHORT_ANSWER_PART_RE = re.compile(r"^\*\*(Say this|中文回答|The numbers behind it)\*\*[ \t]*$", re.MULTILINE)


def read_notebook(path: Path) -> NotebookInfo:
    import nbformat

    cells = nbformat.read(path, as_version=4).cells
    header = _src(cells[0]).splitlines()
    title = header[0].lstrip("# ").split("·", 1)[-1].strip()
    questions = []
    for line in header:
        if line.startswith("- ") and "?" in line:
            en, zh, _ = _split_question(line[2:])
            questions.append((en, zh))
    info = NotebookInfo(path.stem, title, questions)
    for cell in cells:
        if cell.cell_type != "markdown":
            continue
        text = _src(cell)
        info.headings += [line.lstrip("#").strip() for line in text.splitlines() if re.match(r"^#{2,3} ", line)]
        if text.startswith("## Short answer"):
            pieces = SHORT_ANSWER_PART_RE.split(text)
            info.short_answer = dict(zip(pieces[1::2], (p.strip() for p in pieces[2::2]), strict=True))
    return info


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def answering_section(question: dict, notebooks: dict[str, NotebookInfo],
                      need_answer: bool = False) -> tuple[NotebookInfo, str] | None:
    """(notebook, heading) that answers a curriculum question, or None while no notebook does.

    A question belongs to the notebook the curriculum assigns it to when that notebook exists; its
    answer is the notebook's "Short answer" (the header lists the cluster of questions it answers).
    A prose question without a notebook is found by its Chinese wording in a notebook's header.
    need_answer: also require the short answer's "Say this" and "中文回答" (a draft has neither)."""
    info = notebooks.get(question["notebook"] or "")
    if info is None and question["zh"]:
        parts = set(zh_parts(question["zh"]))
        info = next((nb for nb in notebooks.values() if any(parts & set(zh_parts(zh)) for _, zh in nb.questions)),
                    None)
    if info is None or "Short answer" not in info.headings:
        return None
    if need_answer and not (info.short_answer.get("Say this") and info.short_answer.get("中文回答")):
        return None
    return info, "Short answer"


# --- Staging the page sources ------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return html.escape(text).replace("|", "&#124;")


def question_index_markdown(questions: list[dict], notebooks: dict[str, NotebookInfo]) -> str:
    lines = [
        "# Question index · 问题索引",
        "",
        "Every question of the llmlab curriculum, in English and in its original Chinese wording, with a link",
        "to the section that answers it. Questions whose notebook is still being written say so.",
        "",
        "| # | Question | 问题 | Answered in |",
        "|---|---|---|---|",
    ]
    for q in questions:
        found = answering_section(q, notebooks)
        if found:
            info, heading = found
            where = f"[{info.stem[:2]} · {_md_escape(info.title)}, {heading}]({info.page}#{slugify(heading)})"
        else:
            where = "not answered yet"
        zh = _md_escape(q["zh"]) + (" (translation)" if q["zh_source"] == "translation" else "")
        lines.append(f"| {q['id']} | {_md_escape(q['en'])} | {zh} | {where} |")
    return "\n".join(lines) + "\n"


def home_markdown(notebooks: dict[str, NotebookInfo]) -> str:
    rows = ["| # | Notebook | Questions it answers |", "|---|---|---|"]
    for info in notebooks.values():
        qs = "<br>".join(_md_escape(f"{en} ({zh})") for en, zh in info.questions)
        rows.append(f"| {info.stem[:2]} | [{_md_escape(info.title)}]({info.page}) | {qs} |")
    intro = (DOCS / "home.md").read_text(encoding="utf-8")
    return intro.replace("{{ notebook_table }}", "\n".join(rows))


def stage_notebook(path: Path, out: Path) -> None:
    """Copy a notebook for the site: the Colab badge becomes a text link (no remote image) and
    cells whose source JupyterLab shows collapsed (metadata jupyter.source_hidden) get a tag the
    site's script collapses."""
    import warnings

    import nbformat

    with warnings.catch_warnings():  # a draft notebook without cell ids still renders
        warnings.simplefilter("ignore")
        nb = nbformat.read(path, as_version=4)
    header = nb.cells[0]
    header.source = BADGE_RE.sub(r"[Open in Colab](\1)", _src(header))
    for cell in nb.cells:
        if cell.metadata.get("jupyter", {}).get("source_hidden"):
            cell.metadata.setdefault("tags", [])
            if HIDDEN_TAG not in cell.metadata["tags"]:
                cell.metadata["tags"].append(HIDDEN_TAG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nbformat.write(nb, out)


def stage(stage_dir: Path = STAGE) -> dict[str, NotebookInfo]:
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    (stage_dir / "assets").mkdir(parents=True)
    notebooks = {p.stem: read_notebook(p) for p in notebook_paths()}
    for path in notebook_paths():
        stage_notebook(path, stage_dir / path.name)
    questions = load_questions()
    (stage_dir / "index.md").write_text(home_markdown(notebooks), encoding="utf-8")
    (stage_dir / "questions.md").write_text(question_index_markdown(questions, notebooks), encoding="utf-8")
    shutil.copy(DOCS / "search.md", stage_dir / "search.md")
    for asset in ("study.css", "study.js"):
        shutil.copy(DOCS / "assets" / asset, stage_dir / "assets" / asset)
    return notebooks


def copy_mathjax(site: Path) -> None:
    import jupyter_server_mathjax

    src = Path(jupyter_server_mathjax.__file__).parent / "static"
    dest = site / "assets" / "mathjax"
    shutil.copytree(src, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.md"))


DATA_IMAGE_RE = re.compile(r'src="data:image/(png|jpeg|svg\+xml);base64,([A-Za-z0-9+/=\s]+)"')


def extract_images(site: Path) -> int:
    """Move the notebooks' inline base64 images into files under assets/img (named by content
    hash): pages load faster and the search indexer never sees base64 text. Returns the count."""
    import base64
    import hashlib

    out = site / "assets" / "img"
    out.mkdir(parents=True, exist_ok=True)
    count = 0

    def save(match: re.Match) -> str:
        nonlocal count
        data = base64.b64decode(re.sub(r"\s", "", match.group(2)))
        ext = {"png": "png", "jpeg": "jpg", "svg+xml": "svg"}[match.group(1)]
        name = f"{hashlib.sha256(data).hexdigest()[:16]}.{ext}"
        (out / name).write_bytes(data)
        count += 1
        return f'src="assets/img/{name}"'

    for page in site.glob("*.html"):
        text = page.read_text(encoding="utf-8")
        new = DATA_IMAGE_RE.sub(save, text)
        if new != text:
            page.write_text(new, encoding="utf-8")
    return count


def fix_toc_anchors(site: Path) -> int:
    """Point table-of-contents links at the heading ids the page really has. mkdocs-jupyter builds
    the TOC from the headings' text without their inline code, so "## From `tokenizers`" is
    linked as #from while the heading's id is #from-tokenizers; a link whose target is missing is
    moved to the one id that starts with it. Returns the number of links fixed."""
    fixed = 0
    for page in site.glob("*.html"):
        text = page.read_text(encoding="utf-8")
        ids = set(re.findall(r'\bid="([^"]+)"', text))
        new_text, count = _retarget_anchors(text, ids)
        if count:
            page.write_text(new_text, encoding="utf-8")
            fixed += count
    return fixed


def _retarget_anchors(text: str, ids: set[str]) -> tuple[str, int]:
    count = 0

    def retarget(match: re.Match) -> str:
        nonlocal count
        anchor = match.group(1)
        candidates = [i for i in ids if i.startswith(anchor + "-")]
        if anchor in ids or len(candidates) != 1:
            return match.group(0)
        count += 1
        return f'href="#{candidates[0]}"'

    return re.sub(r'href="#([^"]+)"', retarget, text), count


def build(site: Path = SITE) -> int:
    """Stage, render with MkDocs, add MathJax, index with Pagefind. Returns the number of pages."""
    notebooks = stage()
    env_python = sys.executable
    subprocess.run([env_python, "-m", "mkdocs", "build", "--quiet", "--strict", "--config-file",
                    str(DOCS / "mkdocs.yml"), "--site-dir", str(site)], check=True,
                   env={**_env(), "NO_MKDOCS_2_WARNING": "1"})
    copy_mathjax(site)
    extract_images(site)
    fix_toc_anchors(site)
    subprocess.run([env_python, "-m", "pagefind", "--site", str(site), "--root-selector", "article",
                    "--force-language", "zh", "--quiet"], check=True, env=_env())
    return len(notebooks) + 3  # notebooks, home, question index, search


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def serve(site: Path = SITE, port: int = 8000) -> None:
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        print(f"serving {site} on http://127.0.0.1:{port}/ (Ctrl-C stops)")
        server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="build", choices=["build", "questions", "serve"])
    parser.add_argument("--curriculum", type=Path, default=CURRICULUM)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.command == "questions":
        questions = write_questions(args.curriculum)
        print(f"{len(questions)} questions -> {QUESTIONS_JSON.relative_to(ROOT)}")
        return 0
    pages = build()
    print(f"{pages} pages -> {SITE.relative_to(ROOT)}")
    if args.command == "serve":
        serve(port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())

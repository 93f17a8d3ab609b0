"""Build llmlab flashcards from the notebooks: an Anki deck (genanki) and a plain TSV export.

    python scripts/build_flashcards.py                      # build/flashcards/llmlab.apkg and .tsv
    python scripts/build_flashcards.py --site-url URL       # link cards to the study site at URL

One card per curriculum question (docs/questions.json) that a committed notebook answers. Front:
the question in English and in its original Chinese wording. Back: the notebook's "Say this" and
"中文回答" (its ## Short answer cell, read from the notebook, never copied by hand) and a link to
that section. The note id (Anki's guid) is derived from the question's id and wording, so
re-importing a rebuilt deck updates the existing cards instead of duplicating them. Math ($...$)
becomes \\(...\\), which Anki renders with its built-in MathJax.
"""

from __future__ import annotations

import argparse
import csv
import html
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "flashcards"
_spec = importlib.util.spec_from_file_location("build_site", ROOT / "scripts" / "build_site.py")
site = sys.modules.setdefault("build_site", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(site)

# Fixed ids: Anki identifies the note type and the deck by them across rebuilds.
MODEL_ID = 1_733_402_017
DECK_ID = 1_733_402_018
FIELDS = ["Question", "问题", "Say this", "中文回答", "Notebook", "Link"]
FRONT = '<div class="q">{{Question}}</div><div class="zh">{{问题}}</div>'
BACK = (FRONT + '<hr id="answer"><div class="say">{{Say this}}</div><div class="zh">{{中文回答}}</div>'
        '<div class="src"><a href="{{Link}}">{{Notebook}}</a></div>')
CSS = """.card { font-family: sans-serif; font-size: 18px; text-align: left; max-width: 40em; margin: auto; }
.q { font-weight: bold; } .zh { margin-top: 0.5em; } .src { margin-top: 1em; font-size: 14px; }"""
CLAIM_TAG_RE = re.compile(r"\s*\[C\d+\]")
MATH_RE = re.compile(r"\$\$(.+?)\$\$|\$([^$\n]+?)\$", re.DOTALL)


def markdown_html(text: str) -> str:
    """Markdown to HTML with math kept intact as MathJax delimiters Anki understands."""
    import markdown

    spans: list[str] = []

    def hold(match: re.Match) -> str:
        display = match.group(1) is not None
        tex = html.escape(match.group(1) if display else match.group(2), quote=False)
        spans.append(f"\\[{tex}\\]" if display else f"\\({tex}\\)")
        return f"\x00{len(spans) - 1}\x00"

    text = CLAIM_TAG_RE.sub("", text)  # [C3] points at a check cell; on a card it is noise
    body = markdown.markdown(MATH_RE.sub(hold, text), extensions=["sane_lists"])
    body = re.sub(r"\x00(\d+)\x00", lambda m: spans[int(m.group(1))], body)
    return re.sub(r"\s*\n\s*", " ", body).strip()  # one line: TSV rows stay one line each


def card_rows(site_url: str | None = None) -> tuple[list[dict], list[dict]]:
    """(cards, unanswered questions). Each card: question id, guid text and the FIELDS."""
    notebooks = {p.stem: site.read_notebook(p) for p in site.notebook_paths()}
    cards, missing = [], []
    for q in site.load_questions():
        found = site.answering_section(q, notebooks, need_answer=True)
        if not found:
            missing.append(q)
            continue
        info, heading = found
        anchor = site.slugify(heading)
        link = (f"{site_url.rstrip('/')}/{info.page}#{anchor}" if site_url
                else f"{site.REPOSITORY_BLOB}notebooks/{info.stem}.ipynb")
        answer = info.short_answer
        cards.append({
            "id": q["id"],
            "guid_text": f"llmlab {q['id']} {q['zh'] or q['en']}",
            "fields": [html.escape(q["en"]), html.escape(q["zh"]), markdown_html(answer["Say this"]),
                       markdown_html(answer["中文回答"]), html.escape(f"{info.stem[:2]} · {info.title}"), link],
        })
    return cards, missing


def build(out: Path = OUT, site_url: str | None = None) -> tuple[Path, Path, int, list[dict]]:
    """Write llmlab.apkg and llmlab.tsv under out; return their paths, the card count and the
    questions no notebook answers yet."""
    import genanki

    cards, missing = card_rows(site_url)
    model = genanki.Model(MODEL_ID, "llmlab interview question", fields=[{"name": f} for f in FIELDS],
                          templates=[{"name": "Question to answer", "qfmt": FRONT, "afmt": BACK}], css=CSS)
    deck = genanki.Deck(DECK_ID, "llmlab: LLM interview questions")
    for card in cards:
        note = genanki.Note(model=model, fields=card["fields"], guid=genanki.guid_for(card["guid_text"]),
                            tags=["llmlab", f"notebook{card['id'][:2]}"])
        deck.add_note(note)
    out.mkdir(parents=True, exist_ok=True)
    apkg, tsv = out / "llmlab.apkg", out / "llmlab.tsv"
    genanki.Package(deck).write_to_file(str(apkg), timestamp=0.0)
    with tsv.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "guid", *FIELDS])
        for card in cards:
            writer.writerow([card["id"], genanki.guid_for(card["guid_text"]), *card["fields"]])
    return apkg, tsv, len(cards), missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--site-url", default=None, help="link cards to the study site at this URL")
    args = parser.parse_args(argv)
    apkg, tsv, count, missing = build(args.out, args.site_url)
    print(f"{count} cards -> {apkg.relative_to(ROOT) if apkg.is_relative_to(ROOT) else apkg} and {tsv.name}")
    if missing:
        print(f"{len(missing)} questions not answered by a notebook yet: {', '.join(q['id'] for q in missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

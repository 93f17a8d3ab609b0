"""scripts/build_flashcards.py: the Anki deck read back (SQLite inside a zip) has one note per
answered question with every field filled, well-formed HTML and stable ids; the TSV agrees."""

import csv
import importlib.util
import re
import sqlite3
import sys
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("genanki")
pytest.importorskip("markdown")

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = sys.modules.setdefault(name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


site = _load("build_site")
flashcards = _load("build_flashcards")
VOID = {"br", "hr", "img", "input", "meta", "link", "wbr"}


class TagBalance(HTMLParser):
    """Records tags closed out of order or left open."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def html_problems(text: str) -> list[str]:
    parser = TagBalance()
    parser.feed(text)
    parser.close()
    return parser.errors + [f"<{t}> left open" for t in parser.stack]


def test_html_check_can_fail():
    assert html_problems("<p>a <b>b</b></p>") == []
    assert html_problems("<p>a <b>b</p>")
    assert html_problems("<p>a")


@pytest.fixture(scope="module")
def deck(tmp_path_factory):
    out = tmp_path_factory.mktemp("flashcards")
    apkg, tsv, count, missing = flashcards.build(out)
    with zipfile.ZipFile(apkg) as z:
        (out / "collection.anki2").write_bytes(z.read("collection.anki2"))
    db = sqlite3.connect(out / "collection.anki2")
    notes = db.execute("select guid, flds, tags from notes").fetchall()
    cards = db.execute("select nid from cards").fetchall()
    db.close()
    return {"notes": notes, "cards": cards, "count": count, "missing": missing, "tsv": tsv, "out": out}


def _answered_ids():
    notebooks = {p.stem: site.read_notebook(p) for p in site.notebook_paths()}
    return [q["id"] for q in site.load_questions() if site.answering_section(q, notebooks, need_answer=True)]


def test_one_card_per_answered_question(deck):
    expected = _answered_ids()
    assert len(expected) >= 40  # notebooks 01-14 and 16 answer at least these
    assert deck["count"] == len(deck["notes"]) == len(deck["cards"]) == len(expected)
    ids = {q["id"] for q in site.load_questions()}
    assert {q["id"] for q in deck["missing"]} == ids - set(expected)


def test_every_field_is_filled_and_the_html_is_well_formed(deck):
    for guid, flds, _ in deck["notes"]:
        fields = flds.split("\x1f")
        assert len(fields) == len(flashcards.FIELDS)
        for name, value in zip(flashcards.FIELDS, fields, strict=True):
            assert value.strip(), f"note {guid}: field {name} is empty"
            assert not html_problems(value), f"note {guid}: field {name}: {html_problems(value)}"
        assert site.CJK_RE.search(fields[1]) and site.CJK_RE.search(fields[3]), "Chinese question and answer"
        assert not re.search(r"\[C\d+\]", fields[2]) and "$" not in fields[2], "claim tags and $ math converted"
        assert fields[5].startswith("https://")


def test_note_ids_are_unique_and_stable_across_rebuilds(deck, tmp_path):
    guids = [g for g, _, _ in deck["notes"]]
    assert len(set(guids)) == len(guids)
    apkg, _, _, _ = flashcards.build(tmp_path)
    with zipfile.ZipFile(apkg) as z:
        (tmp_path / "c.anki2").write_bytes(z.read("collection.anki2"))
    db = sqlite3.connect(tmp_path / "c.anki2")
    again = [g for (g,) in db.execute("select guid from notes")]
    db.close()
    assert sorted(again) == sorted(guids)


def test_the_tsv_has_the_same_cards(deck):
    with deck["tsv"].open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["id", "guid", *flashcards.FIELDS]
    assert sorted(r[1] for r in rows[1:]) == sorted(g for g, _, _ in deck["notes"])
    assert all(len(r) == len(rows[0]) for r in rows)


def test_math_becomes_anki_mathjax():
    html = flashcards.markdown_html("Scale by $1/\\sqrt{d}$ and $a<b$ [C2], **not** $$x_1 * y_1$$.")
    assert "\\(1/\\sqrt{d}\\)" in html and "\\(a&lt;b\\)" in html and "\\[x_1 * y_1\\]" in html
    assert "<strong>not</strong>" in html and "[C2]" not in html

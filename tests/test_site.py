"""The study site (scripts/build_site.py, `make site`): the committed question bank covers every
notebook's header questions; the built site, opened in headless Chromium (Debian's /usr/bin/chromium
driven by Playwright, no browser download), loads every page with no console error and no request
leaving the machine, renders math, loads every image, resolves every internal link and anchor,
collapses solution cells, and its Pagefind search finds "复读机" in notebook 08 and "GQA" in 04."""

import functools
import http.server
import importlib.util
import json
import os
import re
import shutil
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_site", ROOT / "scripts" / "build_site.py")
site = sys.modules.setdefault("build_site", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(site)
CHROMIUM = os.environ.get("LLMLAB_CHROMIUM", "/usr/bin/chromium")

CURRICULUM_SAMPLE = """## 01 Architectures — `notebooks/01_architectures.ipynb`
- What is an LLM; what does "175B / 60B" mean (大模型后面跟的175B、60B指什么) [C: count]
- Open-source families (主流开源模型体系 / 什么情况用Bert模型) [P]
- In circulation:
  - "A prefix LM adds a prefix" (wrong)

## Prose questions with no notebook of their own
Deployment of a document-writing LLM (公文写作大模型上线流程), honesty, application frameworks: answer each.
"""


# --- The question bank ---------------------------------------------------------------------------


def test_curriculum_parser_reads_questions_kinds_and_prose_items():
    qs = site.parse_curriculum(CURRICULUM_SAMPLE)
    assert [q["id"] for q in qs] == ["01-1", "01-2", "P-1", "P-2", "P-3"]
    assert qs[0]["en"] == 'What is an LLM; what does "175B / 60B" mean'
    assert qs[0]["zh"] == "大模型后面跟的175B、60B指什么" and qs[0]["kind"] == "C"
    assert qs[1]["kind"] == "P" and site.zh_parts(qs[1]["zh"]) == ["主流开源模型体系", "什么情况用Bert模型"]
    assert qs[2]["zh"] == "公文写作大模型上线流程" and qs[2]["zh_source"] == "curriculum"
    assert qs[3]["en"] == "Honesty" and qs[3]["zh_source"] == "translation" and qs[3]["zh"]
    assert qs[4]["en"] == "Application frameworks"


def test_committed_bank_has_every_curriculum_question_with_both_languages():
    data = json.loads(site.QUESTIONS_JSON.read_text(encoding="utf-8"))
    assert "CURRICULUM.md" in data["source"]
    qs = data["questions"]
    assert len(qs) >= 70 and len({q["id"] for q in qs}) == len(qs)
    for q in qs:
        assert q["en"] and site.CJK_RE.search(q["zh"]), q
    if site.CURRICULUM.exists():  # the curriculum lives outside the repository; compare when present
        assert site.parse_curriculum(site.CURRICULUM.read_text(encoding="utf-8")) == qs, (
            "docs/questions.json is stale: run `python scripts/build_site.py questions`")


@pytest.mark.parametrize("path", site.notebook_paths(), ids=lambda p: p.name)
def test_every_header_question_of_the_notebook_is_in_the_bank(path):
    bank = {part for q in site.load_questions() for part in site.zh_parts(q["zh"])}
    info = site.read_notebook(path)
    assert info.questions
    for en, zh in info.questions:
        missing = [part for part in site.zh_parts(zh) if part not in bank]
        assert zh and not missing, f"{en!r}: Chinese wording {missing or zh!r} is not in docs/questions.json"


def test_question_index_lists_every_question_and_links_answered_ones():
    notebooks = {p.stem: site.read_notebook(p) for p in site.notebook_paths()}
    qs = site.load_questions()
    text = site.question_index_markdown(qs, notebooks)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| # ")]
    assert len(rows) == len(qs)
    assert "(08_decoding.html#short-answer)" in next(r for r in rows if r.startswith("| 08-2 |"))
    assert "not answered yet" in next(r for r in rows if r.startswith("| P-1 |"))


def test_toc_links_move_to_the_one_heading_id_they_are_a_prefix_of():
    text = '<h2 id="from-tokenizers"></h2><h2 id="a-b"></h2><h2 id="a-c"></h2>'
    links = '<a href="#from">1</a><a href="#a">2</a><a href="#from-tokenizers">3</a>'
    fixed, count = site._retarget_anchors(text + links, {"from-tokenizers", "a-b", "a-c"})
    assert count == 1 and 'href="#from-tokenizers">1' in fixed and 'href="#a">2' in fixed  # ambiguous: kept


# --- The built site in a real browser --------------------------------------------------------------


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    for module in ("mkdocs", "mkdocs_jupyter", "material", "pagefind", "jupyter_server_mathjax", "playwright"):
        pytest.importorskip(module)
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    out = tmp_path_factory.mktemp("site") / "site"
    pages = site.build(out)
    handler = functools.partial(_QuietHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"dir": out, "base": f"http://127.0.0.1:{server.server_address[1]}/", "pages": pages}
    server.shutdown()
    shutil.rmtree(out, ignore_errors=True)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser(built_site):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser, url):
    """A page that records console errors, page errors and requests that fail or leave the machine."""
    page = browser.new_page()
    page.set_default_timeout(30_000)
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    host = urllib.parse.urlparse(url).netloc

    def only_local(route):
        if urllib.parse.urlparse(route.request.url).netloc in (host, ""):
            route.continue_()
        else:
            problems.append(f"remote request: {route.request.url}")
            route.abort()

    page.route("**/*", only_local)
    page.goto(url, wait_until="load")
    return page, problems


def _html_pages(built_site):
    return sorted(p.name for p in built_site["dir"].glob("*.html") if p.name != "404.html")


def test_site_has_a_page_per_notebook_plus_home_questions_and_search(built_site):
    names = _html_pages(built_site)
    expected = {f"{p.stem}.html" for p in site.notebook_paths()} | {"index.html", "questions.html", "search.html"}
    assert set(names) == expected and built_site["pages"] == len(expected)


MATH_DONE = """() => new Promise(done => {
  if (!window.MathJax || !MathJax.Hub) { done(null); return; }
  const give_up = setTimeout(() => done({rendered: -1, errors: -1}), 60000);
  // once MathJax has started (isReady), its queue holds the page's typesetting; wait behind it
  const poll = () => {
    if (!MathJax.isReady) { setTimeout(poll, 100); return; }
    MathJax.Hub.Queue(() => { clearTimeout(give_up); done({
      rendered: document.querySelectorAll('.MathJax, .MathJax_Display, .MathJax_CHTML').length,
      errors: document.querySelectorAll('.MathJax_Error, merror, .mjx-merror').length,
    }); });
  };
  poll();
})"""
IMAGES = """() => Array.from(document.images).map(i => ({src: i.getAttribute('src'),
  ok: i.complete && i.naturalWidth > 0}))"""
LINKS = """() => Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"""
IDS = """() => Array.from(document.querySelectorAll('[id]')).map(e => e.id)"""


def _has_math(stem: str) -> bool:
    cells = json.loads((site.NOTEBOOKS / f"{stem}.ipynb").read_text(encoding="utf-8"))["cells"]
    return any(re.search(r"\$[^$\n]+\$", "".join(c["source"])) for c in cells if c["cell_type"] == "markdown")


def test_every_page_loads_cleanly_renders_math_and_images_and_links_resolve(built_site, browser):
    base = built_site["base"]
    ids, links, report = {}, set(), []
    for name in _html_pages(built_site):
        page, problems = _open(browser, base + name)
        if name[:2].isdigit():
            math = page.evaluate(MATH_DONE)
            assert math is not None, f"{name}: MathJax did not load"
            assert math["errors"] == 0, f"{name}: math errors {math}"
            assert math["rendered"] > 0 or not _has_math(name[:-5]), f"{name}: its math was not typeset"
            images = page.evaluate(IMAGES)
            broken = [i["src"][:80] for i in images if not i["ok"]]
            assert not broken, f"{name}: images that did not load: {broken}"
            report.append((name, math["rendered"], len(images)))
        page.wait_for_load_state("networkidle")
        ids[name] = set(page.evaluate(IDS))
        links |= {(name, href) for href in page.evaluate(LINKS)}
        page.close()
        assert not problems, f"{name}: {problems}"
    assert sum(n for _, _, n in report) > 0, "no notebook page shows an image"
    bad = []
    for source, href in sorted(links):
        url = urllib.parse.urlparse(href)
        if url.netloc != urllib.parse.urlparse(base).netloc:
            continue  # external links (Colab, papers) are not followed
        target = url.path.lstrip("/") or "index.html"
        if not (built_site["dir"] / target).is_file():
            bad.append(f"{source} -> {href} (no such page)")
        elif url.fragment and target in ids and urllib.parse.unquote(url.fragment) not in ids[target]:
            bad.append(f"{source} -> {href} (no such anchor)")
    assert not bad, bad


def test_question_index_links_every_answered_question_to_its_section(built_site, browser):
    page, problems = _open(browser, built_site["base"] + "questions.html")
    rows = page.evaluate("() => Array.from(document.querySelectorAll('article table tbody tr')).length")
    links = page.evaluate("() => Array.from(document.querySelectorAll('article table a')).map(a => a.href)")
    page.close()
    assert not problems
    assert rows == len(site.load_questions())
    assert any(h.endswith("08_decoding.html#short-answer") for h in links)
    assert any(h.endswith("04_attention.html#short-answer") for h in links)


def _search(browser, base, query):
    page, problems = _open(browser, base + "search.html?q=" + urllib.parse.quote(query))
    page.wait_for_selector(".pagefind-ui__result-link", timeout=20_000)
    page.wait_for_load_state("networkidle")
    hrefs = page.evaluate("() => Array.from(document.querySelectorAll('.pagefind-ui__result-link'))"
                          ".map(a => a.getAttribute('href'))")
    page.close()
    assert not problems, problems
    return [h.split("#")[0].lstrip("/") for h in hrefs]


@pytest.mark.parametrize(("query", "page_name"), [("复读机", "08_decoding.html"), ("GQA", "04_attention.html")])
def test_search_finds_the_notebook(built_site, browser, query, page_name):
    pages = list(dict.fromkeys(_search(browser, built_site["base"], query)))  # unique, in rank order
    assert page_name in pages[:3], f"search {query!r}: {pages[:6]}"


def test_solution_cells_start_collapsed(built_site, browser):
    with_solutions = [p for p in site.notebook_paths()
                      if any(c.get("metadata", {}).get("jupyter", {}).get("source_hidden")
                             for c in json.loads(p.read_text(encoding="utf-8"))["cells"])]
    if not with_solutions:
        pytest.skip("no notebook has a collapsed solution cell yet")
    page, problems = _open(browser, built_site["base"] + f"{with_solutions[0].stem}.html")
    state = page.evaluate("""() => Array.from(document.querySelectorAll('.celltag_llmlab-source-hidden')).map(c => {
        const d = c.querySelector('details.llmlab-solution'); const code = c.querySelector('.jp-InputArea');
        return {details: !!d, open: d ? d.open : null, visible: code ? code.checkVisibility() : null}; })""")
    assert state and all(s["details"] and s["open"] is False and s["visible"] is False for s in state), state
    page.click(".llmlab-solution > summary")
    assert page.evaluate("() => document.querySelector('.llmlab-solution .jp-InputArea').checkVisibility()")
    page.close()
    assert not problems

"""Extract the retrieval corpus of notebook 19 from the installed PyTorch's docstrings.

The corpus is the description and ``Args:`` section of the docstring of the public classes in
``torch.nn`` (layers and losses) and ``torch.optim`` (optimizers and learning-rate schedulers),
without the ``Lazy*`` and 3-D variants, with Sphinx markup removed and each document cut to at
most ``MAX_WORDS`` words. The result is
committed as ``llmlab/corpora/torch_docs.json`` so the notebook, tests and benchmark read the same
text on every machine; rerun this script only with the pinned torch version, then re-check the
questions (``llmlab/corpora/torch_docs_questions.json``) with
``llmlab.retrieval.load_corpus``.

Command: ``.venv/bin/python scripts/rag_build_corpus.py``
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import torch

MAX_WORDS = 100
SKIP = re.compile(r"^Lazy|3d$|^RNNBase$")  # near-copies of kept classes
OUT = Path(__file__).resolve().parents[1] / "llmlab" / "corpora" / "torch_docs.json"
STOP = ("Shape:", "Examples:", "Example:", "Examples::", "Example::", "Attributes:", "Returns:",
        "Variables:", "Inputs:", "Outputs:", "Note:", "Warning:", "Reference:", "References:")


def clean_inline(s: str) -> str:
    s = re.sub(r":(?:attr|math|class|func|meth|mod|ref|obj|data):`~?([^`]*)`", r"\1", s)
    s = re.sub(r"`([^`<]*?)\s*<[^>]*>`_+", r"\1", s)  # `text <url>`__ -> text
    s = re.sub(r"`([^`]*)`_+", r"\1", s)
    s = s.replace("``", "").replace("`", "")
    s = re.sub(r"\\(?:text|mathrm|mathbf|operatorname)\{([^}]*)\}", r"\1", s)
    return re.sub(r"\s+", " ", s).strip()


def doc_text(doc: str) -> str:
    lines = inspect.cleandoc(doc).split("\n")
    paras, cur, skip_indent = [], [], None
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if stripped and indent <= skip_indent:
                skip_indent = None
            else:
                continue
        if stripped in STOP or stripped.startswith(".. _"):
            break
        if stripped.startswith(".. math::") or stripped.startswith(".. code") or stripped.endswith("::"):
            skip_indent = indent
            continue
        if stripped.startswith(".. "):  # note / warning: keep the body, drop the directive
            continue
        if not stripped:
            if cur:
                paras.append(" ".join(cur))
                cur = []
            continue
        if stripped == "Args:" or stripped == "Arguments:" or stripped == "Parameters:":
            if cur:
                paras.append(" ".join(cur))
            cur = []
            continue
        if re.match(r"^[A-Za-z_][\w, ]*(\s*\([^)]*\))?:\s", stripped) and indent <= 4 and cur:
            paras.append(" ".join(cur))  # one paragraph per argument
            cur = []
        cur.append(stripped)
    if cur:
        paras.append(" ".join(cur))
    paras = [clean_inline(p) for p in paras]
    paras = [p if p.endswith((".", ":", "?")) else p + "." for p in paras if len(p) > 2]
    words, out = 0, []
    for p in paras:
        n = len(p.split())
        if words + n > MAX_WORDS:
            if words < MAX_WORDS // 2:
                out.append(" ".join(p.split()[: MAX_WORDS - words]) + ".")
            break
        out.append(p)
        words += n
    return "\n".join(out)


def public_classes(module, base) -> list:
    out = []
    for name in sorted(dir(module)):
        obj = getattr(module, name)
        if (inspect.isclass(obj) and issubclass(obj, base) and obj is not base and not name.startswith("_")
                and not SKIP.search(name)
                and obj.__doc__ and len(obj.__doc__.split()) > 30):
            out.append((f"{module.__name__}.{name}", obj))
    return out


def main() -> None:
    docs = []
    groups = [(torch.nn, torch.nn.Module), (torch.optim, torch.optim.Optimizer),
              (torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler)]
    seen = set()
    for module, base in groups:
        for name, obj in public_classes(module, base):
            if obj in seen:
                continue
            seen.add(obj)
            text = doc_text(obj.__doc__)
            if len(text.split()) >= 25:
                docs.append({"id": name, "text": text})
    data = {"source": f"docstrings of public classes in torch.nn, torch.optim and torch.optim.lr_scheduler "
                      f"of torch {torch.__version__.split('+')[0]} (BSD-3-Clause), Sphinx markup removed, "
                      f"at most {MAX_WORDS} words each; built by scripts/rag_build_corpus.py",
            "documents": docs}
    OUT.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(len(docs), "documents,", sum(len(d["text"].split()) for d in docs), "words ->", OUT.name)


if __name__ == "__main__":
    main()

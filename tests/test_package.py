"""Package-level promises: `import llmlab` is light (no transformers or peft, which Colab users may
lack or have in other versions), and every module listed in __all__ imports."""

import inspect
import re
import subprocess
import sys

import llmlab


def test_import_does_not_pull_in_transformers_or_peft():
    code = "import sys, llmlab; print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_name_exists():
    for name in llmlab.__all__:
        assert hasattr(llmlab, name), name


INFRASTRUCTURE = {"notebook", "shapes"}  # helpers for notebooks and argument checks, not a concept
SOURCE = re.compile(r"\b(19|20)\d\d\b|[Rr]eference|transformers|peft|PyTorch|nanoGPT|safetensors")


def test_every_concept_module_docstring_has_the_style_guide_sections():
    """STYLE.md rule 1: what the module implements, what it leaves out, and the paper (a year) or the
    reference implementation it follows."""
    modules = {name: getattr(llmlab, name) for name in llmlab.__all__ if inspect.ismodule(getattr(llmlab, name))}
    assert INFRASTRUCTURE < set(modules) and len(modules) > 30
    for name, module in modules.items():
        doc = inspect.getdoc(module) or ""
        assert doc, f"llmlab.{name} has no module docstring"
        if name in INFRASTRUCTURE:
            continue
        assert re.search(r"^What it implements", doc, re.MULTILINE), f"llmlab.{name}: no 'What it implements'"
        assert re.search(r"[Ll]eaves? out|[Ll]eft out", doc), f"llmlab.{name}: no 'What it leaves out'"
        assert SOURCE.search(doc), f"llmlab.{name}: names no paper (year) or reference implementation"

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


def _import_graph() -> dict[str, set[str]]:
    """llmlab's modules (a subpackage counts as one) -> the llmlab modules they import, at the top
    of the file or inside a function (a deferred import still ties the two modules together)."""
    import ast
    from pathlib import Path

    root = Path(llmlab.__file__).parent
    files = {p.stem: [p] for p in root.glob("*.py") if p.stem != "__init__"}
    files.update({d.name: sorted(d.glob("*.py")) for d in root.iterdir() if (d / "__init__.py").exists()})
    graph = {name: set() for name in files}
    for name, paths in files.items():
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text())):
                targets = []
                if isinstance(node, ast.ImportFrom) and node.module == "llmlab":
                    targets = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llmlab."):
                    targets = [node.module.split(".")[1]]
                elif isinstance(node, ast.Import):
                    targets = [a.name.split(".")[1] for a in node.names if a.name.startswith("llmlab.")]
                graph[name] |= {t for t in targets if t in graph and t != name}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search with a path stack)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            cycle = visit(nxt, path + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    return next((c for c in (visit(n, []) for n in sorted(graph)) if c), None)


def test_the_import_graph_of_the_package_has_no_cycles():
    graph = _import_graph()
    assert {"model", "attention", "decoding", "exercises"} <= set(graph)
    assert "attention" in graph["model"] and "generation" in graph["beam_search"]  # the scan sees imports
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None

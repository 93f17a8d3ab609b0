"""Package-level promises: `import llmlab` is light (no transformers or peft, which Colab users may
lack or have in other versions), and every module listed in __all__ imports."""

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


def test_every_module_has_a_docstring_naming_what_it_implements():
    for name in llmlab.__all__:
        obj = getattr(llmlab, name)
        if type(obj).__name__ == "module":
            assert obj.__doc__ and len(obj.__doc__) > 80, f"llmlab.{name} needs a module docstring"

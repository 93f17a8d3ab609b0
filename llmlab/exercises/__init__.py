"""Checkers for the exercises at the end of the notebooks.

Each ``check_*`` function runs the learner's function and llmlab's reference on fresh random
inputs (new shapes and values on every call unless ``seed`` is given), prints a verdict, and
returns it as a :class:`Verdict` (true when passed). When the answer is wrong, the checker
compares it with the mistakes people commonly make (RoPE with the wrong pairing, attention scaled
by the model width, ...) and names the one it matches in the hint.

The references are the package's own implementations (``llmlab.attention``, ``llmlab.positional``,
``llmlab.bpe``, ``llmlab.quantization``, ...), which the tests check against PyTorch and
transformers; the mistakes are written beside each checker so the tests can show that every
checker rejects them.

One module per notebook (``llmlab.exercises.nb04`` holds notebook 04's checkers and mistakes);
this package re-exports every module's public names, so ``from llmlab.exercises import
check_rope`` works, and merges their ``MISTAKES`` tables into one, keyed by exercise name.

>>> from llmlab.exercises import check_causal_mask
>>> v = check_causal_mask(lambda t: torch.ones(t, t, dtype=torch.bool).tril(), verbose=False)
>>> bool(v)
True
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

import torch  # noqa: F401  (the docstring example uses it)

from llmlab.exercises._core import Verdict

NOTEBOOK_MODULES = tuple(f"nb{n:02d}" for n in range(1, 21))  # nb01 ... nb20, one per notebook

MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {}
__all__ = ["MISTAKES", "NOTEBOOK_MODULES", "Verdict"]



def _collect() -> None:
    """Re-export each notebook module's public names and merge its MISTAKES (names must be unique)."""
    for name in NOTEBOOK_MODULES:
        module = import_module(f"llmlab.exercises.{name}")
        for public in module.__all__:
            if public in globals():
                raise ImportError(f"llmlab.exercises.{name} exports {public!r}, which another module already defines")
            globals()[public] = getattr(module, public)
            __all__.append(public)
        for exercise, mistakes in module.MISTAKES.items():
            if exercise in MISTAKES:
                raise ImportError(f"llmlab.exercises.{name} defines mistakes for {exercise!r} a second time")
            MISTAKES[exercise] = mistakes


_collect()

"""What every exercise checker shares: the verdict, fresh random inputs, and the comparison that
names a recognized mistake."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Verdict:
    """The result of one checker run; ``bool(verdict)`` is whether the learner's function passed."""

    exercise: str  # the checker's name, e.g. "rope"
    passed: bool
    message: str  # what was compared and what happened
    hint: str = ""  # what to look at when it failed

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        head = f"{'PASS' if self.passed else 'FAIL'} [{self.exercise}] {self.message}"
        return head if self.passed or not self.hint else f"{head}\nHint: {self.hint}"


def _generator(seed: int | None) -> torch.Generator:
    if seed is None:
        seed = int.from_bytes(os.urandom(7), "little")  # fresh inputs on every call
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def _same(got: object, expected: object, rtol: float, atol: float) -> bool:
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            return False
        if expected.dtype == torch.bool or not expected.is_floating_point():
            return bool(torch.equal(got.to(expected.dtype), expected))
        return bool(torch.allclose(got.to(expected.dtype), expected, rtol=rtol, atol=atol))
    if isinstance(expected, tuple | list):
        return (isinstance(got, tuple | list) and len(got) == len(expected)
                and all(_same(a, b, rtol, atol) for a, b in zip(got, expected, strict=True)))
    if isinstance(expected, float):
        return isinstance(got, int | float) and math.isclose(got, expected, rel_tol=rtol, abs_tol=atol)
    return got == expected


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}, dtype {value.dtype}"
    if isinstance(value, tuple | list) and len(value) > 4:
        return f"{type(value).__name__} of length {len(value)}"
    return repr(value)


def _run(
    exercise: str,
    fn: Callable,
    reference: Callable,
    cases: Sequence[tuple],
    hint: str,
    mistakes: dict[str, tuple[Callable, str]] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    verbose: bool = True,
) -> Verdict:
    """Compare fn with reference on every case; on the first difference, name a matching mistake."""
    if not callable(fn):
        raise TypeError(f"fn must be the function to check, got {type(fn).__name__}")
    verdict = None
    for i, args in enumerate(cases, start=1):
        expected = reference(*args)
        try:
            got = fn(*_copy(args))
        except Exception as err:  # the learner's code failing is a verdict, not a crash
            verdict = Verdict(exercise, False, f"raised {type(err).__name__}: {err} (input {i} of {len(cases)})",
                              hint)
            break
        if _same(got, expected, rtol, atol):
            continue
        found = hint
        for wrong, why in (mistakes or {}).values():
            try:
                if _same(got, wrong(*_copy(args)), rtol, atol):
                    found = why
                    break
            except Exception:  # a mistake that does not apply to these inputs
                continue
        verdict = Verdict(exercise, False, f"differs from the reference on input {i} of {len(cases)}: expected "
                          f"{_describe(expected)}, got {_describe(got)}", found)
        break
    if verdict is None:
        verdict = Verdict(exercise, True, f"matches the reference on {len(cases)} fresh inputs")
    if verbose:
        print(verdict)
    return verdict


def _copy(args: tuple) -> tuple:
    """Fresh copies, so a function that edits its input in place cannot change the reference's."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else list(a) if isinstance(a, list) else a for a in args)


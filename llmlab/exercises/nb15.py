"""Exercise checkers for notebook 15 Distributed training."""

from __future__ import annotations

from collections.abc import Callable

__all__: list[str] = []

MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {}

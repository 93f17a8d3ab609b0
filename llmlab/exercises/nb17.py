"""Exercise checkers for notebook 17 RLHF, DPO and GRPO."""

from __future__ import annotations

from collections.abc import Callable

__all__: list[str] = []

MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {}

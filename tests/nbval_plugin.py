"""pytest plugin for the notebook run (loaded by the root conftest.py).

- nbval compares every stored output; stderr is skipped (warnings and library log lines vary by
  version and platform and are not claims of a notebook).
- After the run, the wall time of each notebook (kernel start plus all its cells) is printed
  above pytest's summary line, so the 60 s budget per notebook stays visible in CI.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

_notebook_seconds: dict[str, float] = defaultdict(float)


def pytest_collectstart(collector: pytest.Collector) -> None:
    if collector.__class__.__name__ == "IPyNbFile":
        collector.skip_compare = (*collector.skip_compare, "stderr")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = report.nodeid.split("::", 1)[0]
    if path.endswith(".ipynb"):
        _notebook_seconds[path] += report.duration


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    if not _notebook_seconds:
        return
    terminalreporter.section("notebook wall times (budget 60 s each, 90 s ceiling)")
    for path, seconds in sorted(_notebook_seconds.items()):
        flag = "" if seconds <= 60 else ("  OVER BUDGET" if seconds <= 90 else "  OVER CEILING")
        terminalreporter.write_line(f"{seconds:7.1f} s  {path}{flag}")

"""llmlab.notebook's short tracebacks, and the quiet profiler of measure_peak_memory: the two things
that keep machine paths and library chatter out of stored notebook outputs."""

import warnings

import pytest
import torch

from llmlab.memory import measure_peak_memory
from llmlab.notebook import short_tracebacks


def test_short_tracebacks_outside_ipython_does_nothing():
    assert short_tracebacks() is False


def test_short_tracebacks_sets_minimal_mode_in_ipython():
    shell_module = pytest.importorskip("IPython.core.interactiveshell")
    shell = shell_module.InteractiveShell.instance()
    try:
        shell.InteractiveTB.set_mode(mode="Context")
        assert short_tracebacks() is True
        assert shell.InteractiveTB.mode == "Minimal"
    finally:
        shell_module.InteractiveShell.clear_instance()


def test_measure_peak_memory_hides_the_profiler_cycle_warning(monkeypatch):
    # torch 2.11 warns "Profiler clears events at the end of each cycle" from the profiler itself;
    # simulate it on any torch and check that it does not reach the caller, while other warnings do.
    original_start = torch.profiler.profile.start

    def noisy_start(self):
        # torch 2.11's exact text (torch/profiler/profiler.py), including its "Warning: " prefix
        warnings.warn("Warning: Profiler clears events at the end of each cycle.Only events from the "
                      "current cycle will be reported.To keep events across cycles, set acc_events=True.",
                      UserWarning, stacklevel=2)
        return original_start(self)

    monkeypatch.setattr(torch.profiler.profile, "start", noisy_start)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, nbytes = measure_peak_memory(lambda: torch.zeros(1024))
    assert nbytes == 4096
    assert not [w for w in caught if "Profiler clears events" in str(w.message)]
    with pytest.warns(UserWarning, match="user warning"):
        measure_peak_memory(lambda: warnings.warn("user warning", UserWarning, stacklevel=1))

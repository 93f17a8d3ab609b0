"""Helpers every notebook's setup cell uses: seeds, thread count, version print, timing format.

Notebooks are validated by strict nbval, so their outputs must be the same on every run of the
same machine and versions. ``setup`` fixes the seeds and the number of CPU threads (reduction
order, and so the last bits of float results, can depend on it) and prints the versions that
matter; the setup cell is tagged ``nbval-ignore-output`` because versions differ between machines.
Timings are volatile too: print them with ``format_seconds`` in a cell tagged ``nbval-ignore-output``.
"""

from __future__ import annotations

import json
import platform
import random
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from llmlab.shapes import check_int


def seed_everything(seed: int = 0) -> None:
    """Seed Python's, NumPy's and PyTorch's random generators."""
    seed = check_int("seed", seed, minimum=0)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(seed: int = 0, threads: int = 1, device: str = "cpu") -> torch.device:
    """Seed everything, fix the CPU thread count, print versions; return the chosen device.

    ``device="auto"`` picks CUDA, then MPS, then CPU. Results in the committed outputs come from CPU.

    >>> device = setup(seed=0)  # doctest: +ELLIPSIS
    python ... | torch ... | device cpu
    """
    seed_everything(seed)
    torch.set_num_threads(check_int("threads", threads, minimum=1))
    dev = pick_device(device)
    short_tracebacks()
    import transformers  # imported here so that `import llmlab` stays light

    print(
        f"python {platform.python_version()} | torch {torch.__version__} | "
        f"transformers {transformers.__version__} | numpy {np.__version__} | device {dev}"
    )
    return dev


def short_tracebacks() -> bool:
    """In IPython, show an exception as its last line only (``%xmode Minimal``).

    The notebooks demonstrate llmlab's error messages in cells tagged ``raises-exception``; the
    message is the point, and a full traceback would store file paths of the machine that ran it.
    Returns True when an IPython shell was found (outside IPython this does nothing).
    """
    try:
        from IPython import get_ipython
    except ImportError:  # plain Python: tracebacks are the interpreter's own
        return False
    shell = get_ipython()
    if shell is None:
        return False
    shell.InteractiveTB.set_mode(mode="Minimal")  # what %xmode Minimal does, without its print
    return True


def pick_device(device: str = "cpu") -> torch.device:
    """Return a torch.device; ``"auto"`` prefers CUDA, then Apple MPS, then CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def format_seconds(seconds: float) -> str:
    """One fixed format for every printed timing: 3 significant digits with a unit (s, ms, us)."""
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def time_call(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Best-of-``repeat`` wall time of ``fn()`` in seconds (the minimum is the least noisy estimate)."""
    for _ in range(check_int("warmup", warmup, minimum=0)):
        fn()
    best = float("inf")
    for _ in range(check_int("repeat", repeat, minimum=1)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def load_result(name: str) -> dict:
    """Load a committed experiment result ``llmlab/results/<name>.json`` (package data, so it is found
    on Colab as well). Each result records the command that produced it under ``"command"``."""
    folder = resources.files("llmlab") / "results"
    path = folder / f"{name}.json"
    if not path.is_file():
        available = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))
        raise ValueError(f"name must be one of the committed results {available}, got {name!r}")
    return json.loads(path.read_text())


def save_result(result: dict, out) -> dict:
    """Write an experiment result as the JSON that ``load_result`` reads, after recording the Python and
    torch versions under ``"versions"``. ``result`` should already hold the producing ``"command"``."""
    result["versions"] = {"python": platform.python_version(), "torch": torch.__version__}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result

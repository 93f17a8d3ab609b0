"""Root conftest: loads the project's nbval configuration (tests/nbval_plugin.py) for every path,
so that it applies to the notebooks under notebooks/ as well as to tests/."""

pytest_plugins = ("tests.nbval_plugin",)


def pytest_configure(config) -> None:  # noqa: ARG001
    """One torch thread per pytest process: `make test` runs two workers on a 2-core machine, and
    oversubscribed threads make small-tensor tests many times slower. (Notebook kernels are separate
    processes and set their own thread count in their setup cell.)"""
    import torch

    torch.set_num_threads(1)

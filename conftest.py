"""Root conftest: loads the project's nbval configuration (tests/nbval_plugin.py) for every path,
so that it applies to the notebooks under notebooks/ as well as to tests/."""

pytest_plugins = ("tests.nbval_plugin",)

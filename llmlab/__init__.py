"""llmlab: small, tested PyTorch implementations behind the llmlab interview notebooks.

Each module implements one concept and names the paper and the reference implementation it is
checked against. Shape letters used in every shape comment are defined in ``llmlab.shapes``.
"""

from llmlab import positional, shapes
from llmlab.notebook import setup as setup_notebook

__version__ = "0.1.0"

__all__ = ["positional", "setup_notebook", "shapes", "__version__"]

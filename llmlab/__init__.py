"""llmlab: small, tested PyTorch implementations behind the llmlab interview notebooks.

Each module implements one concept and names the paper and the reference implementation it is
checked against. Shape letters used in every shape comment are defined in ``llmlab.shapes``.
Modules that need transformers import it inside their functions, so ``import llmlab`` stays light.
"""

from llmlab import attention, data, model, moe, notebook, positional, shapes, tokenizer
from llmlab.model import LLM, ModelConfig
from llmlab.notebook import setup as setup_notebook

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "ModelConfig",
    "__version__",
    "attention",
    "data",
    "model",
    "moe",
    "notebook",
    "positional",
    "setup_notebook",
    "shapes",
    "tokenizer",
]

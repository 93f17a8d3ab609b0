"""The package's one counter of an instantiated module's parameters.

What it implements
- ``count_trainable_parameters``: (trainable, total) parameter counts of any ``nn.Module``, like
  peft's ``PeftModel.get_nb_trainable_parameters``; a tensor shared by two modules (tied
  embeddings) counts once, because ``nn.Module.parameters()`` yields each tensor once.
- ``trainable_parameters``: its first half.

``LLM.num_parameters`` (``llmlab.model``), the PEFT methods (``llmlab.peft_utils`` re-exports both
names) and the distributed demos all count with it; it imports nothing from llmlab but
``llmlab.shapes``, so every module can use it without an import cycle.

What it leaves out: counts from a configuration alone, without building the model (that is
``llmlab.param_count``), and bytes (``llmlab.memory``).
"""

from __future__ import annotations

from torch import nn

from llmlab.shapes import check_module


def count_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, like peft's ``get_nb_trainable_parameters``; a tensor
    shared by two modules (tied embeddings) counts once.

    >>> count_trainable_parameters(nn.Linear(3, 2))  # 3 x 2 weights + 2 biases
    (8, 8)
    """
    check_module("model", model)
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with requires_grad: ``count_trainable_parameters(model)[0]``.

    >>> layer = nn.Linear(3, 2)
    >>> _ = layer.bias.requires_grad_(False)
    >>> trainable_parameters(layer)
    6
    """
    return count_trainable_parameters(model)[0]

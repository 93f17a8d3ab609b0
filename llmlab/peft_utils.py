"""The plumbing every parameter-efficient fine-tuning method shares: find, wrap, freeze, count.

What it implements
- Model anatomy, for transformers Llama-style models and llmlab's ``LLM`` alike:
  ``ModelGeometry.of(model)`` (layers, width, heads, key/value heads, head dim),
  ``input_embedding`` (the token table), ``decoder_layers`` (the ``nn.ModuleList`` of blocks) and
  ``is_llmlab_model``.
- Module surgery: ``name_matches`` (peft's rule for ``target_modules``), ``find_linear_modules``,
  ``replace_module`` and ``wrap_matching_linears``, which LoRA, QLoRA, AdaLoRA and bottleneck
  adapters all use to put their layer around the matching ``nn.Linear`` modules.
- Trainability: ``freeze`` and ``set_trainable`` / ``mark_only_adapters_trainable``. The one
  parameter counter of the package, ``count_trainable_parameters`` -> (trainable, total), like
  peft's ``PeftModel.get_nb_trainable_parameters``, and ``trainable_parameters`` (its first half)
  live in ``llmlab.parameters`` (below ``llmlab.model``, which counts with it too) and are
  re-exported here; ``check_module`` lives in ``llmlab.shapes``.

Reference implementation: peft (``peft.tuners.tuners_utils``: ``check_target_module_exists``,
``_replace_module``, ``_mark_only_adapters_as_trainable``; ``PeftModel.get_nb_trainable_parameters``).
What it leaves out: the methods themselves (``llmlab.lora``, ``llmlab.adalora``,
``llmlab.quantization``, ``llmlab.prompt_tuning``, ``llmlab.adapters``), several adapters on one
model, and peft's handling of embeddings and convolutions as targets.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from llmlab.model import LLM
from llmlab.parameters import count_trainable_parameters, trainable_parameters  # noqa: F401 (re-exported)
from llmlab.shapes import check_module

# ----------------------------------------------------------------------------------------------
# Model anatomy


@dataclass(frozen=True)
class ModelGeometry:
    """The sizes of a decoder that soft prompts, prefixes and adaption prompts must match."""

    num_layers: int  # L: decoder blocks
    hidden_size: int  # C: model width (the size of a virtual token embedding)
    num_heads: int  # H: query heads
    num_kv_heads: int  # K: key/value heads (the size of a prefix per layer is K * D)
    head_dim: int  # D: head dimension

    @classmethod
    def of(cls, model: nn.Module) -> ModelGeometry:
        """Read the sizes from llmlab's ``ModelConfig`` or a transformers config.

        >>> from llmlab.model import ModelConfig
        >>> ModelGeometry.of(LLM(ModelConfig.tiny(vocab_size=50)))
        ModelGeometry(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8)
        """
        cfg = getattr(model, "config", None)
        if cfg is None:
            raise TypeError(
                f"model must have a .config (llmlab ModelConfig or transformers config), got "
                f"{type(model).__name__} without one"
            )
        if hasattr(cfg, "n_layer"):  # llmlab ModelConfig
            return cls(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        return cls(cfg.num_hidden_layers, cfg.hidden_size, heads, kv_heads, head_dim)


def is_llmlab_model(model: nn.Module) -> bool:
    """True for llmlab's ``LLM`` (keyword ``cache=``, ``targets=``), False for transformers models."""
    return isinstance(model, LLM)


def input_embedding(model: nn.Module) -> nn.Embedding:
    """The token embedding table of a transformers model or of llmlab's ``LLM``.

    >>> from llmlab.model import ModelConfig
    >>> input_embedding(LLM(ModelConfig.tiny(vocab_size=50))).weight.shape  # (V, C)
    torch.Size([50, 32])
    """
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings()
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "embed_tokens", None), nn.Embedding):
        return inner.embed_tokens
    raise TypeError(
        f"model must expose its token embedding (get_input_embeddings or .model.embed_tokens), "
        f"got {type(model).__name__}"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (``model.layers`` in transformers' Llama and in llmlab's ``LLM``).

    >>> from llmlab.model import ModelConfig
    >>> len(decoder_layers(LLM(ModelConfig.tiny(vocab_size=50))))
    2
    """
    check_module("model", model)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            return module
    raise TypeError(
        f"model must hold its decoder blocks in an nn.ModuleList named 'layers', got {type(model).__name__} without one"
    )


# ----------------------------------------------------------------------------------------------
# Finding and replacing modules


def name_matches(name: str, target_modules: tuple[str, ...] | str) -> bool:
    """peft's rule: a string is a regex that must match the whole name; a tuple holds name suffixes.

    >>> name_matches("model.layers.0.self_attn.q_proj", ("q_proj", "v_proj"))
    True
    >>> name_matches("model.layers.0.self_attn.q_proj", r".*\\.1\\..*")
    False
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_linear_modules(
    model: nn.Module, target_modules: tuple[str, ...] | str, skip: tuple[type, ...] = ()
) -> list[str]:
    """Names of the ``nn.Linear`` modules that match ``target_modules``, skipping anything inside
    a module of a type in ``skip`` (so an adapter's own ``lora_A`` is never wrapped again).

    >>> find_linear_modules(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)), ("2",))
    ['2']
    """
    inside_skipped: list[str] = []
    found = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_skipped):
            continue
        if skip and isinstance(module, skip):
            inside_skipped.append(name)
            continue
        if isinstance(module, nn.Linear) and name_matches(name, target_modules):
            found.append(name)
    return found


def no_match_error(model: nn.Module, target_modules: tuple[str, ...] | str) -> ValueError:
    """The error for ``target_modules`` that match nothing, listing the linear layers there are."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    return ValueError(
        f"target_modules={target_modules!r} matched no nn.Linear in the model; its linear layers are named {linear}"
    )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` (dotted path) is.

    >>> model = nn.Sequential(nn.Linear(2, 2))
    >>> replace_module(model, "0", nn.Identity())
    >>> model
    Sequential(
      (0): Identity()
    )
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrap_matching_linears(
    model: nn.Module,
    target_modules: tuple[str, ...] | str,
    make_layer: Callable[[nn.Linear], nn.Module],
    trainable: Callable[[str], bool],
    skip: tuple[type, ...] = (),
) -> nn.Module:
    """Replace each ``nn.Linear`` matching ``target_modules`` by ``make_layer(linear)`` (in place),
    then set ``requires_grad = trainable(parameter name)`` everywhere; return ``model``.

    ``skip`` holds the wrapper types whose insides are never matched again. Raises ``ValueError``
    (listing the linear layers there are) when nothing matches.

    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    >>> model = wrap_matching_linears(model, ("1",), nn.Sequential, lambda name: name.startswith("1."))
    >>> count_trainable_parameters(model)  # (trainable, total): the 4 x 2 layer and its bias
    (10, 30)
    """
    check_module("model", model)
    names = find_linear_modules(model, target_modules, skip=skip)
    if not names:
        raise no_match_error(model, target_modules)
    for name in names:
        replace_module(model, name, make_layer(model.get_submodule(name)))
    set_trainable(model, trainable)
    return model


# ----------------------------------------------------------------------------------------------
# Trainable parameters


def set_trainable(model: nn.Module, trainable: Callable[[str], bool]) -> None:
    """requires_grad = ``trainable(name)`` for every named parameter of ``model``."""
    for name, p in model.named_parameters():
        p.requires_grad_(bool(trainable(name)))


def mark_only_adapters_trainable(model: nn.Module, keyword: str = "lora_") -> None:
    """requires_grad = True exactly for parameters whose name contains ``keyword``."""
    set_trainable(model, lambda name: keyword in name)


def freeze(model: nn.Module) -> None:
    """requires_grad = False for every parameter of ``model``."""
    set_trainable(model, lambda name: False)

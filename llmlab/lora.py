"""LoRA: low-rank adapters on frozen linear layers, with merge, unmerge and safetensors adapters.

What it implements
- ``LoRALinear``: y = base_layer(x) + (alpha / r) * lora_B(lora_A(dropout(x))) (Hu et al. 2021, "LoRA:
  Low-Rank Adaptation of Large Language Models", section 4.1). ``base_layer`` is frozen; ``lora_A``
  (R, in) starts Kaiming-uniform and ``lora_B`` (out, R) starts at zero, so the wrapped layer equals
  the original one until training moves B. ``use_rslora`` scales by alpha / sqrt(r) instead
  (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA").
- ``inject_lora``: wraps every ``nn.Linear`` whose module name matches ``LoRAConfig.target_modules``
  (name suffixes such as ``"q_proj"``, or one regular expression matched against the full name),
  and freezes everything else. It works on any ``nn.Module``: llmlab's ``LLM`` and transformers
  models alike.
- ``merge_lora`` / ``unmerge_lora`` / ``merge_and_unload``: W <- W + (alpha / r) B A and back; a
  merged model has exactly the cost of the base model at inference. ``disable_lora`` temporarily
  turns every adapter off (the base model, e.g. as DPO's reference, with no second copy).
- ``lora_state_dict`` / ``save_adapter`` / ``load_adapter``: only the adapter weights, in
  safetensors, with a JSON config. The files use peft's layout (``adapter_model.safetensors`` with
  keys ``base_model.model.<module>.lora_A.weight`` and an ``adapter_config.json`` with
  ``peft_type: LORA``), so peft loads what llmlab saves and the other way round. Loading with
  ``trainable=True`` resumes training from a saved adapter.

Reference implementation: Hugging Face peft (``peft.tuners.lora``): the parameter names
``base_layer``, ``lora_A``, ``lora_B`` and ``lora_dropout``, the initialisation and the scaling are the
same, and the tests check logits, merged weights and saved files against it.

Left out: several adapters on one model, bias training, LoRA on embeddings and convolutions, DoRA,
and PiSSA/LoftQ initialisations. Shape letters follow ``llmlab.shapes`` (R is the LoRA rank).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmlab.peft_utils import (  # these names used to be defined here; old imports keep working
    check_module,
    count_trainable_parameters,  # noqa: F401 (re-exported)
    find_linear_modules,  # noqa: F401 (re-exported)
    mark_only_adapters_trainable,  # noqa: F401 (re-exported)
    name_matches,  # noqa: F401 (re-exported)
    replace_module,
    set_trainable,
    wrap_matching_linears,
)
from llmlab.shapes import check_float, check_int

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # peft's prefix for module names in a saved adapter


@dataclass(frozen=True)
class LoRAConfig:
    """Which linear layers get a LoRA update, and its rank and scale."""

    r: int = 8  # rank R of the update B A (lora_A is (R, in), lora_B is (out, R))
    alpha: float = 16.0  # the update is scaled by alpha / r (or alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # dropout probability on the LoRA branch input only (the base path sees x)
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")  # name suffixes, or one full-match regex
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)

    def __post_init__(self) -> None:
        check_int("r", self.r, minimum=1)
        check_float("alpha", self.alpha, low=0.0, low_open=True)
        check_float("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        targets = self.target_modules
        if isinstance(targets, list):
            object.__setattr__(self, "target_modules", tuple(targets))
        elif not isinstance(targets, (tuple, str)):
            raise TypeError(f"target_modules must be a tuple of name suffixes or a regex string, got {targets!r}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module, got an empty value")

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    @classmethod
    def paper(cls) -> LoRAConfig:
        """The LoRA paper's GPT-3 setting: W_q and W_v only, r = 8 (alpha = 16 as is common today)."""
        return cls(r=8, alpha=16.0, target_modules=("q_proj", "v_proj"))

    @classmethod
    def all_linear(cls, r: int = 16, alpha: float = 32.0) -> LoRAConfig:
        """QLoRA's advice: adapt every linear layer of every block (attention and MLP)."""
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        return cls(r=r, alpha=alpha, target_modules=names)

    @classmethod
    def tiny(cls) -> LoRAConfig:
        """A small rank for tests on tiny models."""
        return cls(r=4, alpha=8.0, target_modules=("q_proj", "v_proj"))

    def to_peft_dict(self) -> dict:
        """The fields of peft's ``adapter_config.json`` that describe this adapter."""
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return {
            "peft_type": "LORA",
            "task_type": None,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, data: dict) -> LoRAConfig:
        """Read the fields llmlab understands from a peft LoRA ``adapter_config.json``."""
        if data.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter_config.json must describe a LORA adapter, got peft_type={data['peft_type']!r}")
        if data.get("bias", "none") != "none":
            raise ValueError(f"only bias='none' adapters are supported, got bias={data['bias']!r}")
        targets = data["target_modules"]
        return cls(
            r=data["r"],
            alpha=data["lora_alpha"],
            dropout=data.get("lora_dropout", 0.0),
            target_modules=targets if isinstance(targets, str) else tuple(targets),
            use_rslora=data.get("use_rslora", False),
        )


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor in front of B A: alpha / r, or alpha / sqrt(r) for rsLoRA.

    With alpha / r, doubling r halves each direction's step, so one alpha works across ranks at
    small r; rsLoRA's alpha / sqrt(r) keeps the update's scale stable when r is large.
    """
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _adapter_device_dtype(base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the base layer, and the dtype for adapter weights: the base's float dtype, but
    float32 when the base is float16/bfloat16 (as peft does: small updates need the precision)."""
    tensors = list(base_layer.parameters()) + list(base_layer.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    weight = getattr(base_layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        dtype = weight.dtype
    else:
        dtype = getattr(base_layer, "compute_dtype", torch.float32)
    return device, (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = base_layer(x) + s * B(A(dropout(x))).

    x (B, T, in) -> y (B, T, out); s = alpha / r. ``base_layer`` may be an ``nn.Linear`` or any
    module with ``in_features`` / ``out_features`` (QLoRA passes a 4-bit ``NF4Linear``).

    >>> layer = LoRALinear(nn.Linear(32, 64), r=4, alpha=8.0)
    >>> layer(torch.randn(2, 5, 32)).shape
    torch.Size([2, 5, 64])
    """

    def __init__(
        self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Module) or not hasattr(base_layer, "in_features"):
            raise TypeError(
                f"base_layer must be an nn.Linear (or a module with in_features/out_features), "
                f"got {type(base_layer).__name__}"
            )
        self.r = check_int("r", r, minimum=1)
        self.alpha = check_float("alpha", alpha, low=0.0, low_open=True)
        check_float("dropout", dropout, low=0.0, high=1.0, high_open=True)
        self.scaling = lora_scaling(self.r, self.alpha, use_rslora)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        device, dtype = _adapter_device_dtype(base_layer)
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device, dtype=dtype)  # weight (R, in)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device, dtype=dtype)  # weight (out, R)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False  # True: behave like the base layer (see disable_lora)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform (bound 1/sqrt(in)), B = 0: the update B A starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The dense update s * B A that merging adds to the base weight. (out, in)"""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # (out, R) @ (R, in) -> (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        if self.disabled and self.merged:
            raise ValueError("cannot disable a merged LoRA layer; unmerge it first")
        y = self.base_layer(x)  # (..., out)
        if self.merged or self.disabled:
            return y
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (..., R)
        # Add in the adapter's precision, round once to the output dtype (as peft does).
        return (y + self.lora_B(h) * self.scaling).to(y.dtype)  # (..., out)

    def _dense_weight(self) -> torch.Tensor:
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(
                f"merging needs a floating-point base_layer.weight, got {type(self.base_layer).__name__}; "
                "dequantize a 4-bit base first (see llmlab.quantization.QLoRALinear.dequantize_and_merge)"
            )
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s B A; afterwards forward costs one matmul, like the base layer."""
        if self.merged:
            raise ValueError("this LoRALinear is already merged; call unmerge() first")
        weight = self._dense_weight()
        weight += self.delta_weight().to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - s B A, restoring the base weight up to float rounding."""
        if not self.merged:
            raise ValueError("this LoRALinear is not merged; there is nothing to unmerge")
        weight = self._dense_weight()
        weight -= self.delta_weight().to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, merged={self.merged}"


# ----------------------------------------------------------------------------------------------
# Injecting adapters (the module surgery lives in llmlab.peft_utils)


def inject_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap every matching ``nn.Linear`` of ``model`` in a ``LoRALinear`` (in place) and freeze the rest.

    Returns ``model``. Raises ``ValueError`` if no linear layer matches.

    >>> from llmlab.model import LLM, ModelConfig
    >>> model = LLM(ModelConfig.tiny(vocab_size=50))  # 2 layers; q_proj 32 -> 32, v_proj 32 -> 16
    >>> model = inject_lora(model, LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")))
    >>> count_trainable_parameters(model)[0] == 2 * 8 * ((32 + 32) + (32 + 16))  # layers * r * (in + out)
    True
    """
    return wrap_lora_linears(
        model, config, lambda linear: LoRALinear(linear, config.r, config.alpha, config.dropout, config.use_rslora)
    )


def wrap_lora_linears(model: nn.Module, config: LoRAConfig, make_layer: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    """``wrap_matching_linears`` with LoRA's rules: ``config.target_modules``, never inside a
    ``LoRALinear``, only ``lora_*`` parameters trainable. Shared by LoRA and QLoRA; returns ``model``."""
    check_module("model", model)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    return wrap_matching_linears(
        model, config.target_modules, make_layer, trainable=lambda name: "lora_" in name, skip=(LoRALinear,)
    )


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` in ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _require_lora(model: nn.Module) -> dict[str, LoRALinear]:
    check_module("model", model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRALinear layers; call inject_lora(model, config) first")
    return layers


# ----------------------------------------------------------------------------------------------
# Merging


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold s B A into every base weight (in place); the LoRA modules stay, so it can be undone."""
    for layer in _require_lora(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract s B A from every base weight again (in place)."""
    for layer in _require_lora(model).values():
        layer.unmerge()
    return model


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes exactly its base model (like peft's ``disable_adapter()``),
    e.g. the frozen reference model of DPO without a second copy of the weights.

    >>> import copy
    >>> from llmlab.model import LLM, ModelConfig
    >>> base = LLM(ModelConfig.tiny(vocab_size=50))
    >>> model = inject_lora(copy.deepcopy(base), LoRAConfig.tiny())
    >>> _ = torch.nn.init.ones_(model.model.layers[0].self_attn.q_proj.lora_B.weight)  # B != 0
    >>> ids = torch.tensor([[1, 2, 3]])  # (B, T)
    >>> with disable_lora(model):
    ...     reference_logits = model(ids).logits
    >>> torch.equal(reference_logits, base(ids).logits), torch.equal(model(ids).logits, reference_logits)
    (True, False)
    """
    layers = _require_lora(model).values()
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge and put the plain base layers back: the result has no trace of LoRA (like peft's)."""
    for name, layer in _require_lora(model).items():
        if not layer.merged:
            layer.merge()
        replace_module(model, name, layer.base_layer)
    return model


# ----------------------------------------------------------------------------------------------
# Saving and loading adapters


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights: ``{"<module>.lora_A.weight": (R, in), "<module>.lora_B.weight": (out, R)}``."""
    state = {}
    for name, layer in _require_lora(model).items():
        state[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()  # (R, in)
        state[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()  # (out, R)
    return state


def to_peft_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llmlab adapter keys -> peft's saved-adapter keys (``base_model.model.`` in front)."""
    return {PEFT_PREFIX + k: v for k, v in state.items()}


def from_peft_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's saved-adapter keys (with or without the adapter name ``.default``) -> llmlab keys."""
    out = {}
    for key, value in state.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"peft adapter keys must start with {PEFT_PREFIX!r}, got {key!r}")
        key = key[len(PEFT_PREFIX) :].replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        out[key] = value
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights into the model's LoRA layers; every key must match, both ways."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"adapter keys do not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, target in own.items():
        if state[key].shape != target.shape:
            raise ValueError(f"{key} must have shape {tuple(target.shape)}, got {tuple(state[key].shape)}")
        target.copy_(state[key])


def save_adapter(model: nn.Module, config: LoRAConfig, directory: str | Path) -> Path:
    """Write ``adapter_model.safetensors`` (adapter weights only) and ``adapter_config.json``.

    The layout is peft's, so ``peft.PeftModel.from_pretrained(base, directory)`` loads it too.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in to_peft_keys(lora_state_dict(model)).items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config.to_peft_dict(), indent=2))
    return directory


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    """The ``LoRAConfig`` stored next to a saved adapter (written by llmlab or by peft)."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"directory must contain {ADAPTER_CONFIG}, got {str(directory)!r} without it")
    return LoRAConfig.from_peft_dict(json.loads(path.read_text()))


def load_adapter(model: nn.Module, directory: str | Path, trainable: bool = False) -> nn.Module:
    """Inject LoRA as the saved config says, load the saved weights; ``trainable=True`` resumes training.

    >>> import copy, tempfile
    >>> from llmlab.model import LLM, ModelConfig
    >>> base = LLM(ModelConfig.tiny(vocab_size=50))
    >>> tuned = inject_lora(copy.deepcopy(base), LoRAConfig.tiny())
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     _ = save_adapter(tuned, LoRAConfig.tiny(), directory)
    ...     model = load_adapter(base, directory, trainable=True)
    >>> count_trainable_parameters(model) == count_trainable_parameters(tuned)
    True
    """
    check_module("model", model)
    config = read_adapter_config(directory)
    if not lora_layers(model):
        inject_lora(model, config)
    device = next(iter(lora_layers(model).values())).lora_A.weight.device
    state = from_peft_keys(load_file(str(Path(directory) / ADAPTER_WEIGHTS), device=str(device)))
    load_lora_state_dict(model, state)
    set_trainable(model, lambda name: trainable and "lora_" in name)
    return model

"""Checkpoints: safetensors weights plus one JSON file, and the checkpoint shipped with llmlab.

What it implements
- ``save_checkpoint``: ``model.safetensors`` (weights only: safetensors cannot run code when it is
  loaded, unlike a pickled ``torch.save`` file) and ``config.json`` holding the model config, the
  tokenizer, and training metadata (held-out loss, the command that produced the run, ...).
  Tied embeddings (``lm_head.weight`` is ``model.embed_tokens.weight``) are one tensor in memory;
  safetensors refuses to store two names for one buffer, so ``safetensors.torch.save_model``
  writes it once and ``load_model`` restores the tie, as transformers' ``save_pretrained`` does.
- ``load_checkpoint``: rebuild ``LLM`` and the tokenizer from a directory, on any device.
- ``load_pretrained``: the checkpoint shipped inside the package (``llmlab/checkpoints/<name>/``),
  so notebooks on decoding, KV caches or quantization get a trained model without a download.

What it leaves out: optimizer state and resuming, sharded weights, the Hugging Face Hub.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from llmlab.tokenizer import Tokenizer, tokenizer_from_dict

CHECKPOINT_FORMAT = "llmlab-checkpoint-v1"  # "format" field of config.json
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SHIPPED_DIR = Path(__file__).resolve().parent / "checkpoints"  # llmlab/checkpoints/<name>/


def save_checkpoint(model, tokenizer: Tokenizer, out_dir: str | Path, extra_metadata: dict | None = None) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json``; return ``out_dir``.

    ``extra_metadata`` must be JSON-serializable; it is stored under "metadata".

    >>> save_checkpoint(model, tokenizer, "runs/tiny", {"val_loss": 1.23})  # doctest: +SKIP
    """
    from llmlab.model import LLM

    if not isinstance(model, LLM):
        raise TypeError(f"model must be an llmlab.model.LLM, got {type(model).__name__}")
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be an llmlab.tokenizer.Tokenizer, got {type(tokenizer).__name__}")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"tokenizer.vocab_size must equal model.config.vocab_size={model.config.vocab_size}, "
                         f"got {tokenizer.vocab_size}")  # fmt: skip
    config = {
        "format": CHECKPOINT_FORMAT,
        "model_config": dataclasses.asdict(model.config),
        "tokenizer": tokenizer.to_dict(),
        "num_parameters": model.num_parameters(),
        "weights": WEIGHTS_FILE,
        "metadata": extra_metadata or {},
    }
    text = json.dumps(config, indent=1, ensure_ascii=False)  # fails early if metadata is not JSON
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")
    return out


def read_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory (model config, tokenizer, metadata)."""
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_dir must contain {CONFIG_FILE}, got {str(ckpt_dir)!r} without it")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} must have format {CHECKPOINT_FORMAT!r}, got {config.get('format')!r}")
    return config


def load_checkpoint(ckpt_dir: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, tokenizer) from a directory written by ``save_checkpoint``.

    >>> model, tokenizer = load_checkpoint("runs/tiny")  # doctest: +SKIP
    """
    from llmlab.model import LLM, ModelConfig

    config = read_config(ckpt_dir)
    weights = Path(ckpt_dir) / config["weights"]
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint weights must exist at {weights}, got no such file")
    model = LLM(ModelConfig(**config["model_config"]))
    load_model(model, str(weights), strict=True)
    tokenizer = tokenizer_from_dict(config["tokenizer"])
    return model.to(device).eval(), tokenizer


def shipped_checkpoints() -> list[str]:
    """Names of the checkpoints that ship with llmlab."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def pretrained_dir(name: str = "tiny-char") -> Path:
    """The directory of a shipped checkpoint."""
    names = shipped_checkpoints()
    if name not in names:
        raise ValueError(f"name must be one of the shipped checkpoints {names}, got {name!r}")
    return SHIPPED_DIR / name


def load_pretrained(name: str = "tiny-char", device: str | torch.device = "cpu"):
    """(model, tokenizer) of a checkpoint shipped in ``llmlab/checkpoints/<name>/``; no network.

    "tiny-char": ``ModelConfig.small`` trained on ``llmlab.data.generate_corpus()`` by
    ``scripts/train_shipped_model.sh``; its held-out loss is in ``read_config(pretrained_dir())``.

    >>> model, tokenizer = load_pretrained()  # doctest: +SKIP
    """
    return load_checkpoint(pretrained_dir(name), device=device)

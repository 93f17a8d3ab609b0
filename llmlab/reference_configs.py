"""Published model configurations, committed as data with their sources.

What it implements
- ``load_reference_config(name)``: one published configuration as a frozen ``ReferenceConfig``:
  ``.fields`` holds the relevant fields of the released ``config.json`` under their published
  names (``num_key_value_heads``, ChatGLM's ``multi_query_group_num``, ``sliding_window``,
  ``num_local_experts``, ``rope_scaling``, DeepSeek's ``kv_lora_rank`` ...), ``.source`` the
  repository, path and revision they were taken from, and ``.published`` totals published
  independently of the configuration (parameter counts from model cards, papers or other
  implementations, training tokens), each with its own source and, where the figure is rounded,
  the unit it is rounded to (``rounded_to``), so a derived count can be compared with it.
- ``reference_config_names()``: the names of every committed configuration.
- ``ReferenceConfig.to_transformers_config()``: the transformers configuration built from the
  published fields themselves (``AutoConfig.for_model``), so a test can instantiate the model on the
  meta device and count its parameters without any download.

The data lives in ``llmlab/reference_configs/<name>.json`` (package data, found on Colab too). GPT-3
released no configuration file: its entry holds the sizes of Brown et al. 2020, Table 2.1, under
the paper's names. What it leaves out: tokenizer files, generation settings and dtype fields, which
no notebook reads. Nothing here reaches the network.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

DATA_FOLDER = "reference_configs"  # package-data folder of the JSON files
SOURCE_KEYS = ("repository", "path", "revision")  # what every source names
NO_TRANSFORMERS_CLASS = {  # model types with no built-in transformers class, and why
    None: "GPT-3 released no configuration or weights (the entry holds the paper's Table 2.1)",
    "chatglm": "ChatGLM's modeling code is remote code on the Hub, not part of transformers",
}


@dataclass(frozen=True)
class ReferenceConfig:
    """One published configuration; every dict is a private copy, so edits never leak back."""

    name: str  # reference name, e.g. "llama-2-7b"
    display_name: str  # name for tables, e.g. "LLaMA-2-7B"
    fields: dict  # published config.json fields under their published names
    source: dict  # {"repository", "path", "revision"} (and an optional "note")
    published: dict  # independently published totals: {key: {"value", "source", ["rounded_to"]}}

    @property
    def model_type(self) -> str | None:
        """The ``model_type`` of the published config (None for GPT-3, which has none)."""
        return self.fields.get("model_type")

    def published_value(self, key: str) -> float:
        """The published number ``key`` (e.g. ``"parameters"``), as int when it is exact."""
        if key not in self.published:
            raise ValueError(f"key must be one of {sorted(self.published)} for {self.name!r}, got {key!r}")
        return self.published[key]["value"]

    def published_interval(self, key: str) -> tuple[float, float]:
        """The values the published figure ``key`` stands for: value +- half its rounding unit
        (a single point for an exact count), e.g. Mixtral's "12.9B" active -> (12.85e9, 12.95e9).

        >>> load_reference_config("mixtral-8x7b").published_interval("active_parameters")
        (12850000000.0, 12950000000.0)
        """
        value = self.published_value(key)
        half = self.published[key].get("rounded_to", 0) / 2
        return (value - half, value + half)

    def to_transformers_config(self):
        """The transformers config of the published fields, e.g. a ``MixtralConfig`` (no download).

        >>> load_reference_config("mixtral-8x7b").to_transformers_config().num_local_experts
        8
        """
        import transformers

        if self.model_type in NO_TRANSFORMERS_CLASS:
            raise ValueError(f"{self.name!r} has no transformers config: "
                             f"{NO_TRANSFORMERS_CLASS[self.model_type]}")
        kwargs = {k: v for k, v in self.fields.items() if k not in ("model_type", "architectures")}
        return transformers.AutoConfig.for_model(self.model_type, **kwargs)


def reference_config_names() -> tuple[str, ...]:
    """Names of the committed configurations, sorted, e.g. ``("chatglm-6b", ..., "mixtral-8x7b")``."""
    folder = resources.files("llmlab") / DATA_FOLDER
    return tuple(sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json")))


@cache
def _read(name: str) -> dict:
    return json.loads((resources.files("llmlab") / DATA_FOLDER / f"{name}.json").read_text("utf-8"))


def load_reference_config(name: str) -> ReferenceConfig:
    """Load the committed configuration ``name``, e.g. ``load_reference_config("chatglm2-6b")``.

    >>> load_reference_config("chatglm2-6b").fields["multi_query_group_num"]
    2
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    names = reference_config_names()
    if name not in names:
        raise ValueError(f"name must be one of {list(names)}, got {name!r}")
    return parse_reference_config(copy.deepcopy(_read(name)), origin=f"{DATA_FOLDER}/{name}.json")


def parse_reference_config(data: dict, origin: str = "data") -> ReferenceConfig:
    """Check the layout of one reference entry and build its ``ReferenceConfig``.

    ``origin`` names the file in error messages. Raises ``ValueError`` naming the missing or
    malformed key.
    """
    if not isinstance(data, dict):
        raise TypeError(f"data must be a dict, got {type(data).__name__}")
    for key, kind in (("name", str), ("display_name", str), ("source", dict), ("fields", dict),
                      ("published", dict)):
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{origin}: {key} must be a {kind.__name__}, got {data.get(key)!r}")
    missing = [k for k in SOURCE_KEYS if not isinstance(data["source"].get(k), str) or not data["source"][k]]
    if missing:
        raise ValueError(f"{origin}: source must name {list(SOURCE_KEYS)}, missing or empty: {missing}")
    for key, entry in data["published"].items():
        _check_published(f"{origin}: published[{key!r}]", entry)
    return ReferenceConfig(name=data["name"], display_name=data["display_name"], fields=data["fields"],
                           source=data["source"], published=data["published"])


def _check_published(where: str, entry: object) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("source"), str) or not entry["source"]:
        raise ValueError(f"{where} must be a dict with a non-empty 'source', got {entry!r}")
    value, rounded = entry.get("value"), entry.get("rounded_to")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{where}['value'] must be a positive number, got {value!r}")
    if rounded is not None and (isinstance(rounded, bool) or not isinstance(rounded, (int, float))
                                or rounded <= 0):
        raise ValueError(f"{where}['rounded_to'] must be a positive number or absent, got {rounded!r}")

"""llmlab.peft_utils: the shared PEFT plumbing reads the same geometry and layers from llmlab's LLM
and its transformers conversion, counts parameters like peft, and is what the old import paths give."""

import pytest
import torch
from torch import nn

import llmlab.adapters
import llmlab.lora
import llmlab.prompt_tuning
from llmlab import peft_utils
from llmlab.interop import to_hf
from llmlab.peft_utils import (
    ModelGeometry,
    count_trainable_parameters,
    decoder_layers,
    freeze,
    input_embedding,
    is_llmlab_model,
    set_trainable,
    trainable_parameters,
    wrap_matching_linears,
)
from tests.models import tiny_llama, tiny_llmlab


def test_geometry_layers_and_embedding_agree_between_llmlab_and_transformers():
    ours = tiny_llmlab()
    theirs = to_hf(ours)
    assert ModelGeometry.of(ours) == ModelGeometry.of(theirs) == ModelGeometry(2, 32, 4, 2, 8)
    assert len(decoder_layers(ours)) == len(decoder_layers(theirs)) == 2
    assert decoder_layers(ours) is ours.model.layers and decoder_layers(theirs) is theirs.model.layers
    torch.testing.assert_close(input_embedding(ours).weight, input_embedding(theirs).weight, rtol=0, atol=0)
    assert is_llmlab_model(ours) and not is_llmlab_model(theirs)


def test_counts_equal_peft_and_tied_weights_count_once():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert count_trainable_parameters(model) == model.get_nb_trainable_parameters()
    tied = tiny_llmlab(tie_embeddings=True)
    assert count_trainable_parameters(tied)[1] == tied.num_parameters() < tiny_llmlab().num_parameters()


def test_freeze_and_set_trainable():
    model = tiny_llmlab()
    freeze(model)
    assert trainable_parameters(model) == 0
    set_trainable(model, lambda name: name.endswith("norm.weight"))
    gains = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert trainable_parameters(model) == sum(p.numel() for p in gains) == (2 * 2 + 1) * 32


def test_wrap_matching_linears_wraps_once_and_names_the_layers_when_nothing_matches():
    model = tiny_llama()
    wrap_matching_linears(model, ("down_proj",), lambda lin: nn.Sequential(lin), lambda n: False, skip=(nn.Sequential,))
    assert all(isinstance(layer.mlp.down_proj, nn.Sequential) for layer in decoder_layers(model))
    with pytest.raises(ValueError, match="matched no nn.Linear"):  # the wrapped Linear inside is skipped
        wrap_matching_linears(model, r".*down_proj.*", nn.Sequential, lambda n: False, skip=(nn.Sequential,))
    with pytest.raises(ValueError, match=r"target_modules=\('ffn',\) matched no nn.Linear.*'q_proj'"):
        wrap_matching_linears(model, ("ffn",), nn.Sequential, lambda n: True)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got int"):
        decoder_layers(3)


def test_old_import_paths_give_the_same_objects():
    for module, names in (
        (llmlab.lora, ("replace_module", "wrap_matching_linears", "count_trainable_parameters", "name_matches")),
        (llmlab.prompt_tuning, ("ModelGeometry", "input_embedding", "freeze", "trainable_parameters")),
        (llmlab.adapters, ("decoder_layers",)),
    ):
        for name in names:
            assert getattr(module, name) is getattr(peft_utils, name), (module.__name__, name)

"""llmlab.peft_domain: the recipes are deterministic, written only in the shipped checkpoint's
characters, and new to the shipped model (new words, and a much higher loss than its own stories)."""

import re

import pytest
import torch

from llmlab.checkpoint import load_pretrained, pretrained_dir, read_config
from llmlab.data import generate_corpus, train_val_split
from llmlab.peft_domain import RECIPE_CHARS, generate_recipes
from llmlab.train import heldout_loss


def test_recipes_are_deterministic_seeded_and_prefix_stable():
    text = generate_recipes(20_000, seed=0)
    assert len(text) >= 20_000 and text == generate_recipes(20_000, seed=0)
    assert generate_recipes(20_000, seed=1) != text
    assert text.startswith(generate_recipes(2_000, seed=0))
    assert text.endswith("\n\n") and text.startswith("Recipe for ")


def test_every_character_is_in_the_shipped_vocabulary():
    text = generate_recipes(300_000, seed=7)
    shipped = set(read_config(pretrained_dir())["tokenizer"]["chars"])
    assert set(text) == RECIPE_CHARS  # the documented set, all of it used
    assert RECIPE_CHARS <= shipped, sorted(RECIPE_CHARS - shipped)


def test_each_recipe_has_title_ingredients_method_and_ending():
    recipes = [r for r in generate_recipes(30_000, seed=2).split("\n\n") if r]
    for recipe in recipes:
        title, ingredients, method, ending = recipe.split("\n")
        assert re.fullmatch(r"Recipe for [a-z]+ [a-z]+ [a-z]+\.", title), title
        assert ingredients.startswith("You need ") and ingredients.endswith(".")
        assert method.count(".") >= 4 and "Then " in method
        assert ending.startswith("Serves ")


def test_the_domain_is_new_to_the_shipped_model():
    recipe_words = set(re.findall(r"[a-z]+", generate_recipes(100_000).lower()))
    story_words = set(re.findall(r"[a-z]+", generate_corpus().lower()))
    assert len(recipe_words - story_words) > 0.5 * len(recipe_words)  # most of its words never occur in the stories
    model, tokenizer = load_pretrained()
    _, recipes_val = train_val_split(torch.tensor(tokenizer.encode(generate_recipes(100_000))))
    _, stories_val = train_val_split(torch.tensor(tokenizer.encode(generate_corpus())))
    new = heldout_loss(model, recipes_val, 128, max_windows=8)
    old = heldout_loss(model, stories_val, 128, max_windows=8)
    assert new > 3.0 > 1.0 > old, (new, old)


@pytest.mark.parametrize("kwargs,error", [({"num_chars": 0}, ValueError), ({"num_chars": 10, "seed": 1.5}, TypeError)])
def test_bad_arguments_raise_clear_errors(kwargs, error):
    with pytest.raises(error, match="num_chars|seed"):
        generate_recipes(**kwargs)

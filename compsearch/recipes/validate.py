"""Check that a recipe fits a model: every layer key names something the model has."""

from __future__ import annotations

import difflib
import re

from torch import nn

from compsearch.errors import RecipeError
from compsearch.fingerprint import model_fingerprint
from compsearch.recipes.schema import REGEX_PREFIX, Recipe


def validate(recipe: Recipe, model: nn.Module, check_fingerprint: bool = True) -> None:
    """Raise RecipeError if a key names no module of ``model`` or the fingerprint differs.

    Exact keys must be module names of ``model``; ``re:`` keys must match at least one. With
    ``check_fingerprint``, a recipe that records a model fingerprint only applies to that model.
    """
    names = [name for name, _ in model.named_modules() if name]
    known = set(names)
    for key in recipe.layers:
        if key.startswith(REGEX_PREFIX):
            pattern = re.compile(key[len(REGEX_PREFIX) :])
            if not any(pattern.fullmatch(name) for name in names):
                raise RecipeError(
                    f"recipe.layers[{key!r}]: expected a pattern that matches at least one module "
                    f"of the model, but it matches none. Module names look like "
                    f"{', '.join(repr(n) for n in names[:5])}."
                )
        elif key not in known:
            close = difflib.get_close_matches(key, names, n=3)
            hint = f" Close names: {', '.join(map(repr, close))}." if close else ""
            raise RecipeError(
                f"recipe.layers[{key!r}]: expected the fully qualified name of a module of the "
                f"model, but the model has no module {key!r}.{hint}"
            )
    wanted = recipe.provenance.model_fingerprint
    if check_fingerprint and wanted is not None:
        actual = model_fingerprint(model)
        if actual != wanted:
            raise RecipeError(
                f"recipe.provenance.model_fingerprint: expected {actual} (the model it is applied "
                f"to), but the recipe was made for {wanted}. Apply it to the model it was made for, "
                "or remove provenance.model_fingerprint to apply it to this one on purpose."
            )

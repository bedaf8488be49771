"""Recipe files: versioned YAML, read with ``safe_load`` only, written atomically.

A file compsearch writes starts with :data:`HEADER` and ends with :data:`FOOTER`. A file that has the
header but not the footer was cut short (a copy broke off, a disk filled) and is refused, since YAML
would otherwise read the part that survived as a smaller, valid recipe. Hand-written recipes carry
neither line and are read as they are; editing the body of a written one is fine.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from compsearch._files import write_text_atomic
from compsearch._schema import yaml_error
from compsearch.errors import RecipeError
from compsearch.recipes.schema import Recipe

HEADER = "# compsearch recipe\n"
FOOTER = "# end of recipe\n"


def dumps(recipe: Recipe) -> str:
    body = yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=False)
    return HEADER + body + FOOTER


def loads(text: str, source: str = "<string>") -> Recipe:
    if text.startswith(HEADER) and not text.rstrip().endswith(FOOTER.strip()):
        raise RecipeError(
            f"{source}: expected a complete recipe ending with {FOOTER.strip()!r}, but the file "
            "stops before it (truncated). Export or copy the recipe again."
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(yaml_error(source, error, "a YAML recipe")) from None
    if data is None:
        raise RecipeError(f"{source}: expected a YAML recipe, but the file is empty.")
    try:
        return Recipe.from_dict(data)
    except RecipeError as error:
        raise RecipeError(f"{source}: {error}") from None


def read_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"expected a recipe file, but {str(path)!r} does not exist.")
    return loads(path.read_text(encoding="utf-8"), source=str(path))


def write_recipe(recipe: Recipe, path: str | os.PathLike) -> Path:
    return write_text_atomic(Path(path), dumps(recipe))

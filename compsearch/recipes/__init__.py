"""Recipes: the schema, YAML I/O and validation against a model."""

from compsearch.recipes.io import dumps, loads, read_recipe, write_recipe
from compsearch.recipes.schema import (
    A_BITS,
    FLOAT_BITS,
    GROUP_SIZES,
    RECIPE_VERSION,
    W_BITS,
    CalibrationPlan,
    DistillPlan,
    FinetuneBudget,
    LayerPlan,
    Provenance,
    PrunePlan,
    Recipe,
)
from compsearch.recipes.validate import validate

__all__ = [
    "A_BITS",
    "FLOAT_BITS",
    "GROUP_SIZES",
    "RECIPE_VERSION",
    "W_BITS",
    "CalibrationPlan",
    "DistillPlan",
    "FinetuneBudget",
    "LayerPlan",
    "Provenance",
    "PrunePlan",
    "Recipe",
    "dumps",
    "loads",
    "read_recipe",
    "validate",
    "write_recipe",
]

"""compsearch: joint search over quantization, structured pruning and distillation.

Judged on measured accuracy, latency and size of the artifact that would ship. See README.md.
"""

from compsearch.errors import (
    CompsearchError,
    ConfigError,
    KernelError,
    RecipeError,
    SpaceError,
    StorageError,
    TaskError,
    TrialError,
)
from compsearch.recipes import LayerPlan, Recipe, read_recipe, validate, write_recipe
from compsearch.tasks import Task, get_task

__version__ = "0.1.0"


def load(path, task=None, device="cpu", trust_task=False):
    """The deploy-form model stored at ``path`` (a ``model.safetensors`` or its folder); see
    :func:`compsearch.final.load`. A task the artifact names is only imported or fetched when it is
    built in, comes from a study in this runs root, or ``trust_task=True`` (or ``task=`` given)."""
    from compsearch.final import load as _load

    return _load(path, task, device, trust_task)


__all__ = [
    "CompsearchError",
    "ConfigError",
    "KernelError",
    "LayerPlan",
    "Recipe",
    "RecipeError",
    "SpaceError",
    "StorageError",
    "Task",
    "TaskError",
    "TrialError",
    "__version__",
    "get_task",
    "load",
    "read_recipe",
    "validate",
    "write_recipe",
]

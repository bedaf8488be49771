"""compsearch: joint search over quantization, structured pruning and distillation.

Judged on measured accuracy, latency and size of the artifact that would ship. See README.md.
"""

from compsearch.errors import (
    CompsearchError,
    ConfigError,
    ExportError,
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
    built in, or with ``trust_task=True`` (or ``task=`` given)."""
    from compsearch.final import load as _load

    return _load(path, task, device, trust_task)


def compress(task, recipe, steps=None, device="cpu"):
    """Compress ``task``'s teacher as ``recipe`` says (prune → quantize → calibrate → distil →
    deploy) — the one path trials and the final run take; see :func:`compsearch.pipeline.compress`.
    ``task`` is a Task or a built-in task name."""
    from compsearch.pipeline import compress as _compress

    return _compress(get_task(task) if isinstance(task, str) else task, recipe, steps, device)


def __getattr__(name: str):
    """``compsearch.search(config)`` without importing the search package up front (it imports
    the pipeline and every kernel); the package is callable (see compsearch.search)."""
    if name == "search":
        import importlib

        return importlib.import_module("compsearch.search")
    raise AttributeError(f"module 'compsearch' has no attribute {name!r}")


__all__ = [
    "CompsearchError",
    "ConfigError",
    "ExportError",
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
    "compress",
    "get_task",
    "load",
    "read_recipe",
    "search",
    "validate",
    "write_recipe",
]

"""Tasks: built-ins by name, and plug-ins by import path (``mypkg.module:make_task``)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path

from compsearch.errors import TaskError
from compsearch.tasks.base import Batch, Outputs, Task, model_device, move

#: built-in task name -> "module:factory"; imported only when asked for
BUILTINS: dict[str, str] = {
    "digits": "compsearch.tasks.digits:make_task",
    "mnist": "compsearch.tasks.mnist:make_task",
    "minilm": "compsearch.tasks.minilm:make_task",
    "vlm-mnist": "compsearch.tasks.vlm:make_task",
    "smollm": "compsearch.tasks.language:make_smollm",
}


def get_task(spec: str, runs_root: Path | None = None) -> Task:
    """Build a task from a built-in name or a ``module.path:factory`` plug-in spec.

    The factory is called with ``runs_root`` (where a trained teacher may be cached) and must
    return a :class:`Task`.
    """
    factory = _factory(spec)
    refused = TaskError(
        f"task {spec!r}: expected a factory that takes the keyword argument runs_root and "
        f"returns a compsearch.tasks.Task, but {spec.partition(':')[2] or spec!r} does not take "
        "it. Point the task at a function like make_task(runs_root=None)."
    )
    try:
        inspect.signature(factory).bind(runs_root=runs_root)
    except TypeError:
        raise refused from None
    except ValueError:  # a builtin without a readable signature: try it
        try:
            task = factory(runs_root=runs_root)
        except TypeError:
            raise refused from None
    else:
        task = factory(runs_root=runs_root)
    if not isinstance(task, Task):
        raise TaskError(
            f"task {spec!r}: expected the factory to return a compsearch.tasks.Task, but it "
            f"returned {type(task).__name__}. Subclass compsearch.tasks.Task."
        )
    return task


def _factory(spec: str) -> Callable[..., Task]:
    if not isinstance(spec, str) or not spec:
        raise TaskError(f"expected a task name or 'module.path:factory', but got {spec!r}.")
    if spec.startswith("hf:"):
        from compsearch.tasks.language import make_hf

        return lambda runs_root=None: make_hf(spec, runs_root)
    target = BUILTINS.get(spec)
    if target is None:
        if ":" not in spec:
            names = ", ".join(sorted(BUILTINS))
            raise TaskError(
                f"expected a built-in task ({names}), 'hf:<model folder>' or a plug-in "
                f"'module.path:factory', but got {spec!r}."
            )
        target = spec
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise TaskError(
            f"task {spec!r}: expected an importable module {module_name!r}, but importing it "
            f"failed ({error}). Check the spelling and that it is on PYTHONPATH."
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise TaskError(
            f"task {spec!r}: expected {module_name} to define a callable {attribute!r}, but it "
            "does not."
        )
    return factory


__all__ = ["BUILTINS", "Batch", "Outputs", "Task", "get_task", "model_device", "move"]

"""Replacing a module inside a model: every registration of it, with its hooks carried over; and
:func:`transaction`, which undoes a kernel's changes to a model when the kernel raises.

Hooks matter: Hugging Face models record hidden states and attentions through forward hooks that
are installed once, on the module instances; a replacement without them would silently drop those
outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

_REGISTRIES = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered in ``model`` (it may be under several names)."""
    if new is not old:
        for attribute in _HOOK_DICTS:
            hooks = getattr(old, attribute, None)
            if hooks:
                getattr(new, attribute).update(hooks)
    for module in model.modules():
        for key, child in list(module._modules.items()):
            if child is old:
                module._modules[key] = new


def replace_by_name(model: nn.Module, name: str, new: nn.Module) -> None:
    replace_module(model, model.get_submodule(name), new)


@contextlib.contextmanager
def transaction(model: nn.Module) -> Iterator[None]:
    """If the block raises, put every module of ``model`` back as it was: its class, attributes and
    registered parameters, buffers and children (the same tensor objects, so bit-identical).

    Kernels change models by replacing modules and tensors, never by writing into a tensor that was
    there before, so this shallow record is a complete one; a kernel that writes in place (the
    masked check of pruning) restores what it wrote itself.
    """
    saved = []
    for module in model.modules():
        state = dict(module.__dict__)
        for key in _REGISTRIES:
            if key in state:
                state[key] = type(state[key])(state[key])
        saved.append((module, type(module), state))
    try:
        yield
    except BaseException:
        for module, cls, state in saved:
            module.__class__ = cls
            module.__dict__.clear()
            module.__dict__.update(state)
        raise

"""Replacing a module inside a model: every registration of it, with its hooks carried over.

Hooks matter: Hugging Face models record hidden states and attentions through forward hooks that
are installed once, on the module instances; a replacement without them would silently drop those
outputs.
"""

from __future__ import annotations

from torch import nn

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

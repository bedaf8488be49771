"""The joint search space: discovery from the model, config menus and rules, suggest → Recipe."""

from compsearch.spaces.config import Menu, Range, Rule, SpaceConfig, parse_space
from compsearch.spaces.discover import ModelInfo, discover
from compsearch.spaces.space import Choice, Space, menu_formats

__all__ = [
    "Choice",
    "Menu",
    "ModelInfo",
    "Range",
    "Rule",
    "Space",
    "SpaceConfig",
    "discover",
    "menu_formats",
    "parse_space",
]

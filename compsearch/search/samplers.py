"""Samplers by name, or a user's own Optuna sampler from ``module.path:factory``.

A built-in name maps to a factory of the study config; a ``module:factory`` spec names a callable
that takes the :class:`~compsearch.search.config.StudyConfig` and returns an Optuna
``BaseSampler`` — so a new sampler is one new file, used by both drivers (the Ray driver hands the
same sampler to ``OptunaSearch``). A spec is imported only because the user's own config names it.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna

from compsearch._plugins import import_target
from compsearch.errors import ConfigError

SamplerFactory = Callable[..., optuna.samplers.BaseSampler]


def _nsga2(config) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(
        population_size=config.search.population_size, seed=config.search.seed
    )


def _tpe(config) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(
        multivariate=True, seed=config.search.seed, n_startup_trials=5
    )


def _surrogate(config) -> optuna.samplers.BaseSampler:
    from compsearch.search.surrogate import SurrogateSampler

    return SurrogateSampler(_nsga2(config), config, seed=config.search.seed)


SAMPLERS: dict[str, SamplerFactory] = {
    "surrogate": _surrogate,
    "nsga2": _nsga2,
    "tpe": _tpe,
    "gp": lambda config: optuna.samplers.GPSampler(seed=config.search.seed),
    "random": lambda config: optuna.samplers.RandomSampler(seed=config.search.seed),
    "qmc": lambda config: optuna.samplers.QMCSampler(seed=config.search.seed),
}


def is_plugin(name: str) -> bool:
    module, _, attribute = name.partition(":")
    return bool(module and attribute)


def make_sampler(config) -> optuna.samplers.BaseSampler:
    """The study's sampler: a built-in by name or a ``module:factory`` plug-in."""
    name = config.search.sampler
    if name in SAMPLERS:
        return SAMPLERS[name](config)
    sampler = import_target(name, "search.sampler", ConfigError)(config)
    if not isinstance(sampler, optuna.samplers.BaseSampler):
        raise ConfigError(
            f"search.sampler {name!r}: expected the factory to return an optuna BaseSampler, but it "
            f"returned {type(sampler).__name__}."
        )
    return sampler

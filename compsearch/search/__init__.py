"""The search: study config, drivers (Optuna embedded / workers, Ray), halving, results.

``compsearch.search(config)`` runs a study from Python; since this package is also named
``compsearch.search``, the package itself is callable (:func:`run_study`), so the call works
whether or not the package was imported first.
"""

import os
import sys
import types

from compsearch.search.config import StudyConfig, parse_config, read_config
from compsearch.search.driver import Driver, SearchSummary, load_driver
from compsearch.search.results import StudyResults, load_results
from compsearch.search.study import StudyFolder, folder_for


def run_study(config) -> StudyResults:
    """Run (or resume) a study, as ``compsearch search CONFIG`` does: ``config`` is a YAML file's
    path or the same data as a dict. Returns the study's results (trials, front, hypervolume)."""
    from compsearch.paths import runs_root
    from compsearch.search.study import open_study

    study = read_config(config) if isinstance(config, (str, os.PathLike)) else parse_config(config)
    folder = folder_for(study, runs_root())
    folder.check_resume(study)
    load_driver(study.search.driver)(study, folder).run()
    return load_results(open_study(study, folder))


class _CallablePackage(types.ModuleType):
    def __call__(self, config) -> StudyResults:
        return run_study(config)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = [
    "Driver",
    "SearchSummary",
    "StudyConfig",
    "StudyFolder",
    "StudyResults",
    "folder_for",
    "load_driver",
    "load_results",
    "parse_config",
    "read_config",
    "run_study",
]

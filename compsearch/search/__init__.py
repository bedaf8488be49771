"""The search: study config, drivers (Optuna embedded / workers, Ray), halving, results."""

from compsearch.search.config import StudyConfig, parse_config, read_config
from compsearch.search.driver import Driver, SearchSummary, load_driver
from compsearch.search.results import StudyResults, load_results
from compsearch.search.study import StudyFolder, folder_for

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
]

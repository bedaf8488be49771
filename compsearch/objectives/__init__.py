"""Objectives (accuracy, size, latency, proxies) and constraints, measured on what ships."""

from compsearch.objectives.accuracy import AccuracyObjective
from compsearch.objectives.base import Candidate, MeasureSetup, Objective
from compsearch.objectives.constraints import Constraint, parse_constraint
from compsearch.objectives.latency import (
    LatencyObjective,
    LatencyResult,
    measure_latency,
    median_ci,
)
from compsearch.objectives.lut import LatencyTable
from compsearch.objectives.proxies import (
    BitOpsObjective,
    MacsObjective,
    bitops,
    count_macs,
    count_macs_by_layer,
)
from compsearch.objectives.registry import OBJECTIVES, build_objectives, objective_class
from compsearch.objectives.size import SizeObjective, float_artifact

__all__ = [
    "OBJECTIVES",
    "AccuracyObjective",
    "BitOpsObjective",
    "Candidate",
    "Constraint",
    "LatencyObjective",
    "LatencyResult",
    "LatencyTable",
    "MacsObjective",
    "MeasureSetup",
    "Objective",
    "SizeObjective",
    "bitops",
    "build_objectives",
    "count_macs",
    "count_macs_by_layer",
    "float_artifact",
    "measure_latency",
    "median_ci",
    "objective_class",
    "parse_constraint",
]

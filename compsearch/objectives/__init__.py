"""Objectives (accuracy, size, latency, proxies) and constraints, measured on what ships."""

from compsearch.objectives.accuracy import AccuracyObjective
from compsearch.objectives.base import Candidate, Objective
from compsearch.objectives.constraints import Constraint, parse_constraint
from compsearch.objectives.latency import LatencyObjective, LatencyResult, measure_latency
from compsearch.objectives.lut import LatencyTable
from compsearch.objectives.proxies import MacsObjective, bitops, count_macs, count_macs_by_layer
from compsearch.objectives.size import SizeObjective, float_artifact

__all__ = [
    "AccuracyObjective",
    "Candidate",
    "Constraint",
    "LatencyObjective",
    "LatencyResult",
    "LatencyTable",
    "MacsObjective",
    "Objective",
    "SizeObjective",
    "bitops",
    "count_macs",
    "count_macs_by_layer",
    "float_artifact",
    "measure_latency",
    "parse_constraint",
]

"""Reading a study back: its trials, the feasible Pareto front and its hypervolume.

Works from the storage alone (plus the frozen config), whichever driver ran the study.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial, TrialState

from compsearch.search.pareto import hypervolume, non_dominated, normalize, reference_point

STUDY_ATTR = "compsearch"


@dataclass
class TrialRow:
    number: int
    state: str
    values: dict[str, float]
    measured: dict[str, float]
    violation: float
    params: dict
    reason: str = ""
    rung: int | None = None
    screened: str = ""  # the hard bounds it broke before training (then it was not fine-tuned)

    @property
    def feasible(self) -> bool:
        return self.violation <= 0


@dataclass
class StudyResults:
    objectives: list[str]
    metric: str
    direction: str
    teacher: dict[str, float]
    rows: list[TrialRow] = field(default_factory=list)
    #: plug-in objectives: config name -> (measured key, direction)
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.state] = out.get(row.state, 0) + 1
        return out

    def point(self, row: TrialRow) -> tuple[float, ...]:
        return normalize(row.measured, self.objectives, self.metric, self.direction, self.teacher,
                         self.keys)  # fmt: skip

    def front(self) -> list[TrialRow]:
        """Completed, feasible, non-dominated trials (stopped and failed ones never count)."""
        candidates = [r for r in self.rows if r.state == "COMPLETE" and r.feasible]
        points = [self.point(r) for r in candidates]
        return [candidates[i] for i in non_dominated(points)]

    def hypervolume(self, rows: list[TrialRow] | None = None) -> float:
        rows = self.front() if rows is None else rows
        return hypervolume([self.point(r) for r in rows], reference_point(self.objectives))


def _row(trial: FrozenTrial, objectives: list[str], metric: str) -> TrialRow:
    measured = dict(trial.user_attrs.get("measured", {}))
    values = {}
    if trial.values is not None:
        values = dict(zip(objectives, trial.values, strict=True))
    rungs = [int(k[5:]) for k in trial.user_attrs if k.startswith("rung_")]
    return TrialRow(
        trial.number,
        trial.state.name,
        values,
        measured,
        float(trial.user_attrs.get("violation", 0.0)),
        dict(trial.params),
        trial.user_attrs.get("fail_reason", ""),
        max(rungs) if rungs else None,
        trial.user_attrs.get("screened", ""),
    )


def load_results(study: optuna.Study) -> StudyResults:
    info = study.user_attrs.get(STUDY_ATTR)
    if info is None:
        from compsearch.errors import StorageError

        raise StorageError(
            f"study {study.study_name!r}: expected a compsearch study (with its '{STUDY_ATTR}' "
            "attributes), but this storage holds another kind of study."
        )
    keys = {name: tuple(entry) for name, entry in info.get("keys", {}).items()}
    results = StudyResults(info["objectives"], info["metric"], info["direction"], info["teacher"],
                           keys=keys)  # fmt: skip
    for trial in study.get_trials(deepcopy=False):
        if trial.state in (TrialState.WAITING,):
            continue
        results.rows.append(_row(trial, info["objectives"], info["metric"]))
    return results

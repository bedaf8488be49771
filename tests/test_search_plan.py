"""Screening, sensitivity, one-shot ILP plans and the surrogate sampler."""

import itertools
import json

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from compsearch.cli import main
from compsearch.recipes import read_recipe
from compsearch.search import StudyFolder, parse_config
from compsearch.search.plan import ladder, solve
from compsearch.search.results import STUDY_ATTR
from compsearch.search.sensitivity import ATTR, Sensitivity
from compsearch.search.study import open_study
from compsearch.search.surrogate import ROLE, SurrogateSampler
from tests.test_search import tiny, write


def _study(runs_root, name):
    folder = StudyFolder(runs_root / name)
    return open_study(folder.frozen(), folder)


# -- screening -------------------------------------------------------------------------------------


def test_a_candidate_over_a_hard_bound_is_screened_not_trained(tmp_path, runs_root, monkeypatch):
    import compsearch.pipeline as pipeline

    def no_training(*args, **kwargs):
        raise AssertionError("a screened candidate was fine-tuned")

    monkeypatch.setattr(pipeline, "finetune", no_training)
    data = tiny("screen-all", baselines=False, plans=0, trials=2, preflight=False)
    data["constraints"]["size_bytes"] = 1000  # no recipe of the digits model is this small
    data["latency"]["repeats"] = 10  # a screened candidate's latency stops at the sixth pair
    assert main(["search", str(write(tmp_path, data))]) == 0
    study = _study(runs_root, "screen-all")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for trial in trials:
        assert "size_bytes over by" in trial.user_attrs["screened"]
        assert trial.user_attrs["steps"] == 0
        assert trial.user_attrs["violation"] > 0
        measured = trial.user_attrs["measured"]
        assert measured["size_bytes"] > 1000 and measured["latency_ms"] > 0
        assert measured["latency_runs"] == 6 and measured["latency_settled"] == 1
        assert 0 < measured["accuracy"] <= 1  # the zero-shot deploy form, evaluated
        metrics = json.loads((runs_root / "screen-all" / "trials" / f"{trial.number:05d}" /
                              "metrics.json").read_text())  # fmt: skip
        assert metrics["screened"] and "finetune" not in metrics["timings"]


def test_an_empty_front_explains_itself_and_exports_the_closest_marked(tmp_path, runs_root,
                                                                        capsys):  # fmt: skip
    data = tiny("explained", baselines=False, plans=0, trials=2, preflight=False)
    data["constraints"]["size_bytes"] = 1000  # no point meets it (pre-flight off to get here)
    assert main(["search", str(write(tmp_path, data))]) == 0
    folder = runs_root / "explained"
    capsys.readouterr()
    assert main(["status", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "the feasible front has 0 of 2 measured trials" in out
    assert "size <= 1 KB: broken by 2" in out and "closest: trial" in out
    assert "--allow-infeasible" in out
    assert main(["export", str(folder)]) == 2  # no feasible point: the plain export refuses
    assert main(["export", str(folder), "--allow-infeasible"]) == 0
    assert "INFEASIBLE" in capsys.readouterr().out
    recipe = read_recipe(folder / "recipes" / "infeasible-0.yaml")
    assert recipe.provenance.infeasible["size <= 1 KB"] > 0
    # optuna-dashboard on the same storage, through its own API: named objectives, trials marked
    # infeasible, and (through `compsearch dashboard`) no infeasible trial among its best trials
    study = _dashboard_study(folder, patched=False)
    assert study["objective_names"] == ["accuracy", "latency_ms", "size_bytes"]
    assert all(any(c > 0 for c in t["constraints"]) for t in study["trials"])
    assert study["best_trials"], "unpatched, the dashboard calls infeasible trials best"
    assert _dashboard_study(folder, patched=True)["best_trials"] == []


def _dashboard_study(folder, patched: bool) -> dict:
    import io
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard import _app, wsgi

    from compsearch.cli.dashboard import constraint_aware
    from compsearch.search.storage import open_storage

    storage = open_storage(None, folder)
    original = _app.get_pareto_front_trials
    try:
        if patched:
            assert constraint_aware(_app)
        environ: dict = {}
        setup_testing_defaults(environ)
        study_id = storage.get_study_id_from_name(folder.name)
        environ.update(PATH_INFO=f"/api/studies/{study_id}", QUERY_STRING="after=0",
                       REQUEST_METHOD="GET", **{"wsgi.input": io.BytesIO()})  # fmt: skip
        body = b"".join(wsgi(storage)(environ, lambda *status_headers: None))
    finally:
        _app.get_pareto_front_trials = original
    return json.loads(body)


def test_preflight_refuses_a_bound_no_point_of_the_space_reaches(tmp_path, runs_root, capsys):
    data = tiny("unreachable", trials=2)
    data["constraints"]["size_bytes"] = 1000
    assert main(["search", str(write(tmp_path, data))]) == 2
    error = capsys.readouterr().err
    line = next(line for line in error.splitlines() if line.startswith("error:"))
    assert "constraints.size_bytes: 1 KB is out of reach" in line
    assert "the cheapest point of the space (formats w4" in line and "raise the bound" in line
    assert not (runs_root / "unreachable").exists(), "nothing may be stored for a refused study"


def _measured_by_preflight(monkeypatch) -> list[dict]:
    """What the pre-flight check measured, point by point, in the runs that follow."""
    import compsearch.search.preflight as preflight

    seen, measure = [], preflight.untrained_measure

    def spy(*args, **kwargs):
        measured, result = measure(*args, **kwargs)
        seen.append(measured)
        return measured, result

    monkeypatch.setattr(preflight, "untrained_measure", spy)
    return seen


def test_preflight_stops_timing_a_point_clearly_past_the_latency_bound(tmp_path, runs_root,
                                                                       capsys, monkeypatch):  # fmt: skip
    seen = _measured_by_preflight(monkeypatch)
    data = tiny("too-fast", trials=2)
    data["constraints"]["latency_ms"] = "0.01x"  # no recipe of the space is 100x faster
    data["latency"]["repeats"] = 20
    assert main(["search", str(write(tmp_path, data))]) == 2
    assert "constraints.latency_ms: 0.01x is out of reach" in capsys.readouterr().err
    assert len(seen) == 3, "every cheapest point is measured before a bound is refused"
    for measured in seen:  # six pairs settle it, as for a screened trial
        assert measured["latency_settled"] == 1.0 and measured["latency_runs"] == 6


def test_preflight_passes_a_relative_bound_the_space_reaches(tmp_path, runs_root, capsys,
                                                             monkeypatch):  # fmt: skip
    seen = _measured_by_preflight(monkeypatch)
    data = tiny("reachable", trials=1, baselines=False, plans=0)
    data["constraints"].update(size_bytes="0.5x", latency_ms="3x")
    assert main(["search", str(write(tmp_path, data))]) == 0
    assert len(seen) == 1, "a point that meets every bound ends the check"
    assert "pre-flight" in capsys.readouterr().err
    study = _study(runs_root, "reachable")
    (trial,) = study.get_trials()
    names = study.user_attrs[STUDY_ATTR]["constraint_names"]
    constraints = dict(zip(names, trial.constraints.values(), strict=True))
    assert set(constraints) == {"accuracy_drop", "size_bytes", "latency_ms"}
    measured = trial.user_attrs["measured"]
    # the size bound is checked on the file's ratio to the teacher's, latency on the interleaved one
    assert constraints["size_bytes"] == pytest.approx(1 / measured["size_ratio"] - 0.5)
    assert constraints["latency_ms"] == pytest.approx(1 / measured["speedup"] - 3)


def test_screening_off_trains_every_candidate(tmp_path, runs_root):
    data = tiny("screen-off", baselines=False, plans=0, trials=1, screen=False, preflight=False)
    data["constraints"]["size_bytes"] = 1000
    assert main(["search", str(write(tmp_path, data))]) == 0
    (trial,) = _study(runs_root, "screen-off").get_trials()
    assert "screened" not in trial.user_attrs and trial.user_attrs["steps"] == 4


# -- the integer program ---------------------------------------------------------------------------


def _table() -> Sensitivity:
    """Three units with known losses and costs (log-linear costs, as the cost model fits them)."""
    options = {}
    menu = {"w4": (0.30, 0.25), "w8": (0.02, 0.5), "float": (0.0, 1.0)}
    for unit, weight in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        options[f"fmt:{unit}"] = {
            label: {"loss": loss * weight * 10, "size_bytes": 1000 * (1 - weight + weight * ratio)}
            for label, (loss, ratio) in menu.items()
        }
    return Sensitivity({"loss": 0.0, "size_bytes": 1000.0},
                       {f"fmt:{u}": "float" for u in "abc"}, options)  # fmt: skip


@pytest.mark.parametrize("bound", [950.0, 800.0, 650.0, 500.0, 420.0])
def test_the_ilp_finds_the_least_sensitive_combination_within_the_bound(bound):
    table = _table()
    best = None
    for combo in itertools.product(*(table.options[p] for p in table.options)):
        params = dict(zip(table.options, combo, strict=True))
        guess = table.predict(params)
        if guess["size_bytes"] <= bound and (best is None or guess["loss"] < best[1] - 1e-12):
            best = (params, guess["loss"])
    chosen = solve(table, {"size_bytes": bound})
    assert best is not None and chosen is not None
    assert table.predict(chosen)["size_bytes"] <= bound * (1 + 1e-9)
    assert table.predict(chosen)["loss"] == pytest.approx(best[1])


def test_an_unreachable_bound_has_no_plan():
    assert solve(_table(), {"size_bytes": 10.0}) is None


def test_the_ladder_tightens_a_bound_its_measurement_breaks():
    table = _table()

    def measure(params):  # the real model is 20 % larger than the cost model predicts
        return {"size_bytes": table.predict(params)["size_bytes"] * 1.2}

    plans = ladder(table, {"size_bytes": 900.0}, 3, measure)
    assert len(plans) >= 2
    for plan in plans:
        assert plan.measured["size_bytes"] <= plan.bounds["size_bytes"] * (1 + 1e-9)
    sizes = [p.measured["size_bytes"] for p in plans]
    assert sizes == sorted(sizes, reverse=True)  # most accurate first, cheaper after


def test_a_rung_left_out_says_why(monkeypatch):
    monkeypatch.setattr("compsearch.search.plan.LEARN_WEIGHT", 0)  # the cost model as measured
    table = _table()

    def measure(params):  # 50 % over the prediction, and one solve cannot make it up
        return {"size_bytes": table.predict(params)["size_bytes"] * 1.5}

    lines: list[str] = []
    assert ladder(table, {"size_bytes": 650.0}, 3, measure, rounds=1, log=lines.append) == []
    assert len(lines) == 3, lines
    assert all("left out: still over after 1 solve: size_bytes" in line for line in lines), lines
    assert ladder(table, {"size_bytes": 650.0}, 3, measure, rounds=4), "more solves find one"


def test_a_rung_over_its_aim_but_within_the_bound_keeps_its_plan():
    """30 % over every prediction and one solve per rung: the rungs that aim under the bound
    miss their aims, yet their plans meet the study's bound, so they stay, under that bound."""
    table = _table()
    lines: list[str] = []
    plans = ladder(table, {"size_bytes": 900.0}, 3,
                   lambda params: {"size_bytes": table.predict(params)["size_bytes"] * 1.3},
                   rounds=1, log=lines.append)  # fmt: skip
    assert plans and any("kept under the study's bound" in line for line in lines), lines
    for plan in plans:
        assert plan.measured["size_bytes"] <= plan.bounds["size_bytes"] <= 900.0


def test_the_ladder_learns_a_cost_its_single_changes_mispredict():
    """A cost with a fixed floor (700 + 0.3x the single changes' prediction: most of mnist's
    latency is per-operator time no single change removes): fitted again with what it measures,
    the ladder plans every rung within its aim; with the table as measured, it ends two rungs
    over their aims and loses the third."""
    table = _table()
    lines: list[str] = []
    plans = ladder(table, {"size_bytes": 900.0}, 3,
                   lambda params: {"size_bytes": 700 + 0.3 * table.predict(params)["size_bytes"]},
                   log=lines.append)  # fmt: skip
    assert len(plans) == 3 and lines == []
    for plan in plans:
        assert plan.measured["size_bytes"] <= plan.bounds["size_bytes"] <= 900.0
    assert table.to_dict() == _table().to_dict(), "the study's table stays as measured"
    with pytest.MonkeyPatch.context() as patch:  # the same ladder without learning
        patch.setattr("compsearch.search.plan.LEARN_WEIGHT", 0)
        lines = []
        unlearned = ladder(table, {"size_bytes": 900.0}, 3,
                           lambda params: {"size_bytes": 700 + 0.3 * table.predict(params)["size_bytes"]},
                           log=lines.append)  # fmt: skip
    assert len(unlearned) == 2 and sum("over its aim" in line for line in lines) == 2, lines


def test_a_bound_the_cheapest_combination_breaks_has_no_plan():
    """Measured three times the prediction, the cheapest point (predicted 412) is over the
    bound: no rung may aim above it."""
    table = _table()
    lines: list[str] = []
    plans = ladder(table, {"size_bytes": 900.0}, 3,
                   lambda params: {"size_bytes": table.predict(params)["size_bytes"] * 3},
                   log=lines.append)  # fmt: skip
    assert plans == []
    assert lines and "cheapest" in lines[0] and "900" in lines[0]


def test_a_cost_the_study_does_not_bound_never_drops_a_plan():
    """Without a size bound, rungs are spread along the size axis by prediction; a measurement
    over the rung (timer noise, for latency) is recorded, not a reason to lose the plan."""
    table = _table()

    def measure(params):  # always 20 % over what the cost model predicts
        return {"size_bytes": table.predict(params)["size_bytes"] * 1.2}

    free = ladder(table, {}, 3, measure)
    assert len(free) == 3 and all(p.measured for p in free)
    assert any(p.measured["size_bytes"] > p.bounds["size_bytes"] for p in free)
    bounded = ladder(table, {"size_bytes": 1000.0}, 3, measure)  # the same rungs, now a bound
    for plan in bounded:
        assert plan.measured["size_bytes"] <= plan.bounds["size_bytes"] * (1 + 1e-9)


# -- sensitivity and plans on a real model ---------------------------------------------------------


def test_sensitivity_and_plans_on_digits(tmp_path, runs_root, capsys):
    data = tiny("plans", trials=6, plans=3)
    data["constraints"]["size_bytes"] = 20000
    path = write(tmp_path, data)
    assert main(["search", str(path)]) == 0
    study = _study(runs_root, "plans")
    table = Sensitivity.from_dict(study.user_attrs[ATTR])
    assert (runs_root / "plans" / "sensitivity.json").exists()
    for param, entries in table.options.items():
        if param.startswith("fmt:") and {"w4", "w8"} <= set(entries):
            assert entries["w4"]["loss"] > entries["w8"]["loss"]  # fewer bits move the output more
            assert entries["w4"]["size_bytes"] < entries["w8"]["size_bytes"]
    assert table.fit_error["size_bytes"] < 0.2
    for cost in ("size_bytes", "latency_ms"):  # both forms' errors kept; the smaller one in use
        errors = table.model_error[cost]
        assert set(errors) == {"blocks", "log-linear"}
        assert table.model[cost] == min(errors, key=errors.get)
    assert len(table.samples) >= 12 and all(s["costs"]["size_bytes"] > 0 for s in table.samples)
    plans = [t for t in study.get_trials() if "plan" in t.user_attrs]
    assert plans, "no one-shot plan was enqueued"
    for trial in plans:
        assert trial.user_attrs["measured"]["size_bytes"] <= 20000
        assert "predicted" in trial.user_attrs["plan"] and "measured" in trial.user_attrs["plan"]
    capsys.readouterr()
    assert main(["sensitivity", str(runs_root / "plans")]) == 0
    out = capsys.readouterr().out
    assert "fmt:" in out and "cost model for size_bytes" in out and "log-linear" in out
    assert (runs_root / "plans" / "sensitivity.png").stat().st_size > 1000
    assert main(["plan", str(path), "--points", "2"]) == 0
    written = sorted((runs_root / "plans" / "plans").glob("plan-*.yaml"))
    assert written
    recipe = read_recipe(written[0])
    assert recipe.provenance.task == "digits" and recipe.layers


def test_a_plan_s_latency_is_measured_end_to_end_not_read_from_the_latency_table(
    tmp_path, runs_root, monkeypatch
):
    from compsearch.objectives.lut import LatencyTable

    # a table that misses by orders of magnitude: a plan's measured latency must not be it
    monkeypatch.setattr(LatencyTable, "predict", lambda self, model, task: 12345.0)
    data = tiny("plans_timed", trials=6, plans=2)
    data["latency"] = {**data["latency"], "mode": "table"}
    data["constraints"]["size_bytes"] = 20000
    assert main(["search", str(write(tmp_path, data))]) == 0
    study = _study(runs_root, "plans_timed")
    plans = [t.user_attrs["plan"] for t in study.get_trials() if "plan" in t.user_attrs]
    assert plans, "no one-shot plan was enqueued"
    for text in plans:
        measured = float(text.split("measured: ")[1].split("latency_ms ")[1].split(",")[0])
        assert 0 < measured < 1000, text
    teacher = study.user_attrs[STUDY_ATTR]["teacher"]["latency_ms"]
    assert teacher < 1000  # the plans' milliseconds are on the teacher's scale


# -- the surrogate sampler -------------------------------------------------------------------------


def _synthetic_study(seed: int, confidence: float = 0.5) -> optuna.Study:
    """A study whose accuracy drops only with fmt:a = w4 and whose size shrinks with both knobs."""
    config = parse_config({"study": "s", "task": "digits", "constraints": {"accuracy_drop": "3%"},
                           "search": {"finetune_steps": 10}})  # fmt: skip
    sampler = SurrogateSampler(optuna.samplers.RandomSampler(seed=seed), config, seed=seed,
                               startup=6, explore=0, confidence=confidence)  # fmt: skip
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=sampler)
    study.set_user_attr(STUDY_ATTR, {
        "objectives": ["accuracy", "latency_ms", "size_bytes"], "metric": "accuracy",
        "direction": "maximize", "teacher": {"accuracy": 1.0, "latency_ms": 1.0,
                                             "size_bytes": 1000.0}})  # fmt: skip
    return study


def _measure(params):
    bits = {"w4": 4, "w8": 8, "float": 16}[params["fmt:a"]]
    accuracy = 0.7 if bits == 4 else 0.995
    size = 1000 * params["keep:b"] * bits / 16
    return {"accuracy": accuracy, "latency_ms": params["keep:b"], "size_bytes": size}


SPACE = {"fmt:a": CategoricalDistribution(["w4", "w8", "float"]),
         "keep:b": FloatDistribution(0.25, 1.0, step=0.125)}  # fmt: skip


def _tell(study, params):
    measured = _measure(params)
    study.add_trial(create_trial(
        params=params, distributions=SPACE,
        values=[measured["accuracy"], measured["latency_ms"], measured["size_bytes"]],
        user_attrs={"measured": measured, "steps": 10,
                    "violation": max(0.0, (1 - measured["accuracy"]) - 0.03)},
    ))  # fmt: skip


def _ask_and_tell(study) -> optuna.trial.FrozenTrial:
    trial = study.ask(SPACE)
    measured = _measure(trial.params)
    trial.set_user_attr("measured", measured)
    trial.set_user_attr("steps", 10)
    study.tell(trial, [measured["accuracy"], measured["latency_ms"], measured["size_bytes"]])
    return study.trials[trial.number]


@pytest.mark.parametrize("confidence", [0.5, 1.01])  # 1.01: no candidate can be that likely
def test_the_surrogate_learns_to_avoid_what_breaks_the_accuracy_bound(confidence):
    """At the default confidence, and where no candidate is that likely to meet the bounds (a
    tight accuracy bound early in a study): the model still chooses — the likeliest improving
    candidate, not a random point — says it was below its confidence, and reaches the space's
    best feasible recipe (w8 at the smallest keep); once nothing promises a gain, the base
    sampler chooses."""
    guided = guided_w4 = below = 0
    for seed in range(3):
        study = _synthetic_study(seed, confidence)
        for label, keep in (("w4", 1.0), ("w8", 1.0), ("float", 1.0), ("w4", 0.5),
                            ("w8", 0.75), ("float", 0.5), ("w4", 0.25)):  # fmt: skip
            _tell(study, {"fmt:a": label, "keep:b": keep})
        trials = [_ask_and_tell(study) for _ in range(4)]
        assert {"fmt:a": "w8", "keep:b": 0.25} in [t.params for t in trials]
        for trial in trials:
            note = trial.system_attrs.get("surrogate")
            assert (note is None) == (trial.system_attrs[ROLE] == "explore")
            if note is None:
                continue
            guided += 1
            guided_w4 += trial.params["fmt:a"] == "w4"
            below += note["below_confidence"]
            assert note["below_confidence"] == (note["feasible_probability"] < confidence)
    assert guided >= 3 and guided_w4 == 0  # random would pick w4 a third of the time
    if confidence > 1:
        assert below == guided


def test_with_no_feasible_trial_the_surrogate_mutates_the_nearest_misses():
    from compsearch.search.surrogate import NEAREST, _parents

    study = _synthetic_study(0)
    info = study.user_attrs[STUDY_ATTR]
    for violation, screened in ((0.3, ""), (0.01, ""), (0.2, ""), (0.001, "latency_ms"),
                                (0.05, ""), (0.4, "")):  # fmt: skip
        measured = _measure({"fmt:a": "w4", "keep:b": 0.5})
        study.add_trial(create_trial(
            params={"fmt:a": "w4", "keep:b": 0.5}, distributions=SPACE,
            values=[measured["accuracy"], measured["latency_ms"], measured["size_bytes"]],
            user_attrs={"measured": measured, "steps": 0 if screened else 10,
                        "violation": violation, **({"screened": screened} if screened else {})},
        ))  # fmt: skip
    rows = study.get_trials()
    # the screened one was never trained: its near miss says nothing about what training reaches
    assert [t.number for t in _parents(rows, info)] == [1, 4, 2][:NEAREST]
    _tell(study, {"fmt:a": "w8", "keep:b": 0.5})  # feasible: now the front is the parent
    assert [t.number for t in _parents(study.get_trials(), info)] == [6]


def test_the_surrogate_explores_every_explore_th_trial_it_could_have_chosen():
    """Counted from the first trial past start-up (here trial 7), not from trial 0: a study
    whose first trials were enqueued does not spend its first guided turn at random."""
    study = _synthetic_study(0)
    study.sampler.explore = 3
    for label, keep in (("w4", 1.0), ("w8", 1.0), ("float", 1.0), ("w4", 0.5),
                        ("w8", 0.75), ("float", 0.5), ("w4", 0.25)):  # fmt: skip
        _tell(study, {"fmt:a": label, "keep:b": keep})
    # the rule alone: a model that always has a candidate, then one with nothing to improve
    answers = iter([True, True, True, True, False, True, True])
    study.sampler.choose = lambda *_: (
        ({"fmt:a": "w8", "keep:b": 0.5}, {}) if next(answers) else None
    )
    roles = [_ask_and_tell(study).system_attrs.get(ROLE) for _ in range(9)]
    # turns 3 and 6 explore without asking the model; at turn 7 it finds nothing to improve,
    # which explores too and restarts the count
    assert roles == ["guided", "guided", "explore", "guided", "guided", "explore",
                     "explore", "guided", "guided"]  # fmt: skip


def test_below_its_confidence_the_surrogate_takes_the_likeliest_improving_candidate():
    """Nothing confidence-likely: a near-certain miss with a huge predicted gain (a) loses to a
    likelier candidate (b); one that would not improve the front (c) is not taken at all."""
    sampler = _synthetic_study(0, confidence=0.95).sampler
    scored = [("a", 0.5, (), 0.01), ("b", 0.1, (), 0.4), ("c", 0.0, (), 0.9)]
    sampler._score = lambda pool, probed, context, confidence: [
        item for item in scored if item[3] >= confidence
    ]
    assert [item[0] for item in sampler._likeliest([], [], None)] == ["b", "a"]
    sampler.confidence = 0.3  # one is likely enough: expected improvement decides, as before
    assert [item[0] for item in sampler._likeliest([], [], None)] == ["b", "c"]


# per format: accuracy, latency, size, zero-shot loss
FORMS = {"w4": (0.99, 0.5, 250.0, 0.3), "w8": (0.995, 0.7, 500.0, 0.02),
         "float": (1.0, 1.0, 1000.0, 0.0)}  # fmt: skip


def _forms_study(measured_forms: str, table_share: float = 1.0) -> tuple[optuna.Study, dict]:
    """A study whose one structural knob is fmt:a (in the sensitivity table) beside a training
    knob (lr); a trial per ``measured_forms`` letter at two learning rates, each measured where
    the latency table predicted ``table_share`` of its latency."""
    table = Sensitivity({"loss": 0.0, "latency_ms": 1.0, "size_bytes": 1000.0}, {"fmt:a": "float"},
                        {"fmt:a": {label: {"loss": loss, "latency_ms": latency, "size_bytes": size}
                                   for label, (_, latency, size, loss) in FORMS.items()}})  # fmt: skip
    config = parse_config({"study": "s", "task": "digits", "constraints": {"accuracy_drop": "3%"},
                           "search": {"finetune_steps": 10}})  # fmt: skip
    sampler = SurrogateSampler(optuna.samplers.RandomSampler(seed=0), config, startup=4, explore=0)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=sampler)
    study.set_user_attr(STUDY_ATTR, {
        "objectives": ["accuracy", "latency_ms", "size_bytes"], "metric": "accuracy",
        "direction": "maximize", "teacher": {"accuracy": 1.0, "latency_ms": 1.0,
                                             "size_bytes": 1000.0}})  # fmt: skip
    study.set_user_attr(ATTR, table.to_dict())
    space = {"fmt:a": CategoricalDistribution(list(FORMS)),
             "lr": FloatDistribution(1e-5, 1e-4, log=True)}  # fmt: skip
    for label, lr in itertools.product(measured_forms.split(), (1e-5, 5e-5)):
        accuracy, latency, size, loss = FORMS[label]
        measured = {"accuracy": accuracy, "latency_ms": latency, "size_bytes": size,
                    "zero_shot_loss": loss, "latency_source": "measured",
                    "latency_predicted_ms": table_share * latency}  # fmt: skip
        study.add_trial(create_trial(params={"fmt:a": label, "lr": lr}, distributions=space,
                                     values=[accuracy, latency, size],
                                     user_attrs={"measured": measured, "steps": 10,
                                                 "violation": 0.0}))  # fmt: skip
    return study, space


@pytest.mark.parametrize("measured_forms", ["w4 w8 float", "w4 float"])
def test_a_candidate_that_changes_only_a_training_knob_is_not_probed_again(measured_forms):
    """A candidate whose deploy form a trial measured takes that trial's costs: probing it again
    could only add timer noise (here a lucky timer, 20 % fast), which the front would take for a
    gain. A form no trial measured is probed."""
    study, space = _forms_study(measured_forms)
    probed = []

    def probe(params):
        probed.append(params["fmt:a"])
        _, latency, size, loss = FORMS[params["fmt:a"]]
        return {"latency_ms": 0.8 * latency, "size_bytes": size, "loss": loss}

    study.sampler.attach(probe)
    choice = study.sampler.choose(study, study.get_trials(), space)
    if measured_forms == "w4 w8 float":  # every candidate is a clone: nothing to probe or gain
        assert probed == [] and choice is None
    else:
        assert set(probed) == {"w8"} and choice[0]["fmt:a"] == "w8"


def test_a_candidate_that_differs_only_inside_a_dropped_block_is_the_same_trial():
    from compsearch.search.surrogate import _key

    table = Sensitivity({"loss": 0.0}, {"drop:b": False, "fmt:u": "float"},
                        {"drop:b": {}, "fmt:u": {}}, blocks={"fmt:u": "b"})  # fmt: skip
    names = ["drop:b", "fmt:u", "lr"]
    dropped = {"drop:b": True, "fmt:u": "w4", "lr": 0.001}
    assert _key(dropped, names, table) == _key({**dropped, "fmt:u": "w8"}, names, table)
    assert _key(dropped, names, table) != _key({**dropped, "lr": 0.002}, names, table)  # a knob
    kept = {**dropped, "drop:b": False}
    assert _key(kept, names, table) != _key({**kept, "fmt:u": "w8"}, names, table)
    assert _key(dropped, names, None) != _key({**dropped, "fmt:u": "w8"}, names, None)


def test_a_probe_s_table_latency_is_corrected_by_what_the_table_missed_on_the_trials():
    """The latency table predicted every measured trial 25 % fast; a probe's latency, the
    table's prediction, is taken at what the trials say it will measure."""
    study, space = _forms_study("w4 float", table_share=0.75)

    def probe(params):
        _, latency, size, loss = FORMS[params["fmt:a"]]
        return {"latency_ms": 0.75 * latency, "size_bytes": size, "loss": loss, "table": 1.0}

    study.sampler.attach(probe)
    params, note = study.sampler.choose(study, study.get_trials(), space)
    assert params["fmt:a"] == "w8"
    assert note["predicted"]["latency_ms"] == pytest.approx(FORMS["w8"][1], rel=0.01)


def test_a_search_with_the_surrogate_sampler_runs_guided_trials(tmp_path, runs_root):
    data = tiny("surrogate", sampler="surrogate", trials=10, plans=2)
    assert main(["search", str(write(tmp_path, data))]) == 0
    study = _study(runs_root, "surrogate")
    trials = study.get_trials()
    assert len(trials) == 10 and all(t.state == TrialState.COMPLETE for t in trials)
    guided = [t for t in trials if "surrogate" in t.system_attrs]
    assert guided, "the surrogate never chose a trial"
    assert all("predicted" in t.system_attrs["surrogate"] for t in guided)

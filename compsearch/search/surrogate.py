"""The surrogate sampler: learn from every trial, train only the most promising candidates.

An Optuna ``BaseSampler`` (so the Ray driver's ``OptunaSearch`` uses it unchanged). Each new trial:

1. **Learn.** A Gaussian process is fitted on every trial the study has measured — completed ones
   (their final validation accuracy), stopped ones (their accuracy at the rung they reached) and
   screened ones (their zero-shot accuracy) — with the fraction of the fine-tune each one had as a
   feature, so a prediction at the full budget learns from partial ones too. Its one other
   feature is the zero-shot output loss against the teacher (each trial records it; for a
   candidate, the sensitivity table's sum, mapped onto measured losses, or the loss itself where
   the candidate was probed) — few features, so a dozen trials teach it something; without a
   sensitivity table, every parameter. It predicts the accuracy drop and its uncertainty (no
   trend: a linear one in the zero-shot loss, tried, kept the search from the dropped layers a
   short fine-tune recovers; benchmarks/RESULTS.md); two more, on the cost model's predictions
   (:mod:`compsearch.search.sensitivity`), predict what that model missed of latency and size,
   so it is corrected by the trials themselves (without a table, the costs from the parameters).
2. **Propose.** Many cheap candidates: random points of the space, and mutations (one to three
   parameters changed) of the current front's trials — while no trial is feasible, of the
   trained trials nearest to meeting every bound.
3. **Choose.** Each candidate's predicted point gets its hypervolume improvement over the study's
   feasible front (normalized as everywhere, see :mod:`compsearch.search.pareto`), times the
   predicted probability that it meets every bound (accuracy drop, latency, size); candidates less
   likely than ``confidence`` to meet them are not taken while any other is — a trial budget is
   small, and a trial that breaks a bound adds nothing to the front. Where none is that likely (a
   tight accuracy bound after short fine-tunes, before the front has grown), the likeliest to
   meet them among those that would improve the front is taken — likelier to land than a random
   point. Where a probe is attached (the Optuna driver attaches one), the ``probes`` best are
   first compressed untrained — exact latency, size and zero-shot output loss — and scored again
   with those (a latency the latency table predicted, corrected by what the table missed on the
   trials it was checked on). A candidate whose deploy form a trial already measured (it changes
   only training knobs, such as the learning rate) takes that trial's costs and zero-shot loss
   instead: measured again, it would differ only by timer noise, which the front would take for
   a gain. The best is the trial's parameters; when no candidate promises any improvement, the
   base sampler chooses.

Until ``startup`` trials are measured the base sampler (NSGA-II by default) chooses instead, and
after that on every ``explore``-th trial the model could have chosen — counted from the first of
them, so a small budget that starts with enqueued baselines and plans does not spend one of its
few guided trials at random — so the data keep some diversity the model did not ask for.
Without a sensitivity table the same works on the parameters alone.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from compsearch.search.pareto import hypervolume, non_dominated, normalize, reference_point
from compsearch.search.results import STUDY_ATTR
from compsearch.search.sensitivity import ATTR, Sensitivity

MEASURED = (TrialState.COMPLETE, TrialState.PRUNED)
LATENCY = "latency_ms"
ROLE = "surrogate_role"  # "guided" (the model chose) or "explore" (the base sampler did)
NEGLIGIBLE = 1e-6  # a predicted hypervolume gain below this is the model's rounding, not a promise
ZERO_SHOT = "zero_shot_loss"  # a trial's deploy-form output loss vs the teacher, before training
NEAREST = 3  # with no feasible trial yet, the nearest misses whose mutations join the pool
Probe = Callable[[dict], dict[str, float]]


class SurrogateSampler(optuna.samplers.BaseSampler):
    def __init__(
        self,
        base: optuna.samplers.BaseSampler,
        config,
        seed: int = 0,
        candidates: int = 384,
        startup: int = 5,
        explore: int = 5,
        optimism: float = 0.0,
        probes: int = 4,
        confidence: float = 0.5,
    ) -> None:
        self.base, self.config = base, config
        self.seed, self.candidates, self.startup = seed, candidates, startup
        self.explore, self.optimism = explore, optimism
        self.rng = np.random.default_rng(seed)
        self.probe: Probe | None = None
        self.probes, self.confidence = probes, confidence
        self.loss_map = _LossMap([], [])

    # -- Optuna's sampler protocol

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
        self.rng = np.random.default_rng()

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        done = study.get_trials(deepcopy=False, states=MEASURED)
        return optuna.search_space.intersection_search_space(done) if done else {}

    def sample_relative(self, study, trial, search_space) -> dict[str, object]:
        rows = [t for t in study.get_trials(deepcopy=False, states=MEASURED)
                if t.user_attrs.get("measured")]  # fmt: skip
        eligible = search_space and len(rows) >= self.startup and STUDY_ATTR in study.user_attrs
        choice = None
        if eligible and not self._explore_turn(study):
            choice = self.choose(study, rows, search_space)
        if eligible:
            role = "guided" if choice is not None else "explore"
            study._storage.set_trial_system_attr(trial._trial_id, ROLE, role)
        if choice is None:
            space = self.base.infer_relative_search_space(study, trial)
            return self.base.sample_relative(study, trial, space)
        study._storage.set_trial_system_attr(trial._trial_id, "surrogate", choice[1])
        return choice[0]

    def _explore_turn(self, study) -> bool:
        """Whether ``explore - 1`` guided trials have followed the last base-sampler one (or the
        first the model could have chosen)."""
        if self.explore <= 0:
            return False
        since = 0
        for t in study.get_trials(deepcopy=False):
            role = t.system_attrs.get(ROLE)
            since = 0 if role == "explore" else since + (role == "guided")
        return since >= self.explore - 1

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.base.after_trial(study, trial, state, values)

    # -- the model

    def attach(self, probe: Probe) -> None:
        """Let the sampler measure a candidate untrained before choosing it (see the module
        docstring); the Optuna driver attaches one in the process that runs the trials."""
        self.probe = probe

    def choose(self, study, rows: list[FrozenTrial], space: dict[str, BaseDistribution]):
        """The candidate with the best expected feasible hypervolume improvement, and what was
        predicted for it; None when no candidate promises any."""
        info = study.user_attrs[STUDY_ATTR]
        table = Sensitivity.from_dict(study.user_attrs[ATTR]) if ATTR in study.user_attrs else None
        names = sorted(space)
        objectives, teacher = info["objectives"], info["teacher"]
        points = [_point(info, t.user_attrs["measured"]) for t in rows]
        steps = max(1, self.config.search.finetune_steps)
        fractions = [min(1.0, t.user_attrs.get("steps", 0) / steps) for t in rows]
        guesses = [self._guess(t.params, objectives, table, teacher) for t in rows]
        losses = [t.user_attrs["measured"].get(ZERO_SHOT) for t in rows]
        self.loss_map = _LossMap(guesses, losses)
        x = np.array([self._features(t.params, names, space, table, f, g, loss)
                      for t, f, g, loss in zip(rows, fractions, guesses, losses, strict=True)])  # fmt: skip
        drops = np.array([p[objectives.index("accuracy")] for p in points])
        model = _Gaussian(x, drops, self.seed)
        costs = {}  # per cost: what the cost model missed, in log ratio, from its predictions
        cost_x = _cost_features(guesses, x, table)
        for i, objective in enumerate(objectives):
            if objective != "accuracy":
                measured = np.log(np.maximum([p[i] for p in points], 1e-12))
                costs[i] = _Gaussian(cost_x, measured - np.array([g[i] for g in guesses]),
                                     self.seed)  # fmt: skip
        pool = self._pool(rows, names, space, info, table)
        if not pool:
            return None
        known = _measured_forms(rows, points, objectives, table)
        context = (info, names, space, table, model, costs, self._front(rows, points))
        scored = self._likeliest(pool, [_known(known, table, p) for p in pool], context)
        if self.probe is not None and scored:  # the most promising, measured untrained
            top = [params for params, *_ in scored[: self.probes]]
            bias = _table_bias(rows, cost_x, self.seed) if table is not None else None
            probed = [_known(known, table, params) or self._probed(params, objectives, teacher,
                                                                   table, bias)
                      for params in top]  # fmt: skip
            scored = self._likeliest(top, probed, context)
        if not scored or scored[0][1] <= NEGLIGIBLE:
            return None
        params, score, point, chance = scored[0]
        note = {"predicted": dict(zip(objectives, point, strict=True)),
                "feasible_probability": chance, "score": score,
                "probed": self.probe is not None,
                "below_confidence": chance < self.confidence}  # fmt: skip
        return params, note

    def _likeliest(self, pool, probed, context) -> list[tuple]:
        """:meth:`_score` over the candidates at least ``confidence`` likely to meet every bound;
        where none is (a tight accuracy bound after short fine-tunes, before the front has
        grown), every candidate that would improve the front, the likeliest to meet the bounds
        first — not the largest expected gain, which a near-certain miss with a huge predicted
        gain can win, and not a random point, likelier still to miss."""
        scored = self._score(pool, probed, context, self.confidence)
        if scored:
            return scored
        improving = [item for item in self._score(pool, probed, context, 0.0) if item[1] > 0]
        return sorted(improving, key=lambda item: (-item[3], -item[1]))

    def _probed(self, params, objectives, teacher, table, bias) -> dict:
        """The probe's costs as log ratios to the teacher; a latency the latency table predicted
        is corrected by what the table missed on the trials it was checked on (``bias``)."""
        measured = self.probe(params)
        ratios = [math.log(max(measured[o], 1e-12) / teacher[o]) if o in measured and
                  teacher.get(o) else None for o in objectives]  # fmt: skip
        latency = objectives.index(LATENCY) if LATENCY in objectives else None
        if (
            bias is not None
            and measured.get("table")
            and latency is not None
            and ratios[latency] is not None
        ):
            guess = self._guess(params, objectives, table, teacher)
            ratios[latency] += float(bias.predict(np.array([guess[:-1]]))[0][0])
        return {"log_costs": ratios, "loss": measured.get("loss")}

    def _score(self, pool, probed, context, confidence: float) -> list[tuple]:
        """Candidates at least ``confidence`` likely to meet every bound, by expected feasible
        hypervolume improvement, best first:
        ``(params, score, predicted point, probability of meeting every bound)``."""
        info, names, space, table, model, costs, front = context
        objectives, teacher = info["objectives"], info["teacher"]
        accuracy = objectives.index("accuracy")
        guesses = [self._guess(p, objectives, table, teacher) for p in pool]
        features = np.array([self._features(p, names, space, table, 1.0, g,
                                            q["loss"] if q else None)
                             for p, g, q in zip(pool, guesses, probed, strict=True)])  # fmt: skip
        mean, spread = model.predict(features)
        limits = self._limits(info)
        feasible = np.ones(len(pool))
        if accuracy in limits:
            feasible *= _below(limits[accuracy], mean, spread)
        floor = min(p[accuracy] for p in front) if front else 0.0  # no better than seen
        predicted = {accuracy: np.maximum(mean - self.optimism * spread, floor)}
        cost_x = _cost_features(guesses, features, table)
        for index, fit in costs.items():
            missed, log_spread = fit.predict(cost_x)
            log_value = np.array([g[index] for g in guesses]) + missed
            spreads = np.full(len(pool), float(np.mean(log_spread)))
            for i, q in enumerate(probed):  # a measured cost is known (up to timer noise)
                if q and q["log_costs"][index] is not None:
                    log_value[i], spreads[i] = q["log_costs"][index], 0.02
            predicted[index] = np.exp(log_value)
            if index in limits:
                feasible *= _below(math.log(limits[index]), log_value, spreads)
        reference = reference_point(objectives)
        base_volume = hypervolume(front, reference)
        scored = []
        for i, params in enumerate(pool):
            if feasible[i] < confidence:
                continue
            point = tuple(float(predicted[k][i]) for k in range(len(objectives)))
            gain = hypervolume([*front, point], reference) - base_volume
            scored.append((params, float(feasible[i] * gain), point, float(feasible[i])))
        return sorted(scored, key=lambda item: -item[1])

    def _features(self, params, names, space, table, fraction, guess, loss) -> list[float]:
        """With a sensitivity table: the zero-shot output loss (measured where it was, else the
        table's summed sensitivity mapped onto it) — one feature, so a dozen trials teach the
        model something; without a table, every parameter. Plus the fraction of the fine-tune
        the trial had."""
        if table is None:
            row = [_encode(params.get(n), space[n]) for n in names]
        else:
            zero_shot = loss if loss is not None else self.loss_map(guess[-1])
            row = [math.log10(zero_shot + 1e-6)]
        return [*row, fraction]

    @staticmethod
    def _guess(params, objectives, table: Sensitivity | None, teacher) -> list[float]:
        """The cost model's log ratio to the teacher per objective (0 for accuracy and without a
        table), then the table's summed sensitivity."""
        guess = table.predict(params) if table is not None else {}
        out = []
        for objective in objectives:
            value, base = guess.get(objective), teacher.get(objective)
            out.append(math.log(value / base) if value and base else 0.0)
        return [*out, guess.get("loss", 0.0)]

    def _front(self, rows, points) -> list[tuple[float, ...]]:
        feasible = [p for t, p in zip(rows, points, strict=True)
                    if t.state == TrialState.COMPLETE and not t.user_attrs.get("screened")
                    and t.user_attrs.get("violation", 0.0) <= 0]  # fmt: skip
        return [feasible[i] for i in non_dominated(feasible)]

    def _limits(self, info) -> dict[int, float]:
        """Per objective index, its bound in the normalized point (where the study has one)."""
        teacher, metric = info["teacher"], info["metric"]
        out = {}
        for constraint in self.config.constraints:
            if constraint.name in info["objectives"] and teacher.get(constraint.name):
                out[info["objectives"].index(constraint.name)] = constraint.fraction(teacher)
            elif constraint.name == "accuracy_drop" and "accuracy" in info["objectives"]:
                limit = constraint.limit
                if not constraint.relative and teacher.get(metric):
                    limit /= abs(teacher[metric])
                out[info["objectives"].index("accuracy")] = limit
        return out

    def _pool(self, rows, names, space, info, table) -> list[dict[str, object]]:
        seen = {_key(t.params, names, table) for t in rows}
        pool, keys = [], set()

        def add(params):
            key = _key(params, names, table)
            if key not in seen and key not in keys:
                keys.add(key)
                pool.append(params)

        for _ in range(self.candidates):
            add({n: _draw(space[n], self.rng) for n in names})
        parents = _parents(rows, info)
        for parent in parents:
            for _ in range(max(8, self.candidates // max(1, len(parents)) // 2)):
                child = {n: parent.params.get(n, _draw(space[n], self.rng)) for n in names}
                for n in self.rng.choice(names, size=min(len(names), int(self.rng.integers(1, 4))),
                                         replace=False):  # fmt: skip
                    child[n] = _draw(space[n], self.rng)
                add(child)
        return pool


def _parents(rows: list[FrozenTrial], info: dict) -> list[FrozenTrial]:
    """The trials whose mutations join the candidate pool: the feasible front; while no trial is
    feasible, the ``NEAREST`` trained trials that broke the bounds least, so the pool holds their
    neighbours, not random points alone (on mnist, seed 0 of the b95b04f run found no feasible
    point in 16 trials, its guided picks drawn from random points each 17-21 % likely to meet the
    bounds)."""
    trained = [t for t in rows
               if t.state == TrialState.COMPLETE and not t.user_attrs.get("screened")]  # fmt: skip
    feasible = [t for t in trained if t.user_attrs.get("violation", 0.0) <= 0]
    if feasible:
        points = [_point(info, t.user_attrs["measured"]) for t in feasible]
        return [feasible[i] for i in non_dominated(points)]
    return sorted(trained, key=lambda t: t.user_attrs.get("violation", 0.0))[:NEAREST]


def _measured_forms(rows, points, objectives, table: Sensitivity | None) -> dict[tuple, dict]:
    """Per deploy form the study's trials measured (:meth:`Sensitivity.structure`), its costs
    (median log ratio to the teacher, as in the trials' points) and zero-shot loss. A candidate
    that only changes training knobs of a measured trial has these already: probing it again
    would add nothing but timer noise, which the front would take for a gain."""
    if table is None:  # without a table, no way to tell a training knob from a structural one
        return {}
    grouped: dict[tuple, list] = {}
    for t, point in zip(rows, points, strict=True):
        grouped.setdefault(table.structure(t.params), []).append((point, t.user_attrs["measured"]))
    out = {}
    for form, items in grouped.items():
        logs = [None if o == "accuracy" else
                float(np.median([math.log(max(p[i], 1e-12)) for p, _ in items]))
                for i, o in enumerate(objectives)]  # fmt: skip
        losses = [m[ZERO_SHOT] for _, m in items if m.get(ZERO_SHOT) is not None]
        out[form] = {"log_costs": logs, "loss": float(np.median(losses)) if losses else None}
    return out


def _table_bias(rows, cost_x: np.ndarray, seed: int) -> _Gaussian | None:
    """What the latency table's predictions miss, as trials measured it (log ratio measured /
    predicted, on the cost features of every trial that has both); None with fewer than two.
    On minilm the table put the int8 baseline 13-27 % under its measurement, so an untrained
    probe of a copy of it, predicted by the table, looked faster than the baseline."""
    pairs = [(i, math.log(m[LATENCY] / m["latency_predicted_ms"])) for i, t in enumerate(rows)
             if (m := t.user_attrs["measured"]).get("latency_source") == "measured"
             and m.get("latency_predicted_ms") and m.get(LATENCY)]  # fmt: skip
    if len(pairs) < 2:
        return None
    index, logs = zip(*pairs, strict=True)
    return _Gaussian(cost_x[list(index)], np.array(logs), seed)


def _known(known: dict[tuple, dict], table: Sensitivity | None, params: dict) -> dict | None:
    return known.get(table.structure(params)) if known else None


def _cost_features(guesses, features: np.ndarray, table: Sensitivity | None) -> np.ndarray:
    """What the cost corrections are fitted on: the cost model's predictions; without a table
    (no predictions), the encoded parameters (``features`` less the fine-tune fraction)."""
    return np.array([g[:-1] for g in guesses]) if table is not None else features[:, :-1]


def _point(info: dict, measured: dict) -> tuple[float, ...]:
    keys = {n: tuple(k) for n, k in info.get("keys", {}).items()}
    return normalize(measured, info["objectives"], info["metric"], info["direction"],
                     info["teacher"], keys)  # fmt: skip


def _key(params: dict, names: Sequence[str], table: Sensitivity | None) -> tuple:
    """What makes two recipes the same trial: their deploy form (:meth:`Sensitivity.structure`,
    where a dropped block's own units do not count) and every other parameter (training knobs);
    without a table, every parameter. (On mnist, seed 0 at 3d38092, three of five guided trials
    differed from a front trial only in units of a block it drops: the same model, trained again.)"""
    if table is None:
        return tuple(repr(params.get(n)) for n in names)
    return (table.structure(params),
            tuple(repr(params.get(n)) for n in names if n not in table.options))  # fmt: skip


def _encode(value, distribution: BaseDistribution) -> float:
    if isinstance(distribution, CategoricalDistribution):
        if isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            match = re.fullmatch(r"w(\d+)(?:g(\d+))?(a8)?", value)
            if match:  # a format label: its weight bits, finer for int8 activations
                return int(match.group(1)) + (0.5 if match.group(3) else 0.0)
            if value == "float":
                return 16.0
        choices = list(distribution.choices)
        return float(choices.index(value)) if value in choices else -1.0
    if value is None:
        return 0.0
    if isinstance(distribution, FloatDistribution) and distribution.log:
        return math.log(float(value))
    return float(value)


def _draw(distribution: BaseDistribution, rng: np.random.Generator):
    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[int(rng.integers(len(distribution.choices)))]
    if isinstance(distribution, IntDistribution):
        return int(rng.integers(distribution.low, distribution.high + 1))
    low, high = distribution.low, distribution.high
    if distribution.step:
        count = round((high - low) / distribution.step)
        return round(low + distribution.step * int(rng.integers(count + 1)), 10)
    if distribution.log:
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return float(rng.uniform(low, high))


def _below(limit: float, mean, spread):
    """The probability that a normal (``mean``, ``spread``) value is at most ``limit``."""
    from scipy.stats import norm

    return norm.cdf((limit - mean) / np.maximum(spread, 1e-9))


class _Gaussian:
    """A Gaussian process on standardized features (Matern 5/2 with per-feature length scales,
    plus noise): a value's mean and spread."""

    def __init__(self, x: np.ndarray, y: np.ndarray, seed: int) -> None:
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

        self.center = x.mean(0)
        self.scale = np.where(x.std(0) > 0, x.std(0), 1.0)
        kernel = ConstantKernel(1.0, (1e-3, 1e3)) * Matern(
            np.ones(x.shape[1]), (1e-2, 1e2), nu=2.5
        ) + WhiteKernel(1e-2, (1e-6, 1.0))
        self.model = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=2,
                                              random_state=seed)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence notes of the kernel fit
            self.model.fit((x - self.center) / self.scale, y)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.model.predict((x - self.center) / self.scale, return_std=True)


class _LossMap:
    """The table's summed sensitivity mapped onto the zero-shot loss trials measured (a log-log
    line through the trials that have both); the sum itself where none do."""

    def __init__(self, guesses: list[list[float]], losses: list[float | None]) -> None:
        pairs = [(math.log10(g[-1] + 1e-6), math.log10(loss + 1e-6))
                 for g, loss in zip(guesses, losses, strict=True) if loss is not None]  # fmt: skip
        self.a, self.b = 1.0, 0.0
        if len(pairs) >= 3 and np.ptp([x for x, _ in pairs]) > 0:
            self.a, self.b = np.polyfit(*zip(*pairs, strict=True), 1)

    def __call__(self, summed: float) -> float:
        return 10 ** (self.a * math.log10(summed + 1e-6) + self.b)

"""The cost models over the sensitivity table: the blocks form, its integer program, the choice."""

import itertools
import math
import random

import pytest

from compsearch.search import costmodel
from compsearch.search.costmodel import decode, encode
from compsearch.search.plan import cheapest, cheapest_params, solve
from compsearch.search.sensitivity import Sensitivity, _fit

BLOCKS = ("b0", "b1")
FORMATS = {"float": 1.0, "w8": 0.5, "w4": 0.7}  # a block's latency factor per format
KEEPS = {1.0: 1.0, 0.75: 0.8, 0.5: 0.6}
LOSS = {"float": 0.0, "w8": 0.01, "w4": 0.2, 1.0: 0.0, 0.75: 0.05, 0.5: 0.3}
REST, WHOLE = 20.0, {"b0": 50.0, "b1": 30.0}  # outside the blocks; each block's own latency


def _menus() -> dict[str, list]:
    menus = {"fmt:emb": ["float", "w8"]}
    for block in BLOCKS:
        menus[f"fmt:{block}"] = list(FORMATS)
        menus[f"keep:{block}:ffn"] = list(KEEPS)
        menus[f"drop:{block}"] = [False, True]
    return menus


def _additive(params: dict) -> float:
    """The truth a latency table sums: the rest plus each kept block's own, scaled inside."""
    total = REST * (0.9 if params["fmt:emb"] == "w8" else 1.0)
    for block in BLOCKS:
        if not params[f"drop:{block}"]:
            total += (
                WHOLE[block] * FORMATS[params[f"fmt:{block}"]] * KEEPS[params[f"keep:{block}:ffn"]]
            )
    return total


def _multiplicative(params: dict) -> float:
    """A truth where every unit scales the whole forward."""
    total = 100.0 * (0.9 if params["fmt:emb"] == "w8" else 1.0)
    for block in BLOCKS:
        total *= 0.8 if params[f"drop:{block}"] else 1.0
        total *= FORMATS[params[f"fmt:{block}"]] * KEEPS[params[f"keep:{block}:ffn"]]
    return total


def _loss(param: str, value) -> float:
    if param.startswith("drop:"):
        return 0.5 if value else 0.0
    return LOSS[value] * (2.0 if param == "fmt:emb" else 1.0)


def _table(truth, samples: int = 24) -> Sensitivity:
    """A table measured on ``truth`` as compsearch measures one: single changes, random recipes."""
    menus = _menus()
    reference = {p: values[0] for p, values in menus.items()}
    base = {"loss": 0.0, "latency_ms": truth(reference)}
    table = Sensitivity(base, dict(reference))
    for param, values in menus.items():
        table.options[param] = {encode(v): {"loss": _loss(param, v),
                                            "latency_ms": truth({**reference, param: v})}
                                for v in values}  # fmt: skip
    table.blocks = {p: p.split(":")[1] for p in menus if p.split(":")[1] in BLOCKS}
    rng = random.Random(0)
    rows = [(reference, base)] + [({**reference, p: decode(p, k)}, e)
                                   for p, entries in table.options.items()
                                   for k, e in entries.items()]  # fmt: skip
    for _ in range(samples):
        params = {p: rng.choice(values) for p, values in menus.items()}
        rows.append((params, {"latency_ms": truth(params)}))
        table.samples.append({"params": params, "costs": rows[-1][1]})
    _fit(table, rows, samples)
    costmodel.choose(table, ["latency_ms"])
    return table


def _every(table):
    menus = _menus()
    for combo in itertools.product(*menus.values()):
        yield dict(zip(menus, combo, strict=True))


def test_the_blocks_form_is_exact_where_costs_add_up_over_blocks():
    table = _table(_additive)
    assert table.model["latency_ms"] == costmodel.BLOCKS
    assert table.model_error["latency_ms"][costmodel.BLOCKS] < 1e-9
    assert table.model_error["latency_ms"][costmodel.LOG] > 0.01  # leave-one-out: it misses
    for params in _every(table):
        assert table.predict(params)["latency_ms"] == pytest.approx(_additive(params))


def test_the_log_linear_form_is_kept_where_savings_multiply():
    table = _table(_multiplicative)
    errors = table.model_error["latency_ms"]
    assert table.model["latency_ms"] == costmodel.LOG and errors[costmodel.LOG] < errors["blocks"]


def test_without_random_recipes_the_log_linear_form_is_used():
    table = _table(_additive, samples=0)
    assert table.model == {} and costmodel.form(table, "latency_ms") == costmodel.LOG


@pytest.mark.parametrize("bound", [95.0, 70.0, 50.0, 35.0, 25.0])
def test_the_ilp_over_joint_blocks_finds_the_least_sensitive_recipe_within_the_bound(bound):
    table = _table(_additive)
    best = None
    for params in _every(table):
        guess = table.predict(params)
        if guess["latency_ms"] <= bound and (best is None or guess["loss"] < best - 1e-12):
            best = guess["loss"]
    chosen = solve(table, {"latency_ms": bound})
    assert best is not None and chosen is not None and set(chosen) == set(table.options)
    assert _additive(chosen) <= bound * (1 + 1e-9)  # exact here: the form is the truth
    assert table.predict(chosen)["loss"] == pytest.approx(best)


def test_a_dropped_block_leaves_its_units_at_the_reference():
    table = _table(_additive)
    chosen = solve(table, {"latency_ms": 20.0})  # only the rest is left: both blocks dropped
    assert chosen["drop:b0"] and chosen["drop:b1"]
    assert chosen["fmt:b0"] == "float" and chosen["keep:b1:ffn"] == 1.0  # no loss for nothing


def test_the_cheapest_point_under_the_blocks_form():
    table = _table(_additive)
    assert cheapest(table, "latency_ms") == pytest.approx(min(map(_additive, _every(table))))
    assert _additive(cheapest_params(table, "latency_ms")) == pytest.approx(REST * 0.9)


def test_a_keep_ratio_between_measured_ones_is_interpolated_inside_its_block():
    table = _table(_additive)
    params = {**table.reference, "keep:b0:ffn": 0.625}
    expected = REST + WHOLE["b0"] * 0.7 + WHOLE["b1"]  # halfway between 0.8 and 0.6
    assert table.predict(params)["latency_ms"] == pytest.approx(expected)
    assert math.isclose(table.predict(table.reference)["latency_ms"], 100.0)


def test_parameters_are_mapped_to_the_droppable_block_their_unit_lies_in():
    from types import SimpleNamespace

    from compsearch.search.sensitivity import block_params

    space = SimpleNamespace(drop_blocks=["layer.0", "layer.1"],
                            info=SimpleNamespace(block_of={"layer.0.fc": "layer.0",
                                                           "stem.conv": "stem"}))  # fmt: skip
    params = ["fmt:layer.0", "keep:layer.1:heads", "drop:layer.1", "fmt:layer.0.fc",
              "keep:layer.0.fc:channels", "fmt:stem.conv", "fmt:embeddings"]  # fmt: skip
    assert block_params(space, params) == {
        "fmt:layer.0": "layer.0", "keep:layer.1:heads": "layer.1", "drop:layer.1": "layer.1",
        "fmt:layer.0.fc": "layer.0", "keep:layer.0.fc:channels": "layer.0",
    }  # fmt: skip

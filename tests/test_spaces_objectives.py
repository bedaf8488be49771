import os
import statistics
import time

import optuna
import pytest
import torch

from compsearch.errors import ConfigError, SpaceError
from compsearch.objectives import (
    AccuracyObjective,
    Candidate,
    LatencyObjective,
    LatencyTable,
    MacsObjective,
    SizeObjective,
    count_macs,
    measure_latency,
    median_ci,
    parse_constraint,
)
from compsearch.pipeline import compress
from compsearch.spaces import Space, discover, parse_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def mnist_info(mnist_task):
    return discover(mnist_task)


@pytest.fixture(scope="module")
def digits_info(digits_task):
    return discover(digits_task)


def sample(space: Space, seed: int = 0, n: int = 1):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trials = [study.ask() for _ in range(n)]
    return [(t, space.suggest(t)) for t in trials]


def test_discovery_of_the_mnist_resnet(mnist_info):
    assert mnist_info.first_layer == "conv1"
    assert mnist_info.output_layers == ["fc"]
    assert mnist_info.layers["conv1"] == "conv2d" and mnist_info.layers["fc"] == "linear"
    assert mnist_info.blocks == ["layer1.0", "layer1.1", "layer2.1", "layer3.1"]
    assert mnist_info.block_of["layer2.0.conv1"] == "layer2.0"


def test_replaying_params_with_fixed_trial_gives_the_identical_recipe(mnist_info):
    space = Space.build(parse_space({"depth": True}), mnist_info, "mnist", finetune_steps=10)
    for trial, recipe in sample(space, n=5):
        replayed = space.suggest(optuna.trial.FixedTrial(trial.params, number=trial.number))
        assert replayed == recipe


def test_defaults_keep_first_and_output_layers_at_8_bits(mnist_info):
    space = Space.build(parse_space({}), mnist_info, "mnist")
    for _, recipe in sample(space, n=5):
        assert recipe.layers["conv1"].w_bits == 8
        assert recipe.layers["fc"].w_bits == 8
        assert recipe.plan_for("conv1").keep_ratio is None  # unpruned
    off = Space.build(parse_space({"defaults": {"first_layer": False}}), mnist_info, "mnist")
    assert any(u.name == "layer1.0" for u in off.quant_units)
    formats = {u.name: [f.label for f in u.choices] for u in off.quant_units}
    assert len(formats["conv1"]) > 1


def test_menus_offer_int8_activations_only_where_a_kernel_runs_them(mnist_info):
    from compsearch.kernels.devices import onednn_available

    config = parse_space({"w_bits": [4, 8], "a_bits": [8, 16]})
    space = Space.build(config, mnist_info, "mnist")
    formats = {u.name: {f.label for f in u.choices} for u in space.quant_units}
    assert formats["layer1.0"] == {"w4", "w8"}  # convolutions: no int8 activation kernel on CPU
    # PyTorch runs int8 Linear layers fast only where the CPU has int8 dot products (VNNI)
    assert formats["fc"] == ({"w8a8", "w8"} if onednn_available() else {"w8"})
    served = Space.build(config, mnist_info, "mnist", runtime="onnxruntime")
    formats = {u.name: {f.label for f in u.choices} for u in served.quant_units}
    assert formats["fc"] == {"w8a8", "w8"}  # ONNX Runtime's MatMulIntegerToFloat
    assert formats["layer1.0"] == {"w4", "w8"}  # its QLinearConv needs a quantized output


def test_grouping_sets_the_dimensionality(mnist_info):
    dims = {
        grouping: Space.build(parse_space({"grouping": grouping}), mnist_info, "mnist").dimensions
        for grouping in ("per_layer", "per_block", "global")
    }
    assert dims["per_layer"] > dims["per_block"] > dims["global"]


def test_rules_fix_restrict_and_name_themselves_when_they_empty_a_choice(mnist_info):
    config = parse_space({"rules": [{"match": "re:layer3\\..*", "w_bits": 4, "keep_ratio": 1.0}]})
    space = Space.build(config, mnist_info, "mnist")
    for _, recipe in sample(space, n=3):
        assert recipe.layers["layer3.0.conv1"].w_bits == 4
        assert recipe.plan_for("layer3.0.conv1").keep_ratio is None
    empty = parse_space({"w_bits": [4, 16], "rules": [{"match": "fc", "w_bits": [2]}]})
    with pytest.raises(SpaceError, match=r"space.rules\[0\] \(match 'fc'\): expected it to leave"):
        Space.build(empty, mnist_info, "mnist")


def test_unknown_region_and_bad_ranges_are_named(mnist_info):
    with pytest.raises(SpaceError, match="expected region names of the model"):
        Space.build(
            parse_space({"rules": [{"region": "vision", "w_bits": 8}]}), mnist_info, "mnist"
        )
    with pytest.raises(
        ConfigError, match=r"space.keep_ratio\[1\]: expected a number in \(0.0, 1.0\]"
    ):
        parse_space({"keep_ratio": [0.5, 1.5]})
    with pytest.raises(ConfigError, match=r"space.keep_ratio: expected low <= high"):
        parse_space({"keep_ratio": [0.9, 0.5]})
    with pytest.raises(
        ConfigError, match=r"space.rules\[0\]: expected exactly one of 'match' or 'region'"
    ):
        parse_space({"rules": [{"w_bits": 8}]})
    with pytest.raises(ConfigError, match=r"space: unknown key 'wbits'"):
        parse_space({"wbits": [4]})


def test_uniform_baseline_params_are_valid_trials(mnist_info):
    space = Space.build(parse_space({"depth": True}), mnist_info, "mnist")
    params = space.uniform_params("w4", keep=0.5)
    recipe = space.suggest(optuna.trial.FixedTrial(params))
    assert recipe.layers["layer1.0.conv1"].w_bits == 4
    assert recipe.layers["layer1.0.conv1"].keep_ratio == 0.5
    assert space.uniform_params("w3")["fmt:layer1.0"] == "w4"  # the nearest on the menu
    assert "fmt:fc" not in params or params["fmt:fc"] in ("w8", "w8a8")


def test_size_objective_is_the_saved_file_exactly(digits_task, digits_info, tmp_path):
    space = Space.build(parse_space({}), digits_info, "digits")
    _, recipe = sample(space)[0]
    result = compress(digits_task, recipe, steps=0)
    path = result.save(tmp_path / "m.safetensors")
    size = SizeObjective().measure(Candidate(digits_task, result.deployed, result.artifact_bytes(),
                                             result.student))  # fmt: skip
    assert size["size_bytes"] == os.path.getsize(path)
    assert size["params"] == sum(p.numel() for p in result.student.parameters())


def test_accuracy_objective_reports_the_drop_vs_the_teacher(digits_task):
    teacher = digits_task.teacher()
    objective = AccuracyObjective("accuracy", "maximize")
    objective.prepare(Candidate(digits_task, teacher, b""))
    broken = digits_task.teacher()
    with torch.no_grad():
        broken.fc2.weight.zero_()
        broken.fc2.bias.zero_()
    measured = objective.measure(Candidate(digits_task, broken, b""))
    assert measured["accuracy"] < 0.2
    assert measured["accuracy_drop"] == pytest.approx(
        measured["accuracy_teacher"] - measured["accuracy"]
    )
    assert measured["accuracy_drop_rel"] > 0.8


class _Sleeper(torch.nn.Module):
    """A model whose forward takes a known time: 8 ms."""

    def forward(self, images):
        time.sleep(0.008)
        return images.flatten(1)[:, :10]


def test_latency_is_measured_in_milliseconds_with_its_spread(digits_task):
    result = measure_latency(_Sleeper(), digits_task, repeats=7)
    assert result.runs == 7
    assert 8.0 <= result.median_ms < 30.0, "an 8 ms forward must measure as about 8 ms"
    assert 0.0 <= result.spread < 1.0


class _Busy(torch.nn.Module):
    """Sleeps ``scale`` times the shared machine's load, which triples or drops back every four
    calls (two interleaved pairs): a machine whose load changes under the measurement."""

    def __init__(self, scale: float, calls: list[int]) -> None:
        super().__init__()
        self.scale, self.calls = scale, calls

    def forward(self, images):
        load = 0.006 if (self.calls[0] // 4) % 2 else 0.002
        self.calls[0] += 1
        time.sleep(self.scale * load)
        return images.flatten(1)[:, :10]


def test_interleaved_latency_measures_the_ratio_under_a_changing_load(digits_task):
    load = [0]
    result = measure_latency(_Busy(0.5, load), digits_task, repeats=6, warmup=0,
                             reference=_Busy(1.0, load), ci=0.05, max_repeats=40)  # fmt: skip
    # absolute times swing 3x with the load, the paired ratio does not
    assert result.p90_ms / result.p10_ms > 2
    assert result.ratio == pytest.approx(0.5, rel=0.25) and result.reference_ms > 0
    assert result.ci <= 0.05 or result.runs == 40


@pytest.mark.parametrize("above, settled", [((1.5, True), True), ((0.0, True), True),
                                            ((3.0, True), False)])  # fmt: skip
def test_a_latency_clearly_past_a_screening_bound_stops_at_six_pairs(digits_task, above, settled):
    # twice the reference's time under a load that swings 3x: the ratio is clearly past 1.5x,
    # never past 3x; (0, ...) is a candidate another bound already screens
    load = [0]
    objective = LatencyObjective(warmup=0, repeats=20, ci=0.0)
    objective.use_reference(Candidate(digits_task, _Busy(1.0, load), b""))
    out = objective.measure_interleaved(_Busy(2.0, load), digits_task, above=above)
    # six pairs settle it unless a scheduler hiccup widens the interval for a few more
    assert out["latency_runs"] < 12 if settled else out["latency_runs"] == 20
    assert out.get("latency_settled") == (1.0 if settled else None)
    assert 1 / out["speedup"] == pytest.approx(2.0, rel=0.3)


def test_an_absolute_latency_bound_settles_on_the_milliseconds(digits_task):
    objective = LatencyObjective(warmup=0, repeats=20, ci=0.0)
    objective.use_reference(Candidate(digits_task, _Sleeper(), b""))
    out = objective.measure_interleaved(_Sleeper(), digits_task, above=(2.0, False))  # 8 ms > 2
    assert out["latency_runs"] < 12 and out["latency_settled"] == 1.0
    out = objective.measure_interleaved(_Sleeper(), digits_task, above=(50.0, False))
    assert out["latency_runs"] == 20 and "latency_settled" not in out


def test_a_settled_latency_is_not_measured_again_for_a_drifted_teacher(digits_task):
    objective = LatencyObjective(warmup=0, repeats=6, ci=0.0)
    objective.use_reference(Candidate(digits_task, _Sleeper(), b""))
    objective.teacher_ms = 1.0  # the study's reference: the machine was 8x faster then
    assert objective.measure_interleaved(_Sleeper(), digits_task)["latency_remeasured"] == 2
    out = objective.measure_interleaved(_Sleeper(), digits_task, above=(0.0, True))
    assert out["latency_remeasured"] == 0 and out["latency_settled"] == 1.0


def test_a_latency_table_check_keeps_its_paired_speedup(digits_task):
    class Checking:  # a table that checks every trial
        def latency(self, model, task, objective, number, errors):
            return objective.check(model, task, 5.0, 0.0)

    objective = LatencyObjective(warmup=0, repeats=6, ci=0.0, table=Checking())
    objective.use_reference(Candidate(digits_task, _Sleeper(), b""))
    objective.teacher_ms = 1.0  # the study's reference: unpaired, it would read 1/8
    out = objective.measure(Candidate(digits_task, _Sleeper(), b""))
    assert out["speedup"] == pytest.approx(1.0, rel=0.3) and out["teacher_latency_ms"] >= 8.0
    assert out["latency_check_error"] == pytest.approx(
        abs(5.0 - out["latency_ms"]) / out["latency_ms"]
    )


def test_median_confidence_interval_narrows_with_more_runs():
    noisy = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95] * 2
    assert median_ci(noisy[:5]) == pytest.approx((1.2 - 0.9) / 2 / 1.05)  # the whole range
    assert median_ci([]) == float("inf")
    assert median_ci(noisy * 8) < median_ci(noisy)
    assert median_ci([2.0] * 10) == 0.0


def test_latency_objective_reports_speedup_against_the_interleaved_teacher(digits_task):
    objective = LatencyObjective(repeats=5, warmup=1, ci=0.5, max_repeats=10)
    objective.prepare(Candidate(digits_task, _Sleeper(), b""))
    out = objective.measure(Candidate(digits_task, _Sleeper(), b""))
    assert out["speedup"] == pytest.approx(1.0, rel=0.3) and out["teacher_latency_ms"] >= 8.0
    assert {"latency_ci", "latency_spread", "latency_drift", "latency_runs"} <= set(out)


def test_lookup_table_predicts_measured_latency_and_is_cached(digits_task, digits_info, tmp_path):
    teacher = digits_task.teacher()
    table = LatencyTable(tmp_path / "t.json", check_first=1, check_every=4)
    objective = LatencyObjective(repeats=15, table=table)
    objective.prepare(Candidate(digits_task, teacher, b""))
    assert (tmp_path / "t.json").exists() and table.entries
    space = Space.build(parse_space({}), digits_info, "digits")
    errors = []
    for _, recipe in sample(space, seed=3, n=3):
        deployed = compress(digits_task, recipe, steps=0).deployed
        predicted = table.predict(deployed, digits_task)
        measured = statistics.median(objective.measure_model(deployed, digits_task).median_ms
                                     for _ in range(3))  # fmt: skip
        errors.append(abs(predicted - measured) / measured)
    assert statistics.median(errors) < 0.3, f"the table's predictions are off by {errors}"
    assert LatencyTable(tmp_path / "t.json").entries == table.entries


def test_lookup_table_keys_tell_nchw_from_channels_last_input():
    """The same layer on the same shape runs up to 15x apart by memory layout, so the two are
    separate entries; a 2-D input has no layout to tell."""
    from compsearch.objectives.lut import _describe

    pool, x = torch.nn.MaxPool2d(2), torch.randn(4, 8, 6, 6)
    nchw, last = (
        _describe(pool, x),
        _describe(pool, x.contiguous(memory_format=torch.channels_last)),
    )
    assert nchw != last and last.endswith(":channels_last")
    assert _describe(torch.nn.ReLU(), torch.randn(4, 8)).endswith("float32")


def test_lookup_table_values_say_whether_they_were_predicted_or_checked(digits_task, tmp_path):
    teacher = digits_task.teacher()
    objective = LatencyObjective(repeats=5, table=LatencyTable(tmp_path / "t.json", bound=0.15,
                                                               check_first=2, check_every=10))  # fmt: skip
    objective.prepare(Candidate(digits_task, teacher, b""))

    def measure(number, errors):
        extra = {"trial": number, "latency_checks": errors}
        return objective.measure(Candidate(digits_task, teacher, b"", extra=extra))

    first = measure(0, [])
    assert first["latency_source"] == "measured" and "latency_check_error" in first
    trusted = measure(4, [0.05, 0.1])
    assert trusted["latency_source"] == "predicted"
    assert trusted["latency_table_error"] == pytest.approx(0.075)
    assert trusted["latency_ms"] == trusted["latency_predicted_ms"]
    checked = measure(9, [0.05, 0.1])
    assert checked["latency_source"] == "measured", "every check_every-th trial is measured"
    distrusted = measure(4, [0.3, 0.4, 0.01])
    assert distrusted["latency_source"] == "measured", "past the bound, every trial is measured"


def test_macs_proxy_counts_a_linear_exactly(digits_task):
    layer = torch.nn.Linear(10, 20)
    assert count_macs(layer, lambda m: m(torch.randn(3, 10))) == 3 * 10 * 20
    macs = MacsObjective().measure(Candidate(digits_task, digits_task.teacher(), b"",
                                             digits_task.teacher()))  # fmt: skip
    assert macs["macs"] > 0 and macs["bitops"] == macs["macs"] * 32 * 32
    assert MacsObjective.proxy and "proxy" in MacsObjective().describe()


@pytest.mark.parametrize(
    ("name", "value", "limit", "relative"),
    [("accuracy_drop", "3%", 0.03, True), ("accuracy_drop", 0.02, 0.02, False),
     ("latency_ms", "500 ms", 500.0, False), ("latency_ms", "0.5 s", 500.0, False),
     ("size_bytes", "2 GB", 2e9, False), ("size_bytes", "900 KB", 9e5, False),
     ("latency_ms", "0.5x", 0.5, True), ("size_bytes", "0.125X", 0.125, True)],
)  # fmt: skip
def test_constraints_parse_the_way_budgets_are_written(name, value, limit, relative):
    constraint = parse_constraint(name, value, f"constraints.{name}")
    assert constraint.limit == pytest.approx(limit) and constraint.relative == relative


def test_bad_constraints_say_what_was_expected():
    with pytest.raises(ConfigError, match="expected a size like"):
        parse_constraint("size_bytes", "two gigs", "constraints.size_bytes")
    with pytest.raises(ConfigError, match="unknown constraint 'speed'"):
        parse_constraint("speed", 1, "constraints.speed")


def test_constraint_values_are_feasible_at_or_below_zero():
    constraint = parse_constraint("accuracy_drop", "3%", "c")
    assert constraint.value({"accuracy_drop_rel": 0.01}, "accuracy") == pytest.approx(-0.02)


def test_relative_bounds_are_checked_on_the_ratio_to_the_teacher():
    latency = parse_constraint("latency_ms", "0.5x", "c")
    size = parse_constraint("size_bytes", "0.125x", "c")
    # 2.5x faster and 10x smaller than the teacher: both bounds met, whatever the absolute values
    measured = {"latency_ms": 400.0, "speedup": 2.5, "size_bytes": 1e5, "size_ratio": 10.0}
    assert latency.value(measured, "accuracy") == pytest.approx(0.4 - 0.5)
    assert size.value(measured, "accuracy") == pytest.approx(0.1 - 0.125)
    assert latency.value({**measured, "speedup": 1.6}, "accuracy") > 0
    teacher = {"latency_ms": 8.0, "size_bytes": 8e5}
    assert latency.absolute(teacher) == 4.0 and size.absolute(teacher) == 1e5
    assert size.describe() == "size <= 0.125x the teacher's"
    assert parse_constraint("size_bytes", "250 KB", "c").describe() == "size <= 250 KB"
    with pytest.raises(ConfigError, match="or a multiple of the teacher's latency like '0.5x'"):
        parse_constraint("latency_ms", "half", "c")
    with pytest.raises(ConfigError, match="positive multiple"):
        parse_constraint("latency_ms", "0x", "c")

"""Extension points: a new format, objective, sampler or driver is one new file (here: this one),
found through the registries without touching any other module."""

import json
import uuid

import optuna
import torch
from optuna.trial import TrialState
from test_search import load, tiny, write

from compsearch.cli import main
from compsearch.kernels.formats import WeightFormat
from compsearch.objectives import Objective
from compsearch.search import Driver, SearchSummary


class Ternary(WeightFormat):
    """A toy format: 2-bit ternary weights {-s, 0, +s}, one int8 code per weight."""

    name = "ternary"
    stored_suffix = "tern"

    def check(self, spec):
        return (
            None if spec.w_bits == 2 else f"expected w_bits 2 with ternary, but got {spec.w_bits}"
        )

    def max_level(self, spec):
        return 1.0

    def fake_quantize(self, blocks, scale, spec):
        stored = scale.to(torch.float16).to(blocks.dtype)  # scales are stored as float16
        rounded = torch.round((blocks / stored).clamp(-1, 1)) * stored
        return blocks + (rounded - blocks).detach()

    def pack(self, rows, scale, spec):
        stored = scale.to(torch.float16).float()
        codes = torch.round((rows.reshape(*scale.shape[:2], -1) / stored).clamp(-1, 1))
        return codes.to(torch.int8).reshape(rows.shape)

    def unpack(self, stored, scale, spec, rows_shape):
        scale3 = scale.float().unsqueeze(-1)
        return (stored.float().reshape(*scale3.shape[:2], -1) * scale3).reshape(rows_shape)


class ParamCount(Objective):
    """A toy objective: the compressed model's parameter count."""

    name = "param_count"
    direction = "minimize"
    unit = "parameters"

    def measure(self, candidate):
        model = candidate.student if candidate.student is not None else candidate.deployed
        return {self.name: float(sum(p.numel() for p in model.parameters()))}


def sampler_factory(config):
    return optuna.samplers.RandomSampler(seed=123)


class CountingDriver(Driver):
    """A toy driver: the Optuna driver's loop, counted."""

    runs = 0

    def run(self) -> SearchSummary:
        from compsearch.search.optuna_driver import OptunaDriver

        CountingDriver.runs += 1
        return OptunaDriver(self.config, self.folder).run()


def test_a_format_of_its_own_quantizes_packs_and_reloads_exactly(tmp_path, runs_root, digits_task):
    import compsearch
    from compsearch.kernels.packing import read_packed
    from compsearch.pipeline import compress
    from compsearch.recipes import LayerPlan, Recipe
    from compsearch.spaces import parse_space

    space = parse_space({"w_formats": ["int", "test_registries:Ternary"], "w_bits": [2, 8]})
    assert space.w_formats == ("int", "ternary"), "the config names it; it is registered"
    recipe = Recipe(layers={"fc1": LayerPlan(w_bits=2, w_format="ternary")})
    result = compress(digits_task, recipe, steps=0)
    weight = result.student.fc1.quantized_weight().detach()
    scale = weight.abs().amax(1, keepdim=True)
    assert torch.equal(torch.round(weight / scale).abs() <= 1, torch.ones_like(weight, dtype=bool))
    assert len(torch.unique(torch.round(weight / scale))) == 3, "three levels: -s, 0, +s"
    path = result.save(tmp_path / "m" / "model.safetensors")
    packed, _ = read_packed(path)
    assert packed.weights["fc1"].data.dtype == torch.int8
    assert torch.equal(packed.weights["fc1"].dequantize(), weight)
    assert result.deploy_report.kernels["fc1"] == "dequant"
    loaded = compsearch.load(path.parent, task="digits")
    batch = digits_task.calibration_batches(1)[0]
    with torch.no_grad():
        assert torch.equal(loaded(batch["images"]), result.deployed(batch["images"]))


def test_an_objective_sampler_and_driver_of_ones_own_run_a_study(tmp_path, runs_root):
    name = f"plug-{uuid.uuid4().hex[:6]}"
    data = tiny(name, trials=2, baselines=False, finetune_steps=2,
                sampler="test_registries:sampler_factory", driver="test_registries:CountingDriver")  # fmt: skip
    data["objectives"] = ["accuracy", "test_registries:ParamCount"]
    before = CountingDriver.runs
    assert main(["search", str(write(tmp_path, data))]) == 0
    assert CountingDriver.runs == before + 1
    trials = load(runs_root, name).get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    for trial in trials:
        assert trial.values[1] == trial.user_attrs["measured"]["param_count"] > 0
        assert 0 <= trial.user_attrs["measured"]["float_share"] <= 1
        metrics = json.loads((runs_root / name / "trials" / f"{trial.number:05d}" /
                              "metrics.json").read_text())  # fmt: skip
        assert isinstance(metrics["float_weights"], dict) and isinstance(metrics["unpruned"], dict)
        assert all(isinstance(reason, str) and reason for reason in metrics["unpruned"].values())
    assert main(["pareto", str(runs_root / name)]) == 0
    header = (runs_root / name / "pareto.csv").read_text().splitlines()[0]
    assert header.startswith("trial,accuracy,param_count") and "float_share" in header

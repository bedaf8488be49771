import dataclasses
import json
import math

import pytest
import torch
from torch.nn import functional as F

from compsearch.errors import KernelError, RecipeError, TrialError
from compsearch.kernels.distill import (
    FeatureProjections,
    attention_loss,
    feature_loss,
    kd_loss,
)
from compsearch.pipeline import compress, rebuild
from compsearch.recipes import (
    CalibrationPlan,
    DistillPlan,
    FinetuneBudget,
    LayerPlan,
    PrunePlan,
    Recipe,
)
from compsearch.tasks.teacher_outputs import CacheSpec, TeacherCache
from compsearch.train import Checkpointing


def test_kd_loss_is_a_kl_divergence_times_t_squared():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    t = 3.0
    p = F.softmax(teacher / t, -1)
    expected = (p * (p.log() - F.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    assert kd_loss(student, teacher, t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)
    article = (-p * torch.exp(F.log_softmax(student / t, -1))).mean()  # not a divergence
    assert article.item() < 0 < kd_loss(student, teacher, t).item()


def test_kd_loss_refuses_a_non_positive_temperature():
    with pytest.raises(KernelError, match="temperature: expected a number > 0"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)


def test_feature_loss_projects_a_narrower_student():
    projections = FeatureProjections()
    student = {"h": torch.randn(2, 5, 8)}
    teacher = {"h": torch.randn(2, 5, 16)}
    loss = feature_loss(student, teacher, projections)
    assert loss.item() > 0
    assert projections.maps["h"].in_features == 8 and projections.maps["h"].out_features == 16
    conv = feature_loss({"c": torch.randn(2, 4, 3, 3)}, {"c": torch.randn(2, 8, 3, 3)}, projections)
    assert conv.item() > 0 and isinstance(projections.maps["c"], torch.nn.Conv2d)


def test_attention_loss_is_zero_for_identical_maps_and_ignores_padding():
    maps = torch.softmax(torch.randn(2, 3, 4, 4), -1)
    assert attention_loss(maps, maps).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.softmax(torch.randn(2, 3, 4, 4), -1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    masked = maps.clone()
    masked[0, :, 2:] = other[0, :, 2:]  # padded queries differ
    assert attention_loss(masked, maps, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_loss(other, maps, mask).item() > 0


def _recipe(steps: int = 20, **changes) -> Recipe:
    recipe = Recipe(
        layers={"re:.*": LayerPlan(w_bits=4), "features.3": LayerPlan(keep_ratio=0.5)},
        distill=DistillPlan(alpha=0.7, temperature=2.0),
        finetune=FinetuneBudget(steps=steps, lr=3e-3),
        calibration=CalibrationPlan(batches=2),
    )
    return dataclasses.replace(recipe, **changes)


def test_teacher_cache_is_computed_once_and_shared(digits_task, tmp_path):
    spec = CacheSpec(batches=4, batch_size=32)
    cache = TeacherCache(digits_task, spec, tmp_path)
    compress(digits_task, _recipe(8), cache=cache)
    compress(digits_task, _recipe(8, finetune=FinetuneBudget(steps=8, lr=1e-3)), cache=cache)
    assert cache.teacher_runs == 4, "two trials, and the teacher ran once per cached batch"
    again = TeacherCache(digits_task, spec, tmp_path)
    again.get(0)
    assert again.teacher_runs == 0, "a second process reads the cache from disk"
    changed = TeacherCache(digits_task, dataclasses.replace(spec, seed=1), tmp_path)
    assert changed.key != cache.key, "other data, other cache"


def test_damaged_teacher_cache_is_recomputed(digits_task, tmp_path):
    spec = CacheSpec(batches=2, batch_size=16)
    cache = TeacherCache(digits_task, spec, tmp_path)
    batch, first = cache.get(1)
    cache.path.write_bytes(b"garbage")
    again = TeacherCache(digits_task, spec, tmp_path)
    _, second = again.get(1)
    assert again.teacher_runs == 2
    assert torch.equal(first.main, second.main)


def test_training_is_deterministic_on_cpu(digits_task):
    a = compress(digits_task, _recipe())
    b = compress(digits_task, _recipe())
    for (name, x), (_, y) in zip(
        a.student.state_dict().items(), b.student.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name


def _killed_at_step_9(task, recipe, directory) -> Checkpointing:
    """Run ``recipe`` with checkpoints every 4 steps and kill it at step 9."""

    class Killed(Exception):
        pass

    def kill_at_9(step, loss):
        if step == 9:
            raise Killed

    checkpoint = Checkpointing(directory, every=4)
    with pytest.raises(Killed):
        compress(task, recipe, progress=kill_at_9, checkpoint=checkpoint)
    return checkpoint


def test_resumed_run_ends_with_the_same_weights(digits_task, tmp_path):
    recipe = _recipe(12, prune=PrunePlan(steps=2))
    straight = compress(digits_task, recipe)
    checkpoint = _killed_at_step_9(digits_task, recipe, tmp_path / "ckpt")
    resumed = compress(digits_task, recipe, checkpoint=dataclasses.replace(checkpoint, resume=True))
    assert resumed.train.steps == 12
    for key, value in straight.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key


def test_a_kill_between_the_state_and_its_marker_still_resumes_exactly(digits_task, tmp_path):
    recipe = _recipe(12)
    straight = compress(digits_task, recipe)
    checkpoint = _killed_at_step_9(digits_task, recipe, tmp_path / "ckpt")
    markers = list((tmp_path / "ckpt").glob("**/train-state.json"))
    assert markers and all(json.loads(m.read_text())["step"] == 8 for m in markers)
    for marker in markers:  # the kill landed after the state's rename, before the marker's
        marker.write_text(json.dumps({"step": 4}))
    resumed = compress(digits_task, recipe, checkpoint=dataclasses.replace(checkpoint, resume=True))
    for key, value in straight.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key


def test_nan_loss_fails_the_trial_with_the_reason(digits_task, monkeypatch):
    from compsearch import train

    original = train.Distiller.loss
    calls = []

    def nan_from_the_third_step(self, student, index, device):
        calls.append(index)
        loss = original(self, student, index, device)
        return loss * math.nan if len(calls) >= 3 else loss

    monkeypatch.setattr(train.Distiller, "loss", nan_from_the_third_step)
    with pytest.raises(TrialError, match=r"the fine-tune loss became nan at step 3 of 20"):
        compress(digits_task, _recipe())


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        (
            {"distill": DistillPlan(feature_weight=-1.0)},
            RecipeError,
            "feature_weight: expected a number >= 0",
        ),
        (
            {"distill": DistillPlan(temperature=0.0)},
            RecipeError,
            "temperature: expected a number > 0",
        ),
        (
            {"distill": DistillPlan(alpha=-0.5)},
            RecipeError,
            "alpha: expected a number in [0.0, 1.0]",
        ),
        (
            {"distill": DistillPlan(feature_weight=1.0, feature_layers=("fc9",))},
            KernelError,
            "it has no 'fc9'",
        ),
    ],
)
def test_bad_distillation_settings_fail_before_training(digits_task, changes, error, message):
    cache = TeacherCache(digits_task, CacheSpec(batches=2, batch_size=16))
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        compress(digits_task, _recipe(**changes), cache=cache)
    assert cache.teacher_runs == 0


def test_quantize_first_and_progressive_pruning_are_options_of_one_path(digits_task):
    for changes in ({"order": "quantize_first"}, {"prune": PrunePlan(steps=3)}):
        result = compress(digits_task, _recipe(9, **changes))
        assert result.student.features[3].out_channels == 16
        assert result.train.steps == 9
        assert digits_task.evaluate(result.deployed)["accuracy"] > 0.8


def test_feature_and_attention_distillation_on_a_pruned_transformer(minilm_task):
    recipe = Recipe(
        layers={
            "encoder.layer.5.attention.self": LayerPlan(keep_ratio=0.5),
            "encoder.layer.5.intermediate.dense": LayerPlan(keep_ratio=0.5),
        },
        distill=DistillPlan(feature_weight=1.0, attn_weight=1.0),
        finetune=FinetuneBudget(steps=2, lr=1e-5),
        calibration=CalibrationPlan(batches=1),
    )
    result = compress(minilm_task, recipe)
    attention = result.student.encoder.layer[5].attention.self
    assert attention.query.out_features == 6 * 32  # 6 of 12 heads kept
    assert result.train.steps == 2 and all(math.isfinite(x) for x in result.train.losses)
    assert minilm_task.evaluate(result.deployed)["lee50_pearson"] > 0.5


def test_mnist_4_bit_half_width_recipe_recovers_within_1_5_points(mnist_task):
    from compsearch.kernels.prune import analyze

    example = mnist_task.calibration_batches(1)[0]
    groups = analyze(mnist_task.teacher(), lambda m: mnist_task.forward(m, example)).groups
    layers = {g.name: LayerPlan(keep_ratio=0.5) for g in groups.values() if g.prunable}
    layers["re:.*"] = LayerPlan(w_bits=4)
    recipe = Recipe(
        layers=layers,
        distill=DistillPlan(alpha=0.7, temperature=4.0),
        finetune=FinetuneBudget(steps=300, lr=5e-3),
    )
    result = compress(mnist_task, recipe)
    teacher = mnist_task.evaluate(mnist_task.teacher())["accuracy"]
    assert mnist_task.evaluate(result.deployed)["accuracy"] >= teacher - 0.015
    assert sum(p.numel() for p in result.student.parameters()) < 0.35 * sum(
        p.numel() for p in mnist_task.teacher().parameters()
    )


def test_saved_artifact_rebuilds_the_same_deploy_form(digits_task, tmp_path):
    result = compress(digits_task, _recipe(10, layers={
        "re:.*": LayerPlan(w_bits=4),
        "features.3": LayerPlan(keep_ratio=0.5),
        "fc1": LayerPlan(w_bits=8, a_bits=8),
    }))  # fmt: skip
    path = result.save(tmp_path / "model.safetensors")
    deployed, recipe, report = rebuild(digits_task, path)
    assert recipe == result.recipe
    batch = digits_task.calibration_batches(1)[0]
    with torch.no_grad():
        assert torch.equal(
            digits_task.forward(deployed, batch).logits,
            digits_task.forward(result.deployed, batch).logits,
        )
    assert report.kernels == result.deploy_report.kernels

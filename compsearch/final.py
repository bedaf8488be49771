"""The final run: a recipe trained with the full budget into the artifact that ships.

:func:`train_recipe` calls the same ``pipeline.compress`` as every search trial, with the full
budget, checkpoints every N steps (``resume`` continues exactly), and writes
``<final>/<name>/``: ``model.safetensors`` (packed weights, the recipe and the pruning record in its
metadata), ``recipe.yaml``, ``report.json`` and ``report.md`` — teacher and compressed model on the
same measurements, and whether each constraint is met. The files appear together at the end; a run
that fails leaves what was there before untouched.

:func:`load` rebuilds the architecture from an artifact (replaying pruning), loads the weights
strictly and returns the deploy form; :func:`evaluate` measures an artifact against its teacher.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from compsearch._files import publish_folder, recover_folder
from compsearch.errors import RecipeError, TaskError
from compsearch.kernels.deploy import to_deploy
from compsearch.kernels.quant import quant_bits
from compsearch.objectives import (
    Candidate,
    Constraint,
    MeasureSetup,
    build_objectives,
    float_artifact,
    objective_class,
)
from compsearch.objectives.constraints import format_bytes
from compsearch.paths import runs_root
from compsearch.pipeline import compress, rebuild
from compsearch.recipes import Recipe, dumps, read_recipe
from compsearch.sequential import compress_sequentially
from compsearch.tasks import BUILTINS, Task, get_task, move
from compsearch.train import Checkpointing, StepCallback

ARTIFACT = "model.safetensors"
RUNTIMES = {"onnxruntime": ", ONNX Runtime"}  # how the report names a latency's runtime


@dataclass
class FinalRun:
    path: Path
    measurements: Measurements
    deployed: nn.Module


@dataclass
class Measurements:
    """The same numbers for the teacher and for the compressed model."""

    teacher: dict[str, float]
    compressed: dict[str, float]
    constraints: dict[str, dict[str, object]]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def task_for(recipe: Recipe, task: str | None, trust_task: bool = False) -> Task:
    """The task to rebuild ``recipe``'s model with: ``task`` when given, else the one the recipe
    names. A name the recipe (a file) gives is only acted on when it is safe: a built-in task, or
    ``trust_task=True`` (the CLI sets it for the task of the user's own study in this runs root).
    Anything else — a ``module:factory`` or ``hf:`` name — would import code or fetch a model
    because a file said so, and is refused with the fix."""
    name = task or recipe.provenance.task
    if not name:
        raise TaskError(
            "expected the recipe's provenance to name its task, but it names none. Pass --task."
        )
    if task is None and not trust_task and name not in BUILTINS:
        raise TaskError(
            f"the recipe names the task {name!r}; loading it would import or fetch what a file "
            f"names, which compsearch does only when you say so. If you trust this file, pass "
            f"--task {name!r} or --trust-task (task= or trust_task=True in Python)."
        )
    return get_task(name, runs_root=runs_root())


def measure(
    task: Task,
    compressed: nn.Module,
    artifact: bytes,
    student: nn.Module | None,
    device: str = "cpu",
    constraints: tuple[Constraint, ...] = (),
    threads: int = 2,
    repeats: int = 20,
    objectives: tuple[str, ...] = (),
    runtime: str = "torch",
) -> Measurements:
    """Every objective — accuracy, latency, size, MACs and any named in ``objectives`` (built-in
    or ``module:Class``, as in a study config) — of the teacher's deploy form and of
    ``compressed``, alike.

    Accuracy is on the test split (the primary metric's own key); the validation split's values
    stand beside it with a ``_validation`` suffix. Constraints are checked on the test values.
    With ``runtime`` onnxruntime, latency is timed in ONNX Runtime sessions of both, and the test
    split's metrics from those sessions stand beside with an ``_onnxruntime`` suffix. Latency is
    timed interleaved (see :mod:`compsearch.objectives.latency`): the teacher's ``latency_ms`` is
    its median in those same runs, ``speedup`` the median pairwise ratio; ``latency_ms_alone``, the
    teacher timed alone before them."""
    teacher = task.teacher().to(device)
    example = move(task.calibration_batches(1)[0], device)
    shipped, _ = to_deploy(teacher, device, lambda m: task.forward(m, example))
    reference = Candidate(task, shipped, float_artifact(teacher), teacher)
    candidate = Candidate(task, compressed, artifact, student,
                          quant_bits(student) if student is not None else {})  # fmt: skip
    setup = MeasureSetup(task, device, threads, repeats=repeats, split="test", runtime=runtime)
    measured_by = build_objectives(objectives, setup)
    validation = objective_class("accuracy").build(dataclasses.replace(setup, split="validation"))
    teacher_values: dict[str, float | str] = {}
    compressed_values: dict[str, float | str] = {}
    for objective in (*measured_by.values(), validation):
        objective.prepare(reference)
        suffix = "_validation" if objective is validation else ""
        teacher_values.update(_suffixed(objective.measure(reference), suffix))
        compressed_values.update(_suffixed(objective.measure(candidate), suffix))
    latency = measured_by["latency_ms"]
    if runtime != "torch":
        for model, values in ((shipped, teacher_values), (compressed, compressed_values)):
            served = latency.served(model, task)
            values.update(_suffixed(task.evaluate(served, "test"), f"_{runtime}"))
    # the teacher's latency is its time in the same interleaved runs as the candidate's, so the two
    # times and the speed-up (the median of their pairwise ratios) describe one measurement; its
    # time alone, at the start, stays beside
    paired = compressed_values.get("teacher_latency_ms")
    teacher_values.update(latency_ms=float(paired) if paired else latency.teacher_ms,
                          latency_ms_alone=latency.teacher_ms, speedup=1.0,
                          params=float(sum(p.numel() for p in teacher.parameters())))  # fmt: skip
    met = {}
    for constraint in constraints:
        value = constraint.value(compressed_values, task.primary_metric)
        met[constraint.name] = {"limit": constraint.describe(), "excess": value, "met": value <= 0}
    return Measurements(teacher_values, compressed_values, met)


def _suffixed(values: dict[str, float | str], suffix: str) -> dict[str, float | str]:
    return {f"{key}{suffix}": value for key, value in values.items()}


def report_markdown(
    name: str, recipe: Recipe, m: Measurements, metric: str, left_float: dict[str, str] | None = None,
    float_share: float = 0.0,
) -> str:  # fmt: skip
    t, c = m.teacher, m.compressed
    valid = f"{metric}_validation"
    rows = [
        ("accuracy (test split)", metric, f"{t[metric]:.4f}", f"{c[metric]:.4f}",
         f"drop {c.get(metric + '_drop', 0.0):+.4f}"),
        ("accuracy (validation split)", metric, f"{t[valid]:.4f}", f"{c[valid]:.4f}",
         f"drop {c.get(metric + '_drop_validation', 0.0):+.4f}"),
        ("size (file)", "KB/MB", format_bytes(t["size_bytes"]), format_bytes(c["size_bytes"]),
         f"{t['size_bytes'] / c['size_bytes']:.2f}× smaller"),
        (f"latency (measured{RUNTIMES.get(c.get('latency_runtime'), '')})", "ms",
         f"{t['latency_ms']:.3f}", f"{c['latency_ms']:.3f}"
         + (f" ±{c['latency_ci'] * 100:.0f}%" if math.isfinite(c.get("latency_ci", math.inf))
            else ""),
         f"{c['speedup']:.2f}× faster (timed side by side)"),
    ]  # fmt: skip
    lines = [
        f"# {name}",
        "",
        f"Task `{recipe.provenance.task}`; study `{recipe.provenance.study}`, trial "
        f"{recipe.provenance.trial}; fine-tuned {recipe.finetune.steps} steps. The search chose "
        "this recipe on the validation split; the test split was used for nothing but this report.",
        "",
        "| measurement | unit | teacher | compressed | change |",
        "|---|---|---|---|---|",
        *[f"| {a} | {b} | {x} | {y} | {z} |" for a, b, x, y, z in rows],
        "",
    ]
    others = sorted(k for k in t if k not in (metric, valid) and "nll" not in k and k in c
                    and isinstance(t[k], float)
                    and not k.startswith(("size", "latency", "speedup", "params")))  # fmt: skip
    for other in others:
        lines.append(f"- {other}: teacher {t[other]:.4f}, compressed {c[other]:.4f}")
    if left_float:
        lines += ["", float_summary(left_float, float_share)]
    if m.constraints:
        lines += ["", "| constraint (test split) | met |", "|---|---|"]
        lines += [
            f"| {v['limit']} | {'yes' if v['met'] else 'no'} |" for v in m.constraints.values()
        ]
    return "\n".join(lines) + "\n"


def float_summary(left_float: dict[str, str], share: float) -> str:
    """One line: the share of the weights kept in float, and why, by reason."""
    reasons: dict[str, int] = {}
    for reason in left_float.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    parts = "; ".join(f"{count} {'tensor' if count == 1 else 'tensors'}: {reason}"
                      for reason, count in sorted(reasons.items(), key=lambda r: -r[1]))  # fmt: skip
    return f"Weights kept in float: {share:.1%} of the weight elements ({parts})."


def final_dir(recipe: Recipe, name: str) -> Path:
    study = recipe.provenance.study
    if study and (runs_root() / study / "config.yaml").exists():
        return runs_root() / study / "final" / name
    return runs_root() / "final" / name


def train_recipe(
    recipe_path: str | Path,
    steps: int | None = None,
    epochs: float | None = None,
    name: str | None = None,
    resume: bool = False,
    task: str | None = None,
    checkpoint_every: int = 100,
    progress: StepCallback | None = None,
    trust_task: bool = False,
    bounds: tuple[Constraint, ...] = (),
    device: str = "cpu",
    threads: int = 2,
    runtime: str = "torch",
    one_block_at_a_time: bool = False,
) -> FinalRun:
    """Train the recipe at ``recipe_path`` and write its artifact: its folder, report, deploy form.
    ``task``/``trust_task``: see :func:`task_for`. The report checks ``bounds`` and measures on
    ``device`` with ``threads`` CPU threads (the CLI passes the recipe's study settings).
    ``one_block_at_a_time``: a calibration-only recipe is calibrated from the weight file one
    block at a time (``compsearch.sequential``; the same artifact, a fraction of the memory), then
    measured from the artifact."""
    recipe = read_recipe(recipe_path)
    the_task = task_for(recipe, task, trust_task)
    if epochs is not None:
        examples = the_task.num_train_examples()
        if not examples:
            raise TaskError(
                f"task {the_task.name!r} cannot count its training examples; use --steps."
            )
        batch = recipe.finetune.batch_size or the_task.default_batch_size
        steps = max(1, round(epochs * examples / batch))
    steps = recipe.finetune.steps if steps is None else steps
    recipe = dataclasses.replace(recipe, finetune=dataclasses.replace(recipe.finetune, steps=steps))
    name = name or Path(recipe_path).stem
    target = final_dir(recipe, name)
    recover_folder(target)  # a publish a kill interrupted is finished first
    for leftover in target.parent.glob(f".{name}.staging-*"):  # the staging folder of a killed run
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=target.parent if target.parent.exists()
                                    else _mkdir(target.parent)))  # fmt: skip
    try:
        if one_block_at_a_time:
            made = compress_sequentially(the_task, recipe, staging / ARTIFACT, device)
            deployed, _, deploy_report = rebuild(the_task, made.path, device)
            artifact, student, quant, train = made.path.read_bytes(), None, made.quant_report, None
        else:
            checkpoint = Checkpointing(
                target / "checkpoints", every=checkpoint_every, resume=resume
            )
            result = compress(the_task, recipe, steps, device, progress=progress,
                              checkpoint=checkpoint)  # fmt: skip
            deployed, deploy_report = result.deployed, result.deploy_report
            artifact, student = result.artifact_bytes(), result.student
            quant, train = result.quant_report, result.train
            (staging / ARTIFACT).write_bytes(artifact)
        measured = measure(the_task, deployed, artifact, student, device, bounds, threads,
                           runtime=runtime)  # fmt: skip
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (staging / "recipe.yaml").write_text(dumps(recipe))
    (staging / "report.json").write_text(json.dumps({
        "name": name, "recipe": str(recipe_path), "steps": train.steps if train else 0,
        "final_loss": train.final_loss if train else None, "kernels": deploy_report.kernels,
        "float_weights": {"share": quant.float_share, "tensors": quant.left_float},
        **measured.to_dict()}, indent=2, sort_keys=True))  # fmt: skip
    (staging / "report.md").write_text(
        report_markdown(
            name, recipe, measured, the_task.primary_metric, quant.left_float, quant.float_share
        )
    )
    _publish(staging, target)
    return FinalRun(target, measured, deployed)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _publish(staging: Path, target: Path) -> None:
    """The staged folder becomes ``target`` in one rename (its checkpoints carried over): a kill at
    any point leaves the old files or the new ones, never a mix."""
    publish_folder(staging, target, keep=("checkpoints",))


def resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.name != ARTIFACT:
        recover_folder(path)
    if path.is_dir():
        path = path / ARTIFACT
    if not path.is_file():
        raise RecipeError(
            f"expected a compsearch artifact ({ARTIFACT}, or its folder), but {str(path)!r} does "
            "not exist."
        )
    return path


def load(
    path: str | Path, task: str | None = None, device: str = "cpu", trust_task: bool = False
) -> nn.Module:
    """The deploy-form model stored at ``path`` (an artifact or its folder); ``task`` and
    ``trust_task`` as in :func:`task_for`."""
    artifact = resolve(path)
    deployed, _, _ = rebuild(
        task_for(artifact_recipe(artifact), task, trust_task), artifact, device
    )
    return deployed


def artifact_recipe(path: str | Path) -> Recipe:
    """The recipe an artifact carries in its metadata."""
    from compsearch.kernels.packing import read_packed
    from compsearch.recipes import loads

    artifact = resolve(path)
    _, metadata = read_packed(artifact)
    return loads(metadata.get("compsearch.recipe", ""), source=f"{artifact} (metadata)")


def evaluate(
    path: str | Path,
    task: str | None = None,
    device: str = "cpu",
    trust_task: bool = False,
    bounds: tuple[Constraint, ...] = (),
    threads: int = 2,
    runtime: str = "torch",
) -> Measurements:
    """Re-measure an artifact and its teacher on the same measurements (test split, validation
    beside it), checking ``bounds``; ``task`` and ``trust_task`` as in :func:`task_for`."""
    artifact = resolve(path)
    the_task = task_for(artifact_recipe(artifact), task, trust_task)
    deployed, _, _ = rebuild(the_task, artifact, device)
    return measure(
        the_task, deployed, artifact.read_bytes(), None, device, bounds, threads, runtime=runtime
    )


def best_of(reports: dict[str, Measurements], metric: str, direction: str) -> str:
    """Which trained recipe is best: feasible first, then the primary metric, then latency."""
    sign = 1 if direction == "maximize" else -1

    def key(name: str):
        m = reports[name]
        feasible = all(v["met"] for v in m.constraints.values())
        return (feasible, sign * m.compressed[metric], -m.compressed["latency_ms"])

    return max(reports, key=key)

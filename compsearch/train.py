"""The shared training loop: distillation fine-tuning for a trial and for the final run alike.

AdamW with linear warm-up and cosine decay, gradient clipping, bf16 autocast on CUDA, a fixed seed
(identical results on the CPU), a progress callback, and checkpoints that continue exactly: a run
resumed from step k ends with the same weights as one that was never interrupted. A loss that
becomes NaN or infinite stops the run with a TrialError that says when and how.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from compsearch._files import write_text_atomic
from compsearch.errors import TrialError
from compsearch.kernels.distill import (
    FeatureProjections,
    attention_loss,
    capture_features,
    eager_attention,
    feature_loss,
    output_loss,
)
from compsearch.recipes.schema import DistillPlan, FinetuneBudget
from compsearch.tasks.base import Task
from compsearch.tasks.teacher_outputs import TeacherCache, TeacherStream

StepCallback = Callable[[int, float], None]  # (step, loss) after each fine-tune step


@dataclass
class Distiller:
    """Everything the loss needs besides the student: the task, the cached teacher, the weights."""

    task: Task
    cache: TeacherCache | TeacherStream
    plan: DistillPlan
    feature_layers: list[str] = field(default_factory=list)
    head_index: torch.Tensor | None = None  # teacher heads the student's last attention kept
    projections: FeatureProjections = field(default_factory=FeatureProjections)

    @property
    def wants_attention(self) -> bool:
        return self.plan.attn_weight > 0

    def loss(self, student: nn.Module, step_index: int, device) -> torch.Tensor:
        batch, teacher = self.cache.get(step_index, device)
        with capture_features(student, self.feature_layers) as found:
            outputs = self.task.forward(student, batch, attentions=self.wants_attention)
        plan = self.plan
        main = output_loss(outputs, teacher.outputs(), plan.temperature)
        supervised = self.task.task_loss(outputs, batch)
        total = main if supervised is None else plan.alpha * main + (1 - plan.alpha) * supervised
        if plan.feature_weight > 0 and self.feature_layers:
            total = total + plan.feature_weight * feature_loss(
                found, teacher.features, self.projections
            )
        if self.wants_attention:
            student_map = outputs.attentions[-1]
            teacher_map = teacher.attention
            if self.head_index is not None:
                teacher_map = teacher_map.index_select(1, self.head_index.to(teacher_map.device))
            mask = batch.get("attention_mask")
            total = total + plan.attn_weight * attention_loss(student_map, teacher_map, mask)
        return total


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    seconds: float

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


@dataclass
class Checkpointing:
    """Where and how often to save the training state; ``resume`` continues from the last save.
    ``on_save(directory, step)`` runs after each save (a driver can hand the files on)."""

    directory: Path
    every: int = 50
    resume: bool = False
    on_save: Callable[[Path, int], None] | None = None


def schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def finetune(
    student: nn.Module,
    distiller: Distiller,
    budget: FinetuneBudget,
    device: torch.device | str = "cpu",
    steps: int | None = None,
    progress: StepCallback | None = None,
    checkpoint: Checkpointing | None = None,
) -> TrainResult:
    """Train ``student`` for ``steps`` (default ``budget.steps``) optimizer steps by distillation."""
    total = budget.steps if steps is None else steps
    started = time.perf_counter()
    if total <= 0:
        return TrainResult(0, [], 0.0)
    device = torch.device(device)
    torch.manual_seed(budget.seed)
    student.to(device).train()
    _create_projections(student, distiller, device)
    frozen = set()
    if not budget.train_embeddings:
        frozen = {id(m.weight) for m in student.modules() if isinstance(m, nn.Embedding)}
    params = [p for p in student.parameters() if p.requires_grad and id(p) not in frozen]
    for param in student.parameters():
        if id(param) in frozen:
            param.requires_grad_(False)
    params += list(distiller.projections.parameters())
    optimizer = torch.optim.AdamW(params, lr=budget.lr, weight_decay=budget.weight_decay)
    warmup = int(budget.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, total, warmup))
    losses: list[float] = []
    step = 0
    if checkpoint and checkpoint.resume:
        step = _load_state(checkpoint.directory, student, distiller, optimizer, scheduler, losses)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    context = eager_attention(student) if distiller.wants_attention else _null()
    with context:
        while step < total:
            index = distiller.cache.index(step, budget.seed)
            with autocast:
                loss = distiller.loss(student, index, device)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrialError(
                    f"the fine-tune loss became {value} at step {step + 1} of {total} "
                    f"(learning rate {scheduler.get_last_lr()[0]:.2e}); lower finetune.lr or "
                    "raise the bit widths."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, budget.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(value)
            if progress is not None:
                progress(step, value)
            if checkpoint and (step % checkpoint.every == 0 or step == total):
                _save_state(
                    checkpoint.directory, student, distiller, optimizer, scheduler, losses, step
                )
                if checkpoint.on_save is not None:
                    checkpoint.on_save(checkpoint.directory, step)
    student.eval()
    return TrainResult(step, losses, time.perf_counter() - started)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def _create_projections(student: nn.Module, distiller: Distiller, device) -> None:
    """Make the feature projections now, so the optimizer owns them from the first step."""
    if distiller.plan.feature_weight <= 0 or not distiller.feature_layers:
        return
    batch, teacher = distiller.cache.get(0, device)
    with capture_features(student, distiller.feature_layers) as found:
        distiller.task.forward(student, batch)
    for name in distiller.feature_layers:
        distiller.projections(name, found[name], teacher.features[name])
    distiller.projections.to(device)


# -- checkpoints: tensors in safetensors, the rest in JSON (no pickles) ------------------------------

STATE_FILE, META_FILE = "train-state.safetensors", "train-state.json"
META_KEY = "compsearch.train_state"


def _save_state(directory: Path, student, distiller, optimizer, scheduler, losses, step) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in student.state_dict().items()}
    tensors.update(
        {
            f"proj.{k}": v.detach().contiguous().cpu()
            for k, v in distiller.projections.state_dict().items()
        }
    )
    state = optimizer.state_dict()
    scalars: dict[str, dict[str, float]] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {
        "step": step,
        "losses": losses,
        "param_groups": state["param_groups"],
        "scalars": scalars,
        "scheduler": scheduler.state_dict()["last_epoch"],
    }
    # the metadata rides in the safetensors header, so tensors and step change in one atomic rename;
    # the JSON beside it is a readable marker of the last save (drivers read its step)
    temp = directory / f".{STATE_FILE}.tmp"
    save_file(_unshare(tensors), str(temp), metadata={META_KEY: json.dumps(meta)})
    temp.replace(directory / STATE_FILE)
    write_text_atomic(directory / META_FILE, json.dumps({"step": step}))


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        pointer = value.untyped_storage().data_ptr()
        out[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    return out


def _load_state(directory: Path, student, distiller, optimizer, scheduler, losses) -> int:
    state_path = directory / STATE_FILE
    if not state_path.exists():
        return 0
    tensors = load_file(str(state_path))
    with safe_open(str(state_path), framework="pt") as handle:
        header = handle.metadata() or {}
    if META_KEY not in header:
        raise TrialError(
            f"the checkpoint {state_path} has no training state in its header (expected the "
            f"'{META_KEY}' entry that compsearch writes). Delete {directory} to train from the start."
        )
    meta = json.loads(header[META_KEY])
    student.load_state_dict(
        {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True
    )
    distiller.projections.load_state_dict(
        {k[5:]: v for k, v in tensors.items() if k.startswith("proj.")}, strict=True
    )
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    for index, entries in meta["scalars"].items():
        opt_state.setdefault(int(index), {}).update(entries)
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    scheduler.last_epoch = meta["scheduler"]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    losses.extend(meta["losses"])
    return int(meta["step"])

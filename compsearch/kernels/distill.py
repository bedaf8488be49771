"""Distillation: losses, feature capture, and the teacher-output cache.

Losses (weighted by the recipe's DistillPlan):

* output — for logits, KL(teacher_T ‖ student_T) · T² with temperature T (Hinton et al.; over a
  large vocabulary, on the teacher's top 64 logits, renormalized); for an embedding model, the
  cosine distance between student and teacher embeddings;
* feature — MSE between hidden states of named layers, through a learned projection where pruning
  made the student narrower than the teacher;
* attention — KL between the teacher's and the student's attention maps of the last attention layer,
  on the heads the student kept;
* task — the task's own loss on labels, mixed as ``alpha · output + (1 − alpha) · task``.

The teacher's outputs come to the losses as :class:`TeacherOutputs`; where they are computed and
cached (once per study, on disk) is :mod:`compsearch.tasks.teacher_outputs`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from compsearch.errors import KernelError
from compsearch.tasks.base import Outputs

# -- losses ----------------------------------------------------------------------------------------


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher_T ‖ student_T) · T², averaged over examples (and tokens for sequence logits)."""
    if temperature <= 0:
        raise KernelError(f"temperature: expected a number > 0, but got {temperature!r}.")
    s = F.log_softmax(student.float().reshape(-1, student.shape[-1]) / temperature, dim=-1)
    t = F.log_softmax(teacher.float().reshape(-1, teacher.shape[-1]) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance between embeddings."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def sparse_kd_loss(
    student: torch.Tensor, top_logits: torch.Tensor, indices: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL between the teacher's distribution renormalized over its top entries and the student's
    probabilities of those entries (a large vocabulary's logits are cached as their top k), · T²."""
    vocab = student.shape[-1]
    s = F.log_softmax(student.float().reshape(-1, vocab) / temperature, dim=-1)
    chosen = s.gather(-1, indices.reshape(-1, indices.shape[-1]).long())
    t = F.log_softmax(top_logits.float().reshape(-1, top_logits.shape[-1]) / temperature, dim=-1)
    return (t.exp() * (t - chosen)).sum(-1).mean() * temperature**2


def output_loss(student: Outputs, teacher: Outputs, temperature: float) -> torch.Tensor:
    if teacher.logit_indices is not None:
        return sparse_kd_loss(student.logits, teacher.logits, teacher.logit_indices, temperature)
    if teacher.logits is not None:
        return kd_loss(student.logits, teacher.logits, temperature)
    return embedding_loss(student.embedding, teacher.embedding)


def attention_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(teacher ‖ student) between attention maps ``(batch, heads, queries, keys)``, averaged
    over heads and the queries ``mask`` marks as real tokens."""
    t = teacher.float().clamp(min=1e-8)
    s = student.float().clamp(min=1e-8)
    per_query = (t * (t.log() - s.log())).sum(-1).mean(1)  # (batch, queries)
    if mask is None:
        return per_query.mean()
    weights = mask.to(per_query.dtype)
    return (per_query * weights).sum() / weights.sum().clamp(min=1.0)


class FeatureProjections(nn.Module):
    """Learned maps from a pruned student's feature width to the teacher's, created on first use."""

    def __init__(self) -> None:
        super().__init__()
        self.maps = nn.ModuleDict()

    def forward(self, name: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.shape == teacher.shape:
            return student
        channel = 1 if student.dim() == 4 else -1
        key = name.replace(".", "__")
        if key not in self.maps:
            source, target = student.shape[channel], teacher.shape[channel]
            layer = nn.Conv2d(source, target, 1) if channel == 1 else nn.Linear(source, target)
            self.maps[key] = layer.to(student.device)
        return self.maps[key](student.float())


def feature_loss(
    student: dict[str, torch.Tensor],
    teacher: dict[str, torch.Tensor],
    projections: FeatureProjections,
) -> torch.Tensor:
    losses = [
        F.mse_loss(projections(name, student[name], teacher[name]).float(), teacher[name].float())
        for name in teacher
    ]
    return torch.stack(losses).mean()


# -- capturing features ----------------------------------------------------------------------------


@contextlib.contextmanager
def capture_features(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``found[name]`` holds the latest output of each named module."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KernelError(
            f"feature layer {missing[0]!r}: expected a module name of the model, but there is none. "
            f"Names look like {', '.join(repr(n) for n in list(modules)[1:5])}."
        )
    found: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(module, args, output, name=name):
            found[name] = output[0] if isinstance(output, (tuple, list)) else output

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Hugging Face models return attention maps only with eager attention; switch for the block."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if previous in (None, "eager") or setter is None:
        yield
        return
    setter("eager")
    try:
        yield
    finally:
        setter(previous)


# -- what the losses read of the teacher ----------------------------------------------------------


@dataclass
class TeacherOutputs:
    main: torch.Tensor
    kind: str  # "logits" or "embedding"
    features: dict[str, torch.Tensor]
    attention: torch.Tensor | None
    indices: torch.Tensor | None = None  # set when ``main`` holds only the top logits

    def outputs(self) -> Outputs:
        if self.kind == "logits":
            return Outputs(logits=self.main, logit_indices=self.indices)
        return Outputs(embedding=self.main)
